//! The runtime: which device runs the ops and how many CPU threads they may use.
//!
//! With a CUDA device (feature `cuda`), a model placed on the runtime (`crate::Engine`) runs
//! its UNet, text encoder and VAE there (fp16 weights, uploaded once per model on first use),
//! and a hypernetwork loaded on it too (f32); the tokenizer and everything on a CPU runtime run
//! in this runtime's thread pool, which every runtime keeps.

#[cfg(feature = "cuda")]
use std::sync::Arc;

#[cfg(feature = "cuda")]
use crate::backend::cuda::CudaDevice;
use crate::error::{Error, Result};

/// What the caller asked for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeviceRequest {
    /// CUDA device 0 when a usable one exists, else the CPU.
    #[default]
    Auto,
    Cpu,
    Cuda(u32),
}

impl DeviceRequest {
    /// Parses `auto`, `cpu`, `cuda` (= `cuda:0`) or `cuda:N`.
    pub fn parse(s: &str) -> Result<Self> {
        // Exact names only: "", " cpu" or "cuda:+1" are a host's bug, not a request.
        match s {
            "auto" => Ok(DeviceRequest::Auto),
            "cpu" => Ok(DeviceRequest::Cpu),
            "cuda" => Ok(DeviceRequest::Cuda(0)),
            _ => {
                let n = s
                    .strip_prefix("cuda:")
                    .filter(|n| !n.is_empty() && n.bytes().all(|c| c.is_ascii_digit()))
                    .and_then(|n| n.parse::<u32>().ok());
                n.map(DeviceRequest::Cuda).ok_or_else(|| {
                    Error::invalid_arg(
                        "device",
                        format!("'{s}' is not one of auto, cpu, cuda, cuda:N"),
                    )
                })
            }
        }
    }
}

/// The device a runtime runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(u32),
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

#[derive(Clone, Copy, Debug, Default)]
pub struct RuntimeOptions {
    pub device: DeviceRequest,
    /// CPU threads for ops; 0 means one per available core.
    pub threads: usize,
}

/// Device choice and the CPU thread pool every CPU op of this runtime runs in.
pub struct Runtime {
    device: Device,
    pool: rayon::ThreadPool,
    /// The opened CUDA device, when `device` is CUDA.
    #[cfg(feature = "cuda")]
    cuda: Option<Arc<CudaDevice>>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("device", &self.device)
            .field("threads", &self.threads())
            .finish()
    }
}

impl Runtime {
    /// Opens the requested device: `Cuda(n)` fails as the device reports it
    /// ([`Error::NoDevice`] without a driver, a device, libnvrtc, or in a build without the
    /// `cuda` feature); `Auto` tries cuda:0 and falls back to the CPU (logged at info level).
    /// Every runtime also starts its CPU thread pool (`threads`, 0 = one per core): the
    /// tokenizer and host-side work run there, and on a CPU runtime every model too.
    pub fn new(opts: RuntimeOptions) -> Result<Runtime> {
        let (device, cuda) = match opts.device {
            DeviceRequest::Cpu => (Device::Cpu, None),
            DeviceRequest::Cuda(n) => {
                let d = cuda_device(n)?;
                (Device::Cuda(n), Some(d))
            }
            DeviceRequest::Auto => match cuda_device(0) {
                Ok(d) => (Device::Cuda(0), Some(d)),
                Err(e) => {
                    log::info!("using the CPU backend ({e})");
                    (Device::Cpu, None)
                }
            },
        };
        let threads = if opts.threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            opts.threads
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("hdb-cpu-{i}"))
            .build()
            .map_err(|e| Error::Internal(format!("cannot start {threads} CPU threads: {e}")))?;
        log::info!("runtime on {device} with {threads} CPU threads");
        #[cfg(not(feature = "cuda"))]
        let _ = cuda; // without the feature there is never a device to keep
        Ok(Runtime {
            device,
            pool,
            #[cfg(feature = "cuda")]
            cuda,
        })
    }

    /// The CUDA device of a runtime created on one (models placed on the runtime run there);
    /// None on the CPU.
    #[cfg(feature = "cuda")]
    pub fn cuda(&self) -> Option<&Arc<CudaDevice>> {
        self.cuda.as_ref()
    }

    pub fn device(&self) -> Device {
        self.device
    }

    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    /// Runs `f` inside this runtime's thread pool, so the ops it calls use its threads.
    pub fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        self.pool.install(f)
    }
}

#[cfg(not(feature = "cuda"))]
fn cuda_device(_n: u32) -> Result<std::convert::Infallible> {
    Err(Error::NoDevice(
        "this build of hdb has no CUDA support (built without the 'cuda' feature)".into(),
    ))
}

/// Opens CUDA device `n` (its driver, NVRTC and cuBLAS; see [`CudaDevice::open`]).
#[cfg(feature = "cuda")]
fn cuda_device(n: u32) -> Result<Arc<CudaDevice>> {
    Ok(Arc::new(CudaDevice::open(n as usize)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_device_strings() {
        assert_eq!(DeviceRequest::parse("auto").ok(), Some(DeviceRequest::Auto));
        assert_eq!(DeviceRequest::parse("cpu").ok(), Some(DeviceRequest::Cpu));
        assert_eq!(
            DeviceRequest::parse("cuda").ok(),
            Some(DeviceRequest::Cuda(0))
        );
        assert_eq!(
            DeviceRequest::parse("cuda:3").ok(),
            Some(DeviceRequest::Cuda(3))
        );
        let e = DeviceRequest::parse("tpu").expect_err("bad");
        assert!(e.to_string().contains("'device'"), "{e}");
        for bad in [
            "", "cpu ", " cpu", "CPU", "cuda:", "cuda:+1", "cuda: 1", "cuda:1x",
        ] {
            assert!(DeviceRequest::parse(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn auto_falls_back_to_cpu_without_cuda() {
        let rt = Runtime::new(RuntimeOptions {
            device: DeviceRequest::Auto,
            threads: 2,
        })
        .expect("runtime");
        if !cfg!(feature = "cuda") {
            assert_eq!(rt.device(), Device::Cpu);
        }
        assert_eq!(rt.threads(), 2);
    }

    #[test]
    fn cuda_without_a_usable_device_is_no_device() {
        #[cfg(feature = "cuda")]
        if crate::backend::cuda::driver_available() {
            println!("a CUDA driver is present: the no-driver error cannot be checked here");
            return;
        }
        for n in [0, 3] {
            let e = Runtime::new(RuntimeOptions {
                device: DeviceRequest::Cuda(n),
                threads: 1,
            })
            .expect_err("no CUDA device here");
            assert!(matches!(e, Error::NoDevice(_)), "cuda:{n}: {e}");
        }
    }
}
