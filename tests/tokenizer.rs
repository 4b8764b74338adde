//! The CLIP tokenizer against transformers 5's `CLIPTokenizer` (fixtures from
//! tools/make_tokenizer_fixtures.py): the real SD 1.x vocabulary rebuilt from CLIP's gzipped
//! merge list, 500+ prompts id for id, tokenizer-folder config variants, and the tiny-sd
//! fixture's tokenizer.
//!
//! `HDB_TOKENIZER_SWEEP=/tmp/sweep.json cargo test --test tokenizer` also checks the output of
//! `tools/make_tokenizer_fixtures.py --sweep /tmp/sweep.json` (every code point; not committed).

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use hdb::model::tokenizer::{ClipTokenizer, EOS};
use serde_json::Value;

const N_MERGES: usize = 49152 - 256 - 2;

/// A vocabulary (token -> id) and the merges in rank order.
type Parts = (HashMap<String, u32>, Vec<(String, String)>);

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// GPT-2's byte -> printable character map, written out independently of the crate's, in
/// `bytes_to_unicode()`'s order (printable bytes first), which is the vocabulary's order.
fn bytes_to_unicode() -> Vec<char> {
    let mut bs: Vec<u32> = (0x21..=0x7E)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    cs.into_iter()
        .map(|c| char::from_u32(c).expect("char"))
        .collect()
}

/// openai/clip-vit-large-patch14's vocab.json and merges, built from CLIP's merge list as its
/// SimpleTokenizer does: bytes, bytes + `</w>`, the first 48894 merges joined, the two specials.
fn clip_parts() -> &'static Parts {
    static PARTS: OnceLock<Parts> = OnceLock::new();
    PARTS.get_or_init(|| {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("data/clip/bpe_simple_vocab_16e6.txt.gz");
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let mut text = String::new();
        flate2::read::GzDecoder::new(file)
            .read_to_string(&mut text)
            .expect("gunzip the CLIP merge list");
        let merges: Vec<(String, String)> = text
            .split('\n')
            .skip(1)
            .take(N_MERGES)
            .map(|l| {
                let mut p = l.split_whitespace();
                (
                    p.next().expect("a").to_string(),
                    p.next().expect("b").to_string(),
                )
            })
            .collect();
        let table = bytes_to_unicode();
        let mut tokens: Vec<String> = table.iter().map(|c| c.to_string()).collect();
        tokens.extend(table.iter().map(|c| format!("{c}</w>")));
        tokens.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
        tokens.push("<|startoftext|>".into());
        tokens.push("<|endoftext|>".into());
        let vocab: HashMap<String, u32> = tokens
            .into_iter()
            .enumerate()
            .map(|(i, t)| (t, i as u32))
            .collect();
        assert_eq!(vocab.len(), 49408);
        (vocab, merges)
    })
}

/// Writes a tokenizer folder: vocab.json + merges.txt (or a full tokenizer.json with the given
/// added tokens) and the config files.
fn write_folder(dir: &Path, files: Option<&Value>, tokenizer_json_added: Option<&Value>) {
    let (vocab, merges) = clip_parts();
    std::fs::create_dir_all(dir).expect("mkdir");
    match tokenizer_json_added {
        Some(added) => {
            let tj = serde_json::json!({
                "version": "1.0",
                "added_tokens": added,
                "model": {
                    "type": "BPE",
                    "end_of_word_suffix": "</w>",
                    "vocab": vocab,
                    "merges": merges.iter().map(|(a, b)| format!("{a} {b}")).collect::<Vec<_>>(),
                },
            });
            std::fs::write(dir.join("tokenizer.json"), tj.to_string()).expect("write");
        }
        None => {
            std::fs::write(
                dir.join("vocab.json"),
                serde_json::to_string(vocab).expect("json"),
            )
            .expect("write");
            let mut m = String::from("#version: 0.2\n");
            for (a, b) in merges {
                m.push_str(a);
                m.push(' ');
                m.push_str(b);
                m.push('\n');
            }
            std::fs::write(dir.join("merges.txt"), m).expect("write");
        }
    }
    if let Some(files) = files.and_then(|f| f.as_object()) {
        for (name, content) in files {
            std::fs::write(
                dir.join(name),
                serde_json::to_string_pretty(content).expect("json"),
            )
            .expect("write");
        }
    }
}

fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("id list")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

/// Compares one prompt; returns a report of the first difference.
fn check(what: &str, prompt: &str, got: &[u32], want: &[u32]) -> Option<String> {
    if got == want {
        return None;
    }
    let at = got
        .iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(want.len()));
    Some(format!(
        "{what}: prompt {prompt:?}\n  first difference at position {at}\n  hdb:          {got:?}\n  transformers: {want:?}"
    ))
}

fn finish(failures: Vec<String>, total: usize) {
    if !failures.is_empty() {
        for f in failures.iter().take(20) {
            eprintln!("{f}\n");
        }
        panic!(
            "{} of {total} comparisons differ from transformers",
            failures.len()
        );
    }
}

/// Checks `tok` on the cases of a fixture: `ids` (or `key`) unpadded, `pads` pad ids after them.
fn check_cases(
    what: &str,
    tok: &ClipTokenizer,
    cases: &[Value],
    pad_id: u32,
    key: &str,
) -> Vec<String> {
    let mut failures = Vec::new();
    for c in cases {
        let prompt = c["prompt"].as_str().expect("prompt");
        let ids = ids_of(c.get(key).unwrap_or(&c["ids"]));
        // `pads` completes `ids` to the length; an alternative id list fills the same length.
        let total =
            c["ids"].as_array().expect("ids").len() + c["pads"].as_u64().expect("pads") as usize;
        let pads = total - ids.len();
        let mut padded = ids.clone();
        padded.extend(std::iter::repeat_n(pad_id, pads));
        failures.extend(check(
            &format!("{what} encode"),
            prompt,
            &tok.encode(prompt),
            &ids,
        ));
        failures.extend(check(
            &format!("{what} encode_padded"),
            prompt,
            &tok.encode_padded(prompt),
            &padded,
        ));
    }
    failures
}

fn prompts_fixture() -> Value {
    read_json(&fixtures().join("tokenizer/prompts.json"))
}

#[test]
fn prompts_fixture_covers_the_classes() {
    let fx = prompts_fixture();
    let cases = fx["cases"].as_array().expect("cases");
    assert!(cases.len() >= 300, "{} prompts", cases.len());
    for class in [
        "sd",
        "unicode",
        "accents",
        "punctuation",
        "numbers",
        "contractions",
        "case",
        "whitespace",
        "html",
        "special",
        "control",
        "long",
        "random",
    ] {
        assert!(
            cases.iter().any(|c| c["class"] == class),
            "no '{class}' prompt"
        );
    }
    assert!(cases.iter().any(|c| c["prompt"] == " "), "no blank prompt");
    assert!(
        cases
            .iter()
            .any(|c| c["ids"].as_array().map(|a| a.len()) == Some(77)),
        "no truncated prompt"
    );
    for c in cases {
        let n =
            c["ids"].as_array().expect("ids").len() + c["pads"].as_u64().expect("pads") as usize;
        assert_eq!(n, 77, "{}", c["prompt"]);
    }
}

/// The tokenizer from the gzipped merge list via `from_parts`, as `CLIPTokenizer(vocab=, merges=)`
/// (every special token matched on the raw text only).
#[test]
fn sd_vocabulary_from_parts_matches_transformers() {
    let (vocab, merges) = clip_parts().clone();
    let tok = ClipTokenizer::from_parts(vocab, merges, EOS, 77).expect("tokenizer");
    assert_eq!(
        (tok.bos_id(), tok.eos_id(), tok.pad_id(), tok.max_len()),
        (49406, 49407, 49407, 77)
    );
    let fx = prompts_fixture();
    let cases = fx["cases"].as_array().expect("cases");
    let failures = check_cases("from_parts", &tok, cases, 49407, "ids_without_config");
    finish(failures, cases.len() * 2);
}

/// The SD 1.5 tokenizer folder (vocab.json, merges.txt, its tokenizer_config.json and
/// special_tokens_map.json) via `from_folder`: exactly the pipeline's input_ids.
#[test]
fn sd15_folder_matches_the_pipeline() {
    let cfg = read_json(&fixtures().join("tokenizer/configs.json"));
    let sd15 = cfg["variants"]
        .as_array()
        .expect("variants")
        .iter()
        .find(|v| v["name"] == "sd15")
        .expect("sd15 variant");
    let dir = tempfile::tempdir().expect("tempdir");
    write_folder(dir.path(), Some(&sd15["files"]), None);
    let tok = ClipTokenizer::from_folder(dir.path()).expect("tokenizer");
    assert_eq!((tok.pad_id(), tok.max_len()), (49407, 77));
    let fx = prompts_fixture();
    assert_eq!(fx["pad_id"], 49407);
    let cases = fx["cases"].as_array().expect("cases");
    let failures = check_cases("sd15 folder", &tok, cases, 49407, "ids");
    finish(failures, cases.len() * 2);
}

/// The built-in tokenizer (what LDM single files get): exactly the SD 1.5 pipeline's input_ids,
/// and the same vocabulary as the one rebuilt here from the merge list.
#[test]
fn builtin_tokenizer_matches_the_pipeline() {
    let tok = ClipTokenizer::clip_vit_l14().expect("built-in tokenizer");
    assert_eq!(
        (tok.bos_id(), tok.eos_id(), tok.pad_id(), tok.max_len()),
        (49406, 49407, 49407, 77)
    );
    let fx = prompts_fixture();
    let cases = fx["cases"].as_array().expect("cases");
    let failures = check_cases("built-in", &tok, cases, 49407, "ids");
    finish(failures, cases.len() * 2);
}

/// Folder variants: which special tokens match case-insensitively, the pad token, the length.
#[test]
fn config_variants_match_transformers() {
    let cfg = read_json(&fixtures().join("tokenizer/configs.json"));
    let mut failures = Vec::new();
    let mut total = 0;
    for v in cfg["variants"].as_array().expect("variants") {
        let name = v["name"].as_str().expect("name");
        let dir = tempfile::tempdir().expect("tempdir");
        let tj = v
            .get("tokenizer_json_added_tokens")
            .filter(|t| !t.is_null());
        write_folder(dir.path(), Some(&v["files"]), tj);
        let tok = ClipTokenizer::from_folder(dir.path()).unwrap_or_else(|e| panic!("{name}: {e}"));
        let pad_id = v["pad_id"].as_u64().expect("pad_id") as u32;
        assert_eq!(tok.pad_id(), pad_id, "{name}: pad id");
        let max_len = v["model_max_length"].as_u64().unwrap_or(77) as usize;
        assert_eq!(tok.max_len(), max_len, "{name}: max_len");
        let cases = v["cases"].as_array().expect("cases");
        total += cases.len() * 2;
        failures.extend(check_cases(name, &tok, cases, pad_id, "ids"));
    }
    finish(failures, total);
}

#[test]
fn tiny_sd_tokenizer_matches_transformers() {
    let fx = read_json(&fixtures().join("tokenizer/tiny-sd.json"));
    let tok = ClipTokenizer::from_folder(&fixtures().join("tiny-sd/tokenizer")).expect("tokenizer");
    let pad_id = fx["pad_id"].as_u64().expect("pad_id") as u32;
    assert_eq!(tok.pad_id(), pad_id);
    assert_eq!(
        tok.max_len(),
        fx["model_max_length"].as_u64().expect("len") as usize
    );
    let cases = fx["cases"].as_array().expect("cases");
    let failures = check_cases("tiny-sd", &tok, cases, pad_id, "ids");
    finish(failures, cases.len() * 2);
}

/// With both tokenizer.json and vocab.json + merges.txt, transformers takes the vocabulary from
/// tokenizer.json; so does hdb (checked against transformers with swapped ids: "a b" -> 321, 320).
#[test]
fn tokenizer_json_wins_over_vocab_json() {
    let (vocab, merges) = clip_parts();
    let dir = tempfile::tempdir().expect("tempdir");
    write_folder(dir.path(), None, None);
    let mut swapped = vocab.clone();
    swapped.insert("a</w>".into(), vocab["b</w>"]);
    swapped.insert("b</w>".into(), vocab["a</w>"]);
    let tj = serde_json::json!({
        "added_tokens": [],
        "model": {
            "type": "BPE",
            "vocab": swapped,
            "merges": merges.iter().map(|(a, b)| vec![a.clone(), b.clone()]).collect::<Vec<_>>(),
        },
    });
    std::fs::write(dir.path().join("tokenizer.json"), tj.to_string()).expect("write");
    let tok = ClipTokenizer::from_folder(dir.path()).expect("tokenizer");
    assert_eq!(tok.encode("a b"), [49406, 321, 320, 49407]);
    std::fs::remove_file(dir.path().join("tokenizer.json")).expect("rm");
    let tok = ClipTokenizer::from_folder(dir.path()).expect("tokenizer");
    assert_eq!(tok.encode("a b"), [49406, 320, 321, 49407]);
}

/// The same prompts from several threads at once give the serial answers (shared BPE cache).
#[test]
fn concurrent_encoding_is_consistent() {
    let (vocab, merges) = clip_parts().clone();
    let tok = ClipTokenizer::from_parts(vocab, merges, EOS, 77).expect("tokenizer");
    let fx = prompts_fixture();
    let prompts: Vec<String> = fx["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| c["prompt"].as_str().expect("prompt").to_string())
        .collect();
    let serial: Vec<Vec<u32>> = prompts.iter().map(|p| tok.encode_padded(p)).collect();
    std::thread::scope(|s| {
        for t in 0..4 {
            let (tok, prompts, serial) = (&tok, &prompts, &serial);
            s.spawn(move || {
                for (i, p) in prompts.iter().enumerate().rev().skip(t) {
                    assert_eq!(&tok.encode_padded(p), &serial[i], "{p:?}");
                }
            });
        }
    });
}

/// Any text gives exactly max_len ids, starting with BOS and holding EOS: arbitrary bytes made
/// UTF-8, every plane, long runs.
#[test]
fn any_text_gives_a_well_formed_sequence() {
    let (vocab, merges) = clip_parts().clone();
    let tok = ClipTokenizer::from_parts(vocab, merges, EOS, 77).expect("tokenizer");
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut inputs: Vec<String> = Vec::new();
    for _ in 0..300 {
        let n = (next() % 200) as usize;
        let bytes: Vec<u8> = (0..n).map(|_| next() as u8).collect();
        inputs.push(String::from_utf8_lossy(&bytes).into_owned());
        let s: String = (0..n / 4)
            .filter_map(|_| char::from_u32((next() % 0x11_0000) as u32))
            .collect();
        inputs.push(s);
    }
    inputs.push("\u{301}".repeat(50_000));
    inputs.push("a".repeat(200_000));
    inputs.push("<|endoftext|>".repeat(10_000));
    inputs.push("<|startoftext".repeat(10_000));
    inputs.push("'".repeat(100_000));
    inputs.push("\u{1100}\u{1161}\u{11a8}".repeat(10_000));
    for s in &inputs {
        let ids = tok.encode(s);
        assert!(ids.len() >= 2 && ids.len() <= 77, "{s:?}");
        assert_eq!(ids[0], 49406);
        assert_eq!(*ids.last().expect("eos"), 49407);
        assert!(ids.iter().all(|&i| i < 49408));
        assert_eq!(tok.encode_padded(s).len(), 77);
    }
}

#[test]
fn errors_name_the_file_and_the_problem() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let missing = ClipTokenizer::from_folder(&d.join("nope")).expect_err("missing folder");
    assert!(missing.to_string().contains("nope"), "{missing}");

    let empty = ClipTokenizer::from_folder(d).expect_err("no files");
    assert!(empty.to_string().contains("vocab.json"), "{empty}");

    std::fs::write(d.join("vocab.json"), "{\"a\": 0,").expect("write");
    std::fs::write(d.join("merges.txt"), "#version: 0.2\n").expect("write");
    let bad_json = ClipTokenizer::from_folder(d).expect_err("bad JSON");
    let msg = bad_json.to_string();
    assert!(msg.contains("vocab.json") && msg.contains("JSON"), "{msg}");

    let vocab = r#"{"a": 0, "b</w>": 1, "<|startoftext|>": 2, "<|endoftext|>": 3}"#;
    std::fs::write(d.join("vocab.json"), vocab).expect("write");
    std::fs::write(d.join("merges.txt"), "#version: 0.2\na b</w>\n").expect("write");
    let merge = ClipTokenizer::from_folder(d).expect_err("merge result missing");
    let msg = merge.to_string();
    assert!(
        msg.contains("merges.txt") && msg.contains("'ab</w>' is not in the vocabulary"),
        "{msg}"
    );

    std::fs::write(d.join("merges.txt"), "#version: 0.2\na  b</w>\n").expect("write");
    let msg = ClipTokenizer::from_folder(d)
        .expect_err("bad merge line")
        .to_string();
    assert!(
        msg.contains("merges.txt") && msg.contains("line 2"),
        "{msg}"
    );

    std::fs::write(d.join("merges.txt"), "#version: 0.2\n").expect("write");
    std::fs::write(d.join("tokenizer_config.json"), r#"{"pad_token": "<pad>"}"#).expect("write");
    let msg = ClipTokenizer::from_folder(d)
        .expect_err("pad not in vocab")
        .to_string();
    assert!(msg.contains("'<pad>'"), "{msg}");

    std::fs::write(
        d.join("tokenizer_config.json"),
        r#"{"model_max_length": 1e30}"#,
    )
    .expect("write");
    let msg = ClipTokenizer::from_folder(d)
        .expect_err("absurd length")
        .to_string();
    assert!(
        msg.contains("tokenizer_config.json") && msg.contains("model_max_length"),
        "{msg}"
    );

    std::fs::write(
        d.join("tokenizer_config.json"),
        r#"{"model_max_length": 16}"#,
    )
    .expect("write");
    let tok = ClipTokenizer::from_folder(d).expect("minimal tokenizer");
    assert_eq!(tok.encode_padded("ab").len(), 16);
}

/// Every code point and many mark sequences, when a sweep file is given (see the module doc).
#[test]
fn sweep_when_asked() {
    let Ok(path) = std::env::var("HDB_TOKENIZER_SWEEP") else {
        eprintln!("HDB_TOKENIZER_SWEEP not set: sweep skipped");
        return;
    };
    let fx = read_json(Path::new(&path));
    let (vocab, merges) = clip_parts().clone();
    let tok = ClipTokenizer::from_parts(vocab, merges, EOS, 77).expect("tokenizer");
    let cases = fx["cases"].as_array().expect("cases");
    let mut failures = Vec::new();
    for c in cases {
        let prompt = c["prompt"].as_str().expect("prompt");
        failures.extend(check(
            "sweep",
            prompt,
            &tok.encode(prompt),
            &ids_of(&c["ids"]),
        ));
    }
    eprintln!("sweep: {} prompts", cases.len());
    finish(failures, cases.len());
}
