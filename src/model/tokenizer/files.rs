//! Reading a tokenizer folder's files: vocab.json, merges.txt, tokenizer.json and the special-token configs.

use std::collections::HashMap;
use std::path::Path;

use serde_json::Value;

use super::*;
use crate::error::{Error, Result};

// ---------------------------------------------------------------------------------------------
// Reading the folder's files.

pub(super) fn invalid(path: &Path, format: &'static str, reason: impl Into<String>) -> Error {
    Error::InvalidFile {
        path: path.to_path_buf(),
        format,
        reason: reason.into(),
    }
}

pub(super) fn read_json_file(path: &Path) -> Result<Value> {
    let bytes = crate::io::read_file(path)?;
    serde_json::from_slice(&bytes).map_err(|e| invalid(path, "JSON", e.to_string()))
}

pub(super) fn parse_vocab(path: &Path, v: &Value) -> Result<HashMap<String, u32>> {
    let obj = v.as_object().ok_or_else(|| {
        invalid(
            path,
            "tokenizer",
            "the vocabulary is not a JSON object of token -> id",
        )
    })?;
    let mut vocab = HashMap::with_capacity(obj.len());
    for (k, id) in obj {
        let id = id
            .as_u64()
            .and_then(|i| u32::try_from(i).ok())
            .ok_or_else(|| {
                invalid(
                    path,
                    "tokenizer",
                    format!("token '{k}' has id {id}, not a u32"),
                )
            })?;
        vocab.insert(k.clone(), id);
    }
    Ok(vocab)
}

/// `merges.txt` as `tokenizers` reads it: `#version` lines skipped, every other line exactly
/// two space-separated symbols.
pub fn parse_merges_txt(text: &str) -> std::result::Result<Vec<(String, String)>, String> {
    let mut merges = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.starts_with("#version") {
            continue;
        }
        let mut parts = line.split(' ');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), None) => merges.push((a.to_string(), b.to_string())),
            _ => {
                return Err(format!(
                    "line {}: '{}' is not two symbols separated by one space",
                    i + 1,
                    line.chars().take(80).collect::<String>()
                ))
            }
        }
    }
    Ok(merges)
}

pub(super) type VocabAndMerges = (HashMap<String, u32>, Vec<(String, String)>);

pub(super) fn vocab_from_tokenizer_json(path: &Path, tj: &Value) -> Result<VocabAndMerges> {
    let model = tj
        .get("model")
        .ok_or_else(|| invalid(path, "tokenizer", "no 'model'"))?;
    if let Some(t) = model.get("type").and_then(|t| t.as_str()) {
        if t != "BPE" {
            return Err(invalid(
                path,
                "tokenizer",
                format!("model type '{t}', expected BPE (CLIP)"),
            ));
        }
    }
    let vocab = parse_vocab(path, model.get("vocab").unwrap_or(&Value::Null))?;
    let list = model
        .get("merges")
        .and_then(|m| m.as_array())
        .ok_or_else(|| invalid(path, "tokenizer", "model.merges is not a list"))?;
    let mut merges = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let pair = match m {
            Value::String(s) => {
                let mut p = s.split(' ');
                match (p.next(), p.next(), p.next()) {
                    (Some(a), Some(b), None) => Some((a.to_string(), b.to_string())),
                    _ => None,
                }
            }
            Value::Array(a) if a.len() == 2 => match (a[0].as_str(), a[1].as_str()) {
                (Some(x), Some(y)) => Some((x.to_string(), y.to_string())),
                _ => None,
            },
            _ => None,
        };
        merges.push(pair.ok_or_else(|| {
            invalid(
                path,
                "tokenizer",
                format!("merge {} ({m}) is not a pair of symbols", i + 1),
            )
        })?);
    }
    Ok((vocab, merges))
}

pub(super) const SPECIAL_KEYS: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

/// One token value of a config file: a string (an AddedToken with `normalized: false` once
/// transformers adds it) or an AddedToken dict (`normalized` defaulting to `!special`).
pub(super) fn token_value(
    path: &Path,
    key: &str,
    v: &Value,
    special_default: bool,
) -> Result<Option<AddedToken>> {
    match v {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(AddedToken::new(s, false))),
        Value::Object(o) => {
            let content = o.get("content").and_then(|c| c.as_str()).ok_or_else(|| {
                invalid(
                    path,
                    "JSON",
                    format!("{key}: an AddedToken without a 'content' string"),
                )
            })?;
            for flag in ["lstrip", "rstrip", "single_word"] {
                if o.get(flag).and_then(|f| f.as_bool()) == Some(true) {
                    return Err(Error::Unsupported(format!(
                        "{}: {key} '{content}' has {flag}: true (hdb matches added tokens without stripping or word boundaries)",
                        path.display()
                    )));
                }
            }
            let special = o
                .get("special")
                .and_then(|s| s.as_bool())
                .unwrap_or(special_default);
            let normalized = o
                .get("normalized")
                .and_then(|n| n.as_bool())
                .unwrap_or(!special);
            let id = o
                .get("id")
                .and_then(|i| i.as_u64())
                .and_then(|i| u32::try_from(i).ok());
            Ok(Some(AddedToken {
                content: content.to_string(),
                normalized,
                id,
            }))
        }
        other => Err(invalid(
            path,
            "JSON",
            format!("{key} is {other}, expected a string or an AddedToken"),
        )),
    }
}

/// The named and added tokens, resolved as transformers 5 `CLIPTokenizer.from_pretrained` does:
/// the named tokens come from tokenizer_config.json, overridden by special_tokens_map.json when
/// the config has no `added_tokens_decoder`; the config's `added_tokens_decoder` (else
/// tokenizer.json's `added_tokens`) fixes the flags of the tokens it lists; any other token takes
/// the flags of the last named token (bos, eos, unk, sep, pad, cls, mask) with its text, a plain
/// string counting as `normalized: false`; missing named tokens are CLIPTokenizer's defaults.
pub(super) fn resolve_specials(
    config: Option<(&Path, &Value)>,
    stm: Option<(&Path, &Value)>,
    tokenizer_json: Option<(&Path, &Value)>,
) -> Result<Specials> {
    let mut named: Vec<Option<AddedToken>> = vec![None; SPECIAL_KEYS.len()];
    let mut listed: Vec<AddedToken> = Vec::new();
    if let Some((path, cfg)) = config {
        if !cfg.is_object() {
            return Err(invalid(
                path,
                "JSON",
                "tokenizer_config.json is not a JSON object",
            ));
        }
        for (i, key) in SPECIAL_KEYS.iter().enumerate() {
            if let Some(v) = cfg.get(*key) {
                named[i] = token_value(path, key, v, false)?;
            }
        }
    }
    let decoder = config.and_then(|(p, c)| c.get("added_tokens_decoder").map(|d| (p, d)));
    match decoder {
        Some((path, d)) => {
            let obj = d.as_object().ok_or_else(|| {
                invalid(
                    path,
                    "JSON",
                    "added_tokens_decoder is not an object of id -> AddedToken",
                )
            })?;
            let mut entries: Vec<(u32, AddedToken)> = Vec::new();
            for (id, v) in obj {
                let id: u32 = id.parse().map_err(|_| {
                    invalid(
                        path,
                        "JSON",
                        format!("added_tokens_decoder key '{id}' is not an id"),
                    )
                })?;
                if let Some(mut t) = token_value(path, "added_tokens_decoder", v, false)? {
                    t.id = Some(id);
                    entries.push((id, t));
                }
            }
            entries.sort_by_key(|(id, _)| *id);
            listed.extend(entries.into_iter().map(|(_, t)| t));
        }
        None => {
            if let Some((path, s)) = stm {
                if !s.is_object() {
                    return Err(invalid(
                        path,
                        "JSON",
                        "special_tokens_map.json is not a JSON object",
                    ));
                }
                for (i, key) in SPECIAL_KEYS.iter().enumerate() {
                    if let Some(v) = s.get(*key) {
                        if let Some(t) = token_value(path, key, v, true)? {
                            named[i] = Some(t);
                        }
                    }
                }
            }
            if let Some((path, tj)) = tokenizer_json {
                if let Some(list) = tj.get("added_tokens") {
                    let list = list
                        .as_array()
                        .ok_or_else(|| invalid(path, "tokenizer", "added_tokens is not a list"))?;
                    for v in list {
                        if let Some(t) = token_value(path, "added_tokens", v, false)? {
                            listed.push(t);
                        }
                    }
                }
            }
        }
    }
    // CLIPTokenizer's defaults for the named tokens it always has.
    let defaults = [Some(BOS), Some(EOS), Some(EOS), None, Some(EOS), None, None];
    for (slot, default) in named.iter_mut().zip(defaults) {
        if slot.is_none() {
            *slot = default.map(|d| AddedToken::new(d, false));
        }
    }
    let mut added = dedup_last(listed.clone());
    for t in named.iter().flatten() {
        if listed.iter().any(|l| l.content == t.content) {
            continue;
        }
        match added.iter_mut().find(|a| a.content == t.content) {
            Some(a) => a.normalized = t.normalized,
            None => added.push(t.clone()),
        }
    }
    let get = |i: usize| {
        let t = named[i]
            .clone()
            .unwrap_or_else(|| AddedToken::new(EOS, false));
        added
            .iter()
            .find(|a| a.content == t.content)
            .cloned()
            .unwrap_or(t)
    };
    Ok(Specials {
        bos: get(0),
        eos: get(1),
        unk: get(2),
        pad: get(4),
        added,
    })
}
