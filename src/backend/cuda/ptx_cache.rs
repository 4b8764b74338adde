//! Compiled kernels kept between processes, so NVRTC runs once per kernel source, architecture
//! and NVRTC version instead of at every start: the attention file alone takes seconds to
//! compile, which a host would otherwise pay on the first generation of every run (and
//! scripts/gpu-check.sh in every one of its test processes).
//!
//! The folder is `HDB_KERNEL_CACHE` when set (empty or `off` turns the cache off), else
//! `$XDG_CACHE_HOME/hdb/kernels`, else `$HOME/.cache/hdb/kernels` (as the CUDA driver keeps its
//! own JIT cache under `~/.nv`). An entry is one PTX file named by the kernel file, the
//! architecture and a hash of everything that shapes the PTX (the source with `common.cuh`
//! pasted in, the architecture, the compile options, the NVRTC version); its first line
//! repeats that key in full and is checked on every read, and the PTX must define every kernel
//! the file lists. Entries are written to a temporary name and renamed, so concurrent processes
//! never read half an entry. The cache never makes a compile fail: a folder that cannot be
//! created or written, or an entry that does not check out, is logged and compiled around.
//!
//! PTX is executable code for the GPU: point `HDB_KERNEL_CACHE` only at a folder that no one
//! else can write.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use super::kernels::{compile_ptx, ptx_entries, KernelFile};
use crate::error::Result;

/// The cache folder from the environment (see the module doc); `None` turns the cache off.
pub fn cache_dir() -> Option<PathBuf> {
    cache_dir_from(
        std::env::var_os("HDB_KERNEL_CACHE"),
        std::env::var_os("XDG_CACHE_HOME"),
        std::env::var_os("HOME"),
    )
}

/// [`cache_dir`] given the three variables' values.
fn cache_dir_from(
    hdb: Option<OsString>,
    xdg: Option<OsString>,
    home: Option<OsString>,
) -> Option<PathBuf> {
    if let Some(v) = hdb {
        return (!v.is_empty() && v != "off").then(|| PathBuf::from(v));
    }
    let non_empty = |v: Option<OsString>| v.filter(|v| !v.is_empty()).map(PathBuf::from);
    non_empty(xdg)
        .map(|x| x.join("hdb/kernels"))
        .or_else(|| non_empty(home).map(|h| h.join(".cache/hdb/kernels")))
}

/// The version of the loaded libnvrtc, `major.minor` (`?` when it cannot be read).
fn nvrtc_version() -> String {
    let read = || {
        let (mut major, mut minor) = (0, 0);
        // SAFETY: two out-pointers to live ints; callers checked that libnvrtc loads.
        let r = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
        (r == cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS).then(|| format!("{major}.{minor}"))
    };
    std::panic::catch_unwind(read)
        .ok()
        .flatten()
        .unwrap_or_else(|| "?".into())
}

/// The key of `file` compiled for `arch` with `include_paths` by this NVRTC: what the first
/// line of its entry must say.
fn key(file: &KernelFile, arch: &str, include_paths: &[String]) -> (String, u64) {
    let source = file.source();
    let mut h = crate::rng::fnv1a64(&source);
    let rest = format!(
        "arch={arch} nvrtc={} options=--std=c++17 includes={}",
        nvrtc_version(),
        include_paths.join(":")
    );
    h ^= crate::rng::fnv1a64(&rest).rotate_left(17);
    (
        format!(
            "// hdb kernel cache v1: kernels/{} {rest} source_bytes={} hash={h:016x}",
            file.file,
            source.len()
        ),
        h,
    )
}

/// Where a cache lookup's PTX came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// Read from the cache folder.
    Cache,
    /// Compiled now (and stored, when the folder takes it).
    Compiled,
}

/// The entry path of `file` for `arch` under `dir`.
fn entry_path(dir: &Path, file: &KernelFile, arch: &str, hash: u64) -> PathBuf {
    dir.join(format!(
        "{}-{arch}-{hash:016x}.ptx",
        file.file.trim_end_matches(".cu")
    ))
}

/// `file`'s PTX for `arch`: from `dir`'s entry when it exists and checks out, else compiled
/// by [`compile_ptx`] and stored there (best effort). `dir` `None` compiles every time.
pub fn ptx(
    file: &KernelFile,
    arch: &'static str,
    include_paths: &[String],
    dir: Option<&Path>,
) -> Result<(String, Origin)> {
    let Some(dir) = dir else {
        return Ok((compile_ptx(file, arch, include_paths)?, Origin::Compiled));
    };
    let (first_line, hash) = key(file, arch, include_paths);
    let path = entry_path(dir, file, arch, hash);
    match read_entry(&path, &first_line, file) {
        Ok(Some(ptx)) => return Ok((ptx, Origin::Cache)),
        Ok(None) => {}
        Err(why) => log::warn!(
            "kernel cache: ignoring {} ({why}); compiling kernels/{} again",
            path.display(),
            file.file
        ),
    }
    let ptx = compile_and_write(file, arch, include_paths, dir, &path, &first_line)?;
    Ok((ptx, Origin::Compiled))
}

/// Compiles `file` for `arch` and stores it in `dir`, replacing any entry (one the driver
/// refused to load, say): the PTX.
pub fn store(
    file: &KernelFile,
    arch: &'static str,
    include_paths: &[String],
    dir: &Path,
) -> Result<String> {
    let (first_line, hash) = key(file, arch, include_paths);
    let path = entry_path(dir, file, arch, hash);
    compile_and_write(file, arch, include_paths, dir, &path, &first_line)
}

/// Compiles `file` for `arch` and writes it as the entry at `path` (best effort): the PTX.
fn compile_and_write(
    file: &KernelFile,
    arch: &'static str,
    include_paths: &[String],
    dir: &Path,
    path: &Path,
    first_line: &str,
) -> Result<String> {
    let ptx = compile_ptx(file, arch, include_paths)?;
    if let Err(e) = write_entry(dir, path, first_line, &ptx) {
        log::warn!(
            "kernel cache: could not store kernels/{} in {}: {e} (set HDB_KERNEL_CACHE to a \
             writable folder, or to off)",
            file.file,
            dir.display()
        );
    }
    Ok(ptx)
}

/// The entry's PTX; `Ok(None)` when there is no entry, `Err` naming what is wrong with one.
fn read_entry(
    path: &Path,
    first_line: &str,
    file: &KernelFile,
) -> std::result::Result<Option<String>, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    let (head, ptx) = text
        .split_once('\n')
        .ok_or_else(|| "no key line".to_string())?;
    if head != first_line {
        return Err("its key line does not match this source, architecture or NVRTC".into());
    }
    let entries = ptx_entries(ptx);
    if let Some(missing) = file.kernels.iter().find(|k| !entries.contains(k)) {
        return Err(format!("it lacks kernel {missing} (truncated?)"));
    }
    Ok(Some(ptx.to_string()))
}

/// Writes the entry under a temporary name in `dir`, then renames it into place.
fn write_entry(dir: &Path, path: &Path, first_line: &str, ptx: &str) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let tmp = path.with_extension(format!("tmp-{}-{nanos}", std::process::id()));
    let write = || -> std::io::Result<()> {
        std::fs::write(&tmp, format!("{first_line}\n{ptx}"))?;
        std::fs::rename(&tmp, path)
    };
    let r = write();
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(s: &str) -> Option<OsString> {
        Some(OsString::from(s))
    }

    #[test]
    fn the_folder_comes_from_the_environment() {
        assert_eq!(
            cache_dir_from(os("/c"), os("/x"), os("/h")),
            Some(PathBuf::from("/c"))
        );
        assert_eq!(cache_dir_from(os("off"), os("/x"), os("/h")), None);
        assert_eq!(cache_dir_from(os(""), os("/x"), os("/h")), None);
        assert_eq!(
            cache_dir_from(None, os("/x"), os("/h")),
            Some(PathBuf::from("/x/hdb/kernels"))
        );
        assert_eq!(
            cache_dir_from(None, os(""), os("/h")),
            Some(PathBuf::from("/h/.cache/hdb/kernels"))
        );
        assert_eq!(cache_dir_from(None, None, None), None);
    }

    #[test]
    fn entries_that_do_not_check_out_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = KernelFile::get("lora.cu").expect("lora.cu");
        let path = dir.path().join("e.ptx");
        let line = "// hdb kernel cache v1: key";
        assert_eq!(read_entry(&path, line, file), Ok(None));
        let all: String = file
            .kernels
            .iter()
            .map(|k| format!(".visible .entry {k}(\n)\n"))
            .collect();
        std::fs::write(&path, format!("{line}\n{all}")).expect("write");
        assert_eq!(read_entry(&path, line, file), Ok(Some(all.clone())));
        // Another key (source, arch or NVRTC changed), a truncated entry, no key line.
        assert!(read_entry(&path, "// hdb kernel cache v1: other", file).is_err());
        let first = all.lines().take(2).collect::<Vec<_>>().join("\n");
        std::fs::write(&path, format!("{line}\n{first}\n")).expect("write");
        let e = read_entry(&path, line, file).expect_err("truncated");
        assert!(e.contains("lacks kernel"), "{e}");
        std::fs::write(&path, "no newline").expect("write");
        assert!(read_entry(&path, line, file).is_err());
        // The write goes through a temporary name and leaves only the entry.
        write_entry(dir.path(), &path, line, &all).expect("write entry");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("read dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, [OsString::from("e.ptx")]);
        assert_eq!(read_entry(&path, line, file), Ok(Some(all)));
    }
}
