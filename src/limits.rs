//! Limits on every size that comes from outside (files, configs, image headers, arguments),
//! and the checked arithmetic and fallible allocation used where such sizes become buffers.
//!
//! A size read from a file or passed by a host is bounded here before anything is allocated
//! from it, so a 300-byte file cannot ask for 2^62 floats, and a product of such sizes is
//! computed with `checked_mul`, never wrapped. The bounds sit far above anything a real model,
//! adapter or image reaches (README "Reliability" lists them); crossing one is an error naming
//! the field. Large buffers sized from outside are reserved with `try_reserve`, so a request
//! the machine cannot hold is [`Error::OutOfMemory`] (`HDB_STATUS_OUT_OF_MEMORY`), not an
//! abort of the host process.

use crate::error::{Error, Result};

/// Largest adapter rank (LoRA or LiDB). Published SD LoRAs use 1-256; LiDB uses 1-16.
pub const MAX_RANK: usize = 1024;

/// Most adapters in one session's set (`hdb_session_set_adapters`' `n`): identities for every
/// sample of a large batch plus styles, with room to spare.
pub const MAX_ADAPTERS: usize = 1024;

/// Largest width or height of a generated image, in pixels (SD 1.x is trained at 512).
pub const MAX_IMAGE_SIDE: usize = 4096;

/// Largest height or width of a UNet input, in latent pixels (an image of
/// [`MAX_IMAGE_SIDE`] over SD's VAE factor of 8).
pub const MAX_LATENT_SIDE: usize = MAX_IMAGE_SIDE / 8;

/// Most images in one generation or UNet evaluation.
pub const MAX_BATCH: usize = 256;

/// Most pixels of an input image (a face crop, a PNG): 4096 x 4096. The hypernetwork resizes
/// every face to its 224 px input, so larger images only cost memory.
pub const MAX_IMAGE_PIXELS: usize = 4096 * 4096;

/// Largest `num_train_timesteps` of a scheduler config (SD uses 1000).
pub const MAX_TRAIN_TIMESTEPS: usize = 100_000;

/// Most refinement iterations of a hypernetwork prediction (the paper uses 4).
pub const MAX_ITERATIONS: usize = 100;

/// Most transformer layers of a hypernetwork's decoder (the paper's: 4).
pub const MAX_DECODER_LAYERS: usize = 64;

/// Most transformer blocks of a hypernetwork's image encoder (CLIP ViT-H/14: 32, ViT-bigG: 48).
pub const MAX_ENCODER_DEPTH: usize = 128;

/// Most layer tokens (adapted layers) of a hypernetwork (SD 1.5: 176).
pub const MAX_LAYER_KEYS: usize = 4096;

/// Largest width-like dimension of a hypernetwork config (ViT-H/14: 1280; d_model: 1024).
pub const MAX_HYPERNET_DIM: usize = 1 << 16;

/// The product of `dims`, or `None` when it does not fit in a `usize`.
pub fn product(dims: &[usize]) -> Option<usize> {
    dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

/// The product of `dims`, or `InvalidArgument` naming `what` when it overflows.
pub fn checked_len(what: &'static str, dims: &[usize]) -> Result<usize> {
    product(dims).ok_or_else(|| {
        Error::invalid_arg(
            what,
            format!("the shape {dims:?} has more elements than memory can hold"),
        )
    })
}

/// Refuses `value` above `max` (or zero), naming `field` and the limit.
pub fn check_range(field: &'static str, value: usize, max: usize) -> Result<()> {
    if value == 0 || value > max {
        return Err(Error::invalid_arg(
            field,
            format!("{value} is outside 1..={max} (hdb's documented limit)"),
        ));
    }
    Ok(())
}

/// Checks a generated image's size in pixels: positive multiples of `factor` (the VAE's, 8
/// for SD), at most [`MAX_IMAGE_SIDE`]. Errors name `width` or `height`.
pub fn check_image_size(width: usize, height: usize, factor: usize) -> Result<()> {
    for (name, v) in [("width", width), ("height", height)] {
        check_range(name, v, MAX_IMAGE_SIDE)?;
        if v % factor.max(1) != 0 {
            return Err(Error::invalid_arg(
                name,
                format!("{width}x{height}: {v} is not a multiple of {factor}; sizes must be positive multiples of {factor}"),
            ));
        }
    }
    Ok(())
}

fn oom(what: &str, bytes: Option<usize>) -> Error {
    match bytes {
        Some(b) => Error::OutOfMemory(format!(
            "{what}: {:.1} MB could not be allocated",
            b as f64 / 1e6
        )),
        None => Error::OutOfMemory(format!("{what}: the size overflows the address space")),
    }
}

/// An empty vector with room for `n` elements, or [`Error::OutOfMemory`] naming `what`.
pub fn try_with_capacity<T>(n: usize, what: &str) -> Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n)
        .map_err(|_| oom(what, n.checked_mul(std::mem::size_of::<T>())))?;
    Ok(v)
}

/// `n` copies of `value`, allocated fallibly: [`Error::OutOfMemory`] naming `what` when the
/// memory is not there.
pub fn try_filled<T: Clone>(n: usize, value: T, what: &str) -> Result<Vec<T>> {
    let mut v = try_with_capacity(n, what)?;
    v.resize(n, value);
    Ok(v)
}

/// Checks that `bytes` more bytes could be allocated right now (reserved, then released), or
/// [`Error::OutOfMemory`] naming `what`. Used before work whose many allocations would each
/// abort the process when the whole cannot fit (e.g. a generation's largest activations).
pub fn probe(bytes: usize, what: &str) -> Result<()> {
    let mut v: Vec<u8> = Vec::new();
    v.try_reserve_exact(bytes)
        .map_err(|_| oom(what, Some(bytes)))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn products_overflow_to_none() {
        assert_eq!(product(&[3, 4, 5]), Some(60));
        assert_eq!(product(&[]), Some(1));
        assert_eq!(product(&[1 << 62, 320]), None);
        assert_eq!(product(&[1 << 62, 0]), Some(0));
        let e = checked_len("latents", &[1 << 40, 1 << 40]).expect_err("overflow");
        assert!(e.to_string().contains("'latents'"), "{e}");
    }

    #[test]
    fn ranges_name_the_field_and_the_limit() {
        assert!(check_range("batch", 1, 2).is_ok());
        for v in [0, 3] {
            let e = check_range("batch", v, 2).expect_err("out of range");
            assert!(
                e.to_string().contains("'batch'") && e.to_string().contains("1..=2"),
                "{e}"
            );
        }
    }

    #[test]
    fn impossible_allocations_are_out_of_memory() {
        let e = try_filled(usize::MAX / 4, 0f32, "latents").expect_err("too big");
        assert!(matches!(e, Error::OutOfMemory(_)), "{e:?}");
        assert!(e.to_string().contains("latents"), "{e}");
        let e = probe(usize::MAX / 2, "the VAE").expect_err("too big");
        assert!(matches!(e, Error::OutOfMemory(_)), "{e:?}");
        assert_eq!(try_filled(3, 1u8, "x").expect("small"), vec![1, 1, 1]);
    }
}
