//! `hdb <command> --help` explains every argument: a newcomer reading `hdb adapter export
//! --help` should not meet a bare `<INPUT>`.

use std::process::Command;

const COMMANDS: &[&[&str]] = &[
    &["predict"],
    &["demo"],
    &["generate"],
    &["unet"],
    &["info"],
    &["tokenize"],
    &["finetune"],
    &["finetune", "grad"],
    &["personalize"],
    &["adapter", "info"],
    &["adapter", "export"],
    &["adapter", "basis"],
    &["bench", "unet"],
    &["bench", "pipeline"],
    &["bench", "adapter"],
    &["bench", "hypernet"],
    &["bench", "finetune"],
    #[cfg(feature = "cuda")]
    &["bench", "cuda"],
    #[cfg(feature = "cuda")]
    &["bench", "kernels"],
];

/// Whether a line of clap's help lists an argument (`  -o, --output <OUTPUT>  ...`,
/// `  <INPUT>  ...`), and then what follows the argument's name.
fn argument_help(line: &str) -> Option<&str> {
    let t = line.trim_start();
    if !(line.starts_with("  ") && (t.starts_with('-') || t.starts_with('<'))) {
        return None;
    }
    // Clap separates the name column from the help by at least two spaces.
    Some(t.split_once("  ").map_or("", |(_, rest)| rest.trim()))
}

#[test]
fn every_argument_has_help() {
    let mut bare = Vec::new();
    for cmd in COMMANDS {
        let r = Command::new(env!("CARGO_BIN_EXE_hdb"))
            .args(*cmd)
            .arg("--help")
            .output()
            .expect("run hdb");
        assert!(r.status.success(), "{cmd:?} --help");
        let text = String::from_utf8_lossy(&r.stdout);
        let mut arguments = 0;
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            if let Some(inline) = argument_help(line) {
                arguments += 1;
                // When any help is long, clap puts every help on the line below its argument,
                // indented further.
                let below = lines.get(i + 1).copied().unwrap_or("");
                let help = if inline.is_empty() && below.starts_with("          ") {
                    below.trim()
                } else {
                    inline
                };
                // A default alone ("[default: 0]") is no explanation.
                if help.is_empty() || help.starts_with("[default") {
                    bare.push(format!("hdb {}: {}", cmd.join(" "), line.trim()));
                }
            }
        }
        assert!(arguments >= 2, "{cmd:?}: no arguments found in\n{text}");
    }
    assert!(
        bare.is_empty(),
        "arguments without help:\n{}",
        bare.join("\n")
    );
}
