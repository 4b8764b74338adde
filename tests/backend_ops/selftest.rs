//! The emulation's own checks fail kernels that break CUDA's rules (tests/emu/selftest.cuh),
//! with a message naming the fault: without this, a check that had stopped working would pass
//! every case above it.

use cudarc::driver::LaunchConfig;
use hdb::backend::cuda::ops::{KernelLaunch, Param};

use crate::emu_harness::{selftest_driver, Job};

fn launch(kernel: &str, smem: u32, params: Vec<Param>) -> KernelLaunch {
    KernelLaunch {
        file: "selftest.cuh",
        kernel: kernel.into(),
        cfg: LaunchConfig {
            grid_dim: (2, 1, 1),
            block_dim: (32, 1, 1),
            shared_mem_bytes: smem,
        },
        params,
    }
}

/// Runs one launch on a 32-float output under `schedule`: the output, or the driver's error.
fn run(kernel: &str, smem: u32, extra: &[Param], schedule: &str) -> Result<Vec<u8>, String> {
    let mut job = Job::new();
    let out = job.output(32 * 4);
    let mut params = vec![Param::U64(out)];
    params.extend_from_slice(extra);
    job.launch(&launch(kernel, smem, params));
    job.try_run_once(selftest_driver(), &[out], schedule)
        .map(|mut v| v.remove(0))
}

fn fails_with(kernel: &str, smem: u32, extra: &[Param], want: &str) {
    match run(kernel, smem, extra, "forward") {
        Ok(_) => panic!("{kernel}: the emulation let it pass; it should fail with '{want}'"),
        Err(e) => {
            assert!(
                e.contains(want),
                "{kernel}: failed, but not with '{want}': {e}"
            );
            println!("emulation check: {kernel} fails with '{want}'");
        }
    }
}

#[test]
fn the_emulation_fails_kernels_that_break_the_rules() {
    // Within the launch's dynamic shared memory: fine.
    run("selftest_smem_write", 64, &[Param::I32(63)], "forward").expect("an in-bounds write");
    // Just past it (checked after each block), and far past it (checked after the launch).
    fails_with(
        "selftest_smem_write",
        64,
        &[Param::I32(70)],
        "wrote dynamic shared memory at byte 70, past the launch's 64 bytes",
    );
    fails_with(
        "selftest_smem_write",
        64,
        &[Param::I32(20000)],
        "wrote dynamic shared memory at byte 20000",
    );
    // Past the end of a global buffer: the guard zone.
    run("selftest_global_write", 0, &[Param::I32(0)], "forward").expect("an in-bounds write");
    fails_with(
        "selftest_global_write",
        0,
        &[Param::I32(1)],
        "wrote outside buffer 0",
    );
    // A kernel argument of the wrong kind.
    fails_with(
        "selftest_global_write",
        0,
        &[Param::I64(1)],
        "argument 1 is i32 in the kernel but the launch passes i64",
    );
    // A full-mask warp collective after a lane exited.
    fails_with(
        "selftest_shuffle_after_exit",
        0,
        &[],
        "after a lane of warp 0 exited",
    );
    // A missing barrier: the forward and reverse schedules disagree; with it they agree.
    let f = run("selftest_race", 0, &[], "forward").expect("forward");
    let r = run("selftest_race", 0, &[], "reverse").expect("reverse");
    assert_ne!(
        f, r,
        "the two schedules did not expose the missing __syncthreads"
    );
    let f = run("selftest_no_race", 0, &[], "forward").expect("forward");
    let r = run("selftest_no_race", 0, &[], "reverse").expect("reverse");
    assert_eq!(f, r, "the race-free kernel differs between the schedules");
    println!("emulation check: a missing __syncthreads changes the output between schedules");
}
