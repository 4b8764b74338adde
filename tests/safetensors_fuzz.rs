//! Feeds thousands of random and mutated safetensors files (seeded) to the reader and to model
//! loading. Each must end in a valid result or an error: no panic, no hang, no out-of-bounds
//! range in an accepted file.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use hdb::io::safetensors::parse_header;

/// splitmix64: a tiny seeded generator so every failing case can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn file(header: &str, data_len: usize) -> Vec<u8> {
    let mut v = (header.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(header.as_bytes());
    v.resize(v.len() + data_len, 0x3c);
    v
}

/// A valid file with a few tensors of assorted dtypes and shapes.
fn valid_seed(rng: &mut Rng) -> Vec<u8> {
    let dtypes = [("F32", 4), ("F16", 2), ("BF16", 2), ("I64", 8), ("U8", 1)];
    let mut entries = Vec::new();
    let mut off = 0usize;
    for i in 0..(1 + rng.below(4)) {
        let (dt, size) = dtypes[rng.below(dtypes.len() as u64) as usize];
        let shape: Vec<usize> = (0..rng.below(4))
            .map(|_| 1 + rng.below(5) as usize)
            .collect();
        let n: usize = shape.iter().product::<usize>() * size;
        let key = if rng.below(2) == 0 {
            format!("model.diffusion_model.input_blocks.{i}.0.in_layers.0.weight")
        } else {
            format!("t{i}")
        };
        entries.push(format!(
            r#""{key}":{{"dtype":"{dt}","shape":{shape:?},"data_offsets":[{off},{}]}}"#,
            off + n
        ));
        off += n;
    }
    let header = format!(
        r#"{{"__metadata__":{{"format":"pt"}},{}}}"#,
        entries.join(",")
    );
    file(&header, off)
}

fn mutate(rng: &mut Rng, mut v: Vec<u8>) -> Vec<u8> {
    match rng.below(8) {
        // Flip random bytes anywhere (header length, JSON, data).
        0 | 1 => {
            for _ in 0..(1 + rng.below(4)) {
                let i = rng.below(v.len() as u64) as usize;
                v[i] ^= 1 << rng.below(8);
            }
        }
        // Truncate.
        2 => v.truncate(rng.below(v.len() as u64) as usize),
        // Append junk.
        3 => v.extend((0..rng.below(64)).map(|_| rng.next() as u8)),
        // Lie about the header length.
        4 => {
            let claim = match rng.below(4) {
                0 => u64::MAX,
                1 => rng.next(),
                2 => (v.len() as u64).saturating_add(rng.below(100)),
                _ => rng.below(v.len() as u64),
            };
            if v.len() >= 8 {
                v[..8].copy_from_slice(&claim.to_le_bytes());
            }
        }
        // Replace digits in the JSON (offsets, shapes) with huge or odd numbers.
        5 => {
            let text_end = v.len().min(8 + 512);
            for b in v.iter_mut().take(text_end).skip(8) {
                if b.is_ascii_digit() && rng.below(6) == 0 {
                    *b = b'9';
                }
            }
        }
        // Splice a random printable run into the header.
        6 => {
            let at = 8 + rng.below(v.len().saturating_sub(8) as u64) as usize;
            let junk: Vec<u8> = (0..rng.below(16))
                .map(|_| b"{}[]\",:-0e9aI6F"[rng.below(15) as usize])
                .collect();
            if at <= v.len() {
                v.splice(at..at, junk);
            }
        }
        // Pure random bytes.
        _ => v = (0..rng.below(200)).map(|_| rng.next() as u8).collect(),
    }
    v
}

#[test]
fn random_and_mutated_headers_end_in_a_result_or_an_error() {
    let mut rng = Rng(0x5AFE_7E45);
    let (mut ok, mut err) = (0, 0);
    let start = std::time::Instant::now();
    for case in 0..20000u32 {
        let seed = valid_seed(&mut rng);
        let bytes = if case % 10 == 0 {
            seed
        } else {
            mutate(&mut rng, seed)
        };
        let outcome = catch_unwind(AssertUnwindSafe(|| parse_header(Path::new("fuzz"), &bytes)));
        match outcome {
            Err(_) => panic!(
                "case {case}: parse_header panicked on {:?}",
                String::from_utf8_lossy(&bytes)
            ),
            Ok(Err(e)) => {
                assert!(
                    e.to_string().contains("fuzz"),
                    "case {case}: error does not name the file: {e}"
                );
                err += 1;
            }
            Ok(Ok(h)) => {
                for t in h.tensors.values() {
                    assert!(
                        t.start <= t.end && t.end <= bytes.len(),
                        "case {case}: '{}' out of bounds",
                        t.name
                    );
                    let n = t.shape.numel().expect("accepted shape has a size");
                    assert_eq!(
                        t.end - t.start,
                        n * t.dtype.bitsize() / 8,
                        "case {case}: '{}' size",
                        t.name
                    );
                }
                ok += 1;
            }
        }
    }
    println!("{ok} accepted, {err} rejected in {:?}", start.elapsed());
    assert!(
        ok >= 2000 && err >= 5000,
        "the generator should produce both kinds ({ok} ok, {err} err)"
    );
}

#[test]
fn mutated_files_on_disk_never_crash_model_loading() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut rng = Rng(0xD15C);
    for case in 0..300u32 {
        let seed = valid_seed(&mut rng);
        let bytes = mutate(&mut rng, seed);
        let path = dir.path().join(format!("case{case}.safetensors"));
        std::fs::write(&path, &bytes).expect("write");
        let r = catch_unwind(AssertUnwindSafe(|| {
            hdb::Model::load(&path, Default::default())
        }));
        match r {
            Err(_) => panic!("case {case}: Model::load panicked"),
            Ok(Err(e)) => {
                let msg = e.to_string();
                assert!(
                    msg.contains(&format!("case{case}")) || msg.contains("model.diffusion_model"),
                    "case {case}: error names neither file nor key: {msg}"
                );
            }
            Ok(Ok(_)) => {}
        }
    }
}
