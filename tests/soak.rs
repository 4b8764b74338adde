//! Soak: one process, through the C API on the tiny model, thousands of adapter swaps and loads
//! and hundreds of small generations, with flat memory and no file-descriptor or mapping leak.
//! After a warm-up (the pipeline, the LiDB bases and the allocator's pools settle), the
//! resident set size is read from /proc/self/statm at the start, the middle and the end, with
//! the open descriptors (/proc/self/fd) and mappings (/proc/self/maps). A leak grows with the
//! work, so the second half may not grow the resident set by more than 2 MB (the first half's
//! growth is printed beside it) and descriptors and mappings must come back to their count.
//! `hdb bench soak` is the same at SD 1.5's size.

use std::ffi::CString;
use std::path::PathBuf;
use std::ptr;

use hdb::ffi::adapter::{hdb_adapter, hdb_adapter_free, hdb_adapter_load};
use hdb::ffi::generate::{hdb_generate, hdb_generate_params_default, hdb_image};
use hdb::ffi::model::{hdb_model, hdb_model_free, hdb_model_load};
use hdb::ffi::runtime::{
    hdb_runtime, hdb_runtime_free, hdb_runtime_new, hdb_runtime_params_default,
};
use hdb::ffi::session::{
    hdb_session, hdb_session_free, hdb_session_new, hdb_session_set_adapters,
    hdb_session_set_sample_adapters, HDB_APPLY_MERGE, HDB_APPLY_RUNTIME,
};
use hdb::ffi::status::hdb_status;

fn fx(p: &str) -> CString {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(p);
    CString::new(path.to_str().expect("utf-8")).expect("path")
}

/// (resident bytes, open descriptors, mappings) of this process.
fn usage() -> (u64, usize, usize) {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("statm");
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("resident pages");
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64;
    let fds = std::fs::read_dir("/proc/self/fd").expect("fd").count();
    let maps = std::fs::read_to_string("/proc/self/maps")
        .expect("maps")
        .lines()
        .count();
    (pages * page, fds, maps)
}

fn ok(s: hdb_status, what: &str) {
    assert_eq!(s, hdb_status::HDB_STATUS_OK, "{what}: {}", last_error());
}

fn last_error() -> String {
    // SAFETY: the thread-local message is a valid C string until the next failing call.
    unsafe { std::ffi::CStr::from_ptr(hdb::ffi::boundary::hdb_last_error_message()) }
        .to_string_lossy()
        .into_owned()
}

struct Objects {
    rt: *mut hdb_runtime,
    model: *mut hdb_model,
    session: *mut hdb_session,
    ids: Vec<*mut hdb_adapter>,
}

const IMG: usize = 64 * 64 * 3;

/// One round of the work: `swaps` adapter-set changes in both modes (and per-image indices),
/// one adapter loaded and freed, one model loaded and freed, `gens` generations.
///
/// # Safety
/// `o` holds live objects of this thread.
unsafe fn round(o: &Objects, swaps: usize, gens: usize, k: usize, out: &mut [u8]) {
    let set: Vec<*const hdb_adapter> = o.ids.iter().map(|&a| a as *const _).collect();
    let scales = [0.7f32, 0.9, 1.1];
    for i in 0..swaps {
        let n = 1 + (i + k) % set.len();
        let mode = if i % 2 == 0 {
            HDB_APPLY_MERGE
        } else {
            HDB_APPLY_RUNTIME
        };
        // SAFETY: live session, `set` and `scales` valid for n entries.
        unsafe {
            ok(
                hdb_session_set_adapters(o.session, set.as_ptr(), scales.as_ptr(), n, mode),
                "set_adapters",
            );
            if mode == HDB_APPLY_RUNTIME && i % 4 == 1 {
                let idx = [-1i32, (n - 1) as i32];
                ok(
                    hdb_session_set_sample_adapters(o.session, idx.as_ptr(), 2),
                    "set_sample_adapters",
                );
            }
        }
    }
    // SAFETY: valid paths and out-pointers; each object is freed at once.
    unsafe {
        for f in [
            "adapter/id2.peft.safetensors",
            "adapter/id2.lidb.safetensors",
        ]
        .repeat(5)
        {
            let mut a = ptr::null_mut();
            ok(
                hdb_adapter_load(o.model, fx(f).as_ptr(), &mut a),
                "adapter_load",
            );
            hdb_adapter_free(a);
        }
        let mut m = ptr::null_mut();
        ok(
            hdb_model_load(o.rt, fx("tiny-sd").as_ptr(), ptr::null(), &mut m),
            "model_load",
        );
        hdb_model_free(m);
    }
    let (a, b) = out.split_at_mut(IMG);
    for g in 0..gens {
        let mut p = hdb_generate_params_default();
        p.steps = 1;
        p.width = 64;
        p.height = 64;
        p.batch = 2;
        p.seed = (k * 1000 + g) as u64;
        let mut imgs = [
            hdb_image {
                data: a.as_mut_ptr(),
                data_len: IMG,
                width: 0,
                height: 0,
                stride: 0,
                format: 0,
            },
            hdb_image {
                data: b.as_mut_ptr(),
                data_len: IMG,
                width: 0,
                height: 0,
                stride: 0,
                format: 0,
            },
        ];
        // SAFETY: live session, params and two images of IMG bytes.
        ok(
            unsafe { hdb_generate(o.session, &p, imgs.as_mut_ptr(), 2) },
            "generate",
        );
    }
}

#[test]
fn thousands_of_swaps_and_hundreds_of_generations_keep_memory_descriptors_and_maps_flat() {
    let mut o = Objects {
        rt: ptr::null_mut(),
        model: ptr::null_mut(),
        session: ptr::null_mut(),
        ids: Vec::new(),
    };
    let mut rp = hdb_runtime_params_default();
    rp.device = c"cpu".as_ptr();
    rp.num_threads = 2;
    // SAFETY: valid params and out-pointers; everything is freed at the end.
    unsafe {
        ok(hdb_runtime_new(&rp, &mut o.rt), "runtime");
        ok(
            hdb_model_load(o.rt, fx("tiny-sd").as_ptr(), ptr::null(), &mut o.model),
            "model",
        );
        ok(
            hdb_session_new(o.model, ptr::null(), &mut o.session),
            "session",
        );
        for f in [
            "adapter/id1.lidb.safetensors",
            "adapter/id2.lidb.safetensors",
            "adapter/id1.kohya.safetensors",
        ] {
            let mut a = ptr::null_mut();
            ok(hdb_adapter_load(o.model, fx(f).as_ptr(), &mut a), f);
            o.ids.push(a);
        }
    }
    let mut out = vec![0u8; 2 * IMG];
    // Warm-up: the pipeline, the bases, the allocator's pools.
    // SAFETY: live objects of this thread.
    unsafe { round(&o, 40, 4, 0, &mut out) };
    let (rss0, fd0, maps0) = usage();
    let (rounds, swaps, gens) = (40, 60, 5); // 2400 swaps, 400 loads, 200 generations of 2 images
    let mut mid = (0, 0, 0);
    let t = std::time::Instant::now();
    for k in 0..rounds {
        // SAFETY: as above.
        unsafe { round(&o, swaps, gens, k + 1, &mut out) };
        if k + 1 == rounds / 2 {
            mid = usage();
        }
    }
    let (rss1, fd1, maps1) = usage();
    let mb = |b: u64| b as f64 / 1e6;
    println!(
        "{} swaps, {} adapter and {} model loads, {} generations in {:.1} s: RSS {:.1} -> {:.1} -> {:.1} MB, fds {fd0} -> {} -> {fd1}, maps {maps0} -> {} -> {maps1}",
        rounds * swaps,
        rounds * 10,
        rounds,
        rounds * gens,
        t.elapsed().as_secs_f64(),
        mb(rss0),
        mb(mid.0),
        mb(rss1),
        mid.1,
        mid.2
    );
    assert!(
        rss1 <= mid.0 + (2 << 20),
        "the resident set grew {:.1} MB in the second half (first half: {:+.1} MB)",
        mb(rss1) - mb(mid.0),
        mb(mid.0) - mb(rss0)
    );
    assert_eq!(fd1, fd0, "file descriptors leaked");
    assert!(
        maps1 <= maps0 + 2,
        "mappings leaked: {maps0} -> {maps1} (a mapped weight file never unmapped?)"
    );
    // SAFETY: each object once.
    unsafe {
        for a in o.ids {
            hdb_adapter_free(a);
        }
        hdb_session_free(o.session);
        hdb_model_free(o.model);
        hdb_runtime_free(o.rt);
    }
}
