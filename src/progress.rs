//! Progress reports of long calls (denoising, prediction, and later finetuning): a callback
//! the caller passes in, told after each unit of work how many of how many are done, that can
//! cancel the call by returning `false` (the call then returns [`crate::Error::Cancelled`]
//! within one unit). It may be called from the runtime's worker threads, hence `Send`. A call
//! can also be cancelled from another thread through its object's [`Cancel`] flag.

use std::sync::atomic::{AtomicU8, Ordering};

use crate::error::{Error, Result};

/// Called after each unit with (units done, units total); `false` cancels.
pub type Progress<'a> = &'a mut (dyn FnMut(usize, usize) -> bool + Send);

/// The phases of a generation, in order, as [`StageProgress`] names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// Building the model's components on the device (weights converted and uploaded) on the
    /// first call that needs them; instant afterwards. Units: the UNet, text encoder, VAE.
    Build,
    /// Encoding the prompts with the text encoder; one unit.
    Text,
    /// The denoising steps; one unit per step.
    Denoise,
    /// Decoding the latents to images with the VAE; one unit.
    Decode,
}

impl Stage {
    /// The name the C API passes to the host's progress callback.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Build => "build",
            Stage::Text => "text",
            Stage::Denoise => "denoise",
            Stage::Decode => "decode",
        }
    }
}

/// Called with (stage, units done, units total) when a stage starts (0 done) and after each
/// of its units; `false` cancels.
pub type StageProgress<'a> = &'a mut (dyn FnMut(Stage, usize, usize) -> bool + Send);

/// Set while a call runs.
const RUNNING: u8 = 1;
/// Set by [`Cancel::cancel`] while a call runs.
const CANCELLED: u8 = 2;

/// The cancel flag of one object's calls (a session's), set from any thread: the call in
/// flight checks it between its steps and phases and stops with [`Error::Cancelled`]. Only a
/// call in flight can be cancelled: with none running, [`Cancel::cancel`] does nothing, so a
/// request that arrives late never cancels the next call.
#[derive(Debug, Default)]
pub struct Cancel(AtomicU8);

impl Cancel {
    /// Asks the call in flight to stop; `false` when no call was running.
    pub fn cancel(&self) -> bool {
        self.0
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |s| {
                (s & RUNNING != 0).then_some(s | CANCELLED)
            })
            .is_ok()
    }

    /// Marks a call as running until the guard drops (clearing any earlier request).
    pub fn begin(&self) -> Running<'_> {
        self.0.store(RUNNING, Ordering::SeqCst);
        Running(self)
    }

    /// `Err(Error::Cancelled)` once the running call has been asked to stop.
    pub fn check(&self) -> Result<()> {
        if self.0.load(Ordering::SeqCst) & CANCELLED != 0 {
            Err(Error::Cancelled)
        } else {
            Ok(())
        }
    }
}

/// A call in flight on a [`Cancel`]; dropping it ends the call (and any request with it).
#[derive(Debug)]
pub struct Running<'a>(&'a Cancel);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0 .0.store(0, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_call_in_flight_is_cancelled() {
        let c = Cancel::default();
        assert!(!c.cancel(), "nothing runs");
        let run = c.begin();
        assert!(
            c.check().is_ok(),
            "a request before the call does not carry over"
        );
        assert!(c.cancel());
        assert!(matches!(c.check(), Err(Error::Cancelled)));
        drop(run);
        let _next = c.begin();
        assert!(c.check().is_ok(), "the next call starts clean");
    }
}
