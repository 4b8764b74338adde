//! The comparison every parity test relies on (tests/common/compare.rs) fails on what a
//! hand-rolled `max |got - want|` lets through: an all-NaN output, one NaN element, a NaN in
//! the reference, infinities; and it names the worst element and its index.

mod common;

use common::{check, compare, Tol};

const WANT: [f32; 4] = [1.0, -2.0, 0.5, 4.0];

/// Every kind of tolerance, each loose enough that any finite output here would pass.
const TOLS: [Tol; 3] = [Tol::RelL2(1e9), Tol::MaxAbs(1e9), Tol::MaxAbsOfRef(1e9)];

fn fails_everywhere(what: &str, got: &[f32], want: &[f32]) -> String {
    let mut last = String::new();
    for tol in TOLS {
        match check(what, got, want, tol) {
            Ok(d) => panic!("{what} passed {tol}: {d:?}"),
            Err(msg) => last = msg,
        }
    }
    last
}

#[test]
fn an_all_nan_output_fails() {
    let msg = fails_everywhere("all NaN", &[f32::NAN; 4], &WANT);
    assert!(
        msg.contains("4 elements NaN or infinite") && msg.contains("index 0: got NaN"),
        "{msg}"
    );
}

#[test]
fn one_nan_element_fails_and_is_named() {
    let mut got = WANT;
    got[2] = f32::NAN;
    let msg = fails_everywhere("one NaN", &got, &WANT);
    assert!(msg.contains("index 2: got NaN vs reference 0.5"), "{msg}");
    let d = compare(&got, &WANT);
    assert_eq!((d.at, d.non_finite), (2, 1));
    assert!(d.rel_l2.is_infinite() && d.max_abs.is_infinite());
}

#[test]
fn a_nan_in_the_reference_fails() {
    let mut want = WANT;
    want[1] = f32::NAN;
    let msg = fails_everywhere("NaN reference", &WANT, &want);
    assert!(msg.contains("index 1: got -2 vs reference NaN"), "{msg}");
    // The same NaN on both sides is no agreement either.
    fails_everywhere("NaN on both sides", &want, &want);
}

#[test]
fn infinities_fail_even_when_equal() {
    let mut got = WANT;
    got[3] = f32::INFINITY;
    let msg = fails_everywhere("one infinity", &got, &WANT);
    assert!(msg.contains("index 3: got inf vs reference 4"), "{msg}");
    let mut want = WANT;
    want[0] = f32::NEG_INFINITY;
    fails_everywhere("infinite reference", &WANT, &want);
    fails_everywhere("equal infinities", &want, &want);
}

#[test]
fn the_first_non_finite_element_is_the_one_named() {
    let got = [1.0, f32::INFINITY, f32::NAN, 4.0];
    let d = compare(&got, &WANT);
    assert_eq!((d.at, d.non_finite), (1, 2));
}

#[test]
fn a_finite_output_is_judged_by_the_stated_metric() {
    let got = [1.0, -2.0, 0.5, 4.1];
    let d = compare(&got, &WANT);
    assert_eq!(d.at, 3);
    assert!((d.max_abs - 0.1).abs() < 1e-6, "{d:?}");
    assert_eq!(d.ref_max, 4.0);
    // ||(0, 0, 0, 0.1)|| / ||(1, -2, 0.5, 4)|| = 0.1 / sqrt(21.25)
    assert!((d.rel_l2 - 0.1 / 21.25f64.sqrt()).abs() < 1e-6, "{d:?}");
    assert!(d.within(Tol::MaxAbs(0.11)) && !d.within(Tol::MaxAbs(0.09)));
    assert!(d.within(Tol::MaxAbsOfRef(0.026)) && !d.within(Tol::MaxAbsOfRef(0.024)));
    assert!(d.within(Tol::RelL2(0.022)) && !d.within(Tol::RelL2(0.021)));
    let msg = check("slightly off", &got, &WANT, Tol::RelL2(0.01)).expect_err("over");
    assert!(
        msg.starts_with("slightly off: rel_l2 2.169e-2 > 1.000e-2")
            && msg.contains("(rel_l2 <= 1.0e-2)")
            && msg.contains("index 3: got 4.1 vs reference 4"),
        "{msg}"
    );
    // The printed figures say which metric the tolerance bounds.
    assert!(
        d.figures(Tol::MaxAbsOfRef(1e-4))
            .ends_with("(tol: max_abs <= 1.0e-4 x max|ref| = 4.000e-4)"),
        "{}",
        d.figures(Tol::MaxAbsOfRef(1e-4))
    );
    // An exact match passes every tolerance, zero ones included.
    for tol in [Tol::RelL2(0.0), Tol::MaxAbs(0.0), Tol::MaxAbsOfRef(0.0)] {
        assert!(compare(&WANT, &WANT).within(tol), "{tol}");
    }
}

#[test]
fn outputs_of_another_length_fail() {
    let msg = check("short", &WANT[..3], &WANT, Tol::MaxAbs(1.0)).expect_err("short");
    assert!(
        msg.contains("output length 3 vs reference length 4"),
        "{msg}"
    );
    let r = std::panic::catch_unwind(|| {
        common::assert_close("short", &WANT[..3], &WANT, Tol::MaxAbs(1.0))
    });
    assert!(r.is_err());
}
