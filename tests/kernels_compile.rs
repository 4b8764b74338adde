//! Every CUDA kernel compiles with NVRTC for every CI architecture, and the PTX holds exactly
//! the kernels `backend::cuda::KERNEL_FILES` lists. The compiling tests need libnvrtc, not a
//! GPU, so a plain `cargo test` leaves them out (#[ignore]); scripts/test-all.sh runs them:
//!
//!     eval "$(scripts/nvrtc-env.sh)" && cargo test --test kernels_compile -- --include-ignored
//!
//! Run so, without libnvrtc they fail (they do not skip): CI installs it, so a skip would hide
//! a kernel that no longer compiles.
#![cfg(feature = "cuda")]

use std::collections::BTreeSet;
use std::path::Path;

use hdb::backend::cuda::{compile_ptx, nvrtc_available, ptx_entries, CI_ARCHS, KERNEL_FILES};

fn require_nvrtc() {
    assert!(
        nvrtc_available(),
        "libnvrtc could not be loaded, so the CUDA kernels cannot be compile-checked.\n\
         Install NVRTC (no GPU or CUDA toolkit needed) and put it on the loader path:\n\
         \n    eval \"$(scripts/nvrtc-env.sh)\" && cargo test --test kernels_compile -- --include-ignored\n\n\
         (the script pip-installs nvidia-cuda-nvrtc-cu12 into target/nvrtc-venv and prints\n\
         LD_LIBRARY_PATH and HDB_CUDA_INCLUDE; .ci/run does the same)"
    );
}

/// Extra NVRTC include folders: `HDB_CUDA_INCLUDE`, `:`-separated.
fn include_paths() -> Vec<String> {
    std::env::var("HDB_CUDA_INCLUDE")
        .map(|v| {
            v.split(':')
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect()
        })
        .unwrap_or_default()
}

#[test]
#[ignore = "needs libnvrtc: eval \"$(scripts/nvrtc-env.sh)\"; cargo test --test kernels_compile -- --include-ignored"]
fn every_kernel_compiles_for_sm80_and_sm90() {
    require_nvrtc();
    let includes = include_paths();
    // One thread per (file, arch): NVRTC programs are independent, and the attention file
    // dominates, so this is about as fast as the slowest single compile allows.
    let jobs: Vec<_> = KERNEL_FILES
        .iter()
        .flat_map(|f| CI_ARCHS.iter().map(move |&a| (f, a)))
        .collect();
    let results: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = jobs
            .iter()
            .map(|&(f, arch)| {
                let includes = &includes;
                s.spawn(move || {
                    let t = std::time::Instant::now();
                    let r = compile_ptx(f, arch, includes);
                    (f, arch, r, t.elapsed())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });

    let mut failures = Vec::new();
    for (f, arch, r, took) in results {
        match r {
            Err(e) => failures.push(format!("{e}")),
            Ok(ptx) => {
                let entries: BTreeSet<&str> = ptx_entries(&ptx).into_iter().collect();
                let listed: BTreeSet<&str> = f.kernels.iter().copied().collect();
                let missing: Vec<_> = listed.difference(&entries).collect();
                let unlisted: Vec<_> = entries.difference(&listed).collect();
                if !missing.is_empty() {
                    failures.push(format!(
                        "kernels/{} for {arch}: listed kernels missing from the PTX: {missing:?}",
                        f.file
                    ));
                }
                if !unlisted.is_empty() {
                    failures.push(format!(
                        "kernels/{} for {arch}: PTX entries not listed in KERNEL_FILES: \
                         {unlisted:?}",
                        f.file
                    ));
                }
                println!(
                    "kernels/{:<15} {arch}: {:>2} kernels, {:>7} bytes of PTX, {:.2} s",
                    f.file,
                    entries.len(),
                    ptx.len(),
                    took.as_secs_f64()
                );
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} problem(s):\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

#[test]
fn every_kernel_file_is_listed() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
    let on_disk: BTreeSet<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".cu"))
        .collect();
    let listed: BTreeSet<String> = KERNEL_FILES.iter().map(|f| f.file.to_string()).collect();
    assert_eq!(on_disk, listed, "kernels/*.cu and KERNEL_FILES differ");
}

/// The kernels include no CUDA header, so the machine running hdb needs libnvrtc alone (no
/// toolkit headers). Keep it so, or make the backend find the headers at run time.
#[test]
fn kernels_need_no_cuda_headers() {
    for f in KERNEL_FILES {
        for (i, line) in f.source().lines().enumerate() {
            let l = line.trim_start();
            if l.starts_with("#include") {
                panic!(
                    "kernels/{} (after pasting common.cuh) line {}: {l}",
                    f.file,
                    i + 1
                );
            }
        }
    }
}

/// Each file opens with its launch contract, naming every kernel it defines, and its napkin
/// math (DESIGN.md section 6).
#[test]
fn kernel_files_open_with_their_contract() {
    for f in KERNEL_FILES {
        let head: String = f
            .raw_source
            .lines()
            .take_while(|l| l.starts_with("//") || l.trim().is_empty())
            .collect::<Vec<_>>()
            .join("\n");
        assert!(
            head.contains(f.file),
            "kernels/{}: the opening comment should name the file",
            f.file
        );
        for k in f.kernels {
            // `flash_attn_d40_f16` is described as `flash_attn_d{40,...}_{f16,...}`.
            let op = k.rsplit_once('_').map_or(*k, |(op, _)| op);
            let op = match op.rsplit_once("_d") {
                Some((stem, dim)) if dim.bytes().all(|b| b.is_ascii_digit()) => stem,
                _ => op,
            };
            assert!(
                head.contains(op),
                "kernels/{}: the opening comment does not describe {op} ({k})",
                f.file
            );
        }
        assert!(
            head.to_lowercase().contains("napkin math"),
            "kernels/{}: the opening comment has no napkin math",
            f.file
        );
    }
}

#[test]
#[ignore = "needs libnvrtc: eval \"$(scripts/nvrtc-env.sh)\"; cargo test --test kernels_compile -- --include-ignored"]
fn the_kernel_cache_compiles_once_and_never_fails_a_compile() {
    use hdb::backend::cuda::ptx_cache::{ptx, Origin};
    require_nvrtc();
    let includes = include_paths();
    let dir = tempfile::tempdir().expect("tempdir");
    let cache = dir.path().join("kernels");
    let file = KERNEL_FILES
        .iter()
        .find(|f| f.file == "lora.cu")
        .expect("lora.cu");
    let fresh = compile_ptx(file, "sm_80", &includes).expect("compile");
    let (first, origin) = ptx(file, "sm_80", &includes, Some(&cache)).expect("first");
    assert_eq!((origin, &first), (Origin::Compiled, &fresh));
    let entries: Vec<_> = std::fs::read_dir(&cache)
        .expect("the cache folder was created")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        entries.len() == 1 && entries[0].starts_with("lora-sm_80-") && entries[0].ends_with(".ptx"),
        "{entries:?}"
    );
    let t = std::time::Instant::now();
    let (again, origin) = ptx(file, "sm_80", &includes, Some(&cache)).expect("again");
    println!("kernel cache hit for lora.cu in {:?}", t.elapsed());
    assert_eq!((origin, &again), (Origin::Cache, &fresh));
    // Another architecture is another entry.
    let (_, origin) = ptx(file, "sm_90", &includes, Some(&cache)).expect("sm_90");
    assert_eq!(origin, Origin::Compiled);
    assert_eq!(std::fs::read_dir(&cache).expect("dir").count(), 2);
    // A corrupt entry is compiled around and replaced.
    let path = cache.join(&entries[0]);
    std::fs::write(&path, "garbage").expect("corrupt");
    let (p, origin) = ptx(file, "sm_80", &includes, Some(&cache)).expect("after corruption");
    assert_eq!((origin, &p), (Origin::Compiled, &fresh));
    assert_eq!(
        ptx(file, "sm_80", &includes, Some(&cache)).expect("hit").1,
        Origin::Cache
    );
    // A folder that cannot be created (it would sit under a file) still compiles.
    let blocked = dir.path().join("a-file");
    std::fs::write(&blocked, "x").expect("file");
    let (p, origin) = ptx(file, "sm_80", &includes, Some(&blocked.join("cache"))).expect("blocked");
    assert_eq!((origin, &p), (Origin::Compiled, &fresh));
}
