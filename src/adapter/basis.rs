//! LiDB basis v1 (DESIGN.md section 4): the fixed random orthonormal factors `D_aux [a, in]`
//! and `U_aux [out, b]` of one layer, bit-reproducible from (basis_seed, layer key).

use crate::error::{Error, Result};
use crate::rng::{fnv1a64, normals, SplitMix64};

/// One layer's basis.
#[derive(Clone, Debug, PartialEq)]
pub struct Basis {
    /// [a, in], orthonormal rows.
    pub d_aux: Vec<f32>,
    /// [out, b], orthonormal columns.
    pub u_aux: Vec<f32>,
}

/// Modified Gram-Schmidt on the rows of `m` [rows, cols], in place.
fn orthonormalize_rows(m: &mut [f64], rows: usize, cols: usize) {
    for i in 0..rows {
        let (done, rest) = m.split_at_mut(i * cols);
        let row = &mut rest[..cols];
        for j in 0..i {
            let prev = &done[j * cols..(j + 1) * cols];
            let dot: f64 = row.iter().zip(prev).map(|(a, b)| a * b).sum();
            row.iter_mut().zip(prev).for_each(|(a, b)| *a -= dot * b);
        }
        let norm = row.iter().map(|x| x * x).sum::<f64>().sqrt();
        row.iter_mut().for_each(|x| *x /= norm);
    }
}

/// The basis of layer `key` (e.g. `unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`)
/// with weight `[out, in]`. Requires `1 <= a <= in`, `1 <= b <= out`.
pub fn basis(key: &str, seed: u64, a: usize, b: usize, din: usize, dout: usize) -> Result<Basis> {
    if a == 0 || b == 0 || a > din || b > dout {
        return Err(Error::AdapterMismatch(format!(
            "layer '{key}' is [{dout}, {din}]; LiDB needs 1 <= a <= {din} and 1 <= b <= {dout}, got a = {a}, b = {b}"
        )));
    }
    let seed_k = SplitMix64(seed ^ fnv1a64(key)).next_u64();
    let mut rng = SplitMix64(seed_k);
    let z = normals(&mut rng, a * din + b * dout);
    let (mut d, mut ut) = (z[..a * din].to_vec(), z[a * din..].to_vec());
    for _ in 0..2 {
        orthonormalize_rows(&mut d, a, din);
        orthonormalize_rows(&mut ut, b, dout);
    }
    let mut u_aux = vec![0f32; dout * b];
    for i in 0..b {
        for o in 0..dout {
            u_aux[o * b + i] = ut[i * dout + o] as f32;
        }
    }
    Ok(Basis {
        d_aux: d.into_iter().map(|x| x as f32).collect(),
        u_aux,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_orthonormal_and_reproducible() {
        let b1 = basis("unet.x.attn1.to_q", 42, 5, 3, 16, 12).expect("basis");
        let b2 = basis("unet.x.attn1.to_q", 42, 5, 3, 16, 12).expect("basis");
        assert_eq!(b1, b2);
        for i in 0..5 {
            for j in 0..5 {
                let dot: f32 = (0..16)
                    .map(|c| b1.d_aux[i * 16 + c] * b1.d_aux[j * 16 + c])
                    .sum();
                assert!(
                    (dot - if i == j { 1.0 } else { 0.0 }).abs() < 1e-6,
                    "d_aux rows {i},{j}: {dot}"
                );
            }
        }
        for i in 0..3 {
            for j in 0..3 {
                let dot: f32 = (0..12)
                    .map(|o| b1.u_aux[o * 3 + i] * b1.u_aux[o * 3 + j])
                    .sum();
                assert!(
                    (dot - if i == j { 1.0 } else { 0.0 }).abs() < 1e-6,
                    "u_aux cols {i},{j}: {dot}"
                );
            }
        }
        let other = basis("unet.x.attn1.to_k", 42, 5, 3, 16, 12).expect("basis");
        assert_ne!(b1.d_aux, other.d_aux, "each key has its own stream");
    }

    #[test]
    fn a_larger_than_the_layer_is_a_mismatch_naming_it() {
        let e = basis("unet.k", 1, 17, 3, 16, 12).expect_err("a > in");
        assert!(e.to_string().contains("'unet.k'"), "{e}");
    }
}
