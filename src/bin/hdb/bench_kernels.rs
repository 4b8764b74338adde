//! `hdb bench kernels`: what a CUDA runtime pays to get its kernels, with and without the
//! kernel cache: each kernel file compiled by NVRTC (one at a time, as a device does on first
//! use), then read back from a fresh cache folder. Needs libnvrtc, not a GPU.

use std::time::Instant;

use hdb::backend::cuda::ptx_cache::{ptx, Origin};
use hdb::backend::cuda::KERNEL_FILES;

pub fn run(arch: &str, runs: usize) -> hdb::Result<()> {
    let arch: &'static str = match arch {
        "sm_80" => "sm_80",
        "sm_86" => "sm_86",
        "sm_89" => "sm_89",
        "sm_90" => "sm_90",
        other => {
            return Err(hdb::Error::invalid_arg(
                "--arch",
                format!("{other}: one of sm_80, sm_86, sm_89, sm_90"),
            ))
        }
    };
    // A fresh cache folder for this run, removed at the end.
    struct TempDir(std::path::PathBuf);
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let dir = TempDir(std::env::temp_dir().join(format!(
        "hdb-bench-kernels-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    )));
    let runs = runs.max(1);
    println!(
        "{:<18} {:>10} {:>14} {:>14} {:>8}",
        "kernel file", "PTX KB", "NVRTC ms", "cache hit ms", "ratio"
    );
    let (mut compile_total, mut hit_total) = (0.0, 0.0);
    for f in KERNEL_FILES {
        let t = Instant::now();
        let (p, origin) = ptx(f, arch, &[], Some(&dir.0))?;
        let compile = t.elapsed().as_secs_f64() * 1e3;
        if origin != Origin::Compiled {
            return Err(hdb::Error::Internal(format!(
                "{}: a fresh cache folder already had it",
                f.file
            )));
        }
        let mut hits = Vec::with_capacity(runs);
        for _ in 0..runs {
            let t = Instant::now();
            let (again, origin) = ptx(f, arch, &[], Some(&dir.0))?;
            hits.push(t.elapsed().as_secs_f64() * 1e3);
            if origin != Origin::Cache || again != p {
                return Err(hdb::Error::Internal(format!(
                    "{}: the cache did not give back the compiled PTX",
                    f.file
                )));
            }
        }
        let hit = crate::median(&mut hits);
        compile_total += compile;
        hit_total += hit;
        println!(
            "{:<18} {:>10.0} {:>14.0} {:>14.2} {:>7.0}x",
            f.file,
            p.len() as f64 / 1024.0,
            compile,
            hit,
            compile / hit
        );
    }
    println!(
        "{:<18} {:>10} {:>14.0} {:>14.2} {:>7.0}x",
        "all files",
        "",
        compile_total,
        hit_total,
        compile_total / hit_total
    );
    println!(
        "(NVRTC {arch}, files compiled one after another; cache hits are the median of {runs}. \
         The driver's own PTX-to-SASS step on a GPU comes on top of either.)"
    );
    Ok(())
}
