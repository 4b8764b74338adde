//! The kernel sources of `kernels/`, embedded in the library, the kernels each file defines,
//! and their compilation to PTX with NVRTC.
//!
//! Every `kernels/*.cu` file is listed in [`KERNEL_FILES`] with the `extern "C"` kernels it
//! defines (`<op>_<dtype>`); `tests/kernels_compile.rs` compiles each file for every
//! architecture in [`CI_ARCHS`] and checks that the PTX holds exactly those entries.

use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::error::{Error, Result};

/// `kernels/common.cuh`, pasted into each file in place of its `#include "common.cuh"`.
pub const COMMON_HEADER: &str = include_str!("../../../kernels/common.cuh");

/// The architectures CI compiles every kernel for: Ampere (A100) and Hopper (H100).
pub const CI_ARCHS: &[&str] = &["sm_80", "sm_90"];

/// One kernel source file and the kernels it defines.
#[derive(Debug)]
pub struct KernelFile {
    /// File name under `kernels/`.
    pub file: &'static str,
    /// The file as written (with its `#include "common.cuh"`).
    pub raw_source: &'static str,
    /// Every `extern "C"` kernel of the file, as named in the PTX.
    pub kernels: &'static [&'static str],
}

/// Every kernel file, in the order of DESIGN.md's op families.
pub const KERNEL_FILES: &[KernelFile] = &[
    KernelFile {
        file: "lidb.cu",
        raw_source: include_str!("../../../kernels/lidb.cu"),
        kernels: &[
            "lidb_compose_f32",
            "lidb_merge_f32",
            "lidb_merge_f16",
            "lidb_merge_bf16",
        ],
    },
    KernelFile {
        file: "lora.cu",
        raw_source: include_str!("../../../kernels/lora.cu"),
        kernels: &["lora_bgmv_f32", "lora_bgmv_f16", "lora_bgmv_bf16"],
    },
    KernelFile {
        file: "attention.cu",
        raw_source: include_str!("../../../kernels/attention.cu"),
        kernels: &[
            "flash_attn_d40_f16",
            "flash_attn_d64_f16",
            "flash_attn_d80_f16",
            "flash_attn_d160_f16",
            "flash_attn_d40_bf16",
            "flash_attn_d64_bf16",
            "flash_attn_d80_bf16",
            "flash_attn_d160_bf16",
            "flash2_attn_d40_f16",
            "flash2_attn_d64_f16",
            "flash2_attn_d80_f16",
            "flash2_attn_d160_f16",
            "flash2_attn_d40_bf16",
            "flash2_attn_d64_bf16",
            "flash2_attn_d80_bf16",
            "flash2_attn_d160_bf16",
            "flash3_attn_d40_f16",
            "flash3_attn_d40_bf16",
            "attention_scalar_f32",
            "attention_scalar_f16",
            "attention_scalar_bf16",
            "attention_scalar_causal_f32",
            "attention_scalar_causal_f16",
            "attention_scalar_causal_bf16",
        ],
    },
    KernelFile {
        file: "norm.cu",
        raw_source: include_str!("../../../kernels/norm.cu"),
        kernels: &[
            "group_norm_f32",
            "group_norm_silu_f32",
            "group_norm_f16",
            "group_norm_silu_f16",
            "group_norm_bf16",
            "group_norm_silu_bf16",
            "group_norm_stats_f32",
            "group_norm_stats_f16",
            "group_norm_stats_bf16",
            "group_norm_apply_f32",
            "group_norm_apply_f16",
            "group_norm_apply_bf16",
            "group_norm_apply_silu_f32",
            "group_norm_apply_silu_f16",
            "group_norm_apply_silu_bf16",
            "layer_norm_f32",
            "layer_norm_f16",
            "layer_norm_bf16",
            "group_norm_backward_f32",
            "group_norm_backward_f16",
            "group_norm_backward_bf16",
            "group_norm_backward_sums_f32",
            "group_norm_backward_sums_f16",
            "group_norm_backward_sums_bf16",
            "group_norm_backward_apply_f32",
            "group_norm_backward_apply_f16",
            "group_norm_backward_apply_bf16",
            "layer_norm_backward_f32",
            "layer_norm_backward_f16",
            "layer_norm_backward_bf16",
        ],
    },
    KernelFile {
        file: "conv.cu",
        raw_source: include_str!("../../../kernels/conv.cu"),
        kernels: &[
            "im2col_f32",
            "im2col_f16",
            "im2col_bf16",
            "transpose_f32",
            "transpose_f16",
            "transpose_bf16",
            "add_bias_channels_f32",
            "add_bias_channels_f16",
            "add_bias_channels_bf16",
            "pad_bottom_right_f32",
            "pad_bottom_right_f16",
            "pad_bottom_right_bf16",
            "col2im_f32",
            "col2im_f16",
            "col2im_bf16",
        ],
    },
    KernelFile {
        file: "conv_igemm.cu",
        raw_source: include_str!("../../../kernels/conv_igemm.cu"),
        kernels: &[
            "conv2d_igemm_f16",
            "conv2d_igemm_bf16",
            "conv2d_igemm_reduce_f16",
            "conv2d_igemm_reduce_bf16",
        ],
    },
    KernelFile {
        file: "elementwise.cu",
        raw_source: include_str!("../../../kernels/elementwise.cu"),
        kernels: &[
            "geglu_f32",
            "geglu_f16",
            "geglu_bf16",
            "silu_f32",
            "silu_f16",
            "silu_bf16",
            "gelu_f32",
            "gelu_f16",
            "gelu_bf16",
            "quick_gelu_f32",
            "quick_gelu_f16",
            "quick_gelu_bf16",
            "softmax_rows_f32",
            "softmax_rows_f16",
            "softmax_rows_bf16",
            "softmax_rows_from_f32_f32",
            "softmax_rows_from_f32_f16",
            "softmax_rows_from_f32_bf16",
            "timestep_embedding_f32",
            "timestep_embedding_f16",
            "timestep_embedding_bf16",
            "upsample_nearest2x_f32",
            "upsample_nearest2x_f16",
            "upsample_nearest2x_bf16",
            "add_f32",
            "add_f16",
            "add_bf16",
            "add_channel_bias_f32",
            "add_channel_bias_f16",
            "add_channel_bias_bf16",
            "add_bias_rows_f32",
            "add_bias_rows_f16",
            "add_bias_rows_bf16",
            "silu_backward_f32",
            "silu_backward_f16",
            "silu_backward_bf16",
            "gelu_backward_f32",
            "gelu_backward_f16",
            "gelu_backward_bf16",
            "quick_gelu_backward_f32",
            "quick_gelu_backward_f16",
            "quick_gelu_backward_bf16",
            "geglu_backward_f32",
            "geglu_backward_f16",
            "geglu_backward_bf16",
            "upsample_nearest2x_backward_f32",
            "upsample_nearest2x_backward_f16",
            "upsample_nearest2x_backward_bf16",
            "cast_from_f32_f32",
            "cast_from_f32_f16",
            "cast_from_f32_bf16",
        ],
    },
    KernelFile {
        file: "attention_backward.cu",
        raw_source: include_str!("../../../kernels/attention_backward.cu"),
        kernels: &[
            "attention_backward_rows_f32",
            "attention_backward_rows_f16",
            "attention_backward_rows_bf16",
            "flash_attn_bwd_dq_d40_f16",
            "flash_attn_bwd_dkv_d40_f16",
            "flash_attn_bwd_dq_d64_f16",
            "flash_attn_bwd_dkv_d64_f16",
            "flash_attn_bwd_dq_d80_f16",
            "flash_attn_bwd_dkv_d80_f16",
            "flash_attn_bwd_dq_d160_f16",
            "flash_attn_bwd_dkv_d160_f16",
            "flash_attn_bwd_reduce_f16",
            "flash_attn_bwd_dq_d40_bf16",
            "flash_attn_bwd_dkv_d40_bf16",
            "flash_attn_bwd_dq_d64_bf16",
            "flash_attn_bwd_dkv_d64_bf16",
            "flash_attn_bwd_dq_d80_bf16",
            "flash_attn_bwd_dkv_d80_bf16",
            "flash_attn_bwd_dq_d160_bf16",
            "flash_attn_bwd_dkv_d160_bf16",
            "flash_attn_bwd_reduce_bf16",
        ],
    },
];

const INCLUDE_COMMON: &str = "#include \"common.cuh\"";

impl KernelFile {
    /// The file by name (`"norm.cu"`).
    pub fn get(file: &str) -> Option<&'static KernelFile> {
        KERNEL_FILES.iter().find(|k| k.file == file)
    }

    /// The source NVRTC compiles: [`COMMON_HEADER`] pasted in place of the include, with
    /// `#line` markers so NVRTC's messages name the right file and line.
    pub fn source(&self) -> String {
        let mut out = String::with_capacity(self.raw_source.len() + COMMON_HEADER.len() + 64);
        for (i, line) in self.raw_source.lines().enumerate() {
            if line.trim() == INCLUDE_COMMON {
                out.push_str("#line 1 \"common.cuh\"\n");
                out.push_str(COMMON_HEADER);
                if !COMMON_HEADER.ends_with('\n') {
                    out.push('\n');
                }
                out.push_str(&format!("#line {} \"{}\"\n", i + 2, self.file));
            } else {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }
}

/// Whether `libnvrtc` can be loaded (by the names cudarc tries, e.g. `libnvrtc.so.12`, found
/// through the dynamic loader's search path: `LD_LIBRARY_PATH` for pip's copy).
pub fn nvrtc_available() -> bool {
    // SAFETY: the probe only tries to dlopen the library and drops it.
    catch_unwind(|| unsafe { cudarc::nvrtc::sys::is_culib_present() }).unwrap_or(false)
}

/// Compiles `file` to PTX for `arch` (`"sm_80"`, `"sm_90"`, ...), with extra header
/// directories `include_paths` (the kernels need none today). A missing `libnvrtc` is
/// [`Error::NoDevice`]; a compile error is [`Error::Internal`] carrying NVRTC's log.
pub fn compile_ptx(
    file: &KernelFile,
    arch: &'static str,
    include_paths: &[String],
) -> Result<String> {
    use cudarc::nvrtc::{compile_ptx_with_opts, CompileError, CompileOptions};
    if !nvrtc_available() {
        return Err(Error::NoDevice(
            "libnvrtc could not be loaded (install NVRTC, e.g. the pip package \
             nvidia-cuda-nvrtc-cu12, and put its lib/ on LD_LIBRARY_PATH)"
                .into(),
        ));
    }
    let opts = CompileOptions {
        arch: Some(arch),
        include_paths: include_paths.to_vec(),
        name: Some(file.file.to_string()),
        options: vec!["--std=c++17".into()],
        ..Default::default()
    };
    let source = file.source();
    let res = catch_unwind(AssertUnwindSafe(|| compile_ptx_with_opts(&source, opts)))
        .map_err(|_| Error::Internal(format!("NVRTC panicked compiling {}", file.file)))?;
    match res {
        Ok(ptx) => Ok(ptx.to_src()),
        Err(CompileError::CompileError { nvrtc, log, .. }) => Err(Error::Internal(format!(
            "NVRTC could not compile kernels/{} for {arch} ({nvrtc:?}):\n{}",
            file.file,
            log.to_string_lossy()
        ))),
        Err(e) => Err(Error::Internal(format!(
            "NVRTC failed on kernels/{} for {arch}: {e:?}",
            file.file
        ))),
    }
}

/// The kernel entry points of a PTX module (`.entry NAME(` lines), in order.
pub fn ptx_entries(ptx: &str) -> Vec<&str> {
    ptx.lines()
        .filter_map(|l| {
            let rest = l.trim_start();
            let rest = rest.strip_prefix(".visible ").unwrap_or(rest);
            let rest = rest.strip_prefix(".entry ")?;
            let end = rest.find(|c: char| c == '(' || c.is_whitespace())?;
            Some(&rest[..end])
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_header_is_pasted_with_line_markers() {
        let f = KernelFile::get("norm.cu").unwrap();
        let src = f.source();
        assert!(src.lines().all(|l| l.trim() != INCLUDE_COMMON));
        assert!(src.contains("struct hdb_f16"));
        assert!(src.contains("#line 1 \"common.cuh\""));
        let include_line = f
            .raw_source
            .lines()
            .position(|l| l.trim() == INCLUDE_COMMON)
            .unwrap();
        assert!(src.contains(&format!("#line {} \"norm.cu\"", include_line + 2)));
    }

    #[test]
    fn entries_are_read_from_ptx() {
        let ptx =
            "//\n.visible .entry add_f16(\n\t.param .u64 a\n)\n.entry other_f32 (\n.func f(\n";
        assert_eq!(ptx_entries(ptx), ["add_f16", "other_f32"]);
    }

    #[test]
    fn kernel_names_are_unique() {
        let mut all: Vec<&str> = KERNEL_FILES
            .iter()
            .flat_map(|f| f.kernels)
            .copied()
            .collect();
        let n = all.len();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), n, "a kernel name is listed twice");
    }
}
