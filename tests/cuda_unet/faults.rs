//! Device faults through the C API, on the emulated GPU (scripts/emulated-gpu.sh), which can
//! run out of memory or fail a kernel launch on demand: each is a clear status, and the same
//! session then gives the result it gives without the fault, bit for bit. The faults hit every
//! caller of the process, so this test must run alone (`--test-threads=1`, as the script does).

use super::common::cuda::{emulated_gpu_control, EmuControl};
use super::common::read_input;
use super::session::{last_error, Host};
use hdb::ffi::generate::{hdb_generate, hdb_generate_params_default, hdb_image};
use hdb::ffi::hdb_status;
use std::ffi::CString;

/// A host on a CUDA runtime and the emulated GPU's fault controls, or None after saying why
/// (no device: SKIPPED; a real GPU: not run).
fn emulated_host() -> Option<(Host, EmuControl)> {
    let h = match Host::open("cuda") {
        Ok(h) => h,
        Err((st, msg)) => {
            println!("SKIPPED (no CUDA device): {st:?}: {msg}");
            return None;
        }
    };
    let Some(emu) = emulated_gpu_control() else {
        println!("not run: a real GPU has no fault controls (this test is for the emulated GPU)");
        return None;
    };
    Some((h, emu))
}

/// One 64x64 image of the tiny model through `hdb_generate` (text encoder, two UNet steps with
/// guidance, VAE decode, all on the device): its RGB bytes, or the status and message.
fn generate(h: &mut Host) -> Result<Vec<u8>, (hdb_status, String)> {
    let prompt = CString::new("a photo of sks person").expect("no NUL");
    let mut p = hdb_generate_params_default();
    p.prompt = prompt.as_ptr();
    p.steps = 2;
    p.width = 64;
    p.height = 64;
    p.batch = 1;
    p.seed = 7;
    let mut pixels = vec![0u8; 64 * 64 * 3];
    let mut img = hdb_image {
        data: pixels.as_mut_ptr(),
        data_len: pixels.len(),
        width: 0,
        height: 0,
        stride: 0,
        format: Default::default(),
    };
    // SAFETY: a live session; params valid (the prompt outlives the call); one image whose
    // buffer holds data_len bytes.
    let st = unsafe { hdb_generate(h.session, &p, &mut img, 1) };
    if st != hdb_status::HDB_STATUS_OK {
        return Err((st, last_error()));
    }
    Ok(pixels)
}

#[test]
#[ignore = "needs the emulated GPU's fault controls: scripts/emulated-gpu.sh runs it"]
fn out_of_memory_and_failed_launches_are_statuses_and_the_session_recovers() {
    let Some((mut h, emu)) = emulated_host() else {
        return;
    };
    let inp = read_input("tiny-sd");
    let want = h.try_unet(&inp).expect("the UNet before any fault");

    // Out of device memory at several points of the forward pass: from the first allocation
    // on, to one that leaves room for most of them.
    let mut ooms = 0;
    for headroom in [0u64, 64 << 10, 1 << 20] {
        emu.memory_headroom(Some(headroom));
        let r = h.try_unet(&inp);
        emu.memory_headroom(None);
        match r {
            Err((st, msg)) => {
                println!("cuda-fault headroom {headroom} B: {st:?}: {msg}");
                assert_eq!(st, hdb_status::HDB_STATUS_OUT_OF_MEMORY, "{msg}");
                assert!(msg.contains("device memory"), "{msg}");
                ooms += 1;
            }
            Ok(_) => println!("cuda-fault headroom {headroom} B: the forward pass fits"),
        }
        let again = h
            .try_unet(&inp)
            .expect("the UNet after running out of memory");
        assert!(
            again == want,
            "after running out of memory with {headroom} B of headroom the output differs"
        );
    }
    assert!(ooms >= 2, "only {ooms} headrooms ran out of memory");

    // A failed kernel launch, early and late in the forward pass.
    for n in [1u64, 300] {
        emu.fail_launch(n);
        let r = h.try_unet(&inp);
        emu.fail_launch(0);
        match r {
            Err((st, msg)) => {
                println!("cuda-fault launch {n} fails: {st:?}: {msg}");
                assert_eq!(st, hdb_status::HDB_STATUS_DEVICE_ERROR, "{msg}");
                assert!(msg.contains("LAUNCH_OUT_OF_RESOURCES"), "{msg}");
            }
            Ok(_) => panic!("launch {n} of the forward pass was to fail, but the call succeeded"),
        }
        let again = h.try_unet(&inp).expect("the UNet after a failed launch");
        assert!(again == want, "after failed launch {n} the output differs");
    }
}

#[test]
#[ignore = "needs the emulated GPU's fault controls: scripts/emulated-gpu.sh runs it"]
fn faults_during_hdb_generate_are_statuses_and_the_next_image_is_unchanged() {
    let Some((mut h, emu)) = emulated_host() else {
        return;
    };
    // The first generation builds what later ones reuse (the models on the device); the second
    // is measured: its launches, and the most device memory it holds at once beyond what was
    // held before it (counted under a headroom it cannot reach).
    let want = generate(&mut h).expect("an image before any fault");
    emu.memory_headroom(Some(1 << 40));
    let before = emu.launches();
    let again = generate(&mut h).expect("a second image");
    let (launches, peak) = (emu.launches() - before, emu.peak_bytes());
    emu.memory_headroom(None);
    assert!(again == want, "two generations from the same inputs differ");
    println!("cuda-fault generate: {launches} launches, {peak} B at most beyond the session's");
    assert!(launches > 100 && peak > 0, "{launches} launches, {peak} B");
    let mut faults = 0;
    for headroom in [0, peak / 2] {
        emu.memory_headroom(Some(headroom));
        let r = generate(&mut h);
        emu.memory_headroom(None);
        match r {
            Err((st, msg)) => {
                println!("cuda-fault generate, headroom {headroom} B: {st:?}: {msg}");
                assert_eq!(st, hdb_status::HDB_STATUS_OUT_OF_MEMORY, "{msg}");
                faults += 1;
            }
            Ok(_) => panic!("{headroom} B of headroom was to run out, but the generation fit"),
        }
        assert!(
            generate(&mut h).expect("an image after running out of memory") == want,
            "the image after running out of memory ({headroom} B headroom) differs"
        );
    }
    // A failed launch at the start (the text encoder's first layer norm), in the denoising loop,
    // and near the end (in the VAE).
    for n in [1, launches / 2, launches - 5] {
        emu.fail_launch(n);
        let r = generate(&mut h);
        emu.fail_launch(0);
        match r {
            Err((st, msg)) => {
                println!("cuda-fault generate, launch {n} fails: {st:?}: {msg}");
                assert_eq!(st, hdb_status::HDB_STATUS_DEVICE_ERROR, "{msg}");
                faults += 1;
            }
            Ok(_) => panic!("launch {n} of {launches} was to fail, but the generation succeeded"),
        }
        assert!(
            generate(&mut h).expect("an image after a failed launch") == want,
            "the image after failed launch {n} differs"
        );
    }
    assert_eq!(
        faults, 5,
        "only {faults} of the 5 faults hit the generation"
    );
}
