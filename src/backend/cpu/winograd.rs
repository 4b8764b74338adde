//! 3x3, stride 1, padding 1 convolutions by Winograd's minimal filtering F(2x2, 3x3)
//! (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016).
//!
//! Each 2x2 output tile is `A^T [(G g G^T) . (B^T d B)] A` for its 4x4 input patch `d`: per
//! tile 16 products per (input, output) channel pair instead of 36, so the GEMMs do 2.25x fewer
//! FLOPs than im2col's. The transforms are additions and halvings only (no rounding beyond
//! f32's own in the matrices); the result differs from the direct sum by a few ulps of the
//! largest partial sums (tested against an f64 reference and PyTorch).
//!
//! Work is split as im2col's `per_worker` is: a rayon task per (image, run of tile rows)
//! transforms its input patches into its thread's workspace `V[16][c_in][tiles]`, runs 16
//! single-threaded GEMMs `M[k] = U[k] (c_out x c_in) . V[k] (c_in x tiles)` and writes the
//! output tiles (with bias) straight into y. `U`, the transformed weight, is built once per call
//! (16/9 the weight's size): the weights can change between calls (merged adapters), so it is
//! not cached.

use super::conv::with_workspace;
use super::linear::{gemm_raw, Mat};
use super::SendPtr;
use crate::backend::api::Conv2d;
use gemm::Parallelism;
use rayon::prelude::*;

/// Output tiles per task: enough columns that the 16 GEMMs amortise packing their `U[k]`
/// (measured on 2 Zen 5 cores: 256 beats 64-128 by up to 1.4x at 640 channels and beats 512
/// at 128 channels, where the transforms' L2 traffic dominates)...
const TASK_TILES: usize = 256;
/// ...unless the task's workspace (`V` and `M`, 16 x (c_in + c_out) x tiles floats) would
/// exceed 16 MB: it is kept per thread between calls. A task is at least one tile row, which
/// at the widest plane hdb accepts (a 4096-pixel VAE output, 128 channels) takes 34 MB.
const TASK_BUDGET: usize = 1 << 22;

/// Fewest output pixels per image for which F(2x2, 3x3) beats im2col. Measured on 2 Zen 5
/// cores at SD shapes, AVX-512 and AVX2 kernels: from 32x32 up it wins (1.1-2.0x); at 16x16 it
/// loses (0.5-0.96x): the per-call weight transform (105 MB at 1280 channels) and short GEMMs
/// eat the gain.
const MIN_PLANE: usize = 32 * 32;

/// Whether `conv2d` should take this path for `p`.
pub(super) fn applies(p: &Conv2d) -> bool {
    p.kernel == 3
        && p.stride == 1
        && p.padding == 1
        && p.h * p.w >= MIN_PLANE
        && p.c_in >= 8
        && p.c_out >= 8
}

/// y = conv2d(x, weight) + bias for a 3x3, stride 1, padding 1 convolution (NCHW; shapes
/// checked by the caller).
pub(super) fn conv3x3(y: &mut [f32], x: &[f32], weight: &[f32], bias: Option<&[f32]>, p: &Conv2d) {
    let u = transform_weight(weight, p.c_in, p.c_out, false);
    run(y, x, &u, bias, p);
}

/// dx = the input gradient of the convolution `p` (3x3, stride 1, padding 1) for dy: the
/// convolution of dy with `weight` transposed (c_in <-> c_out) and flipped.
pub(super) fn conv3x3_input_grad(dx: &mut [f32], dy: &[f32], weight: &[f32], p: &Conv2d) {
    let pt = Conv2d {
        c_in: p.c_out,
        c_out: p.c_in,
        ..*p
    };
    let u = transform_weight(weight, pt.c_in, pt.c_out, true);
    run(dx, dy, &u, None, &pt);
}

/// y = the convolution `p` of x with the transformed filters `u`, + bias.
fn run(y: &mut [f32], x: &[f32], u: &[f32], bias: Option<&[f32]>, p: &Conv2d) {
    let (c_in, c_out, h, w) = (p.c_in, p.c_out, p.h, p.w);
    let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
    // Tile rows per task: about TASK_TILES tiles within the workspace budget, but at least two
    // tasks per thread over the batch so uneven task times still balance.
    let per_tile = 16 * (c_in + c_out);
    let mut rows = (TASK_TILES.min(TASK_BUDGET / per_tile) / tw).clamp(1, th);
    let threads = rayon::current_num_threads();
    while rows > 1 && p.batch * th.div_ceil(rows) < 2 * threads {
        rows = rows.div_ceil(2);
    }
    let chunks = th.div_ceil(rows);
    let yp = SendPtr(y.as_mut_ptr());
    (0..p.batch * chunks).into_par_iter().for_each(|t| {
        let (b, r0) = (t / chunks, (t % chunks) * rows);
        let r1 = (r0 + rows).min(th);
        let tiles = (r1 - r0) * tw;
        let xb = &x[b * c_in * h * w..(b + 1) * c_in * h * w];
        with_workspace(per_tile * tiles + 16 * tw, |ws| {
            let (v, rest) = ws.split_at_mut(16 * c_in * tiles);
            let (m, scratch) = rest.split_at_mut(16 * c_out * tiles);
            transform_input(v, xb, p, r0, r1, tiles, scratch);
            for k in 0..16 {
                let uk = Mat::new(&u[k * c_out * c_in..(k + 1) * c_out * c_in], c_in, 1);
                let vk = Mat::new(&v[k * c_in * tiles..(k + 1) * c_in * tiles], tiles, 1);
                // SAFETY: m[k] is c_out x tiles (row stride tiles), uk c_out x c_in, vk
                // c_in x tiles, all inside this task's workspace or the shared U.
                unsafe {
                    gemm_raw(
                        m[k * c_out * tiles..].as_mut_ptr(),
                        tiles,
                        uk,
                        vk,
                        c_out,
                        c_in,
                        tiles,
                        false,
                        1.0,
                        Parallelism::None,
                    )
                };
            }
            // SAFETY: y is batch x c_out x h x w; this task writes output rows
            // 2 r0 .. min(2 r1, h) of image b only, and tasks cover disjoint (image, tile row)
            // ranges.
            unsafe { transform_output(yp.get().add(b * c_out * h * w), m, bias, p, r0, r1, tiles) };
        });
    });
}

/// U[k][co][ci] = (G g G^T)[k] for each 3x3 filter g = weight[co][ci] (`flip`: g =
/// weight[ci][co] rotated by 180 degrees, i.e. the transposed convolution's), with
/// G = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]].
fn transform_weight(weight: &[f32], c_in: usize, c_out: usize, flip: bool) -> Vec<f32> {
    let plane = c_out * c_in;
    let mut u = super::zeroed(16 * plane);
    let up = SendPtr(u.as_mut_ptr());
    let fold = |a: f32, b: f32, c: f32| [a, 0.5 * (a + b + c), 0.5 * (a - b + c), c];
    (0..c_out).into_par_iter().for_each(|co| {
        for ci in 0..c_in {
            let g: [f32; 9] = if flip {
                let f = &weight[(ci * c_out + co) * 9..][..9];
                std::array::from_fn(|j| f[8 - j])
            } else {
                std::array::from_fn(|j| weight[(co * c_in + ci) * 9 + j])
            };
            // cols[j]: column j of G g (G applied to column j of g).
            let cols: [[f32; 4]; 3] = std::array::from_fn(|j| fold(g[j], g[3 + j], g[6 + j]));
            let rows: [[f32; 4]; 4] =
                std::array::from_fn(|r| fold(cols[0][r], cols[1][r], cols[2][r]));
            for (r, row) in rows.into_iter().enumerate() {
                for (c, v) in row.into_iter().enumerate() {
                    // SAFETY: index < 16 * plane; each co writes its own (co, ci) entries.
                    unsafe { *up.get().add((r * 4 + c) * plane + co * c_in + ci) = v };
                }
            }
        }
    });
    u
}

/// V[k][ci][j] = (B^T d B)[k] for tile j of tile rows r0..r1 (tiles = (r1 - r0) x tw), d its
/// 4x4 input patch (rows 2 ty - 1 .. 2 ty + 2, zero outside the image), with
/// B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]].
/// `scratch` holds 16 x tw floats: the row-transformed patch rows of one tile row.
fn transform_input(
    v: &mut [f32],
    xb: &[f32],
    p: &Conv2d,
    r0: usize,
    r1: usize,
    tiles: usize,
    scratch: &mut [f32],
) {
    let (h, w) = (p.h, p.w);
    let tw = w.div_ceil(2);
    let plane = p.c_in * tiles;
    let (hrows, _) = scratch.split_at_mut(16 * tw);
    for ci in 0..p.c_in {
        let xc = &xb[ci * h * w..(ci + 1) * h * w];
        for ty in r0..r1 {
            // hrows[i * 4 + c][tx]: column transform of patch row i (input row 2 ty - 1 + i).
            for i in 0..4 {
                let hr = &mut hrows[i * 4 * tw..(i + 1) * 4 * tw];
                let iy = (2 * ty + i) as isize - 1;
                if iy < 0 || iy as usize >= h {
                    hr.fill(0.0);
                    continue;
                }
                let row = &xc[iy as usize * w..(iy as usize + 1) * w];
                let (h0, rest) = hr.split_at_mut(tw);
                let (h1, rest) = rest.split_at_mut(tw);
                let (h2, h3) = rest.split_at_mut(tw);
                let at = |c: isize| -> f32 {
                    if c < 0 || c as usize >= w {
                        0.0
                    } else {
                        row[c as usize]
                    }
                };
                let mut put = |tx: usize, d: [f32; 4]| {
                    h0[tx] = d[0] - d[2];
                    h1[tx] = d[1] + d[2];
                    h2[tx] = d[2] - d[1];
                    h3[tx] = d[1] - d[3];
                };
                // Tiles whose columns 2 tx - 1 .. 2 tx + 2 are all inside the row: 1..inner.
                let inner = if w >= 3 { (w - 1) / 2 } else { 1 };
                for tx in 1..inner {
                    let d = &row[2 * tx - 1..2 * tx + 3];
                    put(tx, [d[0], d[1], d[2], d[3]]);
                }
                for tx in std::iter::once(0).chain(inner.max(1)..tw) {
                    let c = 2 * tx as isize;
                    put(tx, [at(c - 1), at(c), at(c + 1), at(c + 2)]);
                }
            }
            // Row transform over the four patch rows, into V.
            let j0 = (ty - r0) * tw;
            for c in 0..4 {
                let hr = |i: usize| &hrows[(i * 4 + c) * tw..(i * 4 + c + 1) * tw];
                let (d0, d1, d2, d3) = (hr(0), hr(1), hr(2), hr(3));
                let at = |r: usize| (r * 4 + c) * plane + ci * tiles + j0;
                let (o0, o1, o2, o3) = (at(0), at(1), at(2), at(3));
                for tx in 0..tw {
                    v[o0 + tx] = d0[tx] - d2[tx];
                    v[o1 + tx] = d1[tx] + d2[tx];
                    v[o2 + tx] = d2[tx] - d1[tx];
                    v[o3 + tx] = d1[tx] - d3[tx];
                }
            }
        }
    }
}

/// Rows 2 r0 .. min(2 r1, h) of each output channel of one image (`yb`: c_out x h x w) =
/// A^T M A + bias, A^T = [[1, 1, 1, 0], [0, 1, -1, -1]], for each tile.
///
/// # Safety
/// `yb` must be valid for writes of those rows, and nothing else may access them meanwhile.
unsafe fn transform_output(
    yb: *mut f32,
    m: &[f32],
    bias: Option<&[f32]>,
    p: &Conv2d,
    r0: usize,
    r1: usize,
    tiles: usize,
) {
    let (h, w, c_out) = (p.h, p.w, p.c_out);
    let tw = w.div_ceil(2);
    let plane = c_out * tiles;
    let even = w / 2; // tiles whose two output columns are both inside the image
    for co in 0..c_out {
        let b = bias.map_or(0.0, |b| b[co]);
        let (y0, y1) = (2 * r0, (2 * r1).min(h));
        // SAFETY: rows y0..y1 of channel co: inside yb, owned by this call (the contract).
        let yc =
            unsafe { std::slice::from_raw_parts_mut(yb.add((co * h + y0) * w), (y1 - y0) * w) };
        for ty in r0..r1 {
            let j0 = co * tiles + (ty - r0) * tw;
            let mk = |k: usize| &m[k * plane + j0..k * plane + j0 + tw];
            let mm: [&[f32]; 16] = std::array::from_fn(mk);
            let oy = 2 * ty;
            let two_rows = oy + 1 < h;
            let (row0, row1) = yc[(oy - y0) * w..].split_at_mut(w);
            let row1 = if two_rows {
                &mut row1[..w]
            } else {
                &mut [][..]
            };
            let tile = |tx: usize| -> [f32; 4] {
                // A^T M: two rows of 4.
                let s0: [f32; 4] =
                    std::array::from_fn(|c| mm[c][tx] + mm[4 + c][tx] + mm[8 + c][tx]);
                let s1: [f32; 4] =
                    std::array::from_fn(|c| mm[4 + c][tx] - mm[8 + c][tx] - mm[12 + c][tx]);
                [
                    s0[0] + s0[1] + s0[2] + b,
                    s0[1] - s0[2] - s0[3] + b,
                    s1[0] + s1[1] + s1[2] + b,
                    s1[1] - s1[2] - s1[3] + b,
                ]
            };
            for tx in 0..even {
                let t = tile(tx);
                row0[2 * tx] = t[0];
                row0[2 * tx + 1] = t[1];
                if two_rows {
                    row1[2 * tx] = t[2];
                    row1[2 * tx + 1] = t[3];
                }
            }
            if even < tw {
                let t = tile(even);
                row0[2 * even] = t[0];
                if two_rows {
                    row1[2 * even] = t[2];
                }
            }
        }
    }
}
