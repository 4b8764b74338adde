//! The crate's one-way module order: the floors listed at the top of src/lib.rs (read from
//! there, so the list and this check cannot drift), and no `crate::` path in the code of a
//! module that reaches a module on a higher floor. Every top-level module must be on a floor.
//! Comments are not code (a doc link may point anywhere); `#[cfg(test)]` code counts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn src() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The floors of src/lib.rs's "Module order" list: `//! N. ...` items (continued on lines
/// indented further), each naming its modules in backticks (lowercase names only); module
/// name -> floor number.
fn floors(lib: &str) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    let mut current: Option<usize> = None;
    for line in lib.lines() {
        let Some(rest) = line.strip_prefix("//! ") else {
            current = None;
            continue;
        };
        let text = match rest.split_once(". ") {
            Some((n, text)) if n.trim().parse::<usize>().is_ok() && !rest.starts_with(' ') => {
                current = n.trim().parse().ok();
                text
            }
            _ if rest.starts_with("   ") => rest,
            _ => {
                current = None;
                continue;
            }
        };
        let Some(n) = current else { continue };
        for (i, part) in text.split('`').enumerate() {
            let module = !part.is_empty()
                && part
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
            if i % 2 == 1 && module {
                out.insert(part.to_string(), n);
            }
        }
    }
    out
}

/// The crate root's re-exports (`pub use module::{A, B};`): item name -> module.
fn reexports(lib: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for line in lib.lines() {
        let Some(rest) = line.trim().strip_prefix("pub use ") else {
            continue;
        };
        let rest = rest.trim_end_matches(';');
        let Some((module, items)) = rest.split_once("::") else {
            continue;
        };
        let items = items.trim_start_matches('{').trim_end_matches('}');
        for item in items.split(',') {
            let item = item.trim();
            let name = item.rsplit("::").next().unwrap_or(item);
            if !name.is_empty() {
                out.insert(name.to_string(), module.to_string());
            }
        }
    }
    out
}

/// The first path segment after each `crate::` in `code` (`crate::{a::X, b}` gives a and b).
fn crate_paths(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        let before = rest[..at].chars().next_back();
        rest = &rest[at + "crate::".len()..];
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue; // e.g. `hdb_crate::`
        }
        if let Some(group) = rest.strip_prefix('{') {
            // Top-level names of the group: split on commas outside nested braces.
            let (mut depth, mut start) = (0usize, 0usize);
            let bytes = group.as_bytes();
            let mut names = Vec::new();
            for (i, &b) in bytes.iter().enumerate() {
                match b {
                    b'{' => depth += 1,
                    b'}' if depth == 0 => {
                        names.push(&group[start..i]);
                        break;
                    }
                    b'}' => depth -= 1,
                    b',' if depth == 0 => {
                        names.push(&group[start..i]);
                        start = i + 1;
                    }
                    _ => {}
                }
            }
            for n in names {
                let first = n.trim().split("::").next().unwrap_or("").trim();
                if !first.is_empty() {
                    out.push(first.to_string());
                }
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            out.push(name);
        }
    }
    out
}

/// `code` without `//` comments (line and doc comments) and string literals' contents.
fn strip(line: &str) -> String {
    let mut out = String::new();
    let mut in_str = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if in_str {
            match c {
                '\\' => {
                    chars.next();
                }
                '"' => {
                    in_str = false;
                    out.push('"');
                }
                _ => {}
            }
            continue;
        }
        match c {
            '"' => {
                in_str = true;
                out.push('"');
            }
            '/' if chars.peek() == Some(&'/') => break,
            _ => out.push(c),
        }
    }
    out
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("read src") {
        let p = e.expect("entry").path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The upward edges in the files under src/ (the CLI, src/bin, is above everything).
fn violations(
    floors: &BTreeMap<String, usize>,
    reexports: &BTreeMap<String, String>,
) -> (Vec<String>, Vec<String>) {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let (mut upward, mut unlisted) = (Vec::new(), Vec::new());
    for f in files {
        let rel = f.strip_prefix(src()).expect("under src").to_path_buf();
        let first = rel
            .components()
            .next()
            .and_then(|c| c.as_os_str().to_str())
            .unwrap_or("")
            .trim_end_matches(".rs")
            .to_string();
        if first == "bin" || first == "lib" {
            continue;
        }
        let Some(&own) = floors.get(&first) else {
            unlisted.push(format!("{} (module `{first}`)", rel.display()));
            continue;
        };
        let text = std::fs::read_to_string(&f).expect("read file");
        for (n, line) in text.lines().enumerate() {
            for target in crate_paths(&strip(line)) {
                let module = reexports.get(&target).cloned().unwrap_or(target);
                match floors.get(&module) {
                    Some(&t) if t > own => upward.push(format!(
                        "{}:{}: `{first}` (floor {own}) uses `crate::{module}` (floor {t}): {}",
                        rel.display(),
                        n + 1,
                        line.trim()
                    )),
                    Some(_) => {}
                    // Items defined in lib.rs itself (VERSION, ...) sit below everything.
                    None if module.chars().next().is_some_and(|c| c.is_uppercase()) => {}
                    None => unlisted.push(format!(
                        "{}:{}: `crate::{module}` is on no floor",
                        rel.display(),
                        n + 1
                    )),
                }
            }
        }
    }
    (upward, unlisted)
}

#[test]
fn imports_go_down_the_floors_of_lib_rs() {
    let lib = std::fs::read_to_string(src().join("lib.rs")).expect("lib.rs");
    let floors = floors(&lib);
    assert!(
        floors.len() >= 10,
        "src/lib.rs must list the module order as `//! N. ... `module`` lines; found {floors:?}"
    );
    let (upward, unlisted) = violations(&floors, &reexports(&lib));
    assert!(
        unlisted.is_empty(),
        "modules missing from src/lib.rs's module order:\n{}",
        unlisted.join("\n")
    );
    assert!(
        upward.is_empty(),
        "imports that go up the module order of src/lib.rs:\n{}",
        upward.join("\n")
    );
}

#[test]
fn the_checker_sees_upward_edges_in_every_spelling() {
    assert_eq!(crate_paths("use crate::model::Model;"), ["model"]);
    assert_eq!(
        crate_paths("use crate::{adapter::Adapter, io::{F32Weight, keymap}};"),
        ["adapter", "io"]
    );
    assert_eq!(
        crate_paths("let x = crate::pipeline::generate(crate::Error::Cancelled);"),
        ["pipeline", "Error"]
    );
    assert!(crate_paths("use hdb_crate::x;").is_empty());
    assert_eq!(strip("let a = 1; // crate::ffi"), "let a = 1; ");
    assert_eq!(strip("f(\"crate::ffi\")"), "f(\"\")");
    let lib =
        "//! 1. leaves: `error`,\n//!    `rng`\n//! 2. `model`, `io`, `Engine`\n//! not `ffi`\n\
               pub use model::{Model, X};";
    let f = floors(lib);
    assert_eq!((f["error"], f["rng"], f["model"], f["io"]), (1, 1, 2, 2));
    assert!(!f.contains_key("Engine") && !f.contains_key("ffi"), "{f:?}");
    assert_eq!(reexports(lib)["Model"], "model");
}
