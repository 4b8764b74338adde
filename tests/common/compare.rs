//! The one comparison of a float output with its reference that every test uses.
//!
//! A NaN or an infinity on either side is an infinite error at its element, never a skipped one:
//! `f32::max` and `>` both ignore NaN, so a hand-rolled `max |got - want|` passes on an output
//! that is all NaN. tests/comparator.rs feeds this one NaN and infinities and sees it fail.

use std::fmt;

/// A tolerance, stated with the metric it bounds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Tol {
    /// ||got - want|| / ||want|| <= t (||got - want|| when the reference is all zeros).
    RelL2(f64),
    /// max |got - want| <= t.
    MaxAbs(f64),
    /// max |got - want| <= t x max |want|: an error relative to the reference's magnitude.
    MaxAbsOfRef(f64),
}

impl fmt::Display for Tol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Tol::RelL2(t) => write!(f, "rel_l2 <= {t:.1e}"),
            Tol::MaxAbs(t) => write!(f, "max_abs <= {t:.1e}"),
            Tol::MaxAbsOfRef(t) => write!(f, "max_abs <= {t:.1e} x max|ref|"),
        }
    }
}

/// How far an output is from its reference.
#[derive(Clone, Copy, Debug)]
pub struct Diff {
    /// ||got - want|| / ||want|| (||got - want|| when the reference is all zeros); infinite
    /// when an element of either side is not finite.
    pub rel_l2: f64,
    /// max |got - want|; infinite when an element of either side is not finite.
    pub max_abs: f64,
    /// max |want| over the reference's finite elements.
    pub ref_max: f64,
    /// The index of the worst element: the first non-finite one if there is one.
    pub at: usize,
    /// The output's and the reference's values there.
    pub got: f32,
    pub want: f32,
    /// How many elements are NaN or infinite on either side.
    pub non_finite: usize,
}

impl Diff {
    /// The bound `tol` puts on its metric, and that metric's value here.
    fn bound_and_value(&self, tol: Tol) -> (f64, f64) {
        match tol {
            Tol::RelL2(t) => (t, self.rel_l2),
            Tol::MaxAbs(t) => (t, self.max_abs),
            Tol::MaxAbsOfRef(t) => (t * self.ref_max, self.max_abs),
        }
    }

    /// Whether the output is within `tol` (never with a non-finite element).
    pub fn within(&self, tol: Tol) -> bool {
        let (bound, value) = self.bound_and_value(tol);
        self.non_finite == 0 && value <= bound
    }

    /// `rel_l2=... max_abs=... max|ref|=... (tol: <metric> <= ...)`, the figures a passing
    /// test prints.
    pub fn figures(&self, tol: Tol) -> String {
        let scaled = match tol {
            Tol::MaxAbsOfRef(_) => format!(" = {:.3e}", self.bound_and_value(tol).0),
            _ => String::new(),
        };
        format!(
            "rel_l2={:.3e} max_abs={:.3e} max|ref|={:.3e} (tol: {tol}{scaled})",
            self.rel_l2, self.max_abs, self.ref_max
        )
    }

    /// What a failing test says: the metric over its bound, the worst element and its index.
    pub fn failure(&self, what: &str, tol: Tol) -> String {
        let (bound, value) = self.bound_and_value(tol);
        let metric = match tol {
            Tol::RelL2(_) => "rel_l2",
            _ => "max_abs",
        };
        let non_finite = match self.non_finite {
            0 => String::new(),
            n => format!("; {n} elements NaN or infinite"),
        };
        format!(
            "{what}: {metric} {value:.3e} > {bound:.3e} ({tol}){non_finite}; worst element at \
             index {}: got {} vs reference {}",
            self.at, self.got, self.want
        )
    }
}

/// Compares `got` with the reference `want`, element for element. Panics when the lengths
/// differ: a short output is never "close".
pub fn compare(got: &[f32], want: &[f32]) -> Diff {
    assert_eq!(
        got.len(),
        want.len(),
        "output length {} vs reference length {}",
        got.len(),
        want.len()
    );
    let (mut num, mut den, mut ref_max) = (0f64, 0f64, 0f64);
    let (mut max_abs, mut at, mut non_finite) = (0f64, 0usize, 0usize);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        if w.is_finite() {
            den += f64::from(w) * f64::from(w);
            ref_max = ref_max.max(f64::from(w).abs());
        }
        let e = if g.is_finite() && w.is_finite() {
            (f64::from(g) - f64::from(w)).abs()
        } else {
            non_finite += 1;
            f64::INFINITY
        };
        num += e * e;
        // `>` keeps the first infinite error, the one to name.
        if e > max_abs {
            (max_abs, at) = (e, i);
        }
    }
    let rel_l2 = if non_finite > 0 {
        f64::INFINITY
    } else if den > 0.0 {
        (num / den).sqrt()
    } else {
        num.sqrt()
    };
    Diff {
        rel_l2,
        max_abs,
        ref_max,
        at,
        got: got.get(at).copied().unwrap_or(f32::NAN),
        want: want.get(at).copied().unwrap_or(f32::NAN),
        non_finite,
    }
}

/// Compares and judges: Ok with the figures, or Err with the failure message. For tests that
/// gather every case's failure before failing once.
pub fn check(what: &str, got: &[f32], want: &[f32], tol: Tol) -> Result<Diff, String> {
    if got.len() != want.len() {
        return Err(format!(
            "{what}: output length {} vs reference length {}",
            got.len(),
            want.len()
        ));
    }
    let d = compare(got, want);
    if d.within(tol) {
        Ok(d)
    } else {
        Err(d.failure(what, tol))
    }
}

/// Prints `what: <figures>` and panics unless `got` is within `tol` of `want`, naming the worst
/// element and its index.
pub fn assert_close(what: &str, got: &[f32], want: &[f32], tol: Tol) -> Diff {
    assert_eq!(
        got.len(),
        want.len(),
        "{what}: output length {} vs reference length {}",
        got.len(),
        want.len()
    );
    let d = compare(got, want);
    println!("{what}: {}", d.figures(tol));
    assert!(d.within(tol), "{}", d.failure(what, tol));
    d
}
