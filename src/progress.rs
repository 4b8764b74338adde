//! Progress reports of long calls (denoising, prediction, and later finetuning): a callback
//! the caller passes in, told after each unit of work how many of how many are done, that can
//! cancel the call by returning `false` (the call then returns [`crate::Error::Cancelled`]
//! within one unit). It may be called from the runtime's worker threads, hence `Send`.

/// Called after each unit with (units done, units total); `false` cancels.
pub type Progress<'a> = &'a mut (dyn FnMut(usize, usize) -> bool + Send);
