//! The hypernetwork's image input (DESIGN.md section 4): an RGB8 face crop of any size, center
//! cropped to a square, each channel resized in float exactly as Pillow's
//! `Image.resize((s, s), BILINEAR)` on a mode "F" image, scaled to [0, 1], normalized.
//!
//! Pillow's BILINEAR resize (libImaging/Resample.c, `ImagingResample`) is a separable,
//! antialiased triangle filter: per axis and output pixel, a window of input pixels and weights
//! precomputed in f64 (the filter's support grows with the reduction factor), a horizontal pass
//! into an f32 image, then a vertical pass. Each output sums its window in order, in f64, and
//! rounds to f32. This file follows it step for step, so the result is Pillow's to the bit
//! (tests/hypernet.rs). The crop is square and so is the output, so the pass order is always
//! horizontal first (Pillow 13 switches to vertical first only when the height shrinks much
//! more than the width).

use crate::error::{Error, Result};

/// Smallest accepted image side, in pixels.
pub const MIN_SIDE: usize = 16;

/// RGB8 rows (`stride` bytes apart, `width * 3` used) -> [3, img_size, img_size] f32: center
/// crop to a square of side min(width, height) at ((width - side) / 2, (height - side) / 2),
/// Pillow-bilinear resize per channel, `(v / 255 - mean[c]) / std[c]`.
///
/// Errors (`InvalidArgument`, naming the argument): a zero or below-16 width or height, a stride
/// shorter than a row, a buffer shorter than the image, a zero `img_size`, a zero or non-finite
/// std or a non-finite mean.
pub fn preprocess(
    rgb: &[u8],
    width: usize,
    height: usize,
    stride: usize,
    img_size: usize,
    mean: [f32; 3],
    std: [f32; 3],
) -> Result<Vec<f32>> {
    check(rgb.len(), width, height, stride)?;
    if img_size == 0 {
        return Err(Error::invalid_arg("img_size", "must be positive"));
    }
    if std.iter().any(|s| *s == 0.0 || !s.is_finite()) {
        return Err(Error::invalid_arg(
            "std",
            format!("{std:?}: every value must be finite and non-zero"),
        ));
    }
    if mean.iter().any(|m| !m.is_finite()) {
        return Err(Error::invalid_arg(
            "mean",
            format!("{mean:?}: every value must be finite"),
        ));
    }
    let side = width.min(height);
    let (x0, y0) = ((width - side) / 2, (height - side) / 2);
    let taps = Taps::new(side, img_size);
    let mut out = Vec::with_capacity(3 * img_size * img_size);
    let mut plane = vec![0f32; side * side];
    for c in 0..3 {
        for (y, row) in plane.chunks_exact_mut(side).enumerate() {
            let src = &rgb[(y0 + y) * stride + x0 * 3..][..side * 3];
            row.iter_mut()
                .zip(src.chunks_exact(3))
                .for_each(|(o, px)| *o = px[c] as f32);
        }
        let resized = if side == img_size {
            plane.clone()
        } else {
            let tmp = taps.horizontal(&plane, side);
            taps.vertical(&tmp, img_size)
        };
        out.extend(resized.iter().map(|v| (v / 255.0 - mean[c]) / std[c]));
    }
    Ok(out)
}

/// The argument checks of [`preprocess`], shared with callers that validate before work.
pub fn check(len: usize, width: usize, height: usize, stride: usize) -> Result<()> {
    for (name, v) in [("width", width), ("height", height)] {
        if v == 0 {
            return Err(Error::invalid_arg(name, "must be positive"));
        }
        if v < MIN_SIDE {
            return Err(Error::invalid_arg(
                name,
                format!("the image is {width}x{height}; at least {MIN_SIDE}x{MIN_SIDE} pixels are needed"),
            ));
        }
    }
    // A face is resized to the network's input (224 px); a larger image only costs memory.
    if width.saturating_mul(height) > crate::limits::MAX_IMAGE_PIXELS {
        return Err(Error::invalid_arg(
            "image",
            format!(
                "is {width}x{height}; hdb's limit for an input image is {} pixels (4096x4096)",
                crate::limits::MAX_IMAGE_PIXELS
            ),
        ));
    }
    let row = width
        .checked_mul(3)
        .ok_or_else(|| Error::invalid_arg("width", format!("{width} is too large")))?;
    if stride < row {
        return Err(Error::invalid_arg(
            "stride",
            format!("{stride} bytes is shorter than a row of {width} RGB pixels ({row} bytes)"),
        ));
    }
    let need = (height - 1)
        .checked_mul(stride)
        .and_then(|v| v.checked_add(row))
        .ok_or_else(|| Error::invalid_arg("stride", format!("{stride} is too large")))?;
    if len < need {
        return Err(Error::invalid_arg(
            "rgb",
            format!(
                "{len} bytes; a {width}x{height} RGB image with a stride of {stride} needs {need}"
            ),
        ));
    }
    Ok(())
}

/// Pillow's `precompute_coeffs` for the bilinear filter, one axis of `n_in` -> `n_out` pixels:
/// per output pixel, the first input pixel of its window and the window's normalized weights.
struct Taps {
    /// Window start per output pixel.
    start: Vec<usize>,
    /// Window weights per output pixel.
    weights: Vec<Vec<f64>>,
}

impl Taps {
    fn new(n_in: usize, n_out: usize) -> Taps {
        let scale = n_in as f64 / n_out as f64;
        let filterscale = scale.max(1.0);
        // The bilinear filter's support is 1.0.
        let support = filterscale;
        let inv = 1.0 / filterscale;
        let mut start = Vec::with_capacity(n_out);
        let mut weights = Vec::with_capacity(n_out);
        for xx in 0..n_out {
            let center = (xx as f64 + 0.5) * scale;
            // C's (int) truncation toward zero, then the clamps.
            let lo = ((center - support + 0.5) as i64).max(0) as usize;
            let hi = ((center + support + 0.5) as i64).min(n_in as i64) as usize;
            let mut w: Vec<f64> = (lo..hi)
                .map(|x| {
                    let t = ((x as f64 - center + 0.5) * inv).abs();
                    if t < 1.0 {
                        1.0 - t
                    } else {
                        0.0
                    }
                })
                .collect();
            let mut total = 0.0;
            for v in &w {
                total += v;
            }
            if total != 0.0 {
                w.iter_mut().for_each(|v| *v /= total);
            }
            start.push(lo);
            weights.push(w);
        }
        Taps { start, weights }
    }

    /// Each row of x [rows, width] resampled to [rows, n_out].
    fn horizontal(&self, x: &[f32], width: usize) -> Vec<f32> {
        let n_out = self.start.len();
        let mut out = Vec::with_capacity(x.len() / width * n_out);
        for row in x.chunks_exact(width) {
            for (s, w) in self.start.iter().zip(&self.weights) {
                let mut acc = 0f64;
                for (v, k) in row[*s..].iter().zip(w) {
                    acc += *v as f64 * k;
                }
                out.push(acc as f32);
            }
        }
        out
    }

    /// x [rows_in, cols] resampled along its rows to [n_out, cols].
    fn vertical(&self, x: &[f32], cols: usize) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.start.len() * cols);
        let mut acc = vec![0f64; cols];
        for (s, w) in self.start.iter().zip(&self.weights) {
            acc.fill(0.0);
            for (j, k) in w.iter().enumerate() {
                let row = &x[(s + j) * cols..][..cols];
                acc.iter_mut()
                    .zip(row)
                    .for_each(|(a, v)| *a += *v as f64 * k);
            }
            out.extend(acc.iter().map(|a| *a as f32));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every window lies inside the input and its weights sum to 1, up and down.
    #[test]
    fn windows_fit_and_weights_sum_to_one() {
        for (n_in, n_out) in [
            (16, 224),
            (23, 32),
            (97, 32),
            (480, 224),
            (224, 224),
            (5, 1),
        ] {
            let t = Taps::new(n_in, n_out);
            for (s, w) in t.start.iter().zip(&t.weights) {
                assert!(
                    s + w.len() <= n_in,
                    "{n_in}->{n_out}: window past the input"
                );
                let sum: f64 = w.iter().sum();
                assert!(
                    (sum - 1.0).abs() < 1e-12,
                    "{n_in}->{n_out}: weights sum to {sum}"
                );
            }
        }
    }

    /// A flat image stays flat: every output is (v / 255 - mean) / std.
    #[test]
    fn flat_image_stays_flat() {
        let (w, h) = (37, 29);
        let rgb: Vec<u8> = (0..w * h).flat_map(|_| [10u8, 128, 250]).collect();
        let out = preprocess(&rgb, w, h, w * 3, 24, [0.5; 3], [0.25; 3]).expect("preprocess");
        for (c, v) in [10f32, 128.0, 250.0].iter().enumerate() {
            let want = (v / 255.0 - 0.5) / 0.25;
            let plane = &out[c * 24 * 24..(c + 1) * 24 * 24];
            assert!(
                plane.iter().all(|x| (x - want).abs() < 1e-5),
                "channel {c}: {:?} != {want}",
                plane.iter().find(|x| (*x - want).abs() >= 1e-5)
            );
        }
    }
}
