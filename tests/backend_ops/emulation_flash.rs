//! The flash attention backward under the kernel emulation: `Emu`'s launches of
//! `flash_attn_bwd_*`, as `ops::attention_backward_flash` makes them (emulation.rs holds the
//! other ops; this one has its own file to keep that one's size).

use hdb::backend::cuda::ops::{self, AttnShape, FlashBackwardAddrs};
use hdb::backend::AttnDims;

use crate::emu_harness::{Elem, Job};
use crate::emulation::{Emu, SMS};
use crate::harness::{OpError, OpResult};

impl<T: Elem> Emu<T> {
    /// dq | dk | dv by the flash kernels, with `splits` splits of the key kernel's query tiles
    /// (None: the heuristic's for an H100's multiprocessors). Not here where the flash
    /// kernels do not apply (f32, other head dims: the materialised path is cuBLAS).
    pub fn flash_backward(
        &self,
        i: &[Vec<f32>],
        d: AttnDims,
        splits: Option<usize>,
    ) -> OpResult<Vec<f32>> {
        let s = AttnShape::dense(d.batch, d.heads, d.lq, d.lk, d.head_dim);
        if !ops::flash_backward_applies::<T>(&s) {
            return Err(OpError::NotHere(
                "the materialised attention backward (cuBLAS)".into(),
            ));
        }
        let splits = splits.unwrap_or_else(|| ops::flash_backward_splits(&s, SMS));
        let t = std::mem::size_of::<T>();
        let mut job = Job::new();
        let [q, k, v, dout] = [0, 1, 2, 3].map(|n| job.input(&T::bytes(&i[n])));
        let (nq, nk) = (i[0].len(), i[1].len());
        let (dq, dk, dv) = (job.output(nq * t), job.output(nk * t), job.output(nk * t));
        let (n_stats, n_part) = ops::flash_backward_scratch(&s, splits);
        let stats = job.output(n_stats * 4);
        let part = if n_part > 0 {
            job.output(n_part * 4)
        } else {
            0
        };
        let at = FlashBackwardAddrs {
            q,
            k,
            v,
            dout,
            dq,
            dk,
            dv,
            stats,
            part,
        };
        let launches = ops::attention_backward_flash_launches::<T>(at, &s, d.causal, splits)?;
        for l in &launches {
            job.launch(l);
        }
        let what = format!("{} {d:?} splits {splits}", launches[0].kernel);
        let got = job.run(&what, &[dq, dk, dv]);
        Ok(got.iter().flat_map(|b| T::values(b)).collect())
    }
}
