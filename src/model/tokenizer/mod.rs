//! The CLIP BPE tokenizer of Stable Diffusion 1.x, id for id equal to what diffusers'
//! `StableDiffusionPipeline` gets from `transformers.CLIPTokenizer`.
//!
//! In transformers 5 `CLIPTokenizer` is the `tokenizers`-backed class (the slow Python one, and
//! with it ftfy and `html.unescape`, is gone; ftfy plays no part even when installed). Its
//! pipeline, reproduced here step by step:
//!
//! 1. added tokens (`<|startoftext|>`, `<|endoftext|>`, the pad token, any other added token) are
//!    cut out of the text: those with `normalized: false` matched on the raw text first, those
//!    with `normalized: true` matched on each normalized remainder (so case-insensitively);
//!    leftmost, then longest;
//! 2. normalizer: NFC (with the `tokenizers` crate's older Unicode tables, embedded below), every
//!    run of Unicode White_Space to one space, then per-character lower-casing (`char::to_lowercase`:
//!    no final-sigma rule);
//! 3. pre-tokenizer: the CLIP split
//!    `<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+`
//!    keeping the matches (whitespace is dropped), then GPT-2's byte-level split inside each piece
//!    (it only ever splits a literal special token, which became a piece because it was not matched
//!    in step 1, into `<|`, the word, `|>`), then bytes to GPT-2's printable characters;
//! 4. BPE on each piece with `</w>` on its last symbol, merges applied lowest rank first, leftmost
//!    first among equal ranks (a byte missing from the vocabulary becomes the unknown token,
//!    `<|endoftext|>`);
//! 5. `<|startoftext|>` + ids + `<|endoftext|>`, the ids truncated so the whole fits
//!    `model_max_length` (77), then padded with the pad token to exactly that length, which is how
//!    the pipeline calls it: `tokenizer(prompt, padding="max_length",
//!    max_length=tokenizer.model_max_length, truncation=True)`.
//!
//! Which special tokens are matched after normalization depends on the folder's files the way
//! transformers 5 reads them (see [`ClipTokenizer::from_folder`]): for SD 1.5's tokenizer folder,
//! `<|STARTOFTEXT|>` in a prompt is the start token but `<|ENDOFTEXT|>` is plain text.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::path::Path;
use std::sync::Mutex;

use regex::Regex;
use serde_json::Value;

use crate::error::{Error, Result};

mod builtin;
mod files;
mod nfc;

use files::*;
pub use nfc::nfc;

/// The start token of CLIP's vocabulary (id 49406 in SD 1.x's).
pub const BOS: &str = "<|startoftext|>";
/// The end token (id 49407), also CLIPTokenizer's default unknown and pad token.
pub const EOS: &str = "<|endoftext|>";
/// SD 1.x's text length (`model_max_length` of its tokenizer, the text encoder's positions).
pub const DEFAULT_MAX_LEN: usize = 77;
/// The longest `model_max_length` accepted from a tokenizer_config.json.
const MAX_MAX_LEN: usize = 1 << 20;

/// CLIP's pre-tokenization pattern, as transformers' CLIPTokenizer sets it.
const CLIP_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";
/// GPT-2's pattern of the ByteLevel pre-tokenizer (`use_regex: true`), without its
/// `\s+(?!\S)` branch: the pieces it sees hold no whitespace.
const BYTE_LEVEL_PATTERN: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+";
/// Pieces longer than this (in bytes) are not cached (as the `tokenizers` BPE cache).
const CACHE_MAX_PIECE: usize = 256;
/// Entries kept in the BPE cache; once full, new pieces are not cached.
const CACHE_CAPACITY: usize = 10_000;

/// A token cut out of the text before BPE (an added token of the tokenizer).
#[derive(Clone, Debug, PartialEq, Eq)]
struct AddedToken {
    content: String,
    /// Matched on the normalized text (NFC, whitespace, lower case) rather than the raw text.
    normalized: bool,
    /// Its id when it is not in the BPE vocabulary.
    id: Option<u32>,
}

impl AddedToken {
    fn new(content: &str, normalized: bool) -> Self {
        AddedToken {
            content: content.to_string(),
            normalized,
            id: None,
        }
    }
}

/// Which input a construction error is about.
#[derive(Clone, Copy, Debug)]
enum Part {
    Merges,
    Specials,
}

type BuildResult<T> = std::result::Result<T, (Part, String)>;

/// The CLIP tokenizer; `Send + Sync`, with a per-piece BPE cache.
pub struct ClipTokenizer {
    vocab: HashMap<String, u32>,
    /// (left id, right id) -> (rank, merged id)
    merges: HashMap<(u32, u32), (u32, u32)>,
    /// Id of each byte's character, and of the character + `</w>`.
    byte_ids: [Option<u32>; 256],
    byte_end_ids: [Option<u32>; 256],
    unk_id: u32,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
    max_len: usize,
    /// Added tokens matched on the raw text, and on normalized text (contents normalized).
    raw_added: Vec<(String, u32)>,
    normalized_added: Vec<(String, u32)>,
    clip_re: Regex,
    byte_level_re: Regex,
    cache: Mutex<HashMap<String, Vec<u32>>>,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("vocab", &self.vocab.len())
            .field("merges", &self.merges.len())
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .field("pad_id", &self.pad_id)
            .field("max_len", &self.max_len)
            .finish_non_exhaustive()
    }
}

/// The four named tokens a CLIPTokenizer has (its defaults: BOS, EOS, EOS, EOS).
struct Specials {
    bos: AddedToken,
    eos: AddedToken,
    unk: AddedToken,
    pad: AddedToken,
    /// Every added token, flags final (named ones included).
    added: Vec<AddedToken>,
}

/// The tokenizer folder at `path`: its `tokenizer/` sub-folder (a diffusers model folder) or
/// `path` itself, whichever holds `tokenizer.json` or `vocab.json`.
pub fn find_folder(path: &Path) -> Option<std::path::PathBuf> {
    let holds = |d: &Path| d.join("tokenizer.json").is_file() || d.join("vocab.json").is_file();
    let sub = path.join("tokenizer");
    if holds(&sub) {
        Some(sub)
    } else if holds(path) {
        Some(path.to_path_buf())
    } else {
        None
    }
}

impl ClipTokenizer {
    /// A tokenizer from a vocabulary (token -> id, byte-level strings as in `vocab.json`), the
    /// merge list in rank order, the pad token's text and the sequence length. The start, end and
    /// unknown tokens are CLIP's `<|startoftext|>`, `<|endoftext|>`, `<|endoftext|>`; like
    /// `CLIPTokenizer(vocab=..., merges=...)`, every named token is matched on the raw text only.
    pub fn from_parts(
        vocab: HashMap<String, u32>,
        merges: Vec<(String, String)>,
        pad: &str,
        max_len: usize,
    ) -> Result<Self> {
        if max_len < 2 {
            return Err(Error::invalid_arg(
                "max_len",
                format!("{max_len} leaves no room for the start and end tokens"),
            ));
        }
        let specials = Specials {
            bos: AddedToken::new(BOS, false),
            eos: AddedToken::new(EOS, false),
            unk: AddedToken::new(EOS, false),
            pad: AddedToken::new(pad, false),
            added: dedup_last(vec![
                AddedToken::new(BOS, false),
                AddedToken::new(EOS, false),
                AddedToken::new(pad, false),
            ]),
        };
        Self::build(vocab, merges, specials, max_len).map_err(|(part, reason)| {
            let name = match part {
                Part::Merges => "merges",
                Part::Specials => "pad",
            };
            Error::invalid_arg(name, reason)
        })
    }

    /// A tokenizer without merges for small built-in models (`hdb demo`'s random-weight model):
    /// 514 ids, the 256 byte symbols then the same with `</w>` (in CLIP's order, printable
    /// bytes first), `<|startoftext|>` = 512, `<|endoftext|>` = 513 (also the pad token).
    pub fn byte_level(max_len: usize) -> Result<Self> {
        let table = byte_table();
        let mut order: Vec<usize> = (0..256).filter(|&b| (table[b] as u32) < 256).collect();
        order.extend((0..256).filter(|&b| (table[b] as u32) >= 256));
        let mut vocab = HashMap::with_capacity(514);
        for (i, &b) in order.iter().enumerate() {
            vocab.insert(table[b].to_string(), i as u32);
            vocab.insert(format!("{}</w>", table[b]), 256 + i as u32);
        }
        vocab.insert(BOS.to_string(), 512);
        vocab.insert(EOS.to_string(), 513);
        Self::from_parts(vocab, Vec::new(), EOS, max_len)
    }

    /// Reads a transformers tokenizer folder (a diffusers model's `tokenizer/`): the vocabulary
    /// and merges from `tokenizer.json` when present (transformers prefers it), else from
    /// `vocab.json` + `merges.txt`; the named tokens, which of them match case-insensitively
    /// (`normalized`), the pad token and `model_max_length` from `tokenizer_config.json`,
    /// `special_tokens_map.json` and `tokenizer.json`'s `added_tokens`, resolved as
    /// transformers 5 does. Without a config: pad `<|endoftext|>`, length 77.
    pub fn from_folder(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::NotFound {
                path: dir.to_path_buf(),
            });
        }
        let tj_path = dir.join("tokenizer.json");
        let tokenizer_json = if tj_path.is_file() {
            Some(read_json_file(&tj_path)?)
        } else {
            None
        };
        let (vocab, merges, vocab_path, merges_path) = match &tokenizer_json {
            Some(tj) => {
                let (v, m) = vocab_from_tokenizer_json(&tj_path, tj)?;
                (v, m, tj_path.clone(), tj_path.clone())
            }
            None => {
                let vp = dir.join("vocab.json");
                let mp = dir.join("merges.txt");
                if !vp.is_file() {
                    return Err(Error::not_a_model(
                        dir,
                        "a tokenizer folder needs tokenizer.json or vocab.json + merges.txt",
                    ));
                }
                let v = parse_vocab(&vp, &read_json_file(&vp)?)?;
                let text = crate::io::read_text(&mp)?;
                let m = parse_merges_txt(&text).map_err(|r| invalid(&mp, "merges.txt", r))?;
                (v, m, vp, mp)
            }
        };
        let cfg_path = dir.join("tokenizer_config.json");
        let config = if cfg_path.is_file() {
            Some(read_json_file(&cfg_path)?)
        } else {
            None
        };
        let stm_path = dir.join("special_tokens_map.json");
        let stm = if stm_path.is_file() {
            Some(read_json_file(&stm_path)?)
        } else {
            None
        };
        let specials = resolve_specials(
            config.as_ref().map(|c| (cfg_path.as_path(), c)),
            stm.as_ref().map(|s| (stm_path.as_path(), s)),
            tokenizer_json.as_ref().map(|t| (tj_path.as_path(), t)),
        )?;
        let max_len = match config.as_ref().and_then(|c| c.get("model_max_length")) {
            None | Some(Value::Null) => DEFAULT_MAX_LEN,
            Some(v) => match v.as_u64() {
                Some(n) if (2..=MAX_MAX_LEN as u64).contains(&n) => n as usize,
                _ => {
                    return Err(invalid(
                        &cfg_path,
                        "JSON",
                        format!(
                            "model_max_length {v} is not a sequence length in 2..={MAX_MAX_LEN}"
                        ),
                    ))
                }
            },
        };
        Self::build(vocab, merges, specials, max_len).map_err(|(part, reason)| match part {
            Part::Merges => invalid(&merges_path, "tokenizer", reason),
            Part::Specials => {
                let p = if config.is_some() {
                    &cfg_path
                } else {
                    &vocab_path
                };
                invalid(p, "tokenizer", reason)
            }
        })
    }

    fn build(
        vocab: HashMap<String, u32>,
        merges: Vec<(String, String)>,
        specials: Specials,
        max_len: usize,
    ) -> BuildResult<Self> {
        if max_len < 2 {
            return Err((
                Part::Specials,
                format!("max_len {max_len} leaves no room for the start and end tokens"),
            ));
        }
        let mut merge_map = HashMap::with_capacity(merges.len());
        for (rank, (a, b)) in merges.iter().enumerate() {
            let look = |t: &str| {
                vocab.get(t).copied().ok_or_else(|| {
                    (
                        Part::Merges,
                        format!(
                            "merge {} ('{a}' '{b}'): '{t}' is not in the vocabulary",
                            rank + 1
                        ),
                    )
                })
            };
            let ia = look(a)?;
            let ib = look(b)?;
            let merged = look(&format!("{a}{b}"))?;
            let rank = u32::try_from(rank).map_err(|_| (Part::Merges, "too many merges".into()))?;
            // Like `tokenizers`, a pair listed twice keeps its last rank.
            merge_map.insert((ia, ib), (rank, merged));
        }
        let table = byte_table();
        let mut byte_ids = [None; 256];
        let mut byte_end_ids = [None; 256];
        let mut buf = String::new();
        for b in 0..256 {
            buf.clear();
            buf.push(table[b]);
            byte_ids[b] = vocab.get(&buf).copied();
            buf.push_str("</w>");
            byte_end_ids[b] = vocab.get(&buf).copied();
        }
        let mut ids: HashMap<String, u32> = HashMap::new();
        for t in &specials.added {
            if t.content.is_empty() {
                continue;
            }
            let id = match (vocab.get(&t.content), t.id) {
                (Some(&id), _) | (None, Some(id)) => id,
                (None, None) => {
                    return Err((
                        Part::Specials,
                        format!("added token '{}' is not in the vocabulary", t.content),
                    ))
                }
            };
            ids.insert(t.content.clone(), id);
        }
        let id_of = |t: &AddedToken, what: &str| {
            ids.get(&t.content)
                .or_else(|| vocab.get(&t.content))
                .copied()
                .ok_or_else(|| {
                    (
                        Part::Specials,
                        format!("the {what} token '{}' is not in the vocabulary", t.content),
                    )
                })
        };
        let bos_id = id_of(&specials.bos, "start")?;
        let eos_id = id_of(&specials.eos, "end")?;
        let unk_id = id_of(&specials.unk, "unknown")?;
        let pad_id = id_of(&specials.pad, "pad")?;
        let mut raw_added = Vec::new();
        let mut normalized_added = Vec::new();
        for t in &specials.added {
            let Some(&id) = ids.get(&t.content) else {
                continue;
            };
            if t.normalized {
                let n = normalize(&t.content);
                if !n.is_empty() {
                    normalized_added.push((n, id));
                }
            } else {
                raw_added.push((t.content.clone(), id));
            }
        }
        let re = |p: &str| {
            Regex::new(p).map_err(|e| (Part::Specials, format!("internal regex error: {e}")))
        };
        Ok(ClipTokenizer {
            clip_re: re(CLIP_PATTERN)?,
            byte_level_re: re(BYTE_LEVEL_PATTERN)?,
            vocab,
            merges: merge_map,
            byte_ids,
            byte_end_ids,
            unk_id,
            bos_id,
            eos_id,
            pad_id,
            max_len,
            raw_added,
            normalized_added,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// The sequence length (`model_max_length`, 77 for SD 1.x).
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    /// Start token, the text's tokens, end token; truncated to [`max_len`](Self::max_len)
    /// (keeping both ends), not padded.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let budget = self.max_len - 2;
        let mut content = Vec::new();
        self.tokenize(text, budget, &mut content);
        content.truncate(budget);
        let mut ids = Vec::with_capacity(content.len() + 2);
        ids.push(self.bos_id);
        ids.extend_from_slice(&content);
        ids.push(self.eos_id);
        ids
    }

    /// Exactly [`max_len`](Self::max_len) ids: [`encode`](Self::encode) padded with the pad
    /// token, as the SD pipeline tokenizes prompts.
    pub fn encode_padded(&self, text: &str) -> Vec<u32> {
        let mut ids = self.encode(text);
        ids.resize(self.max_len, self.pad_id);
        ids
    }

    /// The content ids of `text` (no start/end tokens), stopping once `budget` ids are known.
    fn tokenize(&self, text: &str, budget: usize, out: &mut Vec<u32>) {
        let mut finder = Finder::new(&self.raw_added);
        let mut pos = 0;
        while pos < text.len() && out.len() < budget {
            match finder.next(text, pos) {
                Some((start, end, id)) => {
                    self.tokenize_segment(&text[pos..start], budget, out);
                    if out.len() >= budget {
                        return;
                    }
                    out.push(id);
                    pos = end;
                }
                None => {
                    self.tokenize_segment(&text[pos..], budget, out);
                    return;
                }
            }
        }
    }

    /// A stretch of raw text between raw-matched added tokens: normalize, then cut out the
    /// normalized added tokens, then pre-tokenize and BPE.
    fn tokenize_segment(&self, raw: &str, budget: usize, out: &mut Vec<u32>) {
        if raw.is_empty() {
            return;
        }
        let norm = normalize(raw);
        let mut finder = Finder::new(&self.normalized_added);
        let mut pos = 0;
        while pos < norm.len() && out.len() < budget {
            match finder.next(&norm, pos) {
                Some((start, end, id)) => {
                    self.tokenize_normalized(&norm[pos..start], budget, out);
                    if out.len() >= budget {
                        return;
                    }
                    out.push(id);
                    pos = end;
                }
                None => {
                    self.tokenize_normalized(&norm[pos..], budget, out);
                    return;
                }
            }
        }
    }

    fn tokenize_normalized(&self, text: &str, budget: usize, out: &mut Vec<u32>) {
        for m in self.clip_re.find_iter(text) {
            let piece = m.as_str();
            // The ByteLevel pre-tokenizer splits each piece again ("isolated": gaps kept too).
            let mut last = 0;
            for sub in self.byte_level_re.find_iter(piece) {
                if sub.start() > last {
                    self.bpe_into(&piece[last..sub.start()], out);
                }
                self.bpe_into(sub.as_str(), out);
                last = sub.end();
            }
            if last < piece.len() {
                self.bpe_into(&piece[last..], out);
            }
            if out.len() >= budget {
                return;
            }
        }
    }

    fn bpe_into(&self, piece: &str, out: &mut Vec<u32>) {
        if piece.is_empty() {
            return;
        }
        let cacheable = piece.len() <= CACHE_MAX_PIECE;
        if cacheable {
            if let Ok(cache) = self.cache.lock() {
                if let Some(hit) = cache.get(piece) {
                    out.extend_from_slice(hit);
                    return;
                }
            }
        }
        let ids = self.bpe(piece.as_bytes());
        out.extend_from_slice(&ids);
        if cacheable {
            if let Ok(mut cache) = self.cache.lock() {
                if cache.len() < CACHE_CAPACITY {
                    cache.insert(piece.to_string(), ids);
                }
            }
        }
    }

    /// BPE of one pre-token's bytes, as the `tokenizers` library's `Word::merge_all`: a heap of
    /// candidate merges ordered by (rank, position), stale entries skipped.
    fn bpe(&self, bytes: &[u8]) -> Vec<u32> {
        const NONE: usize = usize::MAX;
        #[derive(Clone, Copy)]
        struct Sym {
            id: u32,
            prev: usize,
            next: usize,
            alive: bool,
        }
        let n = bytes.len();
        let mut syms: Vec<Sym> = bytes
            .iter()
            .enumerate()
            .map(|(i, &b)| {
                let id = if i + 1 == n {
                    self.byte_end_ids[b as usize]
                } else {
                    self.byte_ids[b as usize]
                };
                Sym {
                    id: id.unwrap_or(self.unk_id),
                    prev: if i == 0 { NONE } else { i - 1 },
                    next: if i + 1 == n { NONE } else { i + 1 },
                    alive: true,
                }
            })
            .collect();
        let mut heap: BinaryHeap<Reverse<(u32, usize, u32)>> = BinaryHeap::new();
        for i in 0..n.saturating_sub(1) {
            if let Some(&(rank, new_id)) = self.merges.get(&(syms[i].id, syms[i + 1].id)) {
                heap.push(Reverse((rank, i, new_id)));
            }
        }
        while let Some(Reverse((_, pos, new_id))) = heap.pop() {
            let cur = syms[pos];
            if !cur.alive || cur.next == NONE {
                continue;
            }
            let next = cur.next;
            match self.merges.get(&(cur.id, syms[next].id)) {
                Some(&(_, id)) if id == new_id => {}
                _ => continue,
            }
            let after = syms[next].next;
            syms[pos].id = new_id;
            syms[pos].next = after;
            syms[next].alive = false;
            if after != NONE {
                syms[after].prev = pos;
            }
            if cur.prev != NONE {
                if let Some(&(rank, id)) = self.merges.get(&(syms[cur.prev].id, new_id)) {
                    heap.push(Reverse((rank, cur.prev, id)));
                }
            }
            if after != NONE {
                if let Some(&(rank, id)) = self.merges.get(&(new_id, syms[after].id)) {
                    heap.push(Reverse((rank, pos, id)));
                }
            }
        }
        syms.iter().filter(|s| s.alive).map(|s| s.id).collect()
    }
}

/// Leftmost-longest search for a set of patterns over one text, each pattern's next occurrence
/// remembered so a whole text costs one pass per pattern.
struct Finder<'a> {
    patterns: &'a [(String, u32)],
    /// Per pattern: `Some(Some(at))` next occurrence at or after the last query, `Some(None)` none
    /// left, `None` not searched yet.
    next_at: Vec<Option<Option<usize>>>,
}

impl<'a> Finder<'a> {
    fn new(patterns: &'a [(String, u32)]) -> Self {
        Finder {
            patterns,
            next_at: vec![None; patterns.len()],
        }
    }

    /// The leftmost match starting at or after `from` (longest among those at that start):
    /// (start, end, id).
    fn next(&mut self, text: &str, from: usize) -> Option<(usize, usize, u32)> {
        let mut best: Option<(usize, usize, u32)> = None;
        for (i, (pat, id)) in self.patterns.iter().enumerate() {
            let at = match self.next_at[i] {
                Some(Some(at)) if at >= from => Some(at),
                Some(None) => None,
                _ => {
                    let found = text
                        .get(from..)
                        .and_then(|t| t.find(pat.as_str()))
                        .map(|p| p + from);
                    self.next_at[i] = Some(found);
                    found
                }
            };
            if let Some(at) = at {
                let end = at + pat.len();
                let better = match best {
                    None => true,
                    Some((s, e, _)) => at < s || (at == s && end > e),
                };
                if better {
                    best = Some((at, end, *id));
                }
            }
        }
        best
    }
}

/// Keeps the last flags of each content, in first-seen order.
fn dedup_last(tokens: Vec<AddedToken>) -> Vec<AddedToken> {
    let mut out: Vec<AddedToken> = Vec::new();
    for t in tokens {
        match out.iter_mut().find(|o| o.content == t.content) {
            Some(o) => *o = t,
            None => out.push(t),
        }
    }
    out
}

/// GPT-2's byte -> printable character map (`bytes_to_unicode`).
fn byte_table() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut n = 0u32;
    for (b, slot) in table.iter_mut().enumerate() {
        let b = b as u32;
        let printable =
            (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
        let cp = if printable {
            b
        } else {
            n += 1;
            255 + n
        };
        *slot = char::from_u32(cp).unwrap_or('\0');
    }
    table
}

/// CLIPTokenizer's normalizer: NFC, each whitespace run to one space, per-character lower case.
pub fn normalize(text: &str) -> String {
    let nfc = nfc(text);
    let mut out = String::with_capacity(nfc.len());
    let mut in_space = false;
    for c in nfc.chars() {
        if c.is_whitespace() {
            if !in_space {
                out.push(' ');
                in_space = true;
            }
            continue;
        }
        in_space = false;
        if c.is_ascii() {
            out.push(c.to_ascii_lowercase());
        } else {
            out.extend(c.to_lowercase());
        }
    }
    out
}

#[cfg(test)]
mod tests;
