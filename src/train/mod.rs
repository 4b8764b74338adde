//! Training adapters: the gradients of the diffusion loss with respect to an adapter's own
//! tensors (never the model's weights), through the UNet and the text encoder's backward
//! passes (`crate::model::grad`).
//!
//! - [`params`]: an adapter's trainable tensors in its file's layout (LiDB v1/v2, kohya,
//!   PEFT), their effective factors and the chain rule back to them;
//! - [`hook`]: those factors as the projections' adapter hook, collecting their gradients;
//! - [`grad`]: one loss and every gradient (`hdb finetune grad`);
//! - [`adamw`]: the optimizer (torch's AdamW), gradient clipping, learning-rate schedules;
//! - [`finetune`]: the diffusion loss on one face photo and the training loop (LiDB from
//!   zero, rank-relaxed finetuning).

pub mod adamw;
pub mod finetune;
pub mod grad;
pub mod hook;
pub mod params;

pub use grad::{loss_and_gradients, Condition, GradInput};
pub use params::{LayerGrad, Trainable};
