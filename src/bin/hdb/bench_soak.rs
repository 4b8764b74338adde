//! `hdb bench soak`: the soak test (tests/soak.rs) at SD 1.5's size, with random weights made
//! in-process: thousands of identity swaps on the UNet and the text encoder in both apply
//! modes and a run of small generations with changing identities, in one process. Prints the
//! resident set (/proc/self/statm), open descriptors and mappings after a warm-up, halfway and
//! at the end, and fails when the second half grew the resident set by more than
//! `--max-growth-mb` or left descriptors or mappings behind.

use std::sync::Arc;
use std::time::Instant;

use hdb::adapter::apply::ApplyMode;
use hdb::adapter::lidb::{BasisCache, Lidb, LidbMeta};
use hdb::adapter::Adapter;
use hdb::model::adaptable::identity_layers;
use hdb::model::config::UnetConfig;
use hdb::model::random::RandomWeights;
use hdb::model::scheduler::{SamplerKind, SchedulerConfig};
use hdb::model::text_encoder::TextEncoderConfig;
use hdb::model::tokenizer::ClipTokenizer;
use hdb::model::vae::VaeConfig;
use hdb::pipeline::GenerateParams;
use hdb::rng::SplitMix64;
use hdb::session::BuiltModel;
use hdb::{Engine, Session};

/// What the soak does.
pub struct SoakArgs {
    pub threads: usize,
    pub swaps: usize,
    pub generations: usize,
    pub identities: usize,
    /// Image side in pixels of each generation.
    pub size: usize,
    pub max_growth_mb: f64,
}

/// (resident bytes, open descriptors, mappings) of this process.
fn usage() -> (u64, usize, usize) {
    let pages: u64 = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        .unwrap_or(0);
    let fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count());
    let maps = std::fs::read_to_string("/proc/self/maps").map_or(0, |m| m.lines().count());
    (pages * 4096, fds, maps)
}

/// A random LiDB identity for every adaptable layer of `table` (r 1, a 100, b 50).
fn identity(
    table: &std::collections::BTreeMap<String, hdb::adapter::LayerShape>,
    seed: u64,
) -> Lidb {
    let mut rng = SplitMix64(seed);
    let mut g =
        |n: usize| -> Vec<f32> { (0..n).map(|_| 0.5 * (2.0 * rng.next_f32() - 1.0)).collect() };
    Lidb {
        meta: LidbMeta {
            rank: 1,
            a: 100,
            b: 50,
            basis_seed: 42,
            alpha: 1.0,
            base: Some("sd15".into()),
        },
        layers: table.keys().map(|k| (k.clone(), (g(100), g(50)))).collect(),
    }
}

pub fn run(a: SoakArgs) -> hdb::Result<()> {
    let rt = Arc::new(super::cpu_runtime(a.threads)?);
    let t0 = Instant::now();
    let engine = Arc::new(Engine::from_parts(
        rt.clone(),
        BuiltModel {
            unet: UnetConfig::default(),
            text_encoder: TextEncoderConfig::default(),
            vae: VaeConfig::default(),
            weights: &RandomWeights { seed: 0x50AC },
            tokenizer: ClipTokenizer::byte_level(77)?,
            scheduler: SchedulerConfig::default(),
        },
    )?);
    let table = identity_layers(&engine.adaptable_layers());
    let cache = BasisCache::default();
    let ids: Vec<Adapter> = (0..a.identities.max(2) as u64)
        .map(|i| rt.install(|| identity(&table, 100 + i).compose_cached(&table, &cache)))
        .collect::<hdb::Result<_>>()?;
    eprintln!(
        "random SD 1.5 model and {} identities ({} layers each) made in {:.1} s",
        ids.len(),
        table.len(),
        t0.elapsed().as_secs_f64()
    );

    // One swap: a session's set replaced in merge mode (reusing the previous set's buffers) or
    // by a runtime set, on the UNet and the text encoder.
    let mut session = Session::new(engine.clone());
    let swap = |session: &mut Session, i: usize| -> hdb::Result<()> {
        let (x, y) = (&ids[i % ids.len()], &ids[(i + 1) % ids.len()]);
        let set = [(x, 1.0), (y, 0.5)];
        let set = &set[..1 + i % 2];
        let mode = if i % 3 == 2 {
            ApplyMode::Runtime
        } else {
            ApplyMode::Merge
        };
        session.set_adapters(set, mode)
    };
    let generate = |session: &mut Session, g: usize| -> hdb::Result<()> {
        let set: Vec<(&Adapter, f32)> = ids.iter().map(|x| (x, 1.0)).collect();
        if g.is_multiple_of(2) {
            session.set_adapters(&set[g % set.len()..][..1], ApplyMode::Merge)?;
            session.set_sample_adapters(None)?;
        } else {
            session.set_adapters(&set, ApplyMode::Runtime)?;
            session.set_sample_adapters(Some(vec![0, -1]))?;
        }
        let p = GenerateParams {
            prompt: format!("a photo of person {g}"),
            steps: 1,
            sampler: SamplerKind::EulerAncestral,
            seed: g as u64,
            width: a.size,
            height: a.size,
            batch: 2,
            ..Default::default()
        };
        let out = session.generate(&p, None)?;
        if out.images.len() != 2 {
            return Err(hdb::Error::Internal("a generation lost an image".into()));
        }
        Ok(())
    };

    // Warm-up: every kind of swap and a generation of each mode.
    for i in 0..6 {
        swap(&mut session, i)?;
    }
    generate(&mut session, 0)?;
    generate(&mut session, 1)?;
    let start = usage();
    let t = Instant::now();
    let half_swaps = a.swaps / 2;
    let half_gens = a.generations / 2;
    for i in 0..half_swaps {
        swap(&mut session, i)?;
    }
    for g in 0..half_gens {
        generate(&mut session, g)?;
    }
    let mid = usage();
    for i in half_swaps..a.swaps {
        swap(&mut session, i)?;
    }
    for g in half_gens..a.generations {
        generate(&mut session, g)?;
    }
    let end = usage();
    let mb = |b: u64| b as f64 / 1e6;
    println!(
        "soak at SD 1.5 size: {} swaps (UNet and text encoder, merge and runtime), {} generations \
         of 2 images at {}x{} in {:.1} s",
        a.swaps,
        a.generations,
        a.size,
        a.size,
        t.elapsed().as_secs_f64()
    );
    println!("             start      mid      end");
    println!(
        "RSS MB    {:>8.1} {:>8.1} {:>8.1}   (first half {:+.1}, second half {:+.1})",
        mb(start.0),
        mb(mid.0),
        mb(end.0),
        mb(mid.0) - mb(start.0),
        mb(end.0) - mb(mid.0)
    );
    println!("fds       {:>8} {:>8} {:>8}", start.1, mid.1, end.1);
    println!("maps      {:>8} {:>8} {:>8}", start.2, mid.2, end.2);
    let grew = mb(end.0) - mb(mid.0);
    if grew > a.max_growth_mb || end.1 > start.1 || end.2 > start.2 + 2 {
        return Err(hdb::Error::Internal(format!(
            "the soak leaked: {grew:+.1} MB of resident memory in the second half (limit \
             {} MB), fds {} -> {}, maps {} -> {}",
            a.max_growth_mb, start.1, end.1, start.2, end.2
        )));
    }
    println!(
        "flat: no growth beyond {} MB, no descriptor or mapping left behind",
        a.max_growth_mb
    );
    Ok(())
}
