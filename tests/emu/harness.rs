//! The kernel emulation's driver (tests/backend_ops/, `emu::` tests): builds tests/emu/driver.cpp
//! with the kernel sources, writes a job (buffers, launches from `backend::cuda::ops`' pure
//! launch plans, saves) to it, and runs it under two thread schedules that must agree. Also
//! builds the emulated GPU library (tests/emu/gpu.cpp) for scripts/emulated-gpu.sh.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use half::{bf16, f16};
use hdb::backend::cuda::ops::{KernelLaunch, Param};
use hdb::backend::cuda::{DeviceElem, KERNEL_FILES};

// ---------------------------------------------------------------------------------------------
// The driver
// ---------------------------------------------------------------------------------------------

/// `-fno-extern-tls-init`: the kernels' `extern __shared__` arrays are `extern thread_local`
/// under the emulation, and g++ would call a TLS init function that does not exist.
pub const CXX_FLAGS: &[&str] = &[
    "-O2",
    "-std=c++20",
    "-fno-extern-tls-init",
    "-DHDB_EMULATE",
    "-Wno-unknown-pragmas",
];

/// The driver binary, built once per test process (and reused across runs while the header,
/// driver and kernel sources are unchanged).
pub fn driver() -> &'static Path {
    static DRIVER: OnceLock<PathBuf> = OnceLock::new();
    DRIVER.get_or_init(build_driver)
}

pub fn build_driver() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("kernel_emulation");
    build("driver.cpp", &[], &dir, "driver")
}

/// The driver with tests/emu/selftest.cuh's faulty kernels too (tests/kernel_emulation/
/// selftest.rs), built once per test process.
pub fn selftest_driver() -> &'static Path {
    static DRIVER: OnceLock<PathBuf> = OnceLock::new();
    DRIVER.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("kernel_emulation");
        build(
            "driver.cpp",
            &["-DHDB_EMU_SELFTEST"],
            &dir,
            "driver-selftest",
        )
    })
}

/// The emulated GPU (tests/emu/gpu.cpp): `dir/libcuda.so`, and `dir/libcublas.so` naming the
/// same file, for LD_LIBRARY_PATH (scripts/emulated-gpu.sh). Rebuilt when a source changed.
pub fn build_gpu_library(dir: &Path) -> PathBuf {
    let lib = build(
        "gpu.cpp",
        &[
            "-DHDB_EMU_SHARED_LIBRARY",
            "-fPIC",
            "-shared",
            "-Wl,-soname,libcuda.so",
        ],
        dir,
        "libcuda",
    );
    // Earlier builds are not needed (a running test keeps its mapping of a removed file).
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.starts_with("libcuda-") && e.path() != lib {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    for name in ["libcuda.so", "libcublas.so"] {
        let link = dir.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(lib.file_name().expect("a file name"), &link)
            .unwrap_or_else(|e| panic!("linking {}: {e}", link.display()));
    }
    dir.join("libcuda.so")
}

/// Compiles tests/emu/`main` with every kernel file into `dir/<stem>-<hash of the inputs>`
/// (kept while the sources, flags and compiler are unchanged).
fn build(main: &str, extra: &[&str], dir: &Path, stem: &str) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    // hdb_emu_kernels.inc: every kernel file, and every kernel by name for the driver's table.
    let mut inc = String::new();
    for f in KERNEL_FILES {
        inc += &format!("#include \"{}\"\n", f.file);
    }
    inc += "#define HDB_EMU_KERNELS";
    for f in KERNEL_FILES {
        for k in f.kernels {
            inc += &format!(" \\\n    HDB_EMU_KERNEL({k})");
        }
    }
    inc += "\n";
    let mut h = DefaultHasher::new();
    (inc.as_str(), &cxx, CXX_FLAGS, extra).hash(&mut h);
    let mut sources = vec![
        root.join("tests/emu/cuda_emu.h"),
        root.join("tests/emu/guard.h"),
        root.join("tests/emu").join(main),
        root.join("tests/emu/selftest.cuh"),
        root.join("kernels/common.cuh"),
    ];
    sources.extend(
        KERNEL_FILES
            .iter()
            .map(|f| root.join("kernels").join(f.file)),
    );
    for s in &sources {
        std::fs::read(s)
            .unwrap_or_else(|e| panic!("reading {}: {e}", s.display()))
            .hash(&mut h);
    }
    std::fs::create_dir_all(dir).expect("creating the emulation build folder");
    let exe = dir.join(format!("{stem}-{:016x}", h.finish()));
    if exe.exists() {
        return exe;
    }
    let inc_dir = dir.join(format!("inc-{}", std::process::id()));
    std::fs::create_dir_all(&inc_dir).expect("creating the include folder");
    std::fs::write(inc_dir.join("hdb_emu_kernels.inc"), inc).expect("writing the kernel list");
    let tmp = dir.join(format!("{stem}-tmp-{}", std::process::id()));
    let out = Command::new(&cxx)
        .args(CXX_FLAGS)
        .args(extra)
        .arg("-I")
        .arg(root.join("kernels"))
        .arg("-I")
        .arg(root.join("tests/emu"))
        .arg("-I")
        .arg(&inc_dir)
        .arg(root.join("tests/emu").join(main))
        .arg("-o")
        .arg(&tmp)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run the C++ compiler `{cxx}` ({e}): the kernel emulation needs a \
                 C++20 compiler (install g++, or set CXX)"
            )
        });
    assert!(
        out.status.success(),
        "building tests/emu/{main} with `{cxx}` failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Atomic: a concurrent run sees the old name or the finished binary.
    std::fs::rename(&tmp, &exe).expect("moving the build into place");
    let _ = std::fs::remove_dir_all(&inc_dir);
    exe
}

// ---------------------------------------------------------------------------------------------
// Jobs: buffers, launches, outputs
// ---------------------------------------------------------------------------------------------

/// A storage type of the kernels, with its bytes.
pub trait Elem: DeviceElem {
    fn bytes(v: &[f32]) -> Vec<u8>;
    fn values(b: &[u8]) -> Vec<f32>;
}
impl Elem for f32 {
    fn bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }
    fn values(b: &[u8]) -> Vec<f32> {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }
}
impl Elem for f16 {
    fn bytes(v: &[f32]) -> Vec<u8> {
        v.iter()
            .flat_map(|&x| f16::from_f32(x).to_bits().to_le_bytes())
            .collect()
    }
    fn values(b: &[u8]) -> Vec<f32> {
        b.chunks_exact(2)
            .map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect()
    }
}
impl Elem for bf16 {
    fn bytes(v: &[f32]) -> Vec<u8> {
        v.iter()
            .flat_map(|&x| bf16::from_f32(x).to_bits().to_le_bytes())
            .collect()
    }
    fn values(b: &[u8]) -> Vec<f32> {
        b.chunks_exact(2)
            .map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect()
    }
}

/// One driver run: buffers (inputs from files, outputs NaN-filled), then launches in order.
pub struct Job {
    pub dir: tempfile::TempDir,
    pub script: String,
    pub buffers: usize,
}

impl Job {
    pub fn new() -> Self {
        Job {
            dir: tempfile::tempdir().expect("a temporary folder"),
            script: String::new(),
            buffers: 0,
        }
    }

    /// The address a launch plan passes for buffer `id` (the driver maps it back).
    pub fn address(id: usize) -> u64 {
        ((id as u64) + 1) << 40
    }

    /// A buffer holding `bytes`; returns its address.
    pub fn input(&mut self, bytes: &[u8]) -> u64 {
        let id = self.buffers;
        self.buffers += 1;
        let path = self.dir.path().join(format!("in{id}.bin"));
        std::fs::write(&path, bytes).expect("writing an input");
        self.script += &format!("buffer {id} {} {}\n", bytes.len(), path.display());
        Self::address(id)
    }

    /// A buffer of `bytes` NaN bytes (0xFF); returns its address.
    pub fn output(&mut self, bytes: usize) -> u64 {
        let id = self.buffers;
        self.buffers += 1;
        self.script += &format!("buffer {id} {bytes} fill\n");
        Self::address(id)
    }

    pub fn launch(&mut self, l: &KernelLaunch) {
        let c = &l.cfg;
        let args: Vec<String> = l
            .params
            .iter()
            .map(|p| match p {
                Param::U64(v) => format!("u64:{v:x}"),
                Param::I32(v) => format!("i32:{v}"),
                Param::I64(v) => format!("i64:{v}"),
                Param::F32(v) => format!("f32:{:x}", v.to_bits()),
            })
            .collect();
        self.script += &format!(
            "launch {} {} {} {} {} {} {} {} {} {}\n",
            l.kernel,
            c.grid_dim.0,
            c.grid_dim.1,
            c.grid_dim.2,
            c.block_dim.0,
            c.block_dim.1,
            c.block_dim.2,
            c.shared_mem_bytes,
            args.len(),
            args.join(" ")
        );
    }

    /// Runs the job twice, the threads of each block scheduled in forward and in reverse order
    /// between barriers; fails unless both give the same bytes (else the kernel has a race), and
    /// returns the bytes of the buffers at `outputs`.
    pub fn run(self, what: &str, outputs: &[u64]) -> Vec<Vec<u8>> {
        let forward = self.run_once(what, outputs, "forward");
        let reverse = self.run_once(what, outputs, "reverse");
        for (i, (f, r)) in forward.iter().zip(&reverse).enumerate() {
            if let Some(b) = f.iter().zip(r).position(|(x, y)| x != y) {
                panic!(
                    "{what}: output {i} differs at byte {b} between the forward and the \
                     reverse thread schedule: a race (a missing __syncthreads or __syncwarp)"
                );
            }
        }
        forward
    }

    pub fn run_once(&self, what: &str, outputs: &[u64], schedule: &str) -> Vec<Vec<u8>> {
        self.try_run_once(driver(), outputs, schedule)
            .unwrap_or_else(|e| panic!("{what}: the emulated kernel failed {e}"))
    }

    /// The job on `driver` under one schedule: the outputs' bytes, or the driver's exit status
    /// and stderr, with the job, when it fails.
    pub fn try_run_once(
        &self,
        driver: &Path,
        outputs: &[u64],
        schedule: &str,
    ) -> Result<Vec<Vec<u8>>, String> {
        let mut script = format!("schedule {schedule}\n{}", self.script);
        let paths: Vec<PathBuf> = outputs
            .iter()
            .map(|&a| {
                let id = (a >> 40) - 1;
                let p = self.dir.path().join(format!("out{id}-{schedule}.bin"));
                script += &format!("save {id} {}\n", p.display());
                p
            })
            .collect();
        let mut child = Command::new(driver)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting the emulation driver");
        child
            .stdin
            .take()
            .expect("driver stdin")
            .write_all(script.as_bytes())
            .expect("writing the job");
        let out = child.wait_with_output().expect("waiting for the driver");
        if !out.status.success() {
            return Err(format!(
                "({}, {schedule} schedule):\n{}\njob:\n{script}",
                out.status,
                String::from_utf8_lossy(&out.stderr),
            ));
        }
        Ok(paths
            .iter()
            .map(|p| std::fs::read(p).expect("reading an output"))
            .collect())
    }
}
