//! PNG images read as RGB8 (the CLI's face input; feature `png`). The header's size is checked
//! against [`crate::limits::MAX_IMAGE_PIXELS`] before any pixel buffer is allocated, so a
//! 65-byte file that declares 100000 x 100000 pixels is refused, not allocated.

use std::io::{BufRead, Seek};
use std::path::Path;

use crate::error::{Error, Result};
use crate::limits::{try_filled, MAX_IMAGE_PIXELS};

/// Reads a PNG file as RGB8 (gray, alpha, palette and 16-bit images converted):
/// (pixels, width, height). Errors name the file.
pub fn read_png(path: &Path) -> Result<(Vec<u8>, usize, usize)> {
    let file = super::open_file(path)?;
    decode_png(std::io::BufReader::new(file), path)
}

/// As [`read_png`], from any reader; `path` names the image in errors.
pub fn decode_png<R: BufRead + Seek>(r: R, path: &Path) -> Result<(Vec<u8>, usize, usize)> {
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
