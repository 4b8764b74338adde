//! The C API as a C program sees it: each `tests/c/<name>.c` is compiled against
//! `include/hdb.h` and the freshly built `libhdb.so` with AddressSanitizer, LeakSanitizer and
//! UBSan, and run as `<name> <tests/fixtures> <fresh temp dir>`. One `#[test]` per program;
//! a failure shows the program's stdout (one line per check) and stderr.
//!
//! The library: cargo compiles the crate's lib unit once with all of its crate types
//! (`--crate-type cdylib --crate-type staticlib --crate-type rlib`, visible with
//! `cargo test --test c_api -v`) before it links an integration test against the rlib, so
//! `target/<profile>/libhdb.so` is as fresh as this test binary. If the .so is missing or older
//! than the rlib anyway, the tests fail and say to run `cargo build --lib`. Its SONAME is
//! `libhdb.so.1`, so the programs are linked through a directory (under `target/tmp/`) holding
//! `libhdb.so` and `libhdb.so.1` symlinks to it, with an rpath to that directory.
//!
//! Leaks: no LeakSanitizer suppressions are needed (nothing of Rust's std or rayon is reported
//! once every hdb object is freed). The programs run their body on a joined thread (see
//! `tests/c/common.h`) so that stale pointers on the main thread's stack cannot hide a leak,
//! and `leak_checker_catches_a_leaked_model` proves the set-up reports a model never freed.
//!
//! `scripts/valgrind-c-tests.sh` runs the same programs, built without sanitizers, under
//! valgrind.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// Compiler flags for every program (the sanitizers are linked with the same flags).
const CFLAGS: &[&str] = &[
    "-std=c11",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-g",
    "-fsanitize=address,undefined",
    "-fno-omit-frame-pointer",
    "-fno-sanitize-recover=all",
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

struct Setup {
    /// Holds `libhdb.so` and `libhdb.so.1`, symlinks to the built library.
    lib_dir: PathBuf,
    /// Where the compiled programs go.
    bin_dir: PathBuf,
}

/// `target/<profile>/`: integration test binaries live in `target/<profile>/deps/`.
fn profile_dir() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let deps = exe
        .parent()
        .ok_or_else(|| format!("{} has no parent directory", exe.display()))?;
    if deps.file_name().and_then(|n| n.to_str()) != Some("deps") {
        return Err(format!(
            "expected this test binary in target/<profile>/deps/, but it is {}",
            exe.display()
        ));
    }
    deps.parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| format!("{} has no parent directory", deps.display()))
}

/// Points `link` at `target`, atomically replacing whatever `link` was (other test processes
/// may be doing the same at the same time).
fn symlink_atomic(target: &Path, link: &Path) -> Result<(), String> {
    let tmp = link.with_extension(format!("tmp-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp)
        .map_err(|e| format!("symlink {} -> {}: {e}", tmp.display(), target.display()))?;
    std::fs::rename(&tmp, link)
        .map_err(|e| format!("rename {} -> {}: {e}", tmp.display(), link.display()))
}

/// `cargo test` links integration tests against the rlib only, so the C programs' libhdb.so
/// is built here with `cargo build --lib` in the same profile and target dir (cargo has
/// released its build lock by the time tests run). Up to date, this is a no-op.
fn build_cdylib(profile: &Path) -> Result<(), String> {
    let name = profile
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("debug");
    let target_dir = profile.parent().ok_or("no target dir")?;
    let mut cmd = Command::new(env!("CARGO"));
    cmd.args(["build", "--lib", "--quiet"])
        .arg("--manifest-path")
        .arg(root().join("Cargo.toml"))
        .arg("--target-dir")
        .arg(target_dir);
    if name != "debug" {
        cmd.args(["--profile", name]);
    }
    let out = cmd.output().map_err(|e| format!("cannot run cargo: {e}"))?;
    if !out.status.success() {
        return Err(format!("`cargo build --lib` failed:\n{}", show(&out)));
    }
    Ok(())
}

fn make_setup() -> Result<Setup, String> {
    let profile = profile_dir()?;
    build_cdylib(&profile)?;
    let so = profile.join("libhdb.so");
    if !so.is_file() {
        return Err(format!(
            "{} does not exist after `cargo build --lib`",
            so.display()
        ));
    }
    let so = so
        .canonicalize()
        .map_err(|e| format!("{}: {e}", so.display()))?;
    let profile_name = profile
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("unknown")
        .to_string();
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("c_api-{profile_name}"));
    let lib_dir = base.join("lib");
    let bin_dir = base.join("bin");
    for d in [&lib_dir, &bin_dir] {
        std::fs::create_dir_all(d).map_err(|e| format!("create {}: {e}", d.display()))?;
    }
    symlink_atomic(&so, &lib_dir.join("libhdb.so"))?;
    symlink_atomic(&so, &lib_dir.join("libhdb.so.1"))?;
    Ok(Setup { lib_dir, bin_dir })
}

fn setup() -> &'static Setup {
    static SETUP: OnceLock<Result<Setup, String>> = OnceLock::new();
    match SETUP.get_or_init(make_setup) {
        Ok(s) => s,
        Err(e) => panic!("{e}"),
    }
}

fn show(out: &Output) -> String {
    format!(
        "--- exit status: {}\n--- stdout:\n{}\n--- stderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Compiles `tests/c/<rel>.c` into the bin dir as `<exe_name>`.
fn compile(rel: &str, exe_name: &str) -> PathBuf {
    compile_file(&root().join("tests/c").join(format!("{rel}.c")), exe_name)
}

/// Compiles the C file `src` into the bin dir as `<exe_name>`.
fn compile_file(src: &Path, exe_name: &str) -> PathBuf {
    let s = setup();
    let root = root();
    assert!(src.is_file(), "{} is missing", src.display());
    let exe = s.bin_dir.join(exe_name);
    // Build under a private name, then rename: concurrent test runs never see a half-written file.
    let tmp = s
        .bin_dir
        .join(format!("{exe_name}.tmp-{}", std::process::id()));
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_string());
    let mut cmd = Command::new(&cc);
    cmd.args(CFLAGS)
        .arg("-I")
        .arg(root.join("include"))
        .arg(src)
        .arg("-o")
        .arg(&tmp)
        .arg(format!("-L{}", s.lib_dir.display()))
        .arg("-lhdb")
        .arg(format!("-Wl,-rpath,{}", s.lib_dir.display()))
        .arg("-pthread")
        .arg("-lm");
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run the C compiler `{cc}` (set CC to override): {e}"));
    assert!(
        out.status.success(),
        "compiling {} failed:\n{cmd:?}\n{}",
        src.display(),
        show(&out)
    );
    std::fs::rename(&tmp, &exe).unwrap_or_else(|e| panic!("rename {}: {e}", tmp.display()));
    exe
}

/// Runs a compiled program as `<exe> <tests/fixtures> <fresh temp dir>` under the sanitizers.
fn run_sanitized(exe: &Path, name: &str) -> (Command, Output) {
    let work = tempfile::Builder::new()
        .prefix(&format!("hdb-c-{name}-"))
        .tempdir()
        .expect("temp dir");
    let fixtures = root().join("tests/fixtures");
    let mut cmd = Command::new(exe);
    cmd.arg(&fixtures)
        .arg(work.path())
        .env("ASAN_OPTIONS", "detect_leaks=1:abort_on_error=0")
        .env_remove("LSAN_OPTIONS")
        .env("UBSAN_OPTIONS", "print_stacktrace=1:halt_on_error=1")
        // The log callback test must see hdb's own records, not a RUST_LOG filter.
        .env_remove("RUST_LOG");
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", exe.display()));
    (cmd, out)
}

fn run_c_program(name: &str) {
    let exe = compile(name, name);
    let (cmd, out) = run_sanitized(&exe, name);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    print!("{stdout}");
    eprint!("{stderr}");
    let sanitizer_report = [
        "ERROR: AddressSanitizer",
        "ERROR: LeakSanitizer",
        "runtime error:",
    ]
    .iter()
    .find(|m| stderr.contains(*m));
    assert!(
        out.status.success() && sanitizer_report.is_none(),
        "{name} failed ({cmd:?}){}:\n{}",
        sanitizer_report.map_or(String::new(), |m| format!(", sanitizer said '{m}'")),
        show(&out)
    );
    let pass = format!("PASS {name}: ");
    assert!(
        stdout.lines().any(|l| l.starts_with(&pass)),
        "{name} exited 0 without printing its final '{pass}N checks' line:\n{}",
        show(&out)
    );
}

/// One `#[test]` per program, and `PROGRAMS`, which `all_c_programs_have_a_test` checks
/// against the `tests/c/*.c` files.
macro_rules! c_tests {
    ($($name:ident),* $(,)?) => {
        const PROGRAMS: &[&str] = &[$(stringify!($name)),*];
        $(
            #[test]
            fn $name() {
                run_c_program(stringify!($name));
            }
        )*
    };
}

c_tests!(
    version,
    runtime,
    null_args,
    bad_files,
    model_load,
    logging,
    log_threads,
    session,
    adapter,
    generate,
    hypernet,
    threads,
    finetune,
    error_copy,
    cancel,
    log_free,
    model_memory
);

#[test]
fn all_c_programs_have_a_test() {
    let dir = root().join("tests/c");
    let mut found: Vec<String> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let p = e.path();
            (p.extension().and_then(|x| x.to_str()) == Some("c"))
                .then(|| p.file_stem().and_then(|s| s.to_str()).map(str::to_string))
                .flatten()
        })
        .collect();
    found.sort();
    let mut listed: Vec<String> = PROGRAMS.iter().map(|s| s.to_string()).collect();
    listed.sort();
    assert_eq!(
        found, listed,
        "tests/c/*.c and the programs tests/c_api.rs runs differ; list every program in c_tests!"
    );
}

/// The set-up itself: a program that never frees its model must fail with a LeakSanitizer
/// report that points into libhdb, or a leak in the real programs would go unnoticed.
#[test]
fn leak_checker_catches_a_leaked_model() {
    let exe = compile("canary/leak_model", "canary_leak_model");
    let (cmd, out) = run_sanitized(&exe, "canary_leak_model");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("ERROR: LeakSanitizer: detected memory leaks"),
        "the leak canary was not caught ({cmd:?}):\n{}",
        show(&out)
    );
    assert!(
        stderr.contains("hdb::model::") || stderr.contains("hdb::io::"),
        "the leak report does not point into hdb's model loading:\n{}",
        show(&out)
    );
}

/// README.md's C example, exactly as printed there, compiles strictly and runs on the fixture.
#[test]
fn readme_c_example_compiles_and_runs() {
    let readme = std::fs::read_to_string(root().join("README.md")).expect("README.md");
    let section = readme
        .split("## Using it from C")
        .nth(1)
        .expect("README has a '## Using it from C' section");
    let code = section
        .split("```c\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("the section has a ```c block");
    let src = setup().bin_dir.join("readme_minimal.c");
    std::fs::write(&src, code).expect("write the example");
    let exe = compile_file(&src, "readme_minimal");
    let out = Command::new(&exe)
        .arg(root().join("tests/fixtures/tiny-sd"))
        .env("ASAN_OPTIONS", "detect_leaks=1")
        .output()
        .expect("run the README example");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "README example failed:\n{}",
        show(&out)
    );
    assert!(
        stdout.contains("architecture 1") && stdout.contains(env!("CARGO_PKG_VERSION")),
        "unexpected README example output: {stdout}"
    );
}

/// README.md's commands that build and run its C example work as printed: they run in a
/// scratch folder laid out as the repository root they expect (`include/`, `tests/fixtures/`,
/// `minimal.c` holding the example, `target/release/libhdb.so` this test's build of the
/// library, which stands for the first command, `cargo build --release`). The SONAME link is
/// one of the commands, so a program that could not start without it fails here.
#[test]
fn readme_c_build_commands_work_as_printed() {
    let readme = std::fs::read_to_string(root().join("README.md")).expect("README.md");
    let section = readme
        .split("## Using it from C")
        .nth(1)
        .expect("README has a '## Using it from C' section");
    let block = |fence: &str| {
        section
            .split(fence)
            .nth(1)
            .and_then(|rest| rest.split("```").next())
            .unwrap_or_else(|| panic!("the section has a {fence} block"))
    };
    let (commands, code) = (block("```sh\n"), block("```c\n"));
    let mut lines = commands.lines().filter(|l| !l.trim().is_empty());
    assert_eq!(lines.next(), Some("cargo build --release"));
    let dir = tempfile::tempdir().expect("temp dir");
    let d = dir.path();
    std::fs::create_dir_all(d.join("target/release")).expect("target/release");
    std::fs::create_dir_all(d.join("tests")).expect("tests");
    let link = |from: &Path, to: &str| {
        std::os::unix::fs::symlink(from, d.join(to)).unwrap_or_else(|e| panic!("{to}: {e}"))
    };
    let so = setup()
        .lib_dir
        .join("libhdb.so")
        .canonicalize()
        .expect("libhdb.so");
    link(&so, "target/release/libhdb.so");
    link(&root().join("include"), "include");
    link(&root().join("tests/fixtures"), "tests/fixtures");
    std::fs::write(d.join("minimal.c"), code).expect("write minimal.c");
    let mut last = None;
    for line in lines {
        let out = Command::new("sh")
            .args(["-c", line])
            .current_dir(d)
            .env_remove("LD_LIBRARY_PATH")
            .output()
            .expect("run sh");
        assert!(out.status.success(), "`{line}` failed:\n{}", show(&out));
        last = Some(out);
    }
    let out = last.expect("commands after cargo build");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("architecture 1") && stdout.contains(env!("CARGO_PKG_VERSION")),
        "the last command should run the example: {stdout}"
    );
}

/// The shared library exports the C API and nothing else, and carries its SONAME.
#[test]
fn shared_library_exports_only_hdb_symbols() {
    let so = setup().lib_dir.join("libhdb.so");
    let out = Command::new("nm")
        .args(["-D", "--defined-only"])
        .arg(&so)
        .output()
        .expect("run nm");
    assert!(out.status.success(), "nm failed:\n{}", show(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    let names: Vec<&str> = text
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2))
        .collect();
    assert!(
        names.len() >= 20 && names.contains(&"hdb_generate"),
        "{names:?}"
    );
    let foreign: Vec<&&str> = names.iter().filter(|n| !n.starts_with("hdb_")).collect();
    assert!(foreign.is_empty(), "non-hdb exports: {foreign:?}");
    let out = Command::new("readelf")
        .arg("-d")
        .arg(&so)
        .output()
        .expect("run readelf");
    let dynamic = String::from_utf8_lossy(&out.stdout);
    assert!(
        dynamic.contains("Library soname: [libhdb.so.1]"),
        "{dynamic}"
    );
}
