//! Kernel launches as data ([`KernelLaunch`]), built by [`Launch`] with every integer checked,
//! and run on a device.

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::{driver_err, guard, CudaDevice, DeviceElem};
use crate::error::{Error, Result};

/// One kernel argument: a device address, an integer or a float, passed by value.
#[derive(Clone, Copy, Debug)]
pub enum Param {
    U64(u64),
    I64(i64),
    I32(i32),
    F32(f32),
}

impl From<u64> for Param {
    fn from(v: u64) -> Self {
        Param::U64(v)
    }
}
impl From<i64> for Param {
    fn from(v: i64) -> Self {
        Param::I64(v)
    }
}
impl From<i32> for Param {
    fn from(v: i32) -> Self {
        Param::I32(v)
    }
}
impl From<f32> for Param {
    fn from(v: f32) -> Self {
        Param::F32(v)
    }
}

/// One kernel launch as data: what the ops hand the driver, with device addresses as plain `u64`
/// parameters. Ops compute theirs with a pure `*_launch` function (no device) and run it, so
/// tests/backend_ops/ can run the very same launch on the host emulator.
#[derive(Clone, Debug)]
pub struct KernelLaunch {
    /// The kernel file (`"attention.cu"`).
    pub file: &'static str,
    /// The kernel (`"attention_scalar_causal_f16"`).
    pub kernel: String,
    pub cfg: LaunchConfig,
    /// The arguments, in the kernel's order and types.
    pub params: Vec<Param>,
}

impl KernelLaunch {
    /// Launches it on `dev`'s stream.
    pub(crate) fn run(&self, dev: &CudaDevice) -> Result<()> {
        let cfg = self.cfg;
        let f = dev.function_dyn_smem(self.file, &self.kernel, cfg.shared_mem_bytes)?;
        guard(&self.kernel, || {
            let mut b = dev.stream().launch_builder(&f);
            for p in &self.params {
                match p {
                    Param::U64(v) => b.arg(v),
                    Param::I64(v) => b.arg(v),
                    Param::I32(v) => b.arg(v),
                    Param::F32(v) => b.arg(v),
                };
            }
            // SAFETY: each op checks every buffer's extent against the kernel's contract before
            // building its launch, and the launch passes the arguments in the kernel's order
            // and types (tests/backend_ops/ checks both on the host emulator, which compares
            // each argument's kind with the kernel's C signature).
            unsafe { b.launch(cfg) }
                .map(|_| ())
                .map_err(driver_err(&format!("launching {}", self.kernel)))
        })
    }
}

/// CUDA's grid limits: x up to 2^31 - 1 blocks, y and z up to 65535.
const GRID_MAX: [usize; 3] = [i32::MAX as usize, 65535, 65535];

/// Builds a [`KernelLaunch`]: the kernel, its grid, block and dynamic shared memory, then its
/// arguments in the kernel's order. Every `usize` becomes the kernel's `int` or `long long`
/// (or a grid extent) through a checked conversion; the first that does not fit is the error
/// [`Launch::build`] returns, naming the kernel and the argument, so no shape ever reaches a
/// kernel truncated.
#[must_use]
pub(crate) struct Launch {
    l: KernelLaunch,
    err: Option<Error>,
}

impl Launch {
    /// Kernel `kernel` of `kernels/<file>`, on a 1 x 1 x 1 grid of one thread until told more.
    pub(crate) fn new(file: &'static str, kernel: impl Into<String>) -> Self {
        Launch {
            l: KernelLaunch {
                file,
                kernel: kernel.into(),
                cfg: LaunchConfig {
                    grid_dim: (1, 1, 1),
                    block_dim: (1, 1, 1),
                    shared_mem_bytes: 0,
                },
                params: Vec::new(),
            },
            err: None,
        }
    }

    /// Kernel `<op>_<dtype of T>` of `kernels/<file>`.
    pub(crate) fn of<T: DeviceElem>(file: &'static str, op: &str) -> Self {
        Launch::new(file, format!("{op}_{}", T::SUFFIX))
    }

    fn fail(&mut self, msg: String) {
        if self.err.is_none() {
            self.err = Some(Error::Internal(format!("{}: {msg}", self.l.kernel)));
        }
    }

    /// A grid of `x * y * z` blocks, each within CUDA's limits (a zero extent is one block:
    /// the kernels' bounds checks make the spare block a no-op).
    pub(crate) fn grid(mut self, (x, y, z): (usize, usize, usize)) -> Self {
        let mut dims = [1u32; 3];
        for (i, (&v, &max)) in [x, y, z].iter().zip(&GRID_MAX).enumerate() {
            if v > max {
                self.fail(format!(
                    "grid.{} = {v} blocks exceeds CUDA's {max}",
                    ["x", "y", "z"][i]
                ));
            } else {
                dims[i] = v.max(1) as u32;
            }
        }
        self.l.cfg.grid_dim = (dims[0], dims[1], dims[2]);
        self
    }

    /// `threads` threads a block, in x.
    pub(crate) fn block(self, threads: u32) -> Self {
        self.block3((threads, 1, 1))
    }

    /// A block of `x * y * z` threads (the kernel's constant).
    pub(crate) fn block3(mut self, dims: (u32, u32, u32)) -> Self {
        self.l.cfg.block_dim = dims;
        self
    }

    /// `bytes` of dynamic shared memory.
    pub(crate) fn smem(mut self, bytes: usize) -> Self {
        match u32::try_from(bytes) {
            Ok(b) => self.l.cfg.shared_mem_bytes = b,
            Err(_) => self.fail(format!("{bytes} bytes of shared memory")),
        }
        self
    }

    /// The element-wise contract over `n` elements: 256 threads a block, ceil(n / 256) blocks
    /// up to 65536, grid-stride.
    pub(crate) fn elementwise(self, n: usize) -> Self {
        self.grid((n.div_ceil(256).clamp(1, 65536), 1, 1))
            .block(256)
    }

    /// A device address (a pointer argument).
    pub(crate) fn ptr(mut self, addr: u64) -> Self {
        self.l.params.push(Param::U64(addr));
        self
    }

    /// An `int` argument named `arg` (for the error).
    pub(crate) fn int(mut self, arg: &str, v: usize) -> Self {
        match i32::try_from(v) {
            Ok(v) => self.l.params.push(Param::I32(v)),
            Err(_) => self.fail(format!(
                "argument '{arg}' = {v} does not fit the kernel's int"
            )),
        }
        self
    }

    /// A `long long` argument named `arg` (for the error).
    pub(crate) fn long(mut self, arg: &str, v: usize) -> Self {
        match i64::try_from(v) {
            Ok(v) => self.l.params.push(Param::I64(v)),
            Err(_) => self.fail(format!(
                "argument '{arg}' = {v} does not fit the kernel's long long"
            )),
        }
        self
    }

    /// An `int` flag (0 or 1).
    pub(crate) fn flag(mut self, v: bool) -> Self {
        self.l.params.push(Param::I32(v as i32));
        self
    }

    /// A `float` argument.
    pub(crate) fn float(mut self, v: f32) -> Self {
        self.l.params.push(Param::F32(v));
        self
    }

    /// The launch, or the first conversion that failed.
    pub(crate) fn build(self) -> Result<KernelLaunch> {
        match self.err {
            Some(e) => Err(e),
            None => Ok(self.l),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions_are_checked_and_named() {
        let l = Launch::new("x.cu", "k_f16")
            .grid((3, 2, 1))
            .block(128)
            .ptr(16)
            .int("n", 7)
            .long("rows", 1 << 40)
            .flag(true)
            .float(0.5)
            .build()
            .unwrap();
        assert_eq!(l.cfg.grid_dim, (3, 2, 1));
        assert_eq!(l.cfg.block_dim, (128, 1, 1));
        assert_eq!(l.params.len(), 5);
        let e = Launch::new("x.cu", "k_f16")
            .int("h", 1 << 31)
            .int("w", usize::MAX)
            .build()
            .unwrap_err()
            .to_string();
        assert!(e.contains("k_f16") && e.contains("'h'"), "{e}");
        let e = Launch::new("x.cu", "k_bf16")
            .grid((1, 70_000, 1))
            .build()
            .unwrap_err()
            .to_string();
        assert!(e.contains("k_bf16") && e.contains("grid.y"), "{e}");
        assert!(Launch::new("x.cu", "k")
            .grid((1 << 31, 1, 1))
            .build()
            .is_err());
        assert_eq!(
            Launch::new("x.cu", "k")
                .elementwise(0)
                .build()
                .unwrap()
                .cfg
                .grid_dim,
            (1, 1, 1)
        );
    }
}
