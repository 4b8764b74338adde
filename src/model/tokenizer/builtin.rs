//! The CLIP ViT-L/14 tokenizer every SD 1.x model uses, built into the library, for models that
//! carry none (LDM single files, component folders).
//!
//! What is embedded is CLIP's own byte-pair merge list, `bpe_simple_vocab_16e6.txt.gz` (OpenAI,
//! MIT license: `data/clip/LICENSE`), gzip-compressed as CLIP ships it (1.3 MB instead of the
//! 2.2 MB of vocab.json + merges.txt). openai/clip-vit-large-patch14's vocab.json and merges.txt,
//! which SD 1.x's `tokenizer/` folders copy, are derived from it the way CLIP's SimpleTokenizer
//! builds its vocabulary, and SD 1.5's tokenizer_config.json and special_tokens_map.json decide
//! the special tokens, so the result is id for id the pipeline's `CLIPTokenizer` (checked on
//! tests/fixtures/tokenizer/prompts.json in tests/tokenizer.rs).

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use super::*;

/// CLIP's merge list, gzipped: a version line, then one merge (`a b`) a line, best first.
const BPE_GZ: &[u8] = include_bytes!("../../../data/clip/bpe_simple_vocab_16e6.txt.gz");

/// How many merges CLIP keeps: its vocabulary is 49408 = 256 bytes x 2 (with and without
/// `</w>`) + the merges + the two special tokens.
const N_MERGES: usize = 49152 - 256 - 2;

/// The vocabulary size of SD 1.x's text encoder.
const VOCAB_SIZE: usize = 49408;

/// The named-token entries of runwayml/stable-diffusion-v1-5's `tokenizer/tokenizer_config.json`
/// (the rest of it does not change tokenization).
const SD15_TOKENIZER_CONFIG: &str = r#"{
  "bos_token": {"content": "<|startoftext|>", "lstrip": false, "normalized": true, "rstrip": false, "single_word": false},
  "eos_token": {"content": "<|endoftext|>", "lstrip": false, "normalized": true, "rstrip": false, "single_word": false},
  "pad_token": "<|endoftext|>",
  "unk_token": {"content": "<|endoftext|>", "lstrip": false, "normalized": true, "rstrip": false, "single_word": false},
  "model_max_length": 77
}"#;

/// runwayml/stable-diffusion-v1-5's `tokenizer/special_tokens_map.json`.
const SD15_SPECIAL_TOKENS_MAP: &str = r#"{
  "bos_token": {"content": "<|startoftext|>", "lstrip": false, "normalized": true, "rstrip": false, "single_word": false},
  "eos_token": {"content": "<|endoftext|>", "lstrip": false, "normalized": true, "rstrip": false, "single_word": false},
  "pad_token": "<|endoftext|>",
  "unk_token": {"content": "<|endoftext|>", "lstrip": false, "normalized": true, "rstrip": false, "single_word": false}
}"#;

/// Where errors about the built-in data say they come from.
const NAME: &str = "<built-in CLIP ViT-L/14 tokenizer>";

fn internal(what: impl std::fmt::Display) -> Error {
    Error::Internal(format!("{NAME}: {what}"))
}

impl ClipTokenizer {
    /// SD 1.x's tokenizer (CLIP ViT-L/14, 49408 ids, pad `<|endoftext|>`, 77 tokens), built
    /// from the data compiled into the library; what a model without a `tokenizer/` folder
    /// uses. Takes about a tenth of a second (decompression and the merge table).
    pub fn clip_vit_l14() -> Result<Self> {
        let mut text = String::new();
        flate2::read::GzDecoder::new(BPE_GZ)
            .read_to_string(&mut text)
            .map_err(|e| internal(format!("decompressing the merge list: {e}")))?;
        let mut merges = Vec::with_capacity(N_MERGES);
        // Line 0 is "#version: ..."; CLIP keeps the next N_MERGES lines.
        for (i, line) in text.split('\n').skip(1).take(N_MERGES).enumerate() {
            let mut p = line.split_whitespace();
            match (p.next(), p.next(), p.next()) {
                (Some(a), Some(b), None) => merges.push((a.to_string(), b.to_string())),
                _ => return Err(internal(format!("merge line {} is not a pair", i + 2))),
            }
        }
        if merges.len() != N_MERGES {
            return Err(internal(format!(
                "{} merges, expected {N_MERGES}",
                merges.len()
            )));
        }
        // SimpleTokenizer's order: the byte symbols (printable bytes first), the same with
        // `</w>`, each merge's result, then the two special tokens.
        let table = byte_table();
        let mut order: Vec<usize> = (0..256).filter(|&b| (table[b] as u32) < 256).collect();
        order.extend((0..256).filter(|&b| (table[b] as u32) >= 256));
        let mut tokens: Vec<String> = order.iter().map(|&b| table[b].to_string()).collect();
        tokens.extend(order.iter().map(|&b| format!("{}</w>", table[b])));
        tokens.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
        tokens.push(BOS.to_string());
        tokens.push(EOS.to_string());
        let vocab: HashMap<String, u32> = tokens
            .into_iter()
            .enumerate()
            .map(|(i, t)| (t, i as u32))
            .collect();
        if vocab.len() != VOCAB_SIZE {
            return Err(internal(format!(
                "{} distinct tokens, expected {VOCAB_SIZE}",
                vocab.len()
            )));
        }
        let path = Path::new(NAME);
        let parse = |s: &str| serde_json::from_str::<Value>(s).map_err(internal);
        let config = parse(SD15_TOKENIZER_CONFIG)?;
        let stm = parse(SD15_SPECIAL_TOKENS_MAP)?;
        let specials = resolve_specials(Some((path, &config)), Some((path, &stm)), None)?;
        Self::build(vocab, merges, specials, DEFAULT_MAX_LEN).map_err(|(_, r)| internal(r))
    }
}
