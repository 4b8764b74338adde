//! LyCORIS LoHa and LoKr files (kohya names `lora_unet_<path>.hada_w1_a`, or PEFT names
//! `unet.<path>.hada_w1_a[.weight]`), in merge mode: each layer's update is a full matrix, not a
//! low-rank pair, so there is nothing cheaper to run per sample.
//!
//! - LoHa: `dW = (w1_a . w1_b) * (w2_a . w2_b) * alpha / r` (Hadamard product; `w*_a [out, r]`,
//!   `w*_b [r, in]`, a convolution's `in` flattened to `in * k * k`), r the rank of `w1_b`.
//! - LoKr: `dW = kron(w1, w2) * scale`, `w1 = lokr_w1 [a, b]` or `lokr_w1_a . lokr_w1_b`,
//!   `w2 = lokr_w2 [c, d(, k, k)]` or `lokr_w2_a . lokr_w2_b`, with `a c = out` and `b d = in`
//!   (flattened); scale `alpha / r` with r the rank of a decomposed factor, 1 when both are full
//!   (LyCORIS saves alpha = its dim then).
//!
//! Missing alpha: scale 1 (alpha = rank). LyCORIS' CP-decomposed (Tucker) convolutions:
//! `hada_t1 [r, r, kh, kw]` with `hada_w1_a [r, out]`, `hada_w1_b [r, in]` make
//! `w1 = einsum("i j ..., j r, i p -> p r ...", t1, w1_b, w1_a)` (the same for `w2`), and
//! `lokr_t2` with `lokr_w2_a [r, c]`, `lokr_w2_b [r, d]` makes `w2 [c, d, kh, kw]` alike.
//! `dora_scale` (LyCORIS' DoRA, [`super::DoraStyle::Lycoris`]): `[out, 1, ...]` normalizes per
//! output row, `[1, in, ...]` per input channel.
//!
//! The update is held as a [`LoraLayer`] whose smaller side is the identity (rank
//! `min(out, in)`), so merging `W + up . down` adds exactly `dW`; the adapter's source is
//! [`AdapterSource::MergeOnly`] (or [`AdapterSource::Dora`] with `dora_scale`), which runtime
//! mode refuses.

use std::collections::BTreeMap;

use super::lora::{kohya_name, normalize_peft, summarize};
use super::{Adapter, AdapterSource, LayerShape, LoraLayer};
use crate::error::{Error, Result};
use crate::io::safetensors::SafetensorsFile;

/// The factor names LoHa and LoKr files use (a layer's name, then one of these).
const PARTS: [&str; 13] = [
    "hada_w1_a",
    "hada_w1_b",
    "hada_w2_a",
    "hada_w2_b",
    "hada_t1",
    "hada_t2",
    "lokr_w1",
    "lokr_w1_a",
    "lokr_w1_b",
    "lokr_w2",
    "lokr_w2_a",
    "lokr_w2_b",
    "lokr_t2",
];

/// A tensor name's layer stem and part (`alpha` and `dora_scale` included).
fn split(name: &str) -> Option<(&str, &str)> {
    let n = name.strip_suffix(".weight").unwrap_or(name);
    let (stem, part) = n.rsplit_once('.')?;
    (PARTS.contains(&part) || part == "alpha" || part == "dora_scale").then_some((stem, part))
}

/// Whether `f` is a LoHa or LoKr file.
pub fn is_lycoris(f: &SafetensorsFile) -> bool {
    f.tensors().any(|e| {
        split(&e.name).is_some_and(|(_, p)| p.starts_with("hada_") || p.starts_with("lokr_"))
    })
}

/// What a LoHa/LoKr file holds, read without a model: its layer count and the parts it uses
/// (`hada_w1_a`, `lokr_w1`, `alpha`, ...).
pub fn describe(f: &SafetensorsFile) -> (usize, Vec<String>) {
    let mut layers = std::collections::BTreeSet::new();
    let mut parts = std::collections::BTreeSet::new();
    for e in f.tensors() {
        if let Some((stem, part)) = split(&e.name) {
            layers.insert(stem.to_string());
            parts.insert(part.to_string());
        }
    }
    (layers.len(), parts.into_iter().collect())
}

/// A matrix `[rows, cols]` of tensor `name` (4-D `[o, i, k, k]` read as `[o, i k k]`).
fn matrix(f: &SafetensorsFile, name: &str) -> Result<(usize, usize, Vec<f32>)> {
    let e = f
        .get(name)
        .ok_or_else(|| Error::Internal(format!("{name}: gone")))?;
    let dims = e.shape.dims().to_vec();
    let (rows, cols) = match dims.as_slice() {
        [r, c] => (*r, *c),
        [o, i, kh, kw] => (*o, i * kh * kw),
        _ => {
            return Err(Error::InvalidFile {
                path: f.path().to_path_buf(),
                format: "LyCORIS",
                reason: format!("'{name}' has shape {}; expected a matrix", e.shape),
            })
        }
    };
    Ok((rows, cols, f.to_f32(name)?))
}

/// `a [n, r] . b [r, m]` in f64, as f32 `[n, m]`; errors name the factors.
fn product(
    a: &(usize, usize, Vec<f32>),
    b: &(usize, usize, Vec<f32>),
    what: &str,
    layer: (usize, usize),
) -> Result<Vec<f64>> {
    let ((n, r), (r2, m)) = ((a.0, a.1), (b.0, b.1));
    if r != r2 {
        return Err(Error::AdapterMismatch(format!(
            "{what}: factors [{n}, {r}] and [{r2}, {m}] disagree on the rank"
        )));
    }
    within(n, Some(m), layer, what)?;
    let mut out = vec![0f64; n * m];
    for i in 0..n {
        for q in 0..r {
            let c = f64::from(a.2[i * r + q]);
            let row = &b.2[q * m..(q + 1) * m];
            out[i * m..(i + 1) * m]
                .iter_mut()
                .zip(row)
                .for_each(|(o, &x)| *o += c * f64::from(x));
        }
    }
    Ok(out)
}

/// Checks a factor product's size `[rows, cols]` against the layer's `[dout, din]` before it
/// is computed: no part of a layer's update is larger than the layer (hostile shapes would
/// otherwise allocate their product).
fn within(rows: usize, cols: Option<usize>, layer: (usize, usize), what: &str) -> Result<()> {
    match cols {
        Some(c) if rows <= layer.0 && c <= layer.1 => Ok(()),
        _ => Err(Error::AdapterMismatch(format!(
            "{what}: factors make [{rows}, {}], larger than the layer's [{}, {}]",
            cols.map_or_else(|| "overflow".to_string(), |c| c.to_string()),
            layer.0,
            layer.1
        ))),
    }
}

/// A Tucker-decomposed factor `einsum("i j ..., i p, j q -> p (q ...)", t, a, b)` as
/// `[p, q kh kw]`: core `t [r, r, kh, kw]`, `a [r, p]`, `b [r, q]`; errors name the core.
fn tucker(
    f: &SafetensorsFile,
    t_name: &str,
    a: &(usize, usize, Vec<f32>),
    b: &(usize, usize, Vec<f32>),
    what: &str,
    layer: (usize, usize),
) -> Result<(usize, usize, Vec<f64>)> {
    let dims = f
        .get(t_name)
        .map(|e| e.shape.dims().to_vec())
        .unwrap_or_default();
    let r = a.0;
    let kk = match dims.as_slice() {
        [r1, r2, kh, kw] if *r1 == r && *r2 == r && b.0 == r => kh * kw,
        _ => {
            return Err(Error::AdapterMismatch(format!(
                "{what}: Tucker core '{t_name}' is {dims:?}; with factors of {} and {} rows it \
                 must be [{r}, {r}, kh, kw] (the factors then [{r}, out] and [{r}, in])",
                a.0, b.0
            )))
        }
    };
    let (p, q) = (a.1, b.1);
    within(p, q.checked_mul(kk), layer, what)?;
    let t = f.to_f32(t_name)?;
    // tb [r, q kk]: the core folded into b, as a Tucker LoCon's down factor is; then
    // out[p, (q, s)] = sum_i a[i, p] tb[i, (q, s)]
    let tb = super::lora::fold_tucker(&t, &b.2, r, q, kk);
    let cols = q * kk;
    let mut out = vec![0f64; p * cols];
    for i in 0..r {
        let row = &tb[i * cols..(i + 1) * cols];
        for pi in 0..p {
            let c = f64::from(a.2[i * p + pi]);
            out[pi * cols..(pi + 1) * cols]
                .iter_mut()
                .zip(row)
                .for_each(|(o, &x)| *o += c * f64::from(x));
        }
    }
    Ok((p, cols, out))
}

/// One layer's update `[dout, din]` from its parts, and the layout's name.
fn delta(
    f: &SafetensorsFile,
    key: &str,
    parts: &BTreeMap<&str, String>,
    s: &LayerShape,
) -> Result<(Vec<f64>, &'static str)> {
    let get = |p: &str| parts.get(p).map(|n| matrix(f, n)).transpose();
    let alpha = match parts.get("alpha") {
        None => None,
        Some(n) => match f.to_f32(n)?.as_slice() {
            [a] if a.is_finite() => Some(f64::from(*a)),
            v => {
                return Err(Error::AdapterMismatch(format!(
                    "{}: '{n}' must be one finite number, has {} value(s)",
                    f.path().display(),
                    v.len()
                )))
            }
        },
    };
    let what = format!("{}: layer '{key}'", f.path().display());
    let want = (s.dout, s.din);
    if parts.keys().any(|p| p.starts_with("hada_")) {
        let (Some(w1a), Some(w1b), Some(w2a), Some(w2b)) = (
            get("hada_w1_a")?,
            get("hada_w1_b")?,
            get("hada_w2_a")?,
            get("hada_w2_b")?,
        ) else {
            return Err(Error::AdapterMismatch(format!(
                "{what}: a LoHa layer needs hada_w1_a, hada_w1_b, hada_w2_a and hada_w2_b"
            )));
        };
        let half = |a, b, t: &str| -> Result<(usize, usize, Vec<f64>)> {
            match parts.get(t) {
                Some(n) => tucker(f, n, a, b, &what, want),
                None => Ok((a.0, b.1, product(a, b, &what, want)?)),
            }
        };
        if parts.contains_key("hada_t1") != parts.contains_key("hada_t2") {
            return Err(Error::AdapterMismatch(format!(
                "{what}: a Tucker LoHa layer needs both hada_t1 and hada_t2"
            )));
        }
        let (p1, p2) = (half(&w1a, &w1b, "hada_t1")?, half(&w2a, &w2b, "hada_t2")?);
        for p in [&p1, &p2] {
            if (p.0, p.1) != want {
                return Err(Error::AdapterMismatch(format!(
                    "{what}: LoHa factors make [{}, {}], the layer is [{}, {}]",
                    p.0, p.1, want.0, want.1
                )));
            }
        }
        let scale = alpha.map_or(1.0, |a| a / w1b.0 as f64);
        let (p1, p2) = (p1.2, p2.2);
        return Ok((
            p1.iter().zip(&p2).map(|(x, y)| x * y * scale).collect(),
            "LoHa",
        ));
    }
    let full_or_product =
        |w: &str, a: &str, b: &str| -> Result<(usize, usize, Vec<f64>, Option<usize>)> {
            match (get(w)?, get(a)?, get(b)?) {
                (Some(m), None, None) => {
                    Ok((m.0, m.1, m.2.iter().map(|&x| f64::from(x)).collect(), None))
                }
                (None, Some(fa), Some(fb)) => {
                    let r = fb.0;
                    match parts.get("lokr_t2").filter(|_| w == "lokr_w2") {
                        Some(t) => {
                            let (rows, cols, m) = tucker(f, t, &fa, &fb, &what, want)?;
                            Ok((rows, cols, m, Some(r)))
                        }
                        None => Ok((fa.0, fb.1, product(&fa, &fb, &what, want)?, Some(r))),
                    }
                }
                _ => Err(Error::AdapterMismatch(format!(
                    "{what}: a LoKr layer needs {w}, or {a} and {b}"
                ))),
            }
        };
    if parts.contains_key("lokr_t2") && !parts.contains_key("lokr_w2_a") {
        return Err(Error::AdapterMismatch(format!(
            "{what}: a Tucker core lokr_t2 needs lokr_w2_a and lokr_w2_b"
        )));
    }
    let (a, b, w1, r1) = full_or_product("lokr_w1", "lokr_w1_a", "lokr_w1_b")?;
    let (c, d, w2, r2) = full_or_product("lokr_w2", "lokr_w2_a", "lokr_w2_b")?;
    if (a.checked_mul(c), b.checked_mul(d)) != (Some(want.0), Some(want.1)) {
        return Err(Error::AdapterMismatch(format!(
            "{what}: kron of [{a}, {b}] and [{c}, {d}] does not make the layer's [{}, {}]",
            want.0, want.1
        )));
    }
    let scale = match (r1.or(r2), alpha) {
        (Some(r), Some(al)) => al / r as f64,
        _ => 1.0,
    };
    let mut out = vec![0f64; a * c * b * d];
    let cols = b * d;
    for i in 0..a {
        for j in 0..b {
            let w = w1[i * b + j] * scale;
            for p in 0..c {
                let row = &mut out[(i * c + p) * cols + j * d..(i * c + p) * cols + (j + 1) * d];
                row.iter_mut()
                    .zip(&w2[p * d..(p + 1) * d])
                    .for_each(|(o, &x)| *o = w * x);
            }
        }
    }
    Ok((out, "LoKr"))
}

/// `dW [dout, din]` as factors whose smaller side is the identity: `up . down` is `dW` exactly.
fn as_factors(dw: Vec<f64>, dout: usize, din: usize) -> LoraLayer {
    let dw: Vec<f32> = dw.into_iter().map(|x| x as f32).collect();
    let eye = |n: usize| {
        let mut v = vec![0f32; n * n];
        (0..n).for_each(|i| v[i * n + i] = 1.0);
        v
    };
    if dout <= din {
        LoraLayer {
            rank: dout,
            down: dw,
            up: eye(dout),
            conv_kernel: None,
        }
    } else {
        LoraLayer {
            rank: din,
            down: eye(din),
            up: dw,
            conv_kernel: None,
        }
    }
}

/// Imports a LoHa or LoKr file against a model's adaptable layers (merge mode only); keys that
/// match no layer are an error listing them unless `allow_unmatched` (then logged).
pub fn import(
    f: &SafetensorsFile,
    table: &BTreeMap<String, LayerShape>,
    allow_unmatched: bool,
) -> Result<Adapter> {
    let path = f.path();
    let kohya: BTreeMap<String, &String> = table.keys().map(|k| (kohya_name(k), k)).collect();
    let mut by_layer: BTreeMap<&String, BTreeMap<&str, String>> = BTreeMap::new();
    let mut unmatched = Vec::new();
    for e in f.tensors() {
        let key = split(&e.name).and_then(|(stem, part)| {
            let k = kohya
                .get(stem)
                .copied()
                .or_else(|| table.get_key_value(&normalize_peft(stem)).map(|(k, _)| k))?;
            Some((k, part))
        });
        match key {
            Some((k, part)) => {
                by_layer.entry(k).or_default().insert(part, e.name.clone());
            }
            None => unmatched.push(e.name.clone()),
        }
    }
    if !unmatched.is_empty() {
        unmatched.sort();
        if !allow_unmatched {
            return Err(Error::AdapterMismatch(format!(
                "{}: {}",
                path.display(),
                summarize(&unmatched)
            )));
        }
        log::warn!(
            "{}: skipped as asked (allow unmatched): {}",
            path.display(),
            unmatched.join(", ")
        );
    }
    let mut layers = BTreeMap::new();
    let mut doras = BTreeMap::new();
    let mut layout = "LyCORIS";
    for (k, parts) in by_layer {
        let s = &table[k];
        let (dw, name) = delta(f, k, &parts, s)?;
        if let Some(n) = parts.get("dora_scale") {
            let in_channels = match s.kind {
                crate::model::LayerKind::Conv { in_channels, .. } => in_channels,
                crate::model::LayerKind::Linear => s.din,
            };
            let d = super::lora::read_dora(
                f,
                n,
                super::lora::LoraFormat::Kohya,
                k,
                s.dout,
                in_channels,
            )?;
            doras.insert(k.clone(), d);
        }
        if dw.iter().any(|x| !x.is_finite()) {
            return Err(Error::AdapterMismatch(format!(
                "{}: layer '{k}' holds NaN or Inf values",
                path.display()
            )));
        }
        layout = name;
        let mut l = as_factors(dw, s.dout, s.din);
        if let crate::model::LayerKind::Conv { kernel, .. } = s.kind {
            l.conv_kernel = Some(kernel);
        }
        layers.insert(k.clone(), l);
    }
    let adapter = Adapter {
        layers,
        source: if doras.is_empty() {
            AdapterSource::MergeOnly(layout)
        } else {
            AdapterSource::Dora {
                layout,
                magnitudes: doras,
            }
        },
    };
    adapter.validate(table).map_err(|e| match e {
        Error::AdapterMismatch(m) => Error::AdapterMismatch(format!("{}: {m}", path.display())),
        other => other,
    })?;
    Ok(adapter)
}
