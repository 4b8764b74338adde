//! One source of truth: every status code, params field and exported function of
//! `include/hdb.h` must be mentioned by every binding's sources (include/hdb.hpp, and the
//! Go, Python, C# and Swift bindings under bindings/<lang>/; the Unreal plugin is built on
//! hdb.hpp), unless that binding's skip list below names it with the reason. A
//! function, status or field added to the C API therefore fails this test until each binding
//! covers it or says why it does not.
//!
//! What counts as a mention (the sources are read as text, comments included, so a skip is
//! explicit here rather than hidden in a comment there):
//! - a function: its C name (`hdb_generate`), as cgo (`C.hdb_generate`), ctypes and P/Invoke
//!   (`EntryPoint = "hdb_generate"`) spell it;
//! - a status: its C name (`HDB_STATUS_BUSY`), or its suffix in any case with or without
//!   underscores assigned its value (`Busy = 18`, `BUSY = 18`);
//! - a params field: its name in any case with or without underscores (`negative_prompt`,
//!   `NegativePrompt`, `negativePrompt`), as a whole word.

use regex::Regex;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// What hdb.h declares.
struct Api {
    /// (name, value), e.g. ("HDB_STATUS_OK", 0).
    statuses: Vec<(String, u32)>,
    /// (struct, field) of every `hdb_*_params` struct.
    fields: Vec<(String, String)>,
    functions: Vec<String>,
}

fn parse_header(text: &str) -> Api {
    let status = Regex::new(r"(?m)^\s*(HDB_STATUS_[A-Z0-9_]+) = (\d+),").unwrap();
    let statuses = status
        .captures_iter(text)
        .map(|c| (c[1].to_string(), c[2].parse().unwrap()))
        .collect();
    let structs =
        Regex::new(r"(?s)typedef struct (hdb_\w+_params) \{(.*?)\} hdb_\w+_params;").unwrap();
    let comment = Regex::new(r"(?s)/\*.*?\*/").unwrap();
    let field = Regex::new(r"(?m)^\s*[\w\s\*]+?\b(\w+);\s*$").unwrap();
    let mut fields = Vec::new();
    for c in structs.captures_iter(text) {
        let body = comment.replace_all(&c[2], "");
        for f in field.captures_iter(&body) {
            fields.push((c[1].to_string(), f[1].to_string()));
        }
    }
    let func = Regex::new(r"(?m)^[a-z][\w\s\*]*?\b(hdb_\w+)\(").unwrap();
    let functions = func
        .captures_iter(text)
        .map(|c| c[1].to_string())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    Api {
        statuses,
        fields,
        functions,
    }
}

/// Every file under `dir` (or `dir` itself) whose name ends in one of `exts`, concatenated.
fn read_sources(path: &Path, exts: &[&str], out: &mut String) {
    if path.is_dir() {
        let mut entries: Vec<_> = std::fs::read_dir(path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for p in entries {
            read_sources(&p, exts, out);
        }
    } else if exts.iter().any(|e| path.to_string_lossy().ends_with(e)) {
        out.push_str(
            &std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
        );
        out.push('\n');
    }
}

struct Binding {
    name: &'static str,
    /// Files or folders, relative to the repository root.
    sources: &'static [&'static str],
    exts: &'static [&'static str],
    /// Items it deliberately leaves out: a function, a status, `struct.field`, or
    /// `struct.*` for all of a struct's fields. Each with its reason in a comment.
    skip: &'static [&'static str],
}

/// Functions every binding may leave out, with why.
const SKIP_ALL: &[&str] = &[
    // The pointer form is unsafe for hosts whose threads migrate; every binding reads the
    // message with hdb_last_error_copy inside the failing call instead.
    "hdb_last_error_message",
    // Replaced by hdb_set_log_callback_ex, whose destructor lets a binding free its handle.
    "hdb_set_log_callback",
];

const BINDINGS: &[Binding] = &[
    Binding {
        name: "C++ (include/hdb.hpp)",
        sources: &["include/hdb.hpp"],
        exts: &[".hpp"],
        skip: &[
            // C++ takes the params structs by value from hdb_*_params_default().
            "hdb_runtime_params_init",
            "hdb_model_params_init",
            "hdb_session_params_init",
            "hdb_generate_params_init",
            "hdb_predict_params_init",
            "hdb_finetune_params_init",
            "hdb_adapter_load_params_init",
            // hdb.hpp hands out hdb.h's params structs themselves (hdb::GenerateParams =
            // hdb_generate_params), so every field is there by construction.
            "hdb_runtime_params.*",
            "hdb_model_params.*",
            "hdb_session_params.*",
            "hdb_generate_params.*",
            "hdb_predict_params.*",
            "hdb_finetune_params.*",
            "hdb_adapter_load_params.*",
        ],
    },
    Binding {
        name: "Go (bindings/go)",
        sources: &["bindings/go"],
        exts: &[".go", ".c", ".h"],
        skip: &[
            // Go fills params through hdb_*_params_init (a pointer), never by value.
            "hdb_runtime_params_default",
            "hdb_model_params_default",
            "hdb_session_params_default",
            "hdb_generate_params_default",
            "hdb_predict_params_default",
            "hdb_finetune_params_default",
            "hdb_adapter_load_params_default",
        ],
    },
    Binding {
        name: "Python (bindings/python)",
        sources: &["bindings/python/hdb"],
        exts: &[".py"],
        skip: &[],
    },
    Binding {
        name: "C# (bindings/csharp)",
        sources: &["bindings/csharp/Runtime"],
        exts: &[".cs"],
        skip: &[],
    },
    Binding {
        name: "Swift (bindings/swift)",
        sources: &["bindings/swift/Sources"],
        exts: &[".swift"],
        skip: &[
            // Swift fills params through hdb_*_params_init (a pointer), never by value.
            "hdb_runtime_params_default",
            "hdb_model_params_default",
            "hdb_session_params_default",
            "hdb_generate_params_default",
            "hdb_predict_params_default",
            "hdb_finetune_params_default",
            "hdb_adapter_load_params_default",
        ],
    },
];

fn normalize(s: &str) -> String {
    s.chars()
        .filter(|c| *c != '_')
        .flat_map(char::to_lowercase)
        .collect()
}

fn missing_items(api: &Api, b: &Binding, text: &str) -> Vec<String> {
    let skipped = |item: &str| SKIP_ALL.contains(&item) || b.skip.contains(&item);
    let mut missing = Vec::new();
    for f in &api.functions {
        if !skipped(f) && !Regex::new(&format!(r"\b{f}\b")).unwrap().is_match(text) {
            missing.push(format!("function {f}"));
        }
    }
    for (s, v) in &api.statuses {
        if skipped(s) {
            continue;
        }
        let suffix = s.trim_start_matches("HDB_STATUS_");
        let parts: Vec<_> = suffix.split('_').collect();
        // Swift escapes a keyword used as a name: case `internal` = 17.
        let assigned = Regex::new(&format!(r"(?i)\b{}`?\s*=\s*{v}\b", parts.join("_?"))).unwrap();
        if !text.contains(s.as_str()) && !assigned.is_match(text) {
            missing.push(format!("status {s}"));
        }
    }
    let norm = normalize(text);
    for (st, f) in &api.fields {
        let item = format!("{st}.{f}");
        if skipped(&item) || skipped(&format!("{st}.*")) {
            continue;
        }
        if !Regex::new(&format!(r"\b{}\b", normalize(f)))
            .unwrap()
            .is_match(&norm)
        {
            missing.push(format!("field {item}"));
        }
    }
    missing
}

#[test]
fn the_header_parses_into_a_plausible_api() {
    let text = std::fs::read_to_string(root().join("include/hdb.h")).unwrap();
    let api = parse_header(&text);
    // Guards against a regex that silently matches nothing after a header layout change.
    assert!(api.statuses.len() >= 20, "statuses: {:?}", api.statuses);
    assert_eq!(api.statuses[0], ("HDB_STATUS_OK".to_string(), 0));
    assert!(api.functions.len() >= 40, "functions: {:?}", api.functions);
    for f in [
        "hdb_generate",
        "hdb_last_error_copy",
        "hdb_session_cancel",
        "hdb_abi_version",
    ] {
        assert!(
            api.functions.iter().any(|g| g == f),
            "{f} not found: {:?}",
            api.functions
        );
    }
    for (st, f) in [
        ("hdb_generate_params", "negative_prompt"),
        ("hdb_runtime_params", "struct_size"),
        ("hdb_model_params", "progress_user_data"),
        ("hdb_finetune_params", "token"),
    ] {
        assert!(
            api.fields.iter().any(|(s, g)| s == st && g == f),
            "{st}.{f} not found: {:?}",
            api.fields
        );
    }
}

#[test]
fn every_binding_covers_the_whole_header() {
    let text = std::fs::read_to_string(root().join("include/hdb.h")).unwrap();
    let api = parse_header(&text);
    let mut report = String::new();
    for b in BINDINGS {
        let mut src = String::new();
        for s in b.sources {
            let p = root().join(s);
            assert!(p.exists(), "{}: {} does not exist", b.name, p.display());
            read_sources(&p, b.exts, &mut src);
        }
        assert!(!src.is_empty(), "{}: no sources ({:?})", b.name, b.exts);
        // A skip entry naming nothing in the header is stale.
        for s in b.skip {
            let known = api.functions.iter().any(|f| f == s)
                || api.statuses.iter().any(|(n, _)| n == s)
                || api
                    .fields
                    .iter()
                    .any(|(st, f)| *s == format!("{st}.{f}") || *s == format!("{st}.*"));
            assert!(
                known,
                "{}: skip entry {s} names nothing in include/hdb.h",
                b.name
            );
        }
        let missing = missing_items(&api, b, &src);
        if !missing.is_empty() {
            report.push_str(&format!("{} lacks:\n  {}\n", b.name, missing.join("\n  ")));
        }
    }
    assert!(
        report.is_empty(),
        "bindings out of sync with include/hdb.h (cover each item, or add it to the binding's \
         skip list in tests/bindings_sync.rs with the reason):\n{report}"
    );
}
