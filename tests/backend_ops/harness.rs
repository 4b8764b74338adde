//! The table's machinery: dtypes, input generators, tolerances, the NaN-safe comparator, and
//! the runner that takes every case of a family to one target and compares it with the CPU.

use hdb::rng::{fnv1a64, normals, SplitMix64};

use crate::target::{Reference, Target};

/// A storage type the cases run in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    F32,
    F16,
    Bf16,
}

pub const ALL: &[Dtype] = &[Dtype::F32, Dtype::F16, Dtype::Bf16];
/// The tensor-core kernels' types.
pub const HALF: &[Dtype] = &[Dtype::F16, Dtype::Bf16];
pub const F32_ONLY: &[Dtype] = &[Dtype::F32];
pub const F16_ONLY: &[Dtype] = &[Dtype::F16];
pub const BF16_ONLY: &[Dtype] = &[Dtype::Bf16];

impl Dtype {
    pub fn suffix(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::F16 => "f16",
            Dtype::Bf16 => "bf16",
        }
    }

    /// `v` rounded to this type and back: what a device holding it reads.
    pub fn round(self, v: f32) -> f32 {
        match self {
            Dtype::F32 => v,
            Dtype::F16 => half::f16::from_f32(v).to_f32(),
            Dtype::Bf16 => half::bf16::from_f32(v).to_f32(),
        }
    }
}

/// How a case's input is drawn.
#[derive(Clone, Debug)]
pub enum Gen {
    /// `n` normal values times `scale`, plus `offset`.
    Normal { n: usize, scale: f32, offset: f32 },
    /// `n` uniform values in [lo, hi).
    Uniform { n: usize, lo: f32, hi: f32 },
    /// These values.
    Values(Vec<f32>),
    /// One generator after another.
    Cat(Vec<Gen>),
    /// Kept f32 on every target (not rounded to the case's type): f32 scores, timesteps,
    /// adapter factors.
    F32(Box<Gen>),
}

impl Gen {
    pub fn normal(n: usize, scale: f32) -> Gen {
        Gen::Normal {
            n,
            scale,
            offset: 0.0,
        }
    }

    pub fn uniform(n: usize, lo: f32, hi: f32) -> Gen {
        Gen::Uniform { n, lo, hi }
    }

    /// This generator's values kept in f32 (see [`Gen::F32`]).
    pub fn f32(self) -> Gen {
        Gen::F32(Box::new(self))
    }

    /// How many values it draws.
    pub fn len(&self) -> usize {
        match self {
            Gen::Normal { n, .. } | Gen::Uniform { n, .. } => *n,
            Gen::Values(v) => v.len(),
            Gen::Cat(gs) => gs.iter().map(Gen::len).sum(),
            Gen::F32(g) => g.len(),
        }
    }

    /// Draws the values (f32), then rounds them to `dtype` unless kept in f32.
    fn draw(&self, rng: &mut SplitMix64, dtype: Dtype) -> Vec<f32> {
        let raw = |g: &Gen, rng: &mut SplitMix64| g.draw(rng, Dtype::F32);
        let v: Vec<f32> = match self {
            Gen::Normal { n, scale, offset } => normals(rng, *n)
                .into_iter()
                .map(|v| v as f32 * scale + offset)
                .collect(),
            Gen::Uniform { n, lo, hi } => {
                (0..*n).map(|_| lo + (hi - lo) * rng.next_f32()).collect()
            }
            Gen::Values(v) => v.clone(),
            Gen::Cat(gs) => gs.iter().flat_map(|g| raw(g, rng)).collect(),
            Gen::F32(g) => return raw(g, rng),
        };
        v.into_iter().map(|x| dtype.round(x)).collect()
    }
}

/// A tolerance: the relative L2 error ||got - want|| / ||want||, the largest |got - want|,
/// and optionally every element's |got - want| <= rel * |want| + floor.
#[derive(Clone, Copy, Debug)]
pub struct Tol {
    pub rel_l2: f64,
    pub max_abs: f64,
    pub elem: Option<(f64, f64)>,
}

impl Tol {
    pub const EXACT: Tol = Tol {
        rel_l2: 0.0,
        max_abs: 0.0,
        elem: None,
    };

    /// A bound on the relative L2 error only.
    pub const fn rel(rel_l2: f64) -> Tol {
        Tol {
            rel_l2,
            max_abs: f64::INFINITY,
            elem: None,
        }
    }

    /// Bounds on the relative L2 error and the largest absolute one.
    pub const fn both(rel_l2: f64, max_abs: f64) -> Tol {
        Tol {
            rel_l2,
            max_abs,
            elem: None,
        }
    }
}

/// A case's tolerance in each type.
#[derive(Clone, Copy, Debug)]
pub struct Tols {
    pub f32: Tol,
    pub f16: Tol,
    pub bf16: Tol,
}

impl Tols {
    pub const EXACT: Tols = Tols {
        f32: Tol::EXACT,
        f16: Tol::EXACT,
        bf16: Tol::EXACT,
    };

    pub const fn per(f32: Tol, f16: Tol, bf16: Tol) -> Tols {
        Tols { f32, f16, bf16 }
    }

    /// An op that rounds its output once to T: `f32_rel` in f32 (summation order and libm,
    /// by op), then half-precision's rounding: 1e-3 (f16) and 8e-3 (bf16) on the relative
    /// L2 error.
    pub const fn one_rounding(f32_rel: f64) -> Tols {
        Tols::per(Tol::rel(f32_rel), Tol::rel(1e-3), Tol::rel(8e-3))
    }

    /// GEMMs and convolutions: one rounding of the output; 1e-5 in f32 would catch cuBLAS
    /// running f32 GEMMs in TF32.
    pub const GEMM: Tols = Tols::one_rounding(1e-5);

    /// The tensor-core and materialised attention round P to T before P v (FlashAttention-2's
    /// precision): f16 2e-3, bf16 1.5e-2.
    pub const FLASH: Tols = Tols::per(Tol::rel(1e-5), Tol::rel(2e-3), Tol::rel(1.5e-2));

    /// An op whose result is one rounding to T of a value the CPU backend also computes in
    /// f32 or better, for outputs up to `mag` in magnitude: `f32_err`, the relative difference
    /// of the two f32 computations (summation order, libm), plus, in f16 and bf16, half an ulp
    /// of T relative (2^-11 and 2^-8; f16's subnormals round to 2^-25 absolute).
    pub fn rounding(f32_err: f64, mag: f64) -> Tols {
        let t = |half_ulp: f64, floor: f64| {
            Tol::both(half_ulp + f32_err, (half_ulp + f32_err) * mag + floor)
        };
        Tols::per(
            t(0.0, 0.0),
            t(2f64.powi(-11), 2f64.powi(-25)),
            t(2f64.powi(-8), 0.0),
        )
    }

    pub fn get(&self, d: Dtype) -> Tol {
        match d {
            Dtype::F32 => self.f32,
            Dtype::F16 => self.f16,
            Dtype::Bf16 => self.bf16,
        }
    }
}

/// Why an op gave no output.
#[derive(Debug)]
pub enum OpError {
    /// The target cannot run this op (cuBLAS under the kernel emulation, a launch-only kernel
    /// on a device): the case is counted as not run there.
    NotHere(String),
    /// The op failed.
    Hdb(hdb::Error),
    /// A property the case checks beside the values failed (a kernel choice, an untouched
    /// region).
    Check(String),
}

impl From<hdb::Error> for OpError {
    fn from(e: hdb::Error) -> Self {
        OpError::Hdb(e)
    }
}

impl std::fmt::Display for OpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpError::NotHere(m) => write!(f, "not on this target: {m}"),
            OpError::Hdb(e) => write!(f, "{e}"),
            OpError::Check(m) => write!(f, "{m}"),
        }
    }
}

pub type OpResult<T> = Result<T, OpError>;
/// A case's outputs.
pub type Out = Vec<Vec<f32>>;
type RunFn = Box<dyn Fn(&dyn Target, &[Vec<f32>]) -> OpResult<Out>>;

/// One row of the table: an op at one shape, its inputs, its tolerance per type, described
/// once and run on the CPU backend (the reference) and on every target that has the op.
pub struct OpCase {
    pub name: String,
    pub dtypes: &'static [Dtype],
    pub inputs: Vec<Gen>,
    /// Per output; the last one stands for the outputs after it.
    pub tols: Vec<Tols>,
    /// Multiply-adds (or elements, for element-wise ops): the emulations skip the largest.
    pub work: f64,
    run: RunFn,
}

impl OpCase {
    /// A case in every type, with one-rounding f32 tolerance 1e-5 until told otherwise.
    pub fn new(name: impl Into<String>) -> OpCase {
        OpCase {
            name: name.into(),
            dtypes: ALL,
            inputs: Vec::new(),
            tols: vec![Tols::one_rounding(1e-5)],
            work: 0.0,
            run: Box::new(|_, _| Ok(Vec::new())),
        }
    }

    pub fn dtypes(mut self, d: &'static [Dtype]) -> Self {
        self.dtypes = d;
        self
    }

    pub fn input(mut self, g: Gen) -> Self {
        self.inputs.push(g);
        self
    }

    pub fn tol(mut self, t: Tols) -> Self {
        self.tols = vec![t];
        self
    }

    pub fn tols(mut self, t: Vec<Tols>) -> Self {
        self.tols = t;
        self
    }

    pub fn work(mut self, w: usize) -> Self {
        self.work = w as f64;
        self
    }

    /// The op, with one output.
    pub fn run(
        mut self,
        f: impl Fn(&dyn Target, &[Vec<f32>]) -> OpResult<Vec<f32>> + 'static,
    ) -> Self {
        self.run = Box::new(move |t, i| f(t, i).map(|v| vec![v]));
        self
    }

    /// The op, with several outputs (compared one by one).
    pub fn run_outputs(
        mut self,
        f: impl Fn(&dyn Target, &[Vec<f32>]) -> OpResult<Out> + 'static,
    ) -> Self {
        self.run = Box::new(f);
        self
    }

    /// Values in all inputs.
    pub fn input_len(&self) -> usize {
        self.inputs.iter().map(Gen::len).sum()
    }

    fn tol_of(&self, output: usize, d: Dtype) -> Tol {
        self.tols[output.min(self.tols.len() - 1)].get(d)
    }
}

/// What one output's comparison found.
pub struct Compared {
    pub rel_l2: f64,
    pub max_abs: f64,
}

/// Compares `got` with `want` under `tol`: Ok with the figures, or the failure naming the
/// metric that failed, its tolerance, and the element at fault (index, got, want). NaN-safe:
/// any NaN (or an infinity the reference does not have) fails, whatever the tolerance.
pub fn compare(got: &[f32], want: &[f32], tol: &Tol) -> Result<Compared, String> {
    if got.len() != want.len() {
        return Err(format!(
            "{} values, the reference has {}",
            got.len(),
            want.len()
        ));
    }
    if let Some(i) = (0..got.len()).find(|&i| {
        let (g, w) = (got[i], want[i]);
        !(g.is_finite() && w.is_finite()) && g != w
    }) {
        return Err(format!(
            "element {i} is {} where the reference has {} (unwritten, overflowed, or NaN in)",
            got[i], want[i]
        ));
    }
    let (mut num, mut den) = (0f64, 0f64);
    let (mut max_abs, mut worst) = (0f64, 0usize);
    let mut elem: Option<(f64, usize)> = None;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let e = if g == w {
            0.0
        } else {
            (g as f64 - w as f64).abs()
        };
        num += e * e;
        den += (w as f64) * (w as f64);
        if e > max_abs {
            (max_abs, worst) = (e, i);
        }
        if let Some((rel, floor)) = tol.elem {
            let excess = e - (rel * (w as f64).abs() + floor);
            if excess > 0.0 && elem.is_none_or(|(x, _)| excess > x) {
                elem = Some((excess, i));
            }
        }
    }
    let rel_l2 = if den > 0.0 {
        (num / den).sqrt()
    } else {
        num.sqrt()
    };
    let at = |i: usize| format!("element {i}: got {}, want {}", got[i], want[i]);
    if rel_l2.is_nan() || rel_l2 > tol.rel_l2 {
        return Err(format!(
            "rel_l2 {rel_l2:.3e} > tol {:.1e}; largest error at {} (|err| {max_abs:.3e})",
            tol.rel_l2,
            at(worst)
        ));
    }
    if max_abs > tol.max_abs {
        return Err(format!(
            "max_abs {max_abs:.3e} > tol {:.1e} at {}",
            tol.max_abs,
            at(worst)
        ));
    }
    if let (Some((_, i)), Some((rel, floor))) = (elem, tol.elem) {
        return Err(format!(
            "per element |err| <= {rel:.0e} |want| + {floor:.0e} fails at {}",
            at(i)
        ));
    }
    Ok(Compared { rel_l2, max_abs })
}

/// The run's seed: `HDB_TEST_SEED` (hex) replays one; else a fresh one, printed.
pub fn run_seed(test: &str) -> u64 {
    let s = std::env::var("HDB_TEST_SEED")
        .ok()
        .and_then(|v| u64::from_str_radix(v.trim_start_matches("0x"), 16).ok())
        .unwrap_or_else(|| {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            t ^ fnv1a64(test)
        });
    println!("{test}: seed {s:#x} (HDB_TEST_SEED={s:x} replays it)");
    s
}

/// Every case's inputs for `dtype`, from the run's seed, the case's name and the type.
fn inputs(case: &OpCase, seed: u64, dtype: Dtype) -> Vec<Vec<f32>> {
    let mut rng = SplitMix64(seed ^ fnv1a64(&case.name) ^ fnv1a64(dtype.suffix()));
    case.inputs
        .iter()
        .map(|g| g.draw(&mut rng, dtype))
        .collect()
}

/// Counts of a family's run on one target.
#[derive(Default)]
pub struct Tally {
    pub compared: usize,
    pub too_big: usize,
    pub not_here: usize,
    pub failures: Vec<String>,
}

/// Runs `cases` in `dtype` on `target` against the reference, printing one line per output
/// (`<prefix> <case> <dtype> rel_l2=... max_abs=...`). `too_big(what, case)` says (and
/// prints why, where it should show) a case is left out on this target.
pub fn run_cases(
    prefix: &str,
    cases: &[OpCase],
    dtype: Dtype,
    target: &dyn Target,
    seed: u64,
    too_big: &dyn Fn(&str, &OpCase) -> bool,
    tally: &mut Tally,
) {
    let reference = Reference::new();
    for case in cases.iter().filter(|c| c.dtypes.contains(&dtype)) {
        let what = format!("{} {}", case.name, dtype.suffix());
        if too_big(&what, case) {
            tally.too_big += 1;
            continue;
        }
        let ins = inputs(case, seed, dtype);
        let got = match (case.run)(target, &ins) {
            Ok(g) => g,
            Err(OpError::NotHere(_)) => {
                tally.not_here += 1;
                continue;
            }
            Err(e) => {
                println!("{prefix} {what} FAILED: {e}");
                tally.failures.push(format!("{what}: {e}"));
                continue;
            }
        };
        let want = (case.run)(&reference, &ins)
            .unwrap_or_else(|e| panic!("{what}: the reference failed: {e}"));
        if got.len() != want.len() {
            tally.failures.push(format!(
                "{what}: {} outputs, the reference {}",
                got.len(),
                want.len()
            ));
            continue;
        }
        for (o, (g, w)) in got.iter().zip(&want).enumerate() {
            let label = if want.len() > 1 {
                format!("{what} output {o}")
            } else {
                what.clone()
            };
            let tol = case.tol_of(o, dtype);
            tally.compared += 1;
            match compare(g, w, &tol) {
                Ok(c) => println!(
                    "{prefix} {label} rel_l2={:.2e} (tol {:.0e}) max_abs={:.2e}{}",
                    c.rel_l2,
                    tol.rel_l2,
                    c.max_abs,
                    if tol.max_abs.is_finite() {
                        format!(" (tol {:.0e})", tol.max_abs)
                    } else {
                        String::new()
                    }
                ),
                Err(e) => {
                    println!("{prefix} {label} FAILED: {e}");
                    tally.failures.push(format!("{label}: {e}"));
                }
            }
        }
    }
}

/// The comparator itself: a NaN or an unmatched infinity fails whatever the tolerance, and
/// each failure names its metric, tolerance and element.
#[test]
fn the_comparator_fails_nan_and_names_the_element() {
    let loose = Tol::rel(f64::INFINITY);
    let want = [1.0, 2.0, 3.0];
    let e = compare(&[1.0, f32::NAN, 3.0], &want, &loose)
        .err()
        .expect("NaN passed");
    assert!(e.contains("element 1 is NaN"), "{e}");
    let e = compare(&[f32::NAN; 3], &want, &loose)
        .err()
        .expect("all-NaN passed");
    assert!(e.contains("element 0"), "{e}");
    let e = compare(&[1.0, f32::INFINITY, 3.0], &want, &loose)
        .err()
        .expect("inf passed");
    assert!(e.contains("element 1 is inf"), "{e}");
    let e = compare(&want, &[1.0, f32::NAN, 3.0], &loose)
        .err()
        .expect("NaN reference passed");
    assert!(e.contains("reference has NaN"), "{e}");
    let e = compare(&[1.0, 2.5, 3.0], &want, &Tol::rel(0.1))
        .err()
        .expect("rel_l2 passed");
    assert!(
        e.contains("rel_l2") && e.contains("element 1: got 2.5, want 2"),
        "{e}"
    );
    let e = compare(&[1.0, 2.0, 3.5], &want, &Tol::both(1.0, 0.25))
        .err()
        .expect("max_abs passed");
    assert!(e.contains("max_abs") && e.contains("element 2"), "{e}");
    let elem = Tol {
        elem: Some((1e-3, 0.0)),
        ..Tol::rel(1.0)
    };
    let e = compare(&[1.0, 2.0, 3.01], &want, &elem)
        .err()
        .expect("per element passed");
    assert!(e.contains("per element") && e.contains("element 2"), "{e}");
    assert!(
        compare(&[1.0, 2.0], &want, &loose).is_err(),
        "a short output passed"
    );
    let c = compare(&want, &want, &Tol::EXACT).expect("equal values");
    assert_eq!((c.rel_l2, c.max_abs), (0.0, 0.0));
}
