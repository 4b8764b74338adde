//! `hdb adapter ...`: describe adapter files, export them as standard LoRA, write the basis.

use std::path::{Path, PathBuf};

use clap::Subcommand;
use hdb::adapter::{adaptable_layers, basis::basis, lidb, lora};
use hdb::io::safetensors::{write_f32_with_metadata, SafetensorsFile};

#[derive(Subcommand)]
pub enum AdapterCmd {
    /// What an adapter file holds: kind, rank, layers, LiDB parameters, size.
    Info { file: PathBuf },
    /// Write an adapter (LiDB or LoRA) as a standard kohya or PEFT LoRA file for `--model`.
    Export {
        #[arg(long)]
        model: PathBuf,
        #[arg(long, value_enum)]
        format: Format,
        input: PathBuf,
        output: PathBuf,
    },
    /// Write the LiDB basis of every adaptable layer K of `--model`: `K.d_aux` [a, in] and
    /// `K.u_aux` [out, b], so anyone can check it.
    Basis {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        seed: u64,
        #[arg(long, default_value_t = 100)]
        a: usize,
        #[arg(long, default_value_t = 50)]
        b: usize,
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
            let a = hdb::adapter::load(&SafetensorsFile::open(&input)?, &adaptable_layers(&m))?;
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
            let table = adaptable_layers(&m);
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
    if !other.is_empty() {
        println!(
            "{} other tensor(s), e.g. {} (refused when loaded for a model)",
            other.len(),
            other[0]
        );
    }
    Ok(())
}
