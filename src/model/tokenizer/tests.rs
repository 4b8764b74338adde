//! The tokenizer's unit tests (the parity tests against transformers are tests/tokenizer.rs).

use super::*;

/// A vocabulary with every byte symbol (plain and `</w>`), the given merges and CLIP's
/// two special tokens.
fn tiny(merges: &[(&str, &str)]) -> ClipTokenizer {
    let table = byte_table();
    let mut vocab = HashMap::new();
    for c in table {
        let n = vocab.len() as u32;
        vocab.insert(c.to_string(), n);
    }
    for c in table {
        let n = vocab.len() as u32;
        vocab.insert(format!("{c}</w>"), n);
    }
    for (a, b) in merges {
        let n = vocab.len() as u32;
        vocab.entry(format!("{a}{b}")).or_insert(n);
    }
    for s in [BOS, EOS] {
        let n = vocab.len() as u32;
        vocab.insert(s.to_string(), n);
    }
    let merges = merges
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
    ClipTokenizer::from_parts(vocab, merges, EOS, 77).expect("tiny tokenizer")
}

fn tokens(t: &ClipTokenizer, text: &str) -> Vec<String> {
    let rev: HashMap<u32, &String> = t.vocab.iter().map(|(k, v)| (*v, k)).collect();
    t.encode(text)[1..]
        .iter()
        .take_while(|&&id| id != t.eos_id)
        .map(|id| rev[id].clone())
        .collect()
}

#[test]
fn byte_table_is_gpt2s() {
    let t = byte_table();
    assert_eq!(t[b'!' as usize], '!');
    assert_eq!(t[b'a' as usize], 'a');
    assert_eq!(t[0], '\u{100}');
    assert_eq!(t[b' ' as usize], '\u{120}');
    assert_eq!(t[0x7F], '\u{121}');
    assert_eq!(t[0xAD], '\u{143}');
    assert_eq!(t[0xFF], '\u{FF}');
    let mut sorted: Vec<char> = t.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), 256);
}

#[test]
fn bpe_merges_lowest_rank_first_and_marks_word_ends() {
    let t = tiny(&[("a", "b"), ("b", "c</w>"), ("ab", "c</w>"), ("a", "a")]);
    // "abc": (a,b) rank 0 before (b,c</w>) rank 1, then (ab,c</w>).
    assert_eq!(tokens(&t, "abc"), ["abc</w>"]);
    // "aaa": (a,a) leftmost first, the last 'a' is 'a</w>'.
    assert_eq!(tokens(&t, "aaa"), ["aa", "a</w>"]);
    assert_eq!(tokens(&t, "bc"), ["bc</w>"]);
    assert_eq!(tokens(&t, "ABC bc"), ["abc</w>", "bc</w>"]);
}

#[test]
fn pre_tokenization_splits_as_clip() {
    let t = tiny(&[]);
    let toks = tokens(&t, "it's 12 cats!!");
    assert_eq!(
        toks,
        ["i", "t</w>", "'", "s</w>", "1</w>", "2</w>", "c", "a", "t", "s</w>", "!", "!</w>"]
    );
    // A literal end token in upper case is plain text: '<|', word, '|>' after lower-casing.
    assert_eq!(
        tokens(&t, "<|ENDOFTEXT|>").concat(),
        "<|</w>endoftext</w>|></w>"
    );
}

#[test]
fn special_tokens_pad_truncate() {
    let t = tiny(&[]);
    assert_eq!(t.encode(""), [t.bos_id, t.eos_id]);
    assert_eq!(t.encode("<|endoftext|>"), [t.bos_id, t.eos_id, t.eos_id]);
    let padded = t.encode_padded("a");
    assert_eq!(padded.len(), 77);
    assert!(padded[3..].iter().all(|&i| i == t.pad_id));
    let long = t.encode(&"a ".repeat(500));
    assert_eq!(long.len(), 77);
    assert_eq!((long[0], long[76]), (t.bos_id, t.eos_id));
}

#[test]
fn nfc_composes_reorders_and_keeps_exclusions() {
    assert_eq!(nfc("cafe\u{301}"), "caf\u{e9}");
    assert_eq!(nfc("\u{212b}"), "\u{c5}");
    assert_eq!(nfc("a\u{301}\u{316}"), "\u{e1}\u{316}");
    assert_eq!(nfc("a\u{316}\u{301}"), "\u{e1}\u{316}");
    assert_eq!(nfc("o\u{323}\u{31b}"), "\u{1ee3}");
    assert_eq!(nfc("\u{1100}\u{1161}\u{11a8}"), "\u{ac01}");
    assert_eq!(nfc("\u{ac00}\u{11a8}"), "\u{ac01}");
    assert_eq!(nfc("\u{958}"), "\u{915}\u{93c}");
    assert_eq!(nfc("\u{b47}\u{b3e}"), "\u{b4b}");
    assert_eq!(nfc("\u{344}"), "\u{308}\u{301}");
    // The tokenizers library's tables: U+11938 neither decomposes nor is composed.
    assert_eq!(nfc("\u{11935}\u{11930}"), "\u{11935}\u{11930}");
    assert_eq!(nfc("\u{11938}"), "\u{11938}");
    assert!(matches!(nfc("plain ascii"), std::borrow::Cow::Borrowed(_)));
}

#[test]
fn normalize_lowercases_per_character() {
    assert_eq!(normalize("ΟΔΥΣΣΕΥΣ"), "οδυσσευσ");
    assert_eq!(normalize("A \t\n B\u{3000}C"), "a b c");
    assert_eq!(normalize("\u{130}"), "i\u{307}");
}

#[test]
fn never_panics_on_odd_text() {
    let t = tiny(&[("a", "b")]);
    let inputs = [
        "\0\u{1}\u{7f}",
        "\u{10ffff}\u{fffe}\u{e000}",
        "\u{301}\u{301}\u{301}",
        "<|endoftext|><|startoftext|><|endoftext|",
        "'''''s'''",
        "\u{feff}\u{200b}\u{2028}",
    ];
    for s in inputs {
        let ids = t.encode_padded(s);
        assert_eq!(ids.len(), 77, "{s:?}");
    }
    let huge = "ab".repeat(200_000);
    assert_eq!(t.encode(&huge).len(), 77);
}

#[test]
fn merges_txt_format() {
    assert_eq!(
        parse_merges_txt("#version: 0.2\na b\r\nc d</w>\n").expect("ok"),
        [("a".into(), "b".into()), ("c".into(), "d</w>".into())]
    );
    assert!(parse_merges_txt("a b\n\nc d\n").is_err());
    assert!(parse_merges_txt("a b c\n").is_err());
}

#[test]
fn merge_result_missing_from_vocab_is_an_error() {
    let mut vocab = HashMap::new();
    vocab.insert("a".to_string(), 0);
    vocab.insert("b</w>".to_string(), 1);
    vocab.insert(EOS.to_string(), 2);
    vocab.insert(BOS.to_string(), 3);
    let err = ClipTokenizer::from_parts(vocab, vec![("a".into(), "b</w>".into())], EOS, 77)
        .expect_err("ab</w> is missing");
    assert!(
        err.to_string()
            .contains("'ab</w>' is not in the vocabulary"),
        "{err}"
    );
}

#[test]
fn byte_level_has_514_ids() {
    let t = ClipTokenizer::byte_level(77).expect("byte level");
    assert_eq!((t.bos_id(), t.eos_id(), t.pad_id()), (512, 513, 513));
    // '!' is the first symbol, 'a' the (0x61 - 0x21)th; the last byte of a piece has '</w>'.
    assert_eq!(t.encode("!!a"), [512, 0, 256, 256 + 0x61 - 0x21, 513]);
    assert!(t
        .encode_padded("any text \u{1f431}")
        .iter()
        .all(|&i| i < 514));
}

#[test]
fn is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<ClipTokenizer>();
}
