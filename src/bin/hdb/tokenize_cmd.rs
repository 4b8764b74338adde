//! `hdb tokenize`: the CLIP token ids of a text, as transformers' `CLIPTokenizer` gives them
//! (`tokenizer(text, max_length=77, truncation=True).input_ids`, or padded as the pipeline
//! feeds the text encoder).

use std::path::Path;

use hdb::model::tokenizer::{find_folder, ClipTokenizer};

/// The tokenizer of `--model`: a diffusers folder's `tokenizer/`, the folder itself when it
/// holds the tokenizer's files, and for no model or a model file (an LDM single file) the
/// built-in one, as `hdb generate` would use.
fn tokenizer(model: Option<&Path>) -> hdb::Result<ClipTokenizer> {
    match model {
        None => ClipTokenizer::clip_vit_l14(),
        Some(m) if m.is_file() => ClipTokenizer::clip_vit_l14(),
        Some(m) => match find_folder(m) {
            Some(dir) => ClipTokenizer::from_folder(&dir),
            None => Err(hdb::Error::invalid_arg(
                "--model",
                format!(
                    "{} is neither a diffusers folder with tokenizer/ nor a tokenizer folder \
                     (tokenizer.json or vocab.json + merges.txt)",
                    m.display()
                ),
            )),
        },
    }
}

/// Prints the ids of `text` on one line, space-separated: start token, the text's tokens, end
/// token (truncated to the tokenizer's length, 77 for SD), then with `padded` the pad token up
/// to that length.
pub fn run(model: Option<&Path>, text: &str, padded: bool) -> hdb::Result<()> {
    let tok = tokenizer(model)?;
    let ids = if padded {
        tok.encode_padded(text)
    } else {
        tok.encode(text)
    };
    let line: Vec<String> = ids.iter().map(u32::to_string).collect();
    println!("{}", line.join(" "));
    Ok(())
}
