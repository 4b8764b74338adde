//! Backward passes of the UNet and the text encoder, for training adapters (the training
//! floor, `crate::train`, drives them): input gradients through frozen weights, with the
//! adapters' own factor gradients collected by the adapter hook
//! ([`crate::backend::AdapterHook::backward`]). Each layer's backward sits in `layers.rs`
//! beside the saved state its forward keeps; the ops are the backend's (`Backend::*_backward`).

pub(crate) mod layers;
pub mod text_encoder;
pub mod unet;

pub use text_encoder::TextEncoderTape;
pub use unet::{GradOptions, UnetGrad};
