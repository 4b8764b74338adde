//! The samplers against diffusers 0.42.1 (fixtures from tools/make_scheduler_fixtures.py): for
//! every case (config x sampler x step count) the timesteps must be equal bit for bit as f32;
//! sigmas, init_noise_sigma, every step's scale_model_input and step outputs (16 probed
//! elements each) and the final sample (all elements) must be within
//! max|hdb - diffusers| <= 1e-5 x max|diffusers| of the same tensor. The synthetic model is
//! eps_i = scaled_i * 0.1 + r * (1 + 0.05 i) in f32; Euler ancestral's noise for its k-th draw
//! is roll(noise, 37 k), as the tool fed diffusers.
//!
//! Measured (diffusers' fixtures made on an AVX-512 CPU): worst 1.2e-6 (DDIM with x0 clipping),
//! 7e-7 or less elsewhere, sigmas within 1 ulp. The residue is torch's CPU `sqrt` (vectorised
//! via MKL/Sleef, not correctly rounded: 190 of the 1000 entries of the f32 sigma table differ by
//! one ulp from a correctly rounded sqrt), not a formula difference: the timesteps, which a
//! formula slip would move, are equal bit for bit, Karras' rounded ones included.
//!
//! `cargo test --test scheduler -- --nocapture` prints the worst error per sampler.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::{compare, Tol};
use hdb::io::safetensors::{read_as_f32, SafetensorsFile};
use hdb::model::scheduler::{make, SamplerKind, SchedulerConfig};
use hdb::Error;

const TOL: Tol = Tol::MaxAbsOfRef(1e-5);

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/scheduler")
}

fn read_json(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).expect("fixture JSON")).expect("JSON")
}

fn tensor(f: &SafetensorsFile, key: &str) -> Vec<f32> {
    read_as_f32(f, key)
        .unwrap_or_else(|e| panic!("{key}: {e}"))
        .1
}

#[derive(Default)]
struct Report {
    failures: Vec<String>,
    /// Worst relative error per sampler and quantity.
    worst: BTreeMap<(String, &'static str), (f64, String)>,
}

impl Report {
    fn check(&mut self, case: &str, sampler: &str, what: &'static str, got: &[f32], want: &[f32]) {
        let d = compare(got, want);
        // max|got - want| / max|want|, infinite on a NaN or infinity.
        let e = d.max_abs / d.ref_max.max(f64::from(f32::MIN_POSITIVE));
        let entry = self
            .worst
            .entry((sampler.to_string(), what))
            .or_insert((0.0, String::new()));
        if e > entry.0 || entry.1.is_empty() {
            *entry = (e, case.to_string());
        }
        if !d.within(TOL) {
            self.failures
                .push(d.failure(&format!("{case} {what}"), TOL));
        }
    }
}

#[test]
fn samplers_match_diffusers() {
    let d = dir();
    let cases = read_json(&d.join("cases.json"));
    let probe: Vec<usize> = cases["probe"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    let roll = cases["roll"].as_u64().unwrap() as usize;
    let inputs = SafetensorsFile::open(&d.join("inputs.safetensors")).unwrap();
    let x0 = tensor(&inputs, "x0");
    let r = tensor(&inputs, "r");
    let base_noise = tensor(&inputs, "noise");
    let numel = x0.len();

    let mut files: BTreeMap<String, SafetensorsFile> = BTreeMap::new();
    let mut report = Report::default();
    let mut n_cases = 0;
    for case in cases["cases"].as_array().unwrap() {
        let config = case["config"].as_str().unwrap();
        let sampler = case["sampler"].as_str().unwrap();
        let n = case["steps"].as_u64().unwrap() as usize;
        let name = format!("{config}/{sampler}/{n}");
        let cfg_path = d.join(format!("configs/{config}.json"));
        let cfg = SchedulerConfig::from_json(&read_json(&cfg_path), &cfg_path).unwrap();
        let f = files.entry(config.to_string()).or_insert_with(|| {
            SafetensorsFile::open(&d.join(format!("{config}.safetensors"))).unwrap()
        });
        let key = |w: &str| format!("{sampler}.{n}.{w}");
        let kind: SamplerKind = sampler.parse().unwrap();
        let mut s = make(kind, &cfg, n).unwrap_or_else(|e| panic!("{name}: {e}"));
        n_cases += 1;

        let want_t = tensor(f, &key("timesteps"));
        let got_t = s.timesteps();
        if got_t.len() != want_t.len()
            || got_t
                .iter()
                .zip(&want_t)
                .any(|(a, b)| a.to_bits() != b.to_bits())
        {
            report.failures.push(format!(
                "{name} timesteps: hdb {got_t:?}\n   diffusers {want_t:?}"
            ));
            continue;
        }
        match (s.sigmas(), f.get(&key("sigmas")).is_some()) {
            (Some(got), true) => {
                let want = tensor(f, &key("sigmas"));
                if got.len() != want.len() {
                    report.failures.push(format!(
                        "{name} sigmas: {} values, diffusers {}",
                        got.len(),
                        want.len()
                    ));
                } else {
                    report.check(&name, sampler, "sigmas", got, &want);
                }
            }
            (None, false) => {}
            (got, has) => report.failures.push(format!(
                "{name}: hdb has sigmas: {}, the fixture: {has}",
                got.is_some()
            )),
        }
        let init = s.init_noise_sigma();
        let want_init = case["init_noise_sigma"].as_f64().unwrap() as f32;
        report.check(&name, sampler, "init_noise_sigma", &[init], &[want_init]);

        let want_scaled = tensor(f, &key("scaled"));
        let want_steps = tensor(f, &key("steps"));
        let k = probe.len();
        let mut x: Vec<f32> = x0.iter().map(|&v| v * init).collect();
        let mut calls = 0usize;
        for i in 0..n {
            let scaled = s.scale_model_input(&x, i);
            let picked: Vec<f32> = probe.iter().map(|&j| scaled[j]).collect();
            report.check(
                &name,
                sampler,
                "scaled",
                &picked,
                &want_scaled[i * k..(i + 1) * k],
            );
            let w = (1.0 + 0.05 * i as f64) as f32;
            let eps: Vec<f32> = scaled
                .iter()
                .zip(&r)
                .map(|(&a, &b)| a * 0.1f32 + b * w)
                .collect();
            let mut noise = |count: usize| -> Vec<f32> {
                assert_eq!(count, numel, "noise count");
                let shift = (roll * calls) % numel;
                calls += 1;
                (0..numel)
                    .map(|j| base_noise[(j + numel - shift) % numel])
                    .collect()
            };
            x = s
                .step(&eps, i, &x, &mut noise)
                .unwrap_or_else(|e| panic!("{name} step {i}: {e}"));
            let picked: Vec<f32> = probe.iter().map(|&j| x[j]).collect();
            report.check(
                &format!("{name} step {i}"),
                sampler,
                "steps",
                &picked,
                &want_steps[i * k..(i + 1) * k],
            );
        }
        report.check(&name, sampler, "final", &x, &tensor(f, &key("final")));
        let want_calls = case["noise_calls"].as_u64().unwrap() as usize;
        if calls != want_calls {
            report.failures.push(format!(
                "{name}: drew noise {calls} times, diffusers {want_calls}"
            ));
        }
    }
    println!("{n_cases} cases; worst max|hdb - diffusers| / max|diffusers| (tolerance: {TOL}):");
    for ((sampler, what), (e, case)) in &report.worst {
        println!("  {sampler:16} {what:17} {e:.3e}  ({case})");
    }
    assert!(n_cases >= 60, "only {n_cases} cases in cases.json");
    assert!(
        report.failures.is_empty(),
        "{} mismatches:\n{}",
        report.failures.len(),
        report.failures.join("\n")
    );
}

#[test]
fn unknown_sampler_name_is_a_clear_error() {
    let e = "k_euler".parse::<SamplerKind>().unwrap_err();
    assert!(matches!(
        e,
        Error::InvalidArgument {
            name: "sampler",
            ..
        }
    ));
    let msg = e.to_string();
    for want in [
        "k_euler",
        "ddim",
        "euler",
        "euler_a",
        "dpmpp_2m",
        "dpmpp_2m_karras",
    ] {
        assert!(msg.contains(want), "{msg}");
    }
    for k in SamplerKind::ALL {
        assert_eq!(k.to_string().parse::<SamplerKind>().unwrap(), k);
    }
}

#[test]
fn zero_steps_is_a_clear_error() {
    let cfg = SchedulerConfig::default();
    for k in SamplerKind::ALL {
        let e = make(k, &cfg, 0).err().expect("steps 0 must fail");
        assert!(
            matches!(e, Error::InvalidArgument { name: "steps", .. }),
            "{e}"
        );
        assert!(e.to_string().contains("steps"), "{e}");
    }
}

#[test]
fn v_prediction_config_is_unsupported() {
    let p = dir().join("configs/sd15.json");
    let mut v = read_json(&p);
    v["prediction_type"] = "v_prediction".into();
    let e = SchedulerConfig::from_json(&v, &p).unwrap_err();
    assert!(matches!(e, Error::Unsupported(_)), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("prediction_type")
            && msg.contains("v_prediction")
            && msg.contains("sd15.json"),
        "{msg}"
    );
}

#[test]
fn sd15_config_is_the_default_and_tiny_sd_spaces_leading() {
    let p = dir().join("configs/sd15.json");
    assert_eq!(
        SchedulerConfig::from_json(&read_json(&p), &p).unwrap(),
        SchedulerConfig::default()
    );
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tiny-sd/scheduler/scheduler_config.json");
    let cfg = SchedulerConfig::from_json(&read_json(&p), &p).unwrap();
    assert_eq!(
        cfg.timestep_spacing,
        Some(hdb::model::scheduler::TimestepSpacing::Leading)
    );
}
