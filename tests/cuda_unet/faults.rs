//! Device faults through the C API, on the emulated GPU (scripts/emulated-gpu.sh), which can
//! run out of memory or fail a kernel launch on demand: each is a clear status, and the same
//! session then gives the result it gives without the fault, bit for bit. The faults hit every
//! caller of the process, so this test must run alone (`--test-threads=1`, as the script does).

use super::common::cuda::emulated_gpu_control;
use super::common::read_input;
use super::session::Host;
use hdb::ffi::hdb_status;

#[test]
#[ignore = "needs the emulated GPU's fault controls: scripts/emulated-gpu.sh runs it"]
fn out_of_memory_and_failed_launches_are_statuses_and_the_session_recovers() {
    let mut h = match Host::open("cuda") {
        Ok(h) => h,
        Err((st, msg)) => {
            println!("SKIPPED (no CUDA device): {st:?}: {msg}");
            return;
        }
    };
    let Some(emu) = emulated_gpu_control() else {
        println!("not run: a real GPU has no fault controls (this test is for the emulated GPU)");
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
