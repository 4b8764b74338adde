//! Faults: clear errors, and the device stays usable

use super::*;

#[test]
#[ignore = "needs a CUDA GPU: scripts/gpu-check.sh runs it"]
fn faults_are_errors_and_the_device_stays_usable() {
    let Some((_lock, dev)) = device() else {
        return;
    };
    // More memory than any GPU has.
    match dev.zeros::<f32>(1 << 42) {
        Err(Error::OutOfMemory(msg)) => println!("cuda-fault out of memory -> OutOfMemory: {msg}"),
        other => panic!("a 16 TiB allocation gave {other:?}"),
    }
    // A buffer too small for the op: refused before launch.
    let x = dev.zeros::<f32>(10).unwrap();
    let mut y = dev.zeros::<f32>(10).unwrap();
    let e = ops::geglu(&dev, &mut y, &x, 10, 10).unwrap_err();
    println!("cuda-fault short buffer -> {e}");
    assert!(e.to_string().contains("'x'"), "{e}");
    // A head dim the kernels do not take.
    let big = dev.zeros::<f32>(2 * 300).unwrap();
    let e = ops::attention(
        &dev,
        At::from(&big),
        At::from(&big),
        At::from(&big),
        At::from(&big),
        AttnShape::dense(1, 1, 2, 2, 300),
        AttnKernel::Auto,
    )
    .unwrap_err();
    assert!(matches!(e, Error::Unsupported(_)), "{e}");
    // Still usable.
    let v = dev.upload(&[1.0f32, -2.0]).unwrap();
    let mut w = dev.upload(&[0.5f32, 0.25]).unwrap();
    ops::add_inplace(&dev, &mut w, &v, 2).unwrap();
    assert_eq!(dev.download(&w, 2).unwrap(), vec![1.5, -1.75]);
    println!("cuda-fault device usable after the faults: yes");
}
