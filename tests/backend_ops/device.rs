//! [`Device`]: the cases on `Cuda<T>` and its ops, on a real GPU or the emulated one
//! (scripts/emulated-gpu.sh). Kernel-level outputs are poisoned with NaN before each launch,
//! so an element an op leaves unwritten fails; regions an op must not touch are checked.

use cudarc::driver::CudaSlice;
use hdb::backend::cuda::ops::{
    self, At, AttnKernel, AttnShape, BlasElem, ComposeLayer, Factor, MergeLayer,
};
use hdb::backend::cuda::{Cuda, CudaDevice};
use hdb::backend::Conv2d;
use hdb::backend::{AttnDims, Backend, NormDims};

use crate::harness::{Dtype, OpError, OpResult, Out};
use crate::target::{on_backend, Bgmv, MergeSpec, Op, QkvLayout, Target};

/// `Cuda<T>` on the test binary's device.
pub struct Device<T: BlasElem> {
    be: Cuda<T>,
}

impl<T: BlasElem> Device<T> {
    pub fn new(be: Cuda<T>) -> Self {
        Device { be }
    }

    fn dev(&self) -> &CudaDevice {
        self.be.dev()
    }

    fn up(&self, x: &[f32]) -> OpResult<CudaSlice<T>> {
        Ok(self.dev().upload_f32::<T>(x)?)
    }

    /// A buffer of `n` NaNs (at least one element).
    fn poisoned(&self, n: usize) -> OpResult<CudaSlice<T>> {
        Ok(self.dev().upload(&vec![T::from_f32(f32::NAN); n.max(1)])?)
    }

    fn down(&self, y: &CudaSlice<T>, n: usize) -> OpResult<Vec<f32>> {
        Ok(self.dev().download_f32(y, n)?)
    }

    /// f32 values (adapter factors) on the device.
    fn up32(&self, x: &[f32]) -> OpResult<CudaSlice<f32>> {
        Ok(self.dev().upload(x)?)
    }
}

/// `n` leading elements of `v` must still be `was` (bit for bit; any NaN for a NaN); the rest
/// is the output.
fn untouched_prefix(v: Vec<f32>, n: usize, was: f32, what: &str) -> OpResult<Vec<f32>> {
    let same = |x: &f32| match was.is_nan() {
        true => x.is_nan(),
        false => x.to_bits() == was.to_bits(),
    };
    if let Some(i) = v[..n].iter().position(|x| !same(x)) {
        return Err(OpError::Check(format!(
            "{what} wrote element {i} before its output ({} where {was} was)",
            v[i]
        )));
    }
    Ok(v[n..].to_vec())
}

#[allow(clippy::too_many_arguments)]
impl<T: BlasElem> Target for Device<T> {
    fn name(&self) -> String {
        self.be.describe()
    }
    fn dtype(&self) -> Dtype {
        match T::SUFFIX {
            "f32" => Dtype::F32,
            "f16" => Dtype::F16,
            _ => Dtype::Bf16,
        }
    }
    fn this(&self) -> &dyn Target {
        self
    }
    fn op(&self, op: &Op, i: &[Vec<f32>]) -> OpResult<Vec<f32>> {
        on_backend(&self.be, op, i)
    }

    fn conv2d_im2col(
        &self,
        x: &[f32],
        w: &[f32],
        b: Option<&[f32]>,
        p: &Conv2d,
    ) -> OpResult<Vec<f32>> {
        let (xd, wd) = (self.up(x)?, self.up(w)?);
        let bd = b.map(|b| self.up(b)).transpose()?;
        let (oh, ow) = p.out_hw();
        let n = p.batch * p.c_out * oh * ow;
        let mut y = self.poisoned(n)?;
        let mut scratch = self.dev().zeros::<T>(ops::conv2d_scratch(p).max(1))?;
        ops::conv2d(self.dev(), &mut y, &xd, &wd, bd.as_ref(), p, &mut scratch)?;
        self.down(&y, n)
    }

    fn conv2d_implicit(
        &self,
        x: &[f32],
        w: &[f32],
        b: Option<&[f32]>,
        p: &Conv2d,
        splits: Option<usize>,
    ) -> OpResult<Vec<f32>> {
        let (xd, wd) = (self.up(x)?, self.up(w)?);
        let bd = b.map(|b| self.up(b)).transpose()?;
        let (oh, ow) = p.out_hw();
        let n = p.batch * p.c_out * oh * ow;
        let mut y = self.poisoned(n)?;
        ops::conv2d_implicit_with(self.dev(), &mut y, &xd, &wd, bd.as_ref(), p, splits)?;
        self.down(&y, n)
    }

    fn attention_kernel(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        d: AttnDims,
        layout: QkvLayout,
        kernel: AttnKernel,
        expect: Option<&str>,
    ) -> OpResult<Vec<f32>> {
        let dev = self.dev();
        let hd = d.heads * d.head_dim;
        let s = AttnShape::dense(d.batch, d.heads, d.lq, d.lk, d.head_dim);
        let out = self.poisoned(q.len())?;
        let ran = match layout {
            QkvLayout::Fused => {
                // One [rows, 3 * hd] buffer holding q | k | v per row (self-attention only).
                let rows = d.batch * d.lq;
                let mut qkv = vec![0.0; rows * 3 * hd];
                for r in 0..rows {
                    let row = &mut qkv[r * 3 * hd..(r + 1) * 3 * hd];
                    row[..hd].copy_from_slice(&q[r * hd..(r + 1) * hd]);
                    row[hd..2 * hd].copy_from_slice(&k[r * hd..(r + 1) * hd]);
                    row[2 * hd..].copy_from_slice(&v[r * hd..(r + 1) * hd]);
                }
                let b = self.up(&qkv)?;
                let st = AttnShape {
                    ld_q: 3 * hd,
                    ld_k: 3 * hd,
                    ld_v: 3 * hd,
                    ..s
                };
                let (q, k, v) = (At::new(&b, 0), At::new(&b, hd), At::new(&b, 2 * hd));
                ops::attention(dev, At::from(&out), q, k, v, st, kernel)?
            }
            QkvLayout::Dense | QkvLayout::StridedQ(_) => {
                let ld_q = match layout {
                    QkvLayout::StridedQ(ld) => ld,
                    _ => hd,
                };
                let rows = d.batch * d.lq;
                let mut qp = vec![f32::NAN; (rows - 1) * ld_q + hd];
                for r in 0..rows {
                    qp[r * ld_q..r * ld_q + hd].copy_from_slice(&q[r * hd..(r + 1) * hd]);
                }
                let (qd, kd, vd) = (self.up(&qp)?, self.up(k)?, self.up(v)?);
                let st = AttnShape { ld_q, ..s };
                let (q, k, v) = (At::from(&qd), At::from(&kd), At::from(&vd));
                ops::attention(dev, At::from(&out), q, k, v, st, kernel)?
            }
        };
        if let Some(stem) = expect {
            if !ran.starts_with(stem) {
                return Err(OpError::Check(format!(
                    "{kernel:?} ran {ran}, expected {stem}_*"
                )));
            }
        }
        self.down(&out, q.len())
    }

    fn attention_materialized(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        d: AttnDims,
        chunk_rows: usize,
    ) -> OpResult<Vec<f32>> {
        let s = AttnShape::dense(d.batch, d.heads, d.lq, d.lk, d.head_dim);
        let budget = 4 * d.heads * d.lk * chunk_rows;
        let (rows, _) = ops::attention_materialized_chunk(&s, budget)
            .ok_or_else(|| OpError::Check("no chunk".into()))?;
        if rows != chunk_rows.min(d.lq) {
            return Err(OpError::Check(format!(
                "chunks of {rows} rows, asked for {chunk_rows}"
            )));
        }
        let (qd, kd, vd) = (self.up(q)?, self.up(k)?, self.up(v)?);
        let out = self.poisoned(q.len())?;
        ops::attention_materialized_with(
            self.dev(),
            At::from(&out),
            At::from(&qd),
            At::from(&kd),
            At::from(&vd),
            s,
            budget,
        )?;
        self.down(&out, q.len())
    }

    fn group_norm_with(
        &self,
        x: &[f32],
        g: &[f32],
        b: &[f32],
        d: NormDims,
        silu: bool,
        chunks: Option<usize>,
        in_place: bool,
    ) -> OpResult<Vec<f32>> {
        let (xd, gd, bd) = (self.up(x)?, self.up(g)?, self.up(b)?);
        let y = if in_place {
            None
        } else {
            Some(self.poisoned(x.len())?)
        };
        let yd = y.as_ref().unwrap_or(&xd);
        let shape = (d.batch, d.channels, d.hw);
        ops::group_norm_with(
            self.dev(),
            yd,
            &xd,
            &gd,
            &bd,
            shape,
            d.groups,
            d.eps,
            silu,
            chunks,
        )?;
        self.down(yd, x.len())
    }

    fn softmax_rows(&self, x: &[f32], rows: usize, n: usize) -> OpResult<Vec<f32>> {
        let mut xd = self.up(x)?;
        ops::softmax_rows(self.dev(), &mut xd, rows, n)?;
        self.down(&xd, x.len())
    }

    fn softmax_rows_from_f32(&self, x: &[f32], rows: usize, n: usize) -> OpResult<Vec<f32>> {
        let xd = self.up32(x)?;
        let mut y = self.poisoned(x.len())?;
        ops::softmax_rows_from_f32(self.dev(), &mut y, &xd, rows, n)?;
        self.down(&y, x.len())
    }

    fn add_bias_rows(
        &self,
        y: &[f32],
        bias: &[f32],
        n: usize,
        offset: usize,
    ) -> OpResult<Vec<f32>> {
        let mut buf = vec![0.0; offset];
        buf.extend_from_slice(y);
        let (yd, bd) = (self.up(&buf)?, self.up(bias)?);
        ops::add_bias_rows(self.dev(), At::new(&yd, offset), &bd, y.len() / n, n)?;
        untouched_prefix(self.down(&yd, buf.len())?, offset, 0.0, "add_bias_rows")
    }

    fn add_bias_channels(
        &self,
        y: &[f32],
        bias: &[f32],
        dims: (usize, usize, usize),
    ) -> OpResult<Vec<f32>> {
        let (mut yd, bd) = (self.up(y)?, self.up(bias)?);
        ops::add_bias_channels(self.dev(), &mut yd, &bd, dims)?;
        self.down(&yd, y.len())
    }

    fn lidb_compose(
        &self,
        inputs: &[Vec<f32>],
        layers: &[(usize, usize)],
        (r, a, b): (usize, usize, usize),
        alpha: f32,
    ) -> OpResult<Out> {
        if T::SUFFIX != "f32" {
            return Err(OpError::NotHere("lidb_compose is f32 only".into()));
        }
        let dev = self.dev();
        let (mut table, mut keep) = (Vec::new(), Vec::new());
        let mut max_out = 0;
        for (l, &(din, dout)) in layers.iter().enumerate() {
            let i = &inputs[4 * l..4 * l + 4];
            let nan = |n: usize| dev.upload(&vec![f32::NAN; n]);
            let bufs = [
                self.up32(&i[0])?,
                self.up32(&i[1])?,
                self.up32(&i[2])?,
                self.up32(&i[3])?,
                nan(r * din)?,
                nan(dout * r)?,
            ];
            table.push(ComposeLayer {
                d_train: dev.ptr(&bufs[0]),
                u_train: dev.ptr(&bufs[1]),
                d_aux: dev.ptr(&bufs[2]),
                u_aux: dev.ptr(&bufs[3]),
                down: dev.ptr(&bufs[4]),
                up: dev.ptr(&bufs[5]),
                din: din as i64,
                dout: dout as i64,
            });
            max_out = max_out.max(r * din + dout * r);
            keep.push((bufs, din, dout));
        }
        let t = dev.upload(&table)?;
        ops::lidb_compose(dev, &t, table.len(), max_out, (r, a, b), alpha)?;
        let mut out = Vec::new();
        for (bufs, din, dout) in &keep {
            out.push(dev.download(&bufs[4], r * din)?);
            out.push(dev.download(&bufs[5], dout * r)?);
        }
        Ok(out)
    }

    fn lidb_merge(&self, inputs: &[Vec<f32>], specs: &[MergeSpec]) -> OpResult<Out> {
        let dev = self.dev();
        let tsz = std::mem::size_of::<T>() as u64;
        let mut it = inputs.iter();
        let (mut layers, mut factors, mut keep) = (Vec::new(), Vec::new(), Vec::new());
        let mut ws = Vec::new();
        let mut max_dout = 0;
        for s in specs {
            let first = factors.len();
            let base = it.next().expect("W_base");
            for &(rank, scale) in &s.factors {
                let (dd, ud) = (
                    self.up32(it.next().expect("down"))?,
                    self.up32(it.next().expect("up"))?,
                );
                factors.push(Factor {
                    down: dev.ptr(&dd),
                    up: dev.ptr(&ud),
                    rank: rank as i32,
                    scale,
                });
                keep.push((dd, ud));
            }
            // W_base and W at element `offset` of their buffers; W's buffer all NaN.
            let mut base_buf = vec![0.0; s.offset];
            base_buf.extend_from_slice(base);
            let bd = self.up(&base_buf)?;
            let wd = self.poisoned(s.offset + s.dout * s.din)?;
            layers.push(MergeLayer {
                w_base: dev.ptr(&bd) + s.offset as u64 * tsz,
                w: dev.ptr(&wd) + s.offset as u64 * tsz,
                dout: s.dout as i64,
                din: s.din as i64,
                first_factor: first as i32,
                n_factors: s.factors.len() as i32,
            });
            max_dout = max_dout.max(s.dout);
            ws.push((bd, wd));
        }
        let lt = dev.upload(&layers)?;
        let ft = if factors.is_empty() {
            dev.upload(&[Factor::default()])?
        } else {
            dev.upload(&factors)?
        };
        ops::lidb_merge::<T>(dev, &lt, layers.len(), max_dout, &ft)?;
        let mut out = Vec::new();
        for (s, (_, wd)) in specs.iter().zip(&ws) {
            let w = self.down(wd, s.offset + s.dout * s.din)?;
            out.push(untouched_prefix(w, s.offset, f32::NAN, "lidb_merge")?);
        }
        drop(keep);
        Ok(out)
    }

    fn conv2d_backward_with(
        &self,
        dy: &[f32],
        w: &[f32],
        p: &Conv2d,
        scratch_bytes: usize,
    ) -> OpResult<Vec<f32>> {
        let (dyd, wd) = (self.up(dy)?, self.up(w)?);
        let n = p.batch * p.c_in * p.h * p.w;
        let mut dx = self.poisoned(n)?;
        ops::conv2d_backward_with(self.dev(), &mut dx, &dyd, &wd, p, scratch_bytes)?;
        self.down(&dx, n)
    }

    fn group_norm_backward_with(
        &self,
        i: &[Vec<f32>],
        d: NormDims,
        silu: bool,
        chunks: Option<usize>,
    ) -> OpResult<Vec<f32>> {
        let (xd, gd, bd, dyd) = (
            self.up(&i[0])?,
            self.up(&i[1])?,
            self.up(&i[2])?,
            self.up(&i[3])?,
        );
        let dx = self.poisoned(i[0].len())?;
        let shape = (d.batch, d.channels, d.hw);
        let used = ops::group_norm_backward_with(
            self.dev(),
            [&dx, &xd, &gd, &bd, &dyd],
            shape,
            d.groups,
            d.eps,
            silu,
            chunks,
        )?;
        if let Some(c) = chunks {
            if used != c {
                return Err(OpError::Check(format!("ran {used} chunks, asked for {c}")));
            }
        }
        self.down(&dx, i[0].len())
    }

    fn attention_backward_with(
        &self,
        i: &[Vec<f32>],
        d: AttnDims,
        chunk_rows: usize,
    ) -> OpResult<Vec<f32>> {
        let s = AttnShape::dense(d.batch, d.heads, d.lq, d.lk, d.head_dim);
        let budget = 4 * d.heads * d.lk * chunk_rows;
        let (rows, _) = ops::attention_materialized_chunk(&s, budget)
            .ok_or_else(|| OpError::Check("no chunk".into()))?;
        if rows != chunk_rows.min(d.lq) {
            return Err(OpError::Check(format!(
                "chunks of {rows} rows, asked for {chunk_rows}"
            )));
        }
        let ins = [
            self.up(&i[0])?,
            self.up(&i[1])?,
            self.up(&i[2])?,
            self.up(&i[3])?,
        ];
        let (nq, nk) = (i[0].len(), i[1].len());
        let (dq, dk, dv) = (self.poisoned(nq)?, self.poisoned(nk)?, self.poisoned(nk)?);
        ops::attention_backward_with(
            self.dev(),
            [&dq, &dk, &dv],
            [&ins[0], &ins[1], &ins[2], &ins[3]],
            s,
            d.causal,
            budget,
        )?;
        Ok([
            self.down(&dq, nq)?,
            self.down(&dk, nk)?,
            self.down(&dv, nk)?,
        ]
        .concat())
    }

    fn attention_backward_flash(
        &self,
        i: &[Vec<f32>],
        d: AttnDims,
        splits: Option<usize>,
    ) -> OpResult<Vec<f32>> {
        let s = AttnShape::dense(d.batch, d.heads, d.lq, d.lk, d.head_dim);
        if !ops::flash_backward_applies::<T>(&s) {
            return Err(OpError::NotHere(format!(
                "the flash backward in {} at head dim {}",
                T::SUFFIX,
                d.head_dim
            )));
        }
        let ins = [
            self.up(&i[0])?,
            self.up(&i[1])?,
            self.up(&i[2])?,
            self.up(&i[3])?,
        ];
        let (nq, nk) = (i[0].len(), i[1].len());
        let (dq, dk, dv) = (self.poisoned(nq)?, self.poisoned(nk)?, self.poisoned(nk)?);
        let ran = ops::attention_backward_flash(
            self.dev(),
            [&dq, &dk, &dv],
            [&ins[0], &ins[1], &ins[2], &ins[3]],
            s,
            d.causal,
            splits,
        )?;
        if splits.is_some_and(|n| n != ran) {
            return Err(OpError::Check(format!(
                "ran {ran} splits, asked for {splits:?}"
            )));
        }
        Ok([
            self.down(&dq, nq)?,
            self.down(&dk, nk)?,
            self.down(&dv, nk)?,
        ]
        .concat())
    }

    fn attention_backward_rows(
        &self,
        s: &[f32],
        dp: &[f32],
        lk: usize,
        rows_per_head: usize,
        q0: usize,
        causal: bool,
    ) -> OpResult<Out> {
        let (sd, dpd) = (self.up32(s)?, self.up32(dp)?);
        let (p, ds) = (self.poisoned(s.len())?, self.poisoned(s.len())?);
        let rows_lk = (s.len() / lk, lk);
        ops::attention_backward_rows(
            self.dev(),
            &p,
            &ds,
            &sd,
            &dpd,
            rows_lk,
            rows_per_head,
            q0,
            causal,
        )?;
        Ok(vec![self.down(&p, s.len())?, self.down(&ds, s.len())?])
    }

    fn cast_from_f32(&self, x: &[f32]) -> OpResult<Vec<f32>> {
        let xd = self.up32(x)?;
        let y = self.poisoned(x.len())?;
        ops::cast_from_f32(self.dev(), &y, &xd, x.len())?;
        self.down(&y, x.len())
    }

    fn lora_bgmv(&self, inputs: &[Vec<f32>], c: &Bgmv) -> OpResult<Vec<f32>> {
        let dev = self.dev();
        let s = c.shape;
        let (xd, yd) = (self.up(&inputs[0])?, self.up(&inputs[1])?);
        let mut facs = Vec::new();
        let mut keep = Vec::new();
        for (a, (&rank, &scale)) in c.ranks.iter().zip(&c.scales).enumerate() {
            let (dd, ud) = (
                self.up32(&inputs[2 + 2 * a])?,
                self.up32(&inputs[3 + 2 * a])?,
            );
            facs.push(Factor {
                down: dev.ptr(&dd),
                up: dev.ptr(&ud),
                rank: rank as i32,
                scale,
            });
            keep.push((dd, ud));
        }
        let (id, fd) = (dev.upload(&c.index)?, dev.upload(&facs)?);
        ops::lora_bgmv::<T>(dev, At::from(&yd), At::from(&xd), &id, &fd, facs.len(), s)?;
        drop(keep);
        self.down(&yd, inputs[1].len())
    }
}
