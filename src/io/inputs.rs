//! The CLI's UNet input file (`hdb unet --input`: sample, timestep, encoder_hidden_states,
//! optional adapter_index), read into checked shapes. In the library so the fuzz targets read
//! it exactly as the CLI does.

use std::path::Path;

use crate::error::{Error, Result};
use crate::io::safetensors::{read_as_f32, SafetensorsFile};

/// One UNet evaluation's inputs as a file holds them (diffusers' argument names).
#[derive(Clone, Debug, PartialEq)]
pub struct UnetInputs {
    /// [batch, channels, height, width]
    pub sample: Vec<f32>,
    /// One per sample (a scalar in the file applies to the whole batch, as in diffusers).
    pub timesteps: Vec<f32>,
    /// [batch, context_len, context_dim]
    pub context: Vec<f32>,
    pub batch: usize,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub context_len: usize,
    pub context_dim: usize,
    /// Per sample, an index into the adapter list or -1 (runtime mode).
    pub adapter_index: Option<Vec<i32>>,
}

fn bad(path: &Path, name: &str, shape: &[usize], want: &str) -> Error {
    Error::InvalidFile {
        path: path.to_path_buf(),
        format: "UNet input",
        reason: format!("'{name}' has shape {shape:?}, expected {want}"),
    }
}

impl UnetInputs {
    /// Reads `sample` `[B, C, H, W]`, `timestep` `[B]` or a scalar, `encoder_hidden_states`
    /// `[B, L, D]` and the optional `adapter_index` `[B]` (integers or floats), checking the
    /// shapes against each other. Whether C and D fit a model is the caller's check.
    pub fn read(f: &SafetensorsFile) -> Result<UnetInputs> {
        let path = f.path();
        let (s_shape, sample) = read_as_f32(f, "sample")?;
        let [b, c, h, w] = s_shape[..] else {
            return Err(bad(path, "sample", &s_shape, "[B, C, H, W]"));
        };
        let (t_shape, mut t) = read_as_f32(f, "timestep")?;
        if t.len() == 1 && b > 1 {
            // A scalar timestep applies to the whole batch, as in diffusers (b is bounded:
            // the sample of b images is in the file).
            t = vec![t[0]; b];
        } else if t.len() != b || t_shape.len() > 1 {
            return Err(bad(
                path,
                "timestep",
                &t_shape,
                &format!("[{b}] or a scalar"),
            ));
        }
        let (c_shape, context) = read_as_f32(f, "encoder_hidden_states")?;
        let [cb, l, d] = c_shape[..] else {
            return Err(bad(path, "encoder_hidden_states", &c_shape, "[B, L, C]"));
        };
        if cb != b {
            return Err(bad(
                path,
                "encoder_hidden_states",
                &c_shape,
                &format!("batch {b} like 'sample'"),
            ));
        }
        let adapter_index = match f.get("adapter_index") {
            None => None,
            Some(_) => {
                let (i_shape, v) = read_as_f32(f, "adapter_index")?;
                if i_shape[..] != [b] {
                    return Err(bad(path, "adapter_index", &i_shape, &format!("[{b}]")));
                }
                // (saturating: a value out of i32's range is refused by the index check)
                Some(v.iter().map(|&x| x as i32).collect())
            }
        };
        Ok(UnetInputs {
            sample,
            timesteps: t,
            context,
            batch: b,
            channels: c,
            height: h,
            width: w,
            context_len: l,
            context_dim: d,
            adapter_index,
        })
    }
}
