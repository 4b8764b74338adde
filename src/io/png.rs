//! PNG images read as RGB8 (the CLI's face input; feature `png`). The header's size is checked
//! against [`crate::limits::MAX_IMAGE_PIXELS`] before any pixel buffer is allocated, so a
//! 65-byte file that declares 100000 x 100000 pixels is refused, not allocated.

use std::io::{BufRead, Seek};
use std::path::Path;

use crate::error::{Error, Result};
use crate::limits::{try_filled, MAX_IMAGE_PIXELS};

/// Largest PNG file read (an uncompressed 4096 x 4096 RGBA16 image is 128 MB).
const MAX_FILE_BYTES: u64 = 512 << 20;

/// Reads a PNG file as RGB8 (gray, alpha, palette and 16-bit images converted):
/// (pixels, width, height). Errors name the file.
pub fn read_png(path: &Path) -> Result<(Vec<u8>, usize, usize)> {
    let len = super::open_file(path)?
        .metadata()
        .map_err(|e| Error::io(path, e))?
        .len();
    if len > MAX_FILE_BYTES {
        return Err(Error::InvalidFile {
            path: path.to_path_buf(),
            format: "PNG",
            reason: format!(
                "the file is {len} bytes; hdb reads PNG files of at most {MAX_FILE_BYTES}"
            ),
        });
    }
    decode_png(&super::read_file(path)?, path)
}

/// Checks what the `png` crate (0.18) does not and panics on: a palette (PLTE) whose length is
/// not a whole number of RGB entries. Chunks are walked by their lengths; a malformed stream
/// is left for the decoder to report.
fn check_chunks(bytes: &[u8]) -> std::result::Result<(), String> {
    let mut at = 8; // the signature
    while let Some(head) = bytes.get(at..at + 8) {
        let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
        let kind = &head[4..8];
        if kind == b"PLTE" && !len.is_multiple_of(3) {
            return Err(format!(
                "its PLTE chunk has {len} bytes, not a whole number of 3-byte RGB entries"
            ));
        }
        if kind == b"IEND" {
            break;
        }
        at = match at.checked_add(12).and_then(|a| a.checked_add(len)) {
            Some(a) => a,
            None => break,
        };
    }
    Ok(())
}

/// As [`read_png`], from the file's bytes; `path` names the image in errors.
pub fn decode_png(bytes: &[u8], path: &Path) -> Result<(Vec<u8>, usize, usize)> {
    let bad = |e: String| Error::InvalidFile {
        path: path.to_path_buf(),
        format: "PNG",
        reason: e,
    };
    check_chunks(bytes).map_err(bad)?;
    // The decoder is a dependency: should it still panic on some other malformed file, that
    // is a refusal of the file, not a crash of the host.
    std::panic::catch_unwind(|| decode_checked(std::io::Cursor::new(bytes), path)).unwrap_or_else(
        |_| {
            Err(bad(
                "the PNG decoder failed on this file (malformed data)".into()
            ))
        },
    )
}

fn decode_checked<R: BufRead + Seek>(r: R, path: &Path) -> Result<(Vec<u8>, usize, usize)> {
    let bad = |e: String| Error::InvalidFile {
        path: path.to_path_buf(),
        format: "PNG",
        reason: e,
    };
    // The decoder's own buffers (chunks, a row) stay under its default limit of 64 MiB.
    let mut dec = png::Decoder::new(r);
    dec.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut reader = dec.read_info().map_err(|e| bad(e.to_string()))?;
    let (w, h) = {
        let info = reader.info();
        (info.width as usize, info.height as usize)
    };
    if w.saturating_mul(h) > MAX_IMAGE_PIXELS {
        return Err(bad(format!(
            "the image is {w}x{h}, more than hdb's limit of {MAX_IMAGE_PIXELS} pixels (4096x4096) \
             for an input image"
        )));
    }
    let size = reader
        .output_buffer_size()
        .ok_or_else(|| bad(format!("a {w}x{h} image is too large")))?;
    let mut buf = try_filled(size, 0u8, &format!("{}: pixels", path.display()))?;
    let info = reader
        .next_frame(&mut buf)
        .map_err(|e| bad(e.to_string()))?;
    let px = buf
        .get(..info.buffer_size())
        .ok_or_else(|| bad("the decoder reported more bytes than it wrote".into()))?;
    let rgb: Vec<u8> = match info.color_type {
        png::ColorType::Rgb => px.to_vec(),
        png::ColorType::Rgba => px
            .chunks_exact(4)
            .flat_map(|p| [p[0], p[1], p[2]])
            .collect(),
        png::ColorType::Grayscale => px.iter().flat_map(|&g| [g, g, g]).collect(),
        png::ColorType::GrayscaleAlpha => px
            .chunks_exact(2)
            .flat_map(|p| [p[0], p[0], p[0]])
            .collect(),
        png::ColorType::Indexed => return Err(bad("palette image was not expanded".into())),
    };
    Ok((rgb, info.width as usize, info.height as usize))
}
