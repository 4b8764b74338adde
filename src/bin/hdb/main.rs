//! `hdb`: the command-line face of the library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

mod adapter_cmd;
mod bench_adapter;
#[cfg(feature = "cuda")]
mod bench_cuda;
#[cfg(feature = "cuda")]
mod bench_cuda_backward;
#[cfg(feature = "cuda")]
mod bench_cuda_models;
mod bench_finetune;
mod bench_gemm;
#[cfg(feature = "cuda")]
mod bench_kernels;
mod bench_personalize;
mod bench_pipeline;
mod bench_soak;
mod demo;
mod finetune_cmd;
mod generate;
mod hypernet_cmd;
mod info_cmd;
mod tokenize_cmd;
mod unet_cmd;

use clap::{Parser, Subcommand};
use hdb::model::unet::UnetInput;
use hdb::model::{LoadOptions, Model};

#[derive(Parser)]
#[command(
    name = "hdb",
    version,
    about = "HyperDreamBooth runtime for Stable Diffusion 1.x"
)]
struct Cli {
    /// Log more (-v info, -vv debug, -vvv trace).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// One face image (PNG) -> a LiDB identity adapter for a model, by the hypernetwork.
    Predict {
        /// A hypernetwork v1 file (hdb info describes one).
        #[arg(long)]
        hypernet: PathBuf,
        /// The SD model the identity is for: a diffusers folder, a component folder or an LDM
        /// single file.
        #[arg(long)]
        model: PathBuf,
        /// A face crop (PNG, any size >= 16x16; center-cropped to a square, resized).
        #[arg(long)]
        face: PathBuf,
        /// Refinement iterations (default: the file's).
        #[arg(long)]
        iterations: Option<usize>,
        /// The LiDB adapter to write (NAME.lidb.safetensors).
        #[arg(short, long)]
        output: PathBuf,
        /// CPU threads (default 0: one per core).
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// Where the network runs: cpu, cuda (= cuda:0), cuda:N, or auto (CUDA when usable,
        /// else the CPU).
        #[arg(long, default_value = "cpu", value_parser = parse_device)]
        device: hdb::runtime::DeviceRequest,
    },
    /// An identity from a face photo: LiDB optimization from zero (--init zero) or
    /// rank-relaxed finetuning of an adapter (--from); `hdb finetune grad` computes an
    /// adapter's gradients.
    #[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
    Finetune {
        #[command(subcommand)]
        what: Option<FinetuneWhat>,
        #[command(flatten)]
        run: Box<finetune_cmd::RunArgs>,
    },
    /// Personalization in one command: the hypernetwork's prediction from a face photo, then
    /// rank-relaxed finetuning of it (40 steps by default).
    Personalize(Box<finetune_cmd::PersonalizeArgs>),
    /// The whole path in one command: a model (built-in, or --model PATH), two identities,
    /// swaps, a batch with one identity per image, PNGs and a timing table.
    Demo {
        /// A real SD 1.5 diffusers folder; default: a small built-in random model.
        #[arg(long)]
        model: Option<PathBuf>,
        /// A hypernetwork v1 file; default: one with random weights shaped for the model.
        #[arg(long)]
        hypernet: Option<PathBuf>,
        /// Where the PNGs and identity files go.
        #[arg(long, default_value = "hdb-demo")]
        out: PathBuf,
        /// Denoising steps per image.
        #[arg(long, default_value_t = 12)]
        steps: usize,
        /// Image size (default 128 built-in, 512 with --model).
        #[arg(long)]
        size: Option<usize>,
        /// CPU threads (default 0: one per core).
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// Where the UNet, text encoder, VAE and hypernetwork (f32) run: cpu, cuda, cuda:N or
        /// auto (the tokenizer runs on the CPU).
        #[arg(long, default_value = "cpu", value_parser = parse_device)]
        device: hdb::runtime::DeviceRequest,
        /// Rank-relaxed finetuning steps on identity 0 (the paper's third step; 0 skips it).
        #[arg(long, default_value_t = 20)]
        finetune_steps: usize,
    },
    /// Text to image (PNG): the whole SD pipeline with optional identity adapters.
    Generate {
        /// A diffusers folder or an LDM single file (SD 1.x ones without a tokenizer/ use the
        /// built-in CLIP ViT-L/14 tokenizer).
        #[arg(long)]
        model: PathBuf,
        /// A tokenizer folder (tokenizer.json or vocab.json + merges.txt), or a diffusers folder
        /// with tokenizer/, to use instead of the model's own or the built-in one.
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// The text to render.
        #[arg(long)]
        prompt: String,
        /// What to steer away from (classifier-free guidance's unconditional prompt).
        #[arg(long, default_value = "")]
        negative: String,
        /// Denoising steps.
        #[arg(long, default_value_t = 25)]
        steps: usize,
        /// Classifier-free guidance scale (<= 1 disables guidance).
        #[arg(long, default_value_t = 7.5)]
        guidance: f32,
        /// ddim, euler, euler_a, dpmpp_2m or dpmpp_2m_karras.
        #[arg(long, default_value = "euler_a", value_parser = generate::parse_sampler)]
        sampler: hdb::model::scheduler::SamplerKind,
        /// Seed of the initial noise (and of euler_a's per-step noise).
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Image width in pixels (a multiple of 8).
        #[arg(long, default_value_t = 512)]
        width: usize,
        /// Image height in pixels (a multiple of 8).
        #[arg(long, default_value_t = 512)]
        height: usize,
        /// Images per run (out.png becomes out-0.png, out-1.png, ...).
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// An identity adapter (LiDB, kohya or PEFT LoRA); repeatable.
        #[arg(long = "adapter")]
        adapters: Vec<PathBuf>,
        /// Scale of each --adapter, in order (default 1.0).
        #[arg(long = "scale")]
        scales: Vec<f32>,
        /// Skip the keys of LoRA files that match no adaptable layer of the model (listed on
        /// stderr) instead of refusing the file.
        #[arg(long)]
        allow_unmatched: bool,
        /// merge: W = W_base + sum scale * dW; runtime: y = x W^T + sum scale * up(down(x)).
        #[arg(long, value_enum, default_value = "merge")]
        mode: Mode,
        /// Start from `latents` [B,4,H/8,W/8] in this safetensors file (unscaled noise, as
        /// diffusers' latents= argument), instead of seeded noise; B sets the batch.
        #[arg(long)]
        latents: Option<PathBuf>,
        /// Also write the final denoised latents (diffusers' output_type="latent") here.
        #[arg(long)]
        dump_latents: Option<PathBuf>,
        /// The image to write, a .png (with --batch N: NAME-0.png ... NAME-<N-1>.png).
        #[arg(short, long, value_parser = parse_png_path)]
        output: PathBuf,
        /// CPU threads (default 0: one per core).
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// Where the UNet, text encoder and VAE run: cpu, cuda (= cuda:0), cuda:N, or auto (CUDA
        /// when usable, else the CPU).
        #[arg(long, default_value = "cpu", value_parser = parse_device)]
        device: hdb::runtime::DeviceRequest,
    },
    /// Benchmarks at full SD 1.5 shapes with random weights made in-process.
    Bench {
        #[command(subcommand)]
        what: BenchWhat,
    },
    /// Run one UNet evaluation: IN holds `sample` [B,4,H,W], `timestep` [B] (or a scalar) and
    /// `encoder_hidden_states` [B,L,C]; OUT gets `out` [B,4,H,W] (all f32).
    Unet {
        /// A diffusers folder, a folder with just `unet/`, or an LDM single file.
        #[arg(long)]
        model: PathBuf,
        /// A safetensors file with `sample`, `timestep` and `encoder_hidden_states` (and optionally
        /// `adapter_index`).
        #[arg(long)]
        input: PathBuf,
        /// The safetensors file to write `out` to.
        #[arg(long)]
        output: PathBuf,
        /// CPU threads (default: all cores).
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// An adapter (LiDB, kohya or PEFT LoRA); repeat for several. IN may hold
        /// `adapter_index` [B] (i64) to give each sample its own: an index into this list,
        /// -1 for none (needs --mode runtime).
        #[arg(long = "adapter")]
        adapters: Vec<PathBuf>,
        /// The scale of each --adapter, in order (default 1.0 each).
        #[arg(long = "scale")]
        scales: Vec<f32>,
        /// An adapter stacked into every --adapter (a style shared by per-sample identities:
        /// each sample gets its identity and this; index -1 still gets nothing); repeatable.
        #[arg(long = "shared-adapter")]
        shared_adapters: Vec<PathBuf>,
        /// The scale of each --shared-adapter, in order (default 1.0 each).
        #[arg(long = "shared-scale")]
        shared_scales: Vec<f32>,
        /// Skip the keys of LoRA files that match no adaptable layer of the model (listed on
        /// stderr) instead of refusing the file.
        #[arg(long)]
        allow_unmatched: bool,
        /// merge: W = W_base + sum scale * dW; runtime: y = x W^T + sum scale * up(down(x)).
        #[arg(long, value_enum, default_value = "merge")]
        mode: Mode,
        /// Where the UNet runs: cpu, cuda (= cuda:0), cuda:N, or auto (CUDA when usable, else
        /// the CPU). On CUDA it runs in fp16; OUT is f32 either way.
        #[arg(long, default_value = "cpu", value_parser = parse_device)]
        device: hdb::runtime::DeviceRequest,
    },
    /// Identity adapters: describe, export to LoRA, write the basis.
    Adapter {
        #[command(subcommand)]
        what: adapter_cmd::AdapterCmd,
    },
    /// Print the CLIP token ids of TEXT on one line: start token, the text's tokens, end token,
    /// truncated to 77 (`tokenizer(text, max_length=77, truncation=True).input_ids` of
    /// transformers' CLIPTokenizer).
    Tokenize {
        /// A diffusers folder with tokenizer/, or a tokenizer folder (tokenizer.json or
        /// vocab.json + merges.txt); without it (or for a model file, such as an LDM single
        /// file), the built-in CLIP ViT-L/14 tokenizer of SD 1.x.
        #[arg(long)]
        model: Option<PathBuf>,
        /// Pad with the pad token to 77 ids, as the pipeline feeds the text encoder.
        #[arg(long)]
        padded: bool,
        /// The text, after `--`; several arguments are joined with single spaces.
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        text: Vec<String>,
    },
    /// Describe a model (diffusers folder, component folder, LDM single file) or any
    /// safetensors file: components, tensors, dtypes, parameter counts, architecture.
    Info {
        /// A diffusers folder, component folder, LDM single file, hypernetwork or any safetensors
        /// file.
        path: PathBuf,
        /// Also list every tensor (name, dtype, shape).
        #[arg(long)]
        tensors: bool,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum FinetuneWhat {
    /// One loss and the gradient of every trainable tensor of an adapter: IN holds `sample`
    /// [B,4,H,W] (noisy latents), `timestep` [B], `target` [B,4,H,W] and either
    /// `encoder_hidden_states` [B,L,C] (the UNet alone) or `input_ids` [B,77] (the text
    /// encoder runs too); loss = mean over all elements of (unet(...) - target)^2. OUT gets
    /// `loss` and the gradients under the adapter's own tensor names and layout, f32.
    Grad {
        /// A diffusers folder or an LDM single file.
        #[arg(long)]
        model: PathBuf,
        /// A LiDB (v1 or v2), kohya or PEFT LoRA file.
        #[arg(long)]
        adapter: PathBuf,
        /// The safetensors input: sample, timestep, target, and encoder_hidden_states or
        /// input_ids.
        #[arg(long)]
        input: PathBuf,
        /// Where `loss` and the gradients go (safetensors, the adapter's own names).
        #[arg(long)]
        output: PathBuf,
        /// CPU threads (default 0: one per core).
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// Keep every activation instead of recomputing each UNet block in the backward
        /// (faster, more memory).
        #[arg(long)]
        no_checkpointing: bool,
    },
}

#[derive(Subcommand)]
enum BenchWhat {
    /// Rank-relaxed finetuning steps at SD 1.5 shapes (512x512, batch 1, rank-4 LoRA on the
    /// UNet and text encoder) with random weights: time per step and peak memory with and
    /// without checkpointing, optionally against PyTorch (tools/bench_torch_finetune.py).
    Finetune {
        /// CPU threads (default 0: one per core).
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// Timed steps after one warm-up step; the median is reported.
        #[arg(long, default_value_t = 2)]
        runs: usize,
        /// Latent size (64 = 512x512 images).
        #[arg(long, default_value_t = 64)]
        size: usize,
        /// Where training runs: cpu, cuda, cuda:N or auto; the peer runs on the same kind.
        #[arg(long, default_value = "cpu", value_parser = parse_device)]
        device: hdb::runtime::DeviceRequest,
        /// Also run the PyTorch peer (tools/bench_torch_finetune.py: diffusers + peft) with
        /// this Python, on the same threads, and print the ratios.
        #[arg(long)]
        peer_python: Option<PathBuf>,
    },
    /// One whole personalization at SD 1.5 shapes with random weights, as `hdb personalize`
    /// runs it: the default hypernetwork's prediction from a 512x512 face, then rank-4
    /// finetuning steps with checkpointing; wall time of each part and in all, peak memory.
    Personalize {
        /// CPU threads (default 0: one per core).
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// Finetuning steps (the paper's and `hdb personalize`'s default: 40).
        #[arg(long, default_value_t = 40)]
        steps: usize,
        /// Where it runs: cpu, cuda, cuda:N or auto; the peer runs on the same kind.
        #[arg(long, default_value = "cpu", value_parser = parse_device)]
        device: hdb::runtime::DeviceRequest,
        /// Also run the PyTorch peer (tools/hypernet_ref.py's prediction and
        /// tools/bench_torch_finetune.py's steps) with this Python, on the same threads.
        #[arg(long)]
        peer_python: Option<PathBuf>,
    },
    /// One hypernetwork prediction at the default config (ViT-H/14, d_model 1024, 176 layer
    /// tokens, 4 iterations) with random weights, optionally against the PyTorch reference.
    Hypernet {
        /// CPU threads (default 0: one per core).
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// Timed runs after one warm-up; the median is reported.
        #[arg(long, default_value_t = 2)]
        runs: usize,
        /// Also run the PyTorch peer with this Python (torch, diffusers/transformers), in the same
        /// run, and print the ratio.
        #[arg(long)]
        peer_python: Option<PathBuf>,
        /// Where the network runs: cpu, cuda (= cuda:0), cuda:N or auto; the peer runs on the
        /// same kind of device.
        #[arg(long, default_value = "cpu", value_parser = parse_device)]
        device: hdb::runtime::DeviceRequest,
        /// Storage type on a GPU: f32, f16 or bf16 (f32 accumulation); the peer runs in the
        /// same type. The CPU runs f32 only.
        #[arg(long, default_value = "f32", value_parser = parse_dtype)]
        dtype: hdb::tensor::DType,
    },
    /// SD 1.5's text encoder, one UNet step with guidance and the VAE decode at 512x512, with
    /// random weights, optionally against PyTorch (tools/bench_torch_pipeline.py) in the same run.
    Pipeline {
        /// CPU threads (default 0: one per core).
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// Timed runs after one warm-up; the median is reported.
        #[arg(long, default_value_t = 2)]
        runs: usize,
        /// Also run the PyTorch peer with this Python (torch, diffusers/transformers), in the same
        /// run, and print the ratio.
        #[arg(long)]
        peer_python: Option<PathBuf>,
    },
    /// The CPU GEMM under hdb's linear layers and convolutions (the `gemm` crate) against the
    /// BLAS PyTorch calls, at the UNet's, the text encoder's and the ViT-H/14's shapes, then the
    /// UNet's and VAE's 3x3 convolutions against F.conv2d, in the same run
    /// (tools/bench_torch_gemm.py): time, GFLOP/s and ratio per shape.
    Gemm {
        /// CPU threads (default 0: one per core).
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// Timed runs after one warm-up; the median is reported.
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Also run the PyTorch peer with this Python (torch), in the same run, and print the
        /// ratio.
        #[arg(long)]
        peer_python: Option<PathBuf>,
    },
    /// Identity swaps at SD 1.5 shapes: compose time, merge-mode swap against memcpy,
    /// runtime-mode swap, and a batch with one identity per sample against one identity; then a
    /// rank-32 style LoRA on every linear and convolution layer: its merge swap against memcpy
    /// of the touched weights, its runtime swap, and runtime mode's per-step cost with each
    /// identity plus the style against the base UNet.
    Adapter {
        /// CPU threads (default 0: one per core).
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// Timed runs after one warm-up; the median is reported.
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Latent size of the batched forward.
        #[arg(long, default_value_t = 64)]
        size: usize,
        /// Batch (and number of identities) of the batched forward.
        #[arg(long, default_value_t = 8)]
        batch: usize,
    },
    /// The CUDA backend at SD 1.5 shapes (GPU 0): fused attention per shape, conv2d by
    /// im2col and cuBLAS and by implicit GEMM, the LiDB merge against a device copy, the
    /// runtime swap, 8 identities against one; with --unet the UNet fp16 step and identities
    /// on it, the text encoder and the VAE decode; optionally against PyTorch on the same GPU
    /// (tools/bench_torch_cuda.py).
    #[cfg(feature = "cuda")]
    Cuda {
        /// Timed runs after warm-up; the median is reported.
        #[arg(long, default_value_t = 20)]
        runs: usize,
        /// Python with torch (and diffusers for --unet) for the peer.
        #[arg(long)]
        peer_python: Option<PathBuf>,
        /// Also time the whole UNet step (uploads an SD 1.5 UNet: ~2 GB of device memory).
        #[arg(long)]
        unet: bool,
        /// Small shapes, each call timed once, no peer: every path of the bench in seconds
        /// (a check, e.g. on the emulated GPU of scripts/emulated-gpu.sh; no figures).
        #[arg(long)]
        smoke: bool,
    },
    /// What a CUDA runtime pays for its kernels on first use: every kernel file compiled with
    /// NVRTC, against reading it back from the kernel cache (HDB_KERNEL_CACHE). Needs libnvrtc,
    /// not a GPU.
    #[cfg(feature = "cuda")]
    Kernels {
        /// The architecture to compile for.
        #[arg(long, default_value = "sm_90")]
        arch: String,
        /// Cache reads per file; the median is reported.
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
    /// Thousands of identity swaps and a run of small generations at SD 1.5's size (random
    /// weights) in one process: resident memory, descriptors and mappings must stay flat.
    Soak {
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// Identity swaps (UNet and text encoder, merge and runtime modes).
        #[arg(long, default_value_t = 2000)]
        swaps: usize,
        /// Generations of 2 images, one step each, with changing identities.
        #[arg(long, default_value_t = 40)]
        generations: usize,
        /// Distinct identities swapped between.
        #[arg(long, default_value_t = 4)]
        identities: usize,
        /// Image side in pixels.
        #[arg(long, default_value_t = 64)]
        size: usize,
        /// Most resident-memory growth allowed in the second half, in MB.
        #[arg(long, default_value_t = 32.0)]
        max_growth_mb: f64,
    },
    /// SD 1.5 UNet forward: batch 2 (classifier-free guidance), 64x64 latents, 77x768 context.
    Unet {
        /// CPU threads (default: all cores).
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// Timed runs after one warm-up; the median is reported.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Latent size (64 = 512x512 images).
        #[arg(long, default_value_t = 64)]
        size: usize,
        /// Batch of the forward (2 = one image with classifier-free guidance).
        #[arg(long, default_value_t = 2)]
        batch: usize,
        /// Also run the PyTorch eager peer (tools/bench_torch_unet.py) with this Python, in
        /// the same session and thread count, and print the ratio.
        #[arg(long)]
        peer_python: Option<PathBuf>,
        /// Print where the time goes (per op category, over the timed runs).
        #[arg(long)]
        profile: bool,
    },
}

fn main() -> ExitCode {
    die_quietly_on_a_closed_pipe();
    let cli = Cli::parse();
    let level = match cli.verbose {
        0 => log::LevelFilter::Warn,
        1 => log::LevelFilter::Info,
        2 => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    };
    hdb::logging::set_sink(
        Some(Box::new(|lvl, target, msg| {
            eprintln!("[{lvl} {target}] {msg}")
        })),
        level,
    );
    if matches!(cli.command, Command::Bench { .. }) {
        // Every benchmark's report starts with the machine it ran on.
        println!(
            "machine: {}; CPU kernels: {}",
            bench_finetune::cpu_model(),
            hdb::backend::cpu::instruction_set()
        );
    }
    let result = match cli.command {
        Command::Predict {
            hypernet,
            model,
            face,
            iterations,
            output,
            threads,
            device,
        } => hypernet_cmd::predict(
            &hypernet,
            &model,
            &face,
            iterations,
            &output,
            (threads, device),
        ),
        Command::Bench {
            what:
                BenchWhat::Finetune {
                    threads,
                    runs,
                    size,
                    device,
                    peer_python,
                },
        } => bench_finetune::run(threads, runs, size, device, peer_python.as_deref()),
        Command::Bench {
            what:
                BenchWhat::Personalize {
                    threads,
                    steps,
                    device,
                    peer_python,
                },
        } => bench_personalize::run(threads, steps, device, peer_python.as_deref()),
        Command::Bench {
            what:
                BenchWhat::Hypernet {
                    threads,
                    runs,
                    peer_python,
                    device,
                    dtype,
                },
        } => hypernet_cmd::bench(threads, runs, peer_python.as_deref(), device, dtype),
        Command::Bench {
            what:
                BenchWhat::Pipeline {
                    threads,
                    runs,
                    peer_python,
                },
        } => bench_pipeline::run(threads, runs, peer_python.as_deref()),
        Command::Bench {
            what:
                BenchWhat::Gemm {
                    threads,
                    runs,
                    peer_python,
                },
        } => bench_gemm::run(threads, runs, peer_python.as_deref()),
        Command::Demo {
            model,
            hypernet,
            out,
            steps,
            size,
            threads,
            device,
            finetune_steps,
        } => demo::run(demo::DemoArgs {
            model,
            hypernet,
            out,
            steps,
            size,
            threads,
            device,
            finetune_steps,
        }),
        Command::Generate {
            model,
            tokenizer,
            prompt,
            negative,
            steps,
            guidance,
            sampler,
            seed,
            width,
            height,
            batch,
            adapters,
            scales,
            allow_unmatched,
            mode,
            latents,
            dump_latents,
            output,
            threads,
            device,
        } => generate::generate(generate::GenerateArgs {
            model,
            tokenizer,
            params: hdb::pipeline::GenerateParams {
                prompt,
                negative_prompt: negative,
                steps,
                guidance,
                sampler,
                seed,
                width,
                height,
                batch,
                latents: None,
            },
            adapters,
            scales,
            allow_unmatched,
            mode: match mode {
                Mode::Merge => hdb::adapter::apply::ApplyMode::Merge,
                Mode::Runtime => hdb::adapter::apply::ApplyMode::Runtime,
            },
            latents,
            dump_latents,
            output,
            threads,
            device,
        }),
        #[cfg(feature = "cuda")]
        Command::Bench {
            what:
                BenchWhat::Cuda {
                    runs,
                    peer_python,
                    unet,
                    smoke,
                },
        } => bench_cuda::run(runs, peer_python.as_deref(), unet, smoke),
        #[cfg(feature = "cuda")]
        Command::Bench {
            what: BenchWhat::Kernels { arch, runs },
        } => bench_kernels::run(&arch, runs),
        Command::Bench {
            what:
                BenchWhat::Soak {
                    threads,
                    swaps,
                    generations,
                    identities,
                    size,
                    max_growth_mb,
                },
        } => bench_soak::run(bench_soak::SoakArgs {
            threads,
            swaps,
            generations,
            identities,
            size,
            max_growth_mb,
        }),
        Command::Bench {
            what:
                BenchWhat::Adapter {
                    threads,
                    runs,
                    size,
                    batch,
                },
        } => bench_adapter::run(threads, runs, size, batch),
        Command::Bench {
            what:
                BenchWhat::Unet {
                    threads,
                    runs,
                    size,
                    batch,
                    peer_python,
                    profile,
                },
        } => bench_unet(threads, runs, size, batch, peer_python.as_deref(), profile),
        Command::Unet {
            model,
            input,
            output,
            threads,
            adapters,
            scales,
            shared_adapters,
            shared_scales,
            allow_unmatched,
            mode,
            device,
        } => unet_cmd::unet(
            &model,
            &input,
            &output,
            (device, threads),
            unet_cmd::AdapterArgs {
                paths: &adapters,
                scales: &scales,
                shared: &shared_adapters,
                shared_scales: &shared_scales,
                allow_unmatched,
            },
            mode,
        ),
        Command::Adapter { what } => adapter_cmd::run(what),
        Command::Finetune { what: None, run } => finetune_cmd::run(&run),
        Command::Personalize(a) => finetune_cmd::personalize(&a),
        Command::Finetune {
            what:
                Some(FinetuneWhat::Grad {
                    model,
                    adapter,
                    input,
                    output,
                    threads,
                    no_checkpointing,
                }),
            ..
        } => finetune_cmd::grad(
            &model,
            &adapter,
            &input,
            &output,
            (threads, !no_checkpointing),
        ),
        Command::Tokenize {
            model,
            padded,
            text,
        } => tokenize_cmd::run(model.as_deref(), &text.join(" "), padded),
        Command::Info {
            path,
            tensors,
            json,
        } => info_cmd::info(&path, tensors, json),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hdb: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Loads a model with a progress bar on stderr when it spans several files.
fn load_model(path: &Path) -> hdb::Result<Model> {
    load_model_with(path, None)
}

/// As [`load_model`], with a tokenizer folder to use instead of the model's.
fn load_model_with(path: &Path, tokenizer: Option<&Path>) -> hdb::Result<Model> {
    let bar = indicatif::ProgressBar::hidden();
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} files")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message("loading");
    let mut progress = |done: usize, total: usize, _f: &Path| {
        if total > 1 && bar.is_hidden() {
            bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
        }
        bar.set_length(total as u64);
        bar.set_position(done as u64);
        true
    };
    let model = Model::load(
        path,
        LoadOptions {
            progress: Some(&mut progress),
            tokenizer: tokenizer.map(Path::to_path_buf),
            ..Default::default()
        },
    );
    bar.finish_and_clear();
    model
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum Mode {
    Merge,
    Runtime,
}

/// The CLI's runtime on `device` (the UNet, text encoder, VAE and hypernetwork run there; the
/// tokenizer on the CPU) with `threads` CPU threads (0 = one per core).
fn runtime(device: hdb::runtime::DeviceRequest, threads: usize) -> hdb::Result<hdb::Runtime> {
    hdb::Runtime::new(hdb::RuntimeOptions { device, threads })
}

/// The CLI's CPU runtime with `threads` threads (0 = one per core).
fn cpu_runtime(threads: usize) -> hdb::Result<hdb::Runtime> {
    runtime(hdb::runtime::DeviceRequest::Cpu, threads)
}

/// `-o` of `hdb generate`: hdb writes PNG only, so any other name would get PNG bytes under
/// the wrong extension.
fn parse_png_path(s: &str) -> Result<PathBuf, String> {
    let p = PathBuf::from(s);
    match p.extension().and_then(|e| e.to_str()) {
        Some(e) if e.eq_ignore_ascii_case("png") => Ok(p),
        _ => Err("hdb writes PNG images only: give -o a file name ending in .png".into()),
    }
}

/// Ends the process quietly, as Unix tools do, when stdout is a pipe whose reader has gone
/// (`hdb demo | head -1`). Rust starts programs with SIGPIPE ignored, so a write to the closed
/// pipe would fail with EPIPE and `println!` would panic; the default action ends the process
/// by the signal instead.
#[cfg(unix)]
fn die_quietly_on_a_closed_pipe() {
    extern "C" {
        fn signal(signum: std::ffi::c_int, handler: usize) -> usize;
    }
    const SIGPIPE: std::ffi::c_int = 13; // on Linux, macOS and the BSDs alike
    const SIG_DFL: usize = 0;
    // SAFETY: restores a signal's default disposition before any thread starts; no handler
    // code runs in this process.
    unsafe {
        signal(SIGPIPE, SIG_DFL);
    }
}

#[cfg(not(unix))]
fn die_quietly_on_a_closed_pipe() {}

/// `--device`: auto, cpu, cuda or cuda:N.
fn parse_dtype(s: &str) -> Result<hdb::tensor::DType, String> {
    use hdb::tensor::DType;
    [DType::F32, DType::F16, DType::BF16]
        .into_iter()
        .find(|d| d.name() == s)
        .ok_or_else(|| format!("'{s}' is not a storage type: f32, f16 or bf16"))
}

fn parse_device(s: &str) -> Result<hdb::runtime::DeviceRequest, String> {
    hdb::runtime::DeviceRequest::parse(s).map_err(|e| e.to_string())
}

/// Peak resident set size of this process in MB (Linux; 0 elsewhere).
fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn bench_unet(
    threads: usize,
    runs: usize,
    size: usize,
    batch: usize,
    peer: Option<&Path>,
    profile: bool,
) -> hdb::Result<()> {
    use hdb::model::config::UnetConfig;
    use hdb::model::random::RandomWeights;
    use hdb::model::unet::Unet;
    let rt = cpu_runtime(threads)?;
    let threads = rt.threads();
    let cfg = UnetConfig::default();
    let (l, cdim) = (77, cfg.cross_attention_dim);
    let t0 = std::time::Instant::now();
    // On the profiling wrapper, collecting only when asked, after the warm-up.
    let be = hdb::backend::profile::Profiled::new(hdb::backend::Cpu);
    let unet =
        rt.install(|| Unet::load_on(be.clone(), cfg.clone(), &RandomWeights { seed: 0x5D15 }))?;
    eprintln!(
        "random SD 1.5 UNet weights made in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    let mut rng = hdb::rng::SplitMix64(7);
    let mut noise = |n: usize| -> Vec<f32> { (0..n).map(|_| 2.0 * rng.next_f32() - 1.0).collect() };
    let sample = noise(batch * 4 * size * size);
    let ctx = noise(batch * l * cdim);
    let t: Vec<f32> = (0..batch).map(|i| 999.0 - 500.0 * i as f32).collect();
    let flops = cfg.flops(batch, size, size, l);
    let mut times = Vec::new();
    for i in 0..=runs {
        let s = std::time::Instant::now();
        let input = UnetInput {
            sample: &sample,
            timesteps: &t,
            context: &ctx,
            batch,
            height: size,
            width: size,
            context_len: l,
        };
        let y = rt.install(|| unet.forward_hooked(&input, None))?;
        let dt = s.elapsed().as_secs_f64();
        if y.iter().any(|x| !x.is_finite()) {
            return Err(hdb::Error::Internal("UNet output is not finite".into()));
        }
        eprintln!("{} {:.3} s", if i == 0 { "warm-up" } else { "run" }, dt);
        if i > 0 {
            times.push(dt);
        }
        if i == 0 {
            be.enable(profile);
        }
    }
    let spent = be.report();
    be.enable(false);
    let med = median(&mut times);
    println!(
        "hdb cpu f32: SD 1.5 UNet batch {batch}, {size}x{size} latents, {l}x{cdim} context, {threads} threads: \
         {med:.3} s/forward (median of {runs}), {:.1} GFLOP/s ({:.1} GFLOP), peak RSS {:.0} MB",
        flops / med / 1e9,
        flops / 1e9,
        peak_rss_mb()
    );
    if profile {
        let total: f64 = times.iter().sum();
        println!("where the time goes (per forward, over {runs} runs):");
        for (name, d, n) in &spent {
            let per = d.as_secs_f64() / runs.max(1) as f64;
            println!(
                "  {name:<20} {:>8.1} ms  {:>5.1}%  {:>5} calls",
                per * 1e3,
                100.0 * d.as_secs_f64() / total,
                n / runs.max(1) as u64
            );
        }
    }
    if let Some(py) = peer {
        let (t, r, s, b) = (
            threads.to_string(),
            runs.to_string(),
            size.to_string(),
            batch.to_string(),
        );
        let args = ["--threads", &t, "--runs", &r, "--size", &s, "--batch", &b];
        let json = bench_pipeline::run_peer(py, "tools/bench_torch_unet.py", &args)?;
        let peer_s = json["median_s"].as_f64().unwrap_or(f64::NAN);
        println!(
            "peer pytorch-eager (torch {}, diffusers {}): {peer_s:.3} s/forward, {:.1} GFLOP/s, peak RSS {:.0} MB",
            json["torch"].as_str().unwrap_or("?"),
            json["diffusers"].as_str().unwrap_or("?"),
            flops / peer_s / 1e9,
            json["peak_rss_mb"].as_f64().unwrap_or(f64::NAN)
        );
        println!(
            "ratio: hdb is {:.2}x the speed of PyTorch eager",
            peer_s / med
        );
    }
    Ok(())
}
