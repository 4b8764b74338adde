//! Multi-head scaled dot-product attention, flash style.
//!
//! Each task owns one (batch, head, query tile) and walks the keys in tiles: S = scale ·
//! Q_t K_t^T (gemm, reading the head's columns in place through strides), an online softmax
//! (running max and sum; the accumulator is rescaled when the max grows), then O += P V_t
//! (gemm). Memory per worker is one [tq, tk] score tile plus a [tq, d] accumulator, never an
//! lq x lk matrix.

use super::linear::{gemm_raw, Mat};
use super::{extent, simd, SendPtr};
use gemm::Parallelism;
use rayon::prelude::*;

/// Largest query tile (rows of Q per task). Measured on SD shapes (2 threads, AVX-512):
/// 256 x 512 tiles beat 128 x 256 by 10-15%; larger tiles gain nothing.
const TQ: usize = 256;
/// Key tile (columns of the score tile): 512 KB of scores with TQ. Fixed, so results do not
/// depend on the thread count.
const TK: usize = 512;
/// Aim for at least this many tasks per thread, shrinking the query tile when needed.
const TASKS_PER_THREAD: usize = 4;

/// Query rows per task: up to `TQ`, smaller when there would be too few tasks to keep the
/// pool's threads busy; a multiple of 16 where it can be.
fn query_tile(bh: usize, lq: usize, threads: usize) -> usize {
    let want_tiles = (TASKS_PER_THREAD * threads).div_ceil(bh.max(1)).max(1);
    let tq = lq.div_ceil(want_tiles).div_ceil(16) * 16;
    tq.clamp(16, TQ).min(lq.max(1))
}

/// out = softmax(q k^T / sqrt(head_dim)) v for each (batch, head).
///
/// q, out: [batch, lq, heads * head_dim]; k, v: [batch, lk, heads * head_dim]; head h owns
/// columns h*head_dim..(h+1)*head_dim of the last dim.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    out: &mut [f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    batch: usize,
    lq: usize,
    lk: usize,
    heads: usize,
    head_dim: usize,
) {
    let hd = extent("attention", &[heads, head_dim]);
    assert_eq!(
        q.len(),
        extent("attention", &[batch, lq, hd]),
        "attention: q"
    );
    assert_eq!(out.len(), q.len(), "attention: out");
    assert_eq!(
        k.len(),
        extent("attention", &[batch, lk, hd]),
        "attention: k"
    );
    assert_eq!(v.len(), k.len(), "attention: v");
    if out.is_empty() {
        return;
    }
    assert!(lk > 0, "attention: no keys");
    #[cfg(all(target_arch = "x86_64", feature = "avx512"))]
    if super::attn512::fits(head_dim) {
        return super::attn512::attention(out, q, k, v, batch, lq, lk, heads, head_dim);
    }
    let d = head_dim;
    let scale = 1.0 / (d as f32).sqrt();
    let threads = rayon::current_num_threads();
    let bh = batch * heads;
    let tq = query_tile(bh, lq, threads);
    let tk = TK.min(lk);
    let nqt = lq.div_ceil(tq);
    let tasks = bh * nqt;
    let outp = SendPtr(out.as_mut_ptr());

    // Per worker: score tile [tq, tk], accumulator [tq, d], running max and sum [tq].
    let scratch_len = tq * tk + tq * d + 2 * tq;
    let run_task = |buf: &mut [f32], t: usize| {
        let (s_buf, rest) = buf.split_at_mut(tq * tk);
        let (o_buf, rest) = rest.split_at_mut(tq * d);
        let (m_buf, l_buf) = rest.split_at_mut(tq);
        let (bhi, qt) = (t / nqt, t % nqt);
        let (b, h) = (bhi / heads, bhi % heads);
        let q0 = qt * tq;
        let mq = tq.min(lq - q0);
        let qm = Mat::new(&q[(b * lq + q0) * hd + h * d..], hd, 1);
        let head_kv = (b * lk) * hd + h * d;
        let (m, l, o) = (&mut m_buf[..mq], &mut l_buf[..mq], &mut o_buf[..mq * d]);
        m.fill(f32::NEG_INFINITY);
        let mut k0 = 0;
        while k0 < lk {
            let nk = tk.min(lk - k0);
            let s = &mut s_buf[..mq * nk];
            let kt = Mat::new(&k[head_kv + k0 * hd..], 1, hd);
            // SAFETY: s is mq x nk; Q rows q0..q0+mq and K rows k0..k0+nk of this head are in
            // bounds (checked lengths; d columns from h*d).
            unsafe {
                gemm_raw(
                    s.as_mut_ptr(),
                    nk,
                    qm,
                    kt,
                    mq,
                    d,
                    nk,
                    false,
                    scale,
                    Parallelism::None,
                )
            };
            simd::online_softmax_tile(s, nk, m, l, o, d, k0 == 0);
            let pm = Mat::new(s, nk, 1);
            let vt = Mat::new(&v[head_kv + k0 * hd..], hd, 1);
            // SAFETY: o is mq x d, P mq x nk, V rows k0..k0+nk of this head.
            unsafe {
                gemm_raw(
                    o.as_mut_ptr(),
                    d,
                    pm,
                    vt,
                    mq,
                    nk,
                    d,
                    k0 > 0,
                    1.0,
                    Parallelism::None,
                )
            };
            k0 += nk;
        }
        simd::divide_rows(o, l, d);
        for (i, row) in o.chunks_exact(d).enumerate() {
            // SAFETY: row q0+i, columns h*d..h*d+d of batch b: in bounds, and no other task
            // writes them (tasks partition (batch, head, query rows)).
            unsafe {
                let dst = outp.get().add((b * lq + q0 + i) * hd + h * d);
                std::ptr::copy_nonoverlapping(row.as_ptr(), dst, d);
            }
        }
    };

    if threads == 1 || tasks == 1 {
        let mut buf = vec![0f32; scratch_len];
        (0..tasks).for_each(|t| run_task(&mut buf, t));
    } else {
        (0..tasks)
            .into_par_iter()
            .for_each_init(|| vec![0f32; scratch_len], |buf, t| run_task(buf, t));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::testutil::{assert_close, fixture, fixtures, rand_vec, TORCH_TOL};

    #[allow(clippy::too_many_arguments)]
    fn attention_ref(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        batch: usize,
        lq: usize,
        lk: usize,
        heads: usize,
        d: usize,
    ) -> Vec<f32> {
        let hd = heads * d;
        let scale = 1.0 / (d as f64).sqrt();
        let mut out = vec![0f32; batch * lq * hd];
        let mut s = vec![0f64; lk];
        for b in 0..batch {
            for h in 0..heads {
                for i in 0..lq {
                    let qi = &q[(b * lq + i) * hd + h * d..][..d];
                    for (j, sj) in s.iter_mut().enumerate() {
                        let kj = &k[(b * lk + j) * hd + h * d..][..d];
                        *sj = qi
                            .iter()
                            .zip(kj)
                            .map(|(&a, &c)| a as f64 * c as f64)
                            .sum::<f64>()
                            * scale;
                    }
                    let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let sum: f64 = s.iter().map(|&x| (x - mx).exp()).sum();
                    for c in 0..d {
                        let mut acc = 0f64;
                        for j in 0..lk {
                            acc += (s[j] - mx).exp() * v[(b * lk + j) * hd + h * d + c] as f64;
                        }
                        out[(b * lq + i) * hd + h * d + c] = (acc / sum) as f32;
                    }
                }
            }
        }
        out
    }

    #[allow(clippy::too_many_arguments)]
    fn check(batch: usize, lq: usize, lk: usize, heads: usize, d: usize, amp: f32) {
        let hd = heads * d;
        let q: Vec<f32> = rand_vec(batch * lq * hd, 40)
            .iter()
            .map(|x| x * amp)
            .collect();
        let k: Vec<f32> = rand_vec(batch * lk * hd, 41)
            .iter()
            .map(|x| x * amp)
            .collect();
        let v = rand_vec(batch * lk * hd, 42);
        let mut out = vec![f32::NAN; q.len()];
        attention(&mut out, &q, &k, &v, batch, lq, lk, heads, d);
        let want = attention_ref(&q, &k, &v, batch, lq, lk, heads, d);
        assert_close(
            &format!("attention b{batch} lq{lq} lk{lk} h{heads} d{d} amp{amp}"),
            &out,
            &want,
            1e-5,
        );
    }

    /// Naive f64 reference: lq, lk below, at and across tile sizes (incl. lk = 77, several
    /// key tiles with a growing max), head dims 40/80/160 and odd; scores spread wide (amp 3
    /// gives logits ~ +-10) so the online rescaling matters. Tolerance 1e-5 x max|ref|.
    #[test]
    fn attention_matches_naive() {
        check(1, 1, 1, 1, 1, 1.0);
        check(2, 5, 77, 3, 40, 3.0);
        check(1, 19, 77, 2, 80, 3.0);
        check(2, 33, 33, 3, 40, 3.0);
        check(1, 70, 70, 1, 160, 2.0);
        check(1, 300, 300, 2, 40, 3.0);
        check(1, 129, 600, 1, 13, 3.0);
        check(2, 257, 513, 2, 8, 3.0);
    }

    /// Against PyTorch `F.scaled_dot_product_attention`; tolerance 1e-5 x max|ref|.
    #[test]
    fn attention_matches_torch() {
        let f = fixtures();
        for (key, batch, lq, lk, heads, d) in [
            ("attn_self40", 2, 33, 33, 3, 40),
            ("attn_cross80", 2, 19, 77, 2, 80),
            ("attn_self160", 1, 70, 70, 1, 160),
            ("attn_long40", 1, 300, 300, 2, 40),
        ] {
            let q = fixture(&f, &format!("{key}.q"));
            let k = fixture(&f, &format!("{key}.k"));
            let v = fixture(&f, &format!("{key}.v"));
            let want = fixture(&f, &format!("{key}.y"));
            assert_eq!(
                (q.len(), k.len()),
                (batch * lq * heads * d, batch * lk * heads * d),
                "{key} shapes"
            );
            let mut out = vec![0f32; q.len()];
            attention(&mut out, &q, &k, &v, batch, lq, lk, heads, d);
            assert_close(&format!("torch {key}"), &out, &want, TORCH_TOL);
        }
    }
}
