//! `hdb adapter ...`: describe adapter files, export them as standard LoRA, write the basis.

use std::path::{Path, PathBuf};

use clap::Subcommand;
use hdb::adapter::{basis::basis, lidb, lora};
use hdb::io::safetensors::{write_f32_with_metadata, SafetensorsFile};

#[derive(Subcommand)]
pub enum AdapterCmd {
    /// What an adapter file holds: kind, rank, layers, LiDB parameters, size.
    Info {
        /// A LiDB adapter or a kohya or PEFT LoRA (safetensors).
        file: PathBuf,
    },
    /// Write an adapter (LiDB or LoRA) as a standard kohya or PEFT LoRA file for `--model`.
    Export {
        /// The model the adapter is for (its layers give the LoRA keys and shapes): a
        /// diffusers folder, a component folder or an LDM single file.
        #[arg(long)]
        model: PathBuf,
        /// kohya (`lora_unet_*.lora_down.weight`, what most SD tools read) or peft
        /// (`unet.*.lora_A.weight`, diffusers' and peft's names).
        #[arg(long, value_enum)]
        format: Format,
        /// The adapter to export: a LiDB file, or a kohya or PEFT LoRA.
        input: PathBuf,
        /// The LoRA file to write (safetensors).
        output: PathBuf,
    },
    /// Write the LiDB basis of every adaptable layer K of `--model`: `K.d_aux` [a, in] and
    /// `K.u_aux` [out, b], so anyone can check it.
    Basis {
        /// The model whose adaptable layers get a basis.
        #[arg(long)]
        model: PathBuf,
        /// The basis seed (a LiDB file's `basis_seed`).
        #[arg(long)]
        seed: u64,
        /// Rows of each layer's down basis D_aux [a, in].
        #[arg(long, default_value_t = 100)]
        a: usize,
        /// Columns of each layer's up basis U_aux [out, b].
        #[arg(long, default_value_t = 50)]
        b: usize,
        /// The safetensors file to write.
        #[arg(long)]
        output: PathBuf,
    },
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Format {
    Kohya,
    Peft,
}

pub fn run(cmd: AdapterCmd) -> hdb::Result<()> {
    match cmd {
        AdapterCmd::Info { file } => info(&file),
        AdapterCmd::Export {
            model,
            format,
            input,
            output,
        } => {
            let m = super::load_model(&model)?;
            let a = hdb::adapter::load(&SafetensorsFile::open(&input)?, &m.adaptable_layers())?;
            let f = match format {
                Format::Kohya => lora::LoraFormat::Kohya,
                Format::Peft => lora::LoraFormat::Peft,
            };
            lora::export(&a, f, &output)?;
            println!(
                "wrote {} ({} layers, {:?})",
                output.display(),
                a.layers.len(),
                f
            );
            Ok(())
        }
        AdapterCmd::Basis {
            model,
            seed,
            a,
            b,
            output,
        } => {
            let m = super::load_model(&model)?;
            let table = m.adaptable_layers();
            let mut names = Vec::new();
            let mut data = Vec::new();
            for (k, s) in &table {
                let bs = basis(k, seed, a, b, s.din, s.dout)?;
                names.push((
                    format!("{k}.d_aux"),
                    vec![a, s.din],
                    format!("{k}.u_aux"),
                    vec![s.dout, b],
                ));
                data.push(bs);
            }
            let mut tensors = Vec::new();
            for ((dn, ds, un, us), bs) in names.iter().zip(&data) {
                tensors.push((dn.as_str(), ds.clone(), bs.d_aux.as_slice()));
                tensors.push((un.as_str(), us.clone(), bs.u_aux.as_slice()));
            }
            let meta = vec![
                ("basis_seed".to_string(), seed.to_string()),
                ("a".into(), a.to_string()),
                ("b".into(), b.to_string()),
            ];
            write_f32_with_metadata(&output, &tensors, &meta)?;
            println!(
                "wrote the basis of {} layers to {}",
                table.len(),
                output.display()
            );
            Ok(())
        }
    }
}

fn info(file: &Path) -> hdb::Result<()> {
    let f = SafetensorsFile::open(file)?;
    let size = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
    if lidb::is_lidb(&f) {
        let l = lidb::Lidb::from_safetensors(&f)?;
        let m = &l.meta;
        let version = f.metadata().get("version").cloned().unwrap_or_default();
        println!("LiDB v{version} adapter: {} ({size} bytes)", file.display());
        println!(
            "rank {}, a {}, b {}, basis_seed {}, alpha {}",
            m.rank, m.a, m.b, m.basis_seed, m.alpha
        );
        println!("base: {}", m.base.as_deref().unwrap_or("(not stated)"));
        let unet = l.layers.keys().filter(|k| k.starts_with("unet.")).count();
        let te = l
            .layers
            .keys()
            .filter(|k| k.starts_with("text_encoder."))
            .count();
        println!(
            "layers: {} ({unet} UNet, {te} text encoder)",
            l.layers.len()
        );
        return Ok(());
    }
    if hdb::adapter::lycoris::is_lycoris(&f) {
        let (layers, parts) = hdb::adapter::lycoris::describe(&f);
        println!("LyCORIS adapter: {} ({size} bytes)", file.display());
        println!("layers: {layers}, parts: {}", parts.join(", "));
        println!("merge mode only (the updates are full matrices)");
        return Ok(());
    }
    if lora::detect(&f).is_none() {
        return Err(hdb::Error::InvalidFile {
            path: file.to_path_buf(),
            format: "adapter",
            reason: "neither a LiDB adapter (metadata format=hdb-lidb) nor a kohya/PEFT LoRA"
                .into(),
        });
    }
    // The file's own structure (factor shapes, ranks, alpha) is checked without a model.
    let lora::LoraFile {
        format: fmt,
        layers,
        partial,
        other,
    } = lora::read_layers(&f)?;
    if let Some((stem, names)) = partial.first() {
        return Err(hdb::Error::InvalidFile {
            path: file.to_path_buf(),
            format: "LoRA",
            reason: format!(
                "layer '{stem}' lacks its down or up factor (has only {})",
                names.join(", ")
            ),
        });
    }
    let ranks: std::collections::BTreeSet<usize> = layers.iter().map(|l| l.rank).collect();
    println!("{fmt:?} LoRA: {} ({size} bytes)", file.display());
    println!("layers: {}, ranks: {ranks:?}", layers.len());
    let dora = layers.iter().filter(|l| l.magnitude_name.is_some()).count();
    let tucker = layers.iter().filter(|l| l.mid_name.is_some()).count();
    if dora > 0 {
        println!("DoRA magnitudes on {dora} layer(s): merge mode only");
    }
    if tucker > 0 {
        println!("Tucker convolutions (lora_mid) on {tucker} layer(s)");
    }
    if !other.is_empty() {
        println!(
            "{} other tensor(s), e.g. {} (refused when loaded for a model)",
            other.len(),
            other[0]
        );
    }
    Ok(())
}
