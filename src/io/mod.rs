//! Reading files: safetensors through mmap, diffusers folders, LDM single files, and the
//! key-name table that maps LDM names to canonical diffusers names.
//!
//! Every file hdb reads is opened through [`open_file`]: only regular files are read. A FIFO
//! (or a device, a socket) named as a model, shard, config or image would otherwise block
//! `open()` forever or read without end, and a directory would fail deep inside `mmap` with
//! "No such device".

pub mod diffusers;
pub mod inputs;
pub mod keymap;
#[cfg(feature = "png")]
pub mod png;
pub mod safetensors;
pub mod weight;

pub use weight::F32Weight;

use std::fs::File;
use std::path::Path;

use crate::error::{Error, Result};

/// What a non-regular file is, for the error that refuses it.
fn kind_of(meta: &std::fs::Metadata) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        let t = meta.file_type();
        if t.is_fifo() {
            return "a named pipe (FIFO)";
        }
        if t.is_socket() {
            return "a socket";
        }
        if t.is_block_device() || t.is_char_device() {
            return "a device";
        }
    }
    if meta.is_dir() {
        "a directory"
    } else {
        "not a regular file"
    }
}

fn refuse_unless_regular(path: &Path, meta: &std::fs::Metadata) -> Result<()> {
    if meta.is_file() {
        return Ok(());
    }
    Err(Error::Io {
        path: path.to_path_buf(),
        source: std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("is {}; hdb reads only regular files here", kind_of(meta)),
        ),
    })
}

/// Opens `path` for reading, refusing anything but a regular file (after symlinks). The file
/// is checked before `open()` and again on the open descriptor, which is opened non-blocking,
/// so a FIFO put in its place between the two cannot block the call either.
pub fn open_file(path: &Path) -> Result<File> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    refuse_unless_regular(path, &meta)?;
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        // No effect on regular files; on a FIFO it makes open() return at once.
        opts.custom_flags(libc::O_NONBLOCK);
    }
    let file = opts.open(path).map_err(|e| Error::io(path, e))?;
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    refuse_unless_regular(path, &meta)?;
    Ok(file)
}

/// The whole of a regular file, read into a buffer reserved fallibly (a file larger than the
/// memory is `OutOfMemory`, not an abort).
pub fn read_file(path: &Path) -> Result<Vec<u8>> {
    use std::io::Read;
    let mut file = open_file(path)?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let len = usize::try_from(len).unwrap_or(usize::MAX);
    let mut v = crate::limits::try_with_capacity(len, &path.display().to_string())?;
    file.read_to_end(&mut v).map_err(|e| Error::io(path, e))?;
    Ok(v)
}

/// Whether a file starts as a PyTorch checkpoint does: a zip archive (`torch.save` since 1.6)
/// or a raw pickle stream (protocol 2 to 5). Used to tell a pickle checkpoint, which hdb
/// refuses to read (unpickling can run code), from other bytes under a `.bin`/`.ckpt` name.
pub fn looks_like_pickle(path: &Path) -> Result<bool> {
    use std::io::Read;
    let mut head = Vec::with_capacity(4);
    open_file(path)?
        .take(4)
        .read_to_end(&mut head)
        .map_err(|e| Error::io(path, e))?;
    Ok(head.starts_with(b"PK\x03\x04") || matches!(head[..], [0x80, 2..=5, ..]))
}

/// A regular file as UTF-8 text; errors name the file.
pub fn read_text(path: &Path) -> Result<String> {
    String::from_utf8(read_file(path)?).map_err(|e| Error::InvalidFile {
        path: path.to_path_buf(),
        format: "text",
        reason: format!("not UTF-8: {e}"),
    })
}
