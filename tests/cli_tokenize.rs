//! `hdb tokenize`: the ids transformers' CLIPTokenizer gives for the tiny-sd fixture's prompts
//! (tests/fixtures/tokenizer/tiny-sd.json, from tools/make_tokenizer_fixtures.py:
//! `tokenizer(prompt, max_length=77, truncation=True).input_ids`, then `pads` pad ids).

use std::path::PathBuf;
use std::process::Command;

fn fx(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(p)
}

fn tokenize(model: &str, extra: &[&str], text: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_hdb"))
        .args(["tokenize", "--model"])
        .arg(fx(model))
        .args(extra)
        .arg("--")
        .args(text)
        .output()
        .expect("run hdb")
}

fn ids(out: &std::process::Output) -> Vec<u32> {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout.clone()).expect("utf-8");
    assert_eq!(text.lines().count(), 1, "one line: {text:?}");
    text.split_whitespace()
        .map(|t| t.parse().expect("an id"))
        .collect()
}

#[test]
fn tokenize_prints_the_ids_transformers_gives() {
    let text = std::fs::read_to_string(fx("tokenizer/tiny-sd.json")).expect("fixture");
    let fixture: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    let pad = fixture["pad_id"].as_u64().expect("pad_id") as u32;
    let cases = fixture["cases"].as_array().expect("cases");
    assert!(cases.len() >= 8, "{} cases", cases.len());
    for c in cases {
        let prompt = c["prompt"].as_str().expect("prompt");
        let want: Vec<u32> = c["ids"]
            .as_array()
            .expect("ids")
            .iter()
            .map(|v| v.as_u64().expect("id") as u32)
            .collect();
        // The diffusers folder and its tokenizer/ folder are both accepted.
        assert_eq!(
            ids(&tokenize("tiny-sd", &[], &[prompt])),
            want,
            "{prompt:?}"
        );
        let mut padded = want.clone();
        padded.extend(std::iter::repeat_n(
            pad,
            c["pads"].as_u64().expect("pads") as usize,
        ));
        assert_eq!(padded.len(), 77);
        assert_eq!(
            ids(&tokenize("tiny-sd/tokenizer", &["--padded"], &[prompt])),
            padded,
            "{prompt:?} --padded"
        );
    }
    // Several words are one text, joined by single spaces.
    let one = ids(&tokenize(
        "tiny-sd",
        &[],
        &["a photo of an astronaut riding a horse"],
    ));
    let words = "a photo of an astronaut riding a horse".split(' ');
    assert_eq!(
        ids(&tokenize("tiny-sd", &[], &words.collect::<Vec<_>>())),
        one
    );
}

#[test]
fn tokenize_names_a_model_without_a_tokenizer() {
    let r = tokenize("unet", &[], &["x"]);
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        !r.status.success() && err.contains("'--model'") && err.contains("tokenizer"),
        "{err}"
    );
}
