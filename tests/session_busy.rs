//! One session used from two threads at once (the header forbids it): the second caller gets
//! `HDB_STATUS_BUSY` and nothing changes, never memory corruption. The first call, held inside
//! `hdb_generate` by its own progress callback, then finishes with the image a lone call
//! gives, and the session takes the second call once the first has returned.

use std::ffi::{c_char, c_void, CStr, CString};
use std::path::PathBuf;
use std::sync::mpsc;

use hdb::ffi::adapter::{hdb_adapter, hdb_adapter_free, hdb_adapter_load};
use hdb::ffi::boundary::hdb_last_error_message;
use hdb::ffi::generate::{hdb_generate, hdb_generate_params_default, hdb_image, HDB_PIXEL_RGB8};
use hdb::ffi::hdb_status;
use hdb::ffi::model::{hdb_model, hdb_model_free, hdb_model_load};
use hdb::ffi::runtime::{
    hdb_runtime, hdb_runtime_free, hdb_runtime_new, hdb_runtime_params_default,
};
use hdb::ffi::session::{
    hdb_session, hdb_session_free, hdb_session_new, hdb_session_set_adapters,
    hdb_session_set_sample_adapters, HDB_APPLY_RUNTIME,
};

fn fixture(p: &str) -> CString {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(p);
    CString::new(path.to_str().expect("utf-8")).expect("no NUL")
}

fn last_error() -> String {
    // SAFETY: a NUL-terminated thread-local string.
    unsafe { CStr::from_ptr(hdb_last_error_message()) }
        .to_string_lossy()
        .into_owned()
}

/// Raw handles may cross threads in this test: the point is what hdb does when they do.
#[derive(Clone, Copy)]
struct Shared(*mut hdb_session, *const hdb_adapter);
// SAFETY: see above; every use is a C API call that must cope with it.
unsafe impl Send for Shared {}

/// The progress callback's user data: after step 1 it reports that the generation is inside
/// the session, then waits until the other thread has made its calls.
struct Hold {
    inside: mpsc::Sender<()>,
    release: mpsc::Receiver<()>,
}

unsafe extern "C" fn hold(
    user: *mut c_void,
    done: u64,
    _total: u64,
    _stage: *const c_char,
) -> bool {
    // SAFETY: user is the Hold the test passed, alive for the whole call.
    let h = unsafe { &*(user as *const Hold) };
    if done == 1 {
        let _ = h.inside.send(());
        let _ = h.release.recv();
    }
    true
}

/// One 64x64 image on `session` with `progress` (and its user data).
fn generate(
    session: *mut hdb_session,
    progress: hdb::ffi::hdb_progress_fn,
    user: *mut c_void,
) -> (hdb_status, Vec<u8>) {
    let mut p = hdb_generate_params_default();
    let prompt = CString::new("a photo of sks person").expect("prompt");
    p.prompt = prompt.as_ptr();
    p.steps = 3;
    p.width = 64;
    p.height = 64;
    p.seed = 5;
    p.progress = progress;
    p.progress_user_data = user;
    let mut px = vec![0u8; 64 * 64 * 3];
    let mut img = hdb_image {
        data: px.as_mut_ptr(),
        data_len: px.len(),
        width: 0,
        height: 0,
        stride: 0,
        format: HDB_PIXEL_RGB8,
    };
    // SAFETY: live session, valid params and one image buffer.
    let st = unsafe { hdb_generate(session, &p, &mut img, 1) };
    (st, px)
}

#[test]
fn a_session_used_from_two_threads_is_busy_not_corrupted() {
    let mut rp = hdb_runtime_params_default();
    rp.num_threads = 1;
    let cpu = CString::new("cpu").expect("device");
    rp.device = cpu.as_ptr();
    let (mut rt, mut model, mut session, mut adapter): (
        *mut hdb_runtime,
        *mut hdb_model,
        *mut hdb_session,
        *mut hdb_adapter,
    ) = Default::default();
    // SAFETY: valid params, paths and out-pointers; each handle freed once at the end.
    unsafe {
        assert_eq!(hdb_runtime_new(&rp, &mut rt), hdb_status::HDB_STATUS_OK);
        let dir = fixture("tiny-sd");
        let st = hdb_model_load(rt, dir.as_ptr(), std::ptr::null(), &mut model);
        assert_eq!(st, hdb_status::HDB_STATUS_OK, "{}", last_error());
        let st = hdb_session_new(model, std::ptr::null(), &mut session);
        assert_eq!(st, hdb_status::HDB_STATUS_OK, "{}", last_error());
        let f = fixture("adapter/id1.lidb.safetensors");
        let st = hdb_adapter_load(model, f.as_ptr(), &mut adapter);
        assert_eq!(st, hdb_status::HDB_STATUS_OK, "{}", last_error());
    }
    let (lone_status, lone) = generate(session, None, std::ptr::null_mut());
    assert_eq!(lone_status, hdb_status::HDB_STATUS_OK, "{}", last_error());

    let (inside_tx, inside_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel();
    let shared = Shared(session, adapter);
    let worker = std::thread::spawn(move || {
        let s = shared;
        let h = Hold {
            inside: inside_tx,
            release: release_rx,
        };
        generate(s.0, Some(hold), &h as *const Hold as *mut c_void)
    });
    inside_rx.recv().expect("the generation reached step 1");
    // The other thread is inside hdb_generate on this session: every session call is busy.
    let set = [shared.1];
    // SAFETY: live session and adapter (misused from a second thread on purpose).
    let busy = [
        unsafe {
            hdb_session_set_adapters(
                session,
                set.as_ptr(),
                std::ptr::null(),
                1,
                HDB_APPLY_RUNTIME,
            )
        },
        unsafe { hdb_session_set_sample_adapters(session, std::ptr::null(), 0) },
        generate(session, None, std::ptr::null_mut()).0,
    ];
    let message = last_error();
    release_tx.send(()).expect("release");
    let (held_status, held) = worker.join().expect("worker");
    for st in busy {
        assert_eq!(st, hdb_status::HDB_STATUS_BUSY, "{message}");
    }
    assert!(
        message.contains("busy") && message.contains("thread"),
        "{message}"
    );
    assert_eq!(held_status, hdb_status::HDB_STATUS_OK);
    assert_eq!(
        held, lone,
        "the held generation is the lone one, bit for bit"
    );
    // The refused set_adapters changed nothing; now that the session is free it is taken.
    let (after_status, after) = generate(session, None, std::ptr::null_mut());
    assert_eq!(after_status, hdb_status::HDB_STATUS_OK);
    assert_eq!(after, lone, "no adapter was applied by the refused call");
    // SAFETY: live session and adapter, one thread.
    let st = unsafe {
        hdb_session_set_adapters(
            session,
            set.as_ptr(),
            std::ptr::null(),
            1,
            HDB_APPLY_RUNTIME,
        )
    };
    assert_eq!(st, hdb_status::HDB_STATUS_OK, "{}", last_error());
    let (with_status, with) = generate(session, None, std::ptr::null_mut());
    assert_eq!(with_status, hdb_status::HDB_STATUS_OK);
    assert_ne!(with, lone, "the identity changes the image");
    // SAFETY: each handle once.
    unsafe {
        hdb_session_free(session);
        hdb_adapter_free(adapter);
        hdb_model_free(model);
        hdb_runtime_free(rt);
    }
}

#[test]
fn a_null_entry_in_the_adapters_array_is_a_null_argument_naming_it() {
    let mut rp = hdb_runtime_params_default();
    let cpu = CString::new("cpu").expect("device");
    rp.device = cpu.as_ptr();
    rp.num_threads = 1;
    let (mut rt, mut model, mut session): (*mut hdb_runtime, *mut hdb_model, *mut hdb_session) =
        Default::default();
    // SAFETY: valid params, paths and out-pointers; each handle freed once.
    unsafe {
        assert_eq!(hdb_runtime_new(&rp, &mut rt), hdb_status::HDB_STATUS_OK);
        let dir = fixture("tiny-sd");
        let st = hdb_model_load(rt, dir.as_ptr(), std::ptr::null(), &mut model);
        assert_eq!(st, hdb_status::HDB_STATUS_OK, "{}", last_error());
        assert_eq!(
            hdb_session_new(model, std::ptr::null(), &mut session),
            hdb_status::HDB_STATUS_OK
        );
        let set: [*const hdb_adapter; 2] = [std::ptr::null(), std::ptr::null()];
        let st = hdb_session_set_adapters(session, set.as_ptr(), std::ptr::null(), 2, 0);
        assert_eq!(st, hdb_status::HDB_STATUS_NULL_ARGUMENT);
        assert!(last_error().contains("'adapters[0]'"), "{}", last_error());
        hdb_session_free(session);
        hdb_model_free(model);
        hdb_runtime_free(rt);
    }
}

/// Sizes a host passes to a session are bounded before anything is allocated or multiplied
/// from them: a huge adapter count or per-sample count, a UNet call whose output size wraps,
/// and a nonzero reserved field are INVALID_ARGUMENT naming the argument, never an abort.
#[test]
fn huge_counts_and_wrapping_sizes_are_invalid_arguments() {
    use hdb::ffi::session::{hdb_session_params_default, hdb_session_unet};
    let mut rp = hdb_runtime_params_default();
    let cpu = CString::new("cpu").expect("device");
    rp.device = cpu.as_ptr();
    rp.num_threads = 1;
    let (mut rt, mut model, mut session): (*mut hdb_runtime, *mut hdb_model, *mut hdb_session) =
        Default::default();
    // SAFETY: valid params, paths and out-pointers; the huge counts are refused before any
    // pointer is read past its first element; each handle freed once.
    unsafe {
        assert_eq!(hdb_runtime_new(&rp, &mut rt), hdb_status::HDB_STATUS_OK);
        let dir = fixture("tiny-sd");
        let st = hdb_model_load(rt, dir.as_ptr(), std::ptr::null(), &mut model);
        assert_eq!(st, hdb_status::HDB_STATUS_OK, "{}", last_error());
        let mut sp = hdb_session_params_default();
        sp.reserved = 1;
        let st = hdb_session_new(model, &sp, &mut session);
        assert_eq!(st, hdb_status::HDB_STATUS_INVALID_ARGUMENT);
        assert!(last_error().contains("params.reserved"), "{}", last_error());
        assert!(session.is_null(), "no session on failure");
        assert_eq!(
            hdb_session_new(model, std::ptr::null(), &mut session),
            hdb_status::HDB_STATUS_OK
        );
        let one: [*const hdb_adapter; 1] = [std::ptr::null()];
        let st = hdb_session_set_adapters(session, one.as_ptr(), std::ptr::null(), usize::MAX, 0);
        assert_eq!(st, hdb_status::HDB_STATUS_INVALID_ARGUMENT);
        assert!(last_error().contains("'n'"), "{}", last_error());
        let idx = [0i32];
        let st = hdb_session_set_sample_adapters(session, idx.as_ptr(), usize::MAX / 4);
        assert_eq!(st, hdb_status::HDB_STATUS_INVALID_ARGUMENT);
        assert!(last_error().contains("'n'"), "{}", last_error());
        // batch * channels * height * width wraps on 64 bits.
        let x = [0f32; 4];
        let mut out = [0f32; 4];
        let st = hdb_session_unet(
            session,
            x.as_ptr(),
            4,
            x.as_ptr(),
            1,
            x.as_ptr(),
            4,
            u32::MAX,
            u32::MAX,
            u32::MAX,
            1,
            out.as_mut_ptr(),
            4,
        );
        assert_eq!(
            st,
            hdb_status::HDB_STATUS_INVALID_ARGUMENT,
            "{}",
            last_error()
        );
        assert!(last_error().contains("out_len"), "{}", last_error());
        hdb_session_free(session);
        hdb_model_free(model);
        hdb_runtime_free(rt);
    }
}
