//! Training on an engine: adapter gradients (`hdb finetune grad`), finetuning an identity
//! from a face photo, and personalization (the hypernetwork's prediction, then finetuning).
//! Everything runs on the engine's placement (the CPU, or a GPU once its backend has the
//! backward ops: until then a GPU engine's training calls fail naming the missing op).

use super::{Engine, Placement};
use crate::error::Result;
use crate::io::safetensors::SafetensorsFile;
use crate::placed::{Place, Placed, PlacedHypernet};
use crate::progress::Progress;
use crate::train::finetune::{
    evaluate, finetune, initial, Face, FinetuneParams, Finetuned, Models, Start, StepProgress,
};
use crate::train::{loss_and_gradients, Condition, GradInput, LayerGrad, Trainable};

impl Engine {
    /// `hdb finetune grad`: the loss of `input` (mean squared error of the UNet's output
    /// against its target) with the adapter file `adapter` applied, and the gradient of every
    /// trainable tensor of that file in the file's own layout (the [`Trainable`] says which).
    /// With token ids the text encoder runs too, with its adapted layers.
    pub fn adapter_gradients(
        &self,
        adapter: &SafetensorsFile,
        input: &GradInput,
        checkpoint: bool,
    ) -> Result<(f64, Trainable, Vec<LayerGrad>)> {
        let trainable = self
            .runtime
            .install(|| Trainable::from_file(adapter, &self.adaptable_layers(), &self.bases))?;
        on_placement!(&self.placement, p => {
            let unet = p.unet()?;
            let te = match input.condition {
                Condition::Ids { .. } => Some(p.text_encoder()?),
                Condition::Hidden { .. } => None,
            };
            let (loss, grads) = self.runtime.install(|| {
                loss_and_gradients(&unet, te.as_deref(), &trainable, input, checkpoint)
            })?;
            Ok((loss, trainable, grads))
        })
    }

    /// The models of `p` (this engine's placement) a run uses, borrowed for `f`, in the
    /// runtime's threads.
    fn with_models<B: Place, R: Send>(
        &self,
        p: &Placed<B>,
        f: impl FnOnce(&Models<'_, B>) -> Result<R> + Send,
    ) -> Result<R> {
        let (unet, te, vae) = (p.unet()?, p.text_encoder()?, p.vae()?);
        let tokenizer = self.tokenizer()?;
        let scheduler = self.scheduler()?;
        // Training adapts the identity layers only (the gradient path hooks just those).
        let layers = crate::model::adaptable::identity_layers(&self.adaptable_layers());
        let models = Models {
            unet: &unet,
            text_encoder: &te,
            vae: &vae,
            tokenizer: &tokenizer,
            scheduler: &scheduler,
            layers: &layers,
            bases: &self.bases,
        };
        self.runtime.install(|| f(&models))
    }

    /// The tensors a run with `params` starts from.
    pub fn initial_tensors(&self, start: Start, params: &FinetuneParams) -> Result<Trainable> {
        on_placement!(&self.placement, p => self.with_models(p, |m| initial(m, start, params)))
    }

    /// The mean diffusion loss of `t` on `face` over `draws` fixed draws of a stream seeded
    /// with `seed` (see [`crate::train::finetune::evaluate`]).
    pub fn evaluate_loss(
        &self,
        face: Face<'_>,
        t: &Trainable,
        params: &FinetuneParams,
        draws: usize,
        seed: u64,
    ) -> Result<f64> {
        on_placement!(&self.placement, p => {
            self.with_models(p, |m| evaluate(m, face, t, params, draws, seed))
        })
    }

    /// Finetunes an identity on `face` from `start` (see [`crate::train::finetune`]);
    /// `progress` gets (step, steps, loss) and may cancel. Nothing of the engine changes.
    pub fn finetune(
        &self,
        face: Face<'_>,
        start: Start,
        params: &FinetuneParams,
        progress: Option<StepProgress<'_>>,
    ) -> Result<Finetuned> {
        params.check()?;
        on_placement!(&self.placement, p => {
            self.with_models(p, |m| finetune(m, face, start, params, progress))
        })
    }

    /// Personalization in one call: the hypernetwork's prediction from `face`
    /// (`iterations`, the file's default when `None`; `predict_progress` per iteration), then
    /// rank-relaxed finetuning of it at `rank` (see [`Engine::finetune`]).
    #[allow(clippy::too_many_arguments)]
    pub fn personalize(
        &self,
        hypernet: &PlacedHypernet,
        face: Face<'_>,
        iterations: Option<usize>,
        rank: usize,
        params: &FinetuneParams,
        predict_progress: Option<Progress<'_>>,
        progress: Option<StepProgress<'_>>,
    ) -> Result<Finetuned> {
        params.check()?;
        let predicted = self.predict(
            hypernet,
            (face.rgb, face.width, face.height, face.stride),
            iterations,
            predict_progress,
        )?;
        self.finetune(
            face,
            Start::Relaxed {
                from: predicted,
                rank,
            },
            params,
            progress,
        )
    }
}
