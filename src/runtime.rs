//! The runtime: which device runs the ops and how many CPU threads they may use.

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
        let s = s.trim();
        match s {
            "" | "auto" => Ok(DeviceRequest::Auto),
            "cpu" => Ok(DeviceRequest::Cpu),
            "cuda" => Ok(DeviceRequest::Cuda(0)),
            _ => {
                let n = s.strip_prefix("cuda:").and_then(|n| n.parse::<u32>().ok());
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

/// Device choice and the CPU thread pool every op of this runtime runs in.
pub struct Runtime {
    device: Device,
    pool: rayon::ThreadPool,
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
    pub fn new(opts: RuntimeOptions) -> Result<Runtime> {
        let device = match opts.device {
            DeviceRequest::Cpu => Device::Cpu,
            DeviceRequest::Cuda(n) => cuda_device(n)?,
            DeviceRequest::Auto => match cuda_device(0) {
                Ok(d) => d,
                Err(e) => {
                    log::info!("using the CPU backend ({e})");
                    Device::Cpu
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
        Ok(Runtime { device, pool })
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
fn cuda_device(_n: u32) -> Result<Device> {
    Err(Error::NoDevice(
        "this build of hdb has no CUDA support (built without the 'cuda' feature)".into(),
    ))
}

#[cfg(feature = "cuda")]
fn cuda_device(n: u32) -> Result<Device> {
    // cudarc panics when libcuda is missing; probe for the library first.
    // SAFETY: the probe only tries to dlopen the driver library.
    let present = unsafe { cudarc::driver::sys::is_culib_present() };
    if !present {
        return Err(Error::NoDevice(
            "no CUDA driver found (libcuda.so could not be loaded)".into(),
        ));
    }
    let count = std::panic::catch_unwind(cudarc::driver::CudaContext::device_count)
        .map_err(|_| Error::NoDevice("the CUDA driver failed to initialise".into()))?
        .map_err(|e| Error::NoDevice(format!("the CUDA driver failed to initialise: {e:?}")))?;
    if n as i64 >= count as i64 {
        return Err(Error::NoDevice(format!(
            "cuda:{n} requested but {count} CUDA device(s) are present"
        )));
    }
    Err(Error::Unsupported(format!(
        "cuda:{n} is present but hdb's CUDA backend is not implemented yet; use 'cpu'"
    )))
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
}
