//! `hdb tokenize`: the CLIP token ids of a text, as transformers' `CLIPTokenizer` gives them
//! (`tokenizer(text, max_length=77, truncation=True).input_ids`, or padded as the pipeline
//! feeds the text encoder).

use std::path::{Path, PathBuf};

use hdb::model::tokenizer::ClipTokenizer;

/// The tokenizer folder of `--model`: a diffusers folder's `tokenizer/`, or the folder itself
/// when it holds the tokenizer's files.
fn tokenizer_folder(model: &Path) -> hdb::Result<PathBuf> {
    let sub = model.join("tokenizer");
    if sub.is_dir() {
        return Ok(sub);
    }
    if model.join("tokenizer.json").is_file() || model.join("vocab.json").is_file() {
        return Ok(model.to_path_buf());
    }
    Err(hdb::Error::invalid_arg(
        "--model",
        format!(
            "{} is neither a diffusers folder with tokenizer/ nor a tokenizer folder \
             (tokenizer.json or vocab.json + merges.txt)",
            model.display()
        ),
    ))
}

/// Prints the ids of `text` on one line, space-separated: start token, the text's tokens, end
/// token (truncated to the tokenizer's length, 77 for SD), then with `padded` the pad token up
/// to that length.
pub fn run(model: &Path, text: &str, padded: bool) -> hdb::Result<()> {
    let tok = ClipTokenizer::from_folder(&tokenizer_folder(model)?)?;
    let ids = if padded {
        tok.encode_padded(text)
    } else {
        tok.encode(text)
    };
    let line: Vec<String> = ids.iter().map(u32::to_string).collect();
    println!("{}", line.join(" "));
    Ok(())
}
