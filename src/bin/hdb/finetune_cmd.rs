//! `hdb finetune grad`: one loss and the gradient of every trainable tensor of an adapter,
//! the contract the gradient tests and users' tools rely on.

use std::path::Path;
use std::sync::Arc;

use hdb::io::safetensors::SafetensorsFile;
use hdb::train::GradInput;
use hdb::Engine;

/// Reads the adapter and the input, runs one forward and backward pass, writes `loss` and
/// the gradients under the adapter's own tensor names and layout.
pub fn grad(
    model: &Path,
    adapter: &Path,
    input: &Path,
    output: &Path,
    (threads, checkpoint): (usize, bool),
) -> hdb::Result<()> {
    let rt = super::runtime(hdb::runtime::DeviceRequest::Cpu, threads)?;
    let engine = Engine::new(Arc::new(rt), super::load_model(model)?);
    let input = GradInput::from_safetensors(&SafetensorsFile::open(input)?)?;
    let adapter_file = SafetensorsFile::open(adapter)?;
    let t = std::time::Instant::now();
    let (loss, trainable, grads) = engine.adapter_gradients(&adapter_file, &input, checkpoint)?;
    trainable.write_gradients(output, loss as f32, &grads)?;
    let tensors: usize = 2 * grads.len();
    println!(
        "loss {loss:.8}; wrote {} ({tensors} gradient tensors of {} layers) in {:.2} s",
        output.display(),
        grads.len(),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}
