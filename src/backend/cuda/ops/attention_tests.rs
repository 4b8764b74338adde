//! Host tests of the attention ops' pure parts: the materialised attention's chunking and its
//! cuBLAS plan, run under cuBLAS's column-major semantics against the CPU's attention.

use super::*;

/// Host memory at fake device addresses: buffer i at (i + 1) << 40, holding f32 values
/// whatever its element size (the plan's address arithmetic is what is under test). The
/// backward's plan test (attention_backward_tests.rs) uses it too.
pub(crate) struct Mem {
    pub(crate) bufs: Vec<(u64, usize, Vec<f32>)>,
}

impl Mem {
    pub(crate) fn add(&mut self, esize: usize, v: Vec<f32>) -> u64 {
        let base = ((self.bufs.len() as u64) + 1) << 40;
        self.bufs.push((base, esize, v));
        base
    }

    /// Buffer and element index of `addr`, which must be an aligned element of a buffer.
    pub(crate) fn at(&mut self, addr: u64, what: &str) -> (&mut Vec<f32>, usize) {
        let (base, esize, v) = self
            .bufs
            .iter_mut()
            .find(|(b, e, v)| addr >= *b && addr < *b + (v.len() * *e) as u64)
            .unwrap_or_else(|| panic!("{what}: address {addr:#x} is in no buffer"));
        let off = (addr - *base) as usize;
        assert_eq!(
            off % *esize,
            0,
            "{what}: misaligned by {} bytes",
            off % *esize
        );
        (v, off / *esize)
    }

    pub(crate) fn get(&mut self, addr: u64, esize: usize, i: i64, what: &str) -> f32 {
        let (v, e) = self.at(addr + (i as u64) * esize as u64, what);
        v[e]
    }

    pub(crate) fn set(&mut self, addr: u64, esize: usize, i: i64, x: f32, what: &str) {
        let (v, e) = self.at(addr + (i as u64) * esize as u64, what);
        v[e] = x;
    }

    /// cublasGemmStridedBatchedEx's column-major semantics, in f64.
    pub(crate) fn gemm(
        &mut self,
        c: &StridedBatchedConfig<f32>,
        (a, b, cc): (u64, u64, u64),
        es: (usize, usize),
    ) {
        let g = &c.gemm;
        let (ta, tb) = (
            g.transa == cublasOperation_t::CUBLAS_OP_T,
            g.transb == cublasOperation_t::CUBLAS_OP_T,
        );
        let (ea, ec) = es;
        for batch in 0..c.batch_size as i64 {
            let (ab, bb, cb) = (
                a + (batch * c.stride_a) as u64 * ea as u64,
                b + (batch * c.stride_b) as u64 * ea as u64,
                cc + (batch * c.stride_c) as u64 * ec as u64,
            );
            for j in 0..g.n as i64 {
                for i in 0..g.m as i64 {
                    let mut acc = 0f64;
                    for l in 0..g.k as i64 {
                        let ai = if ta {
                            l + i * g.lda as i64
                        } else {
                            i + l * g.lda as i64
                        };
                        let bi = if tb {
                            j + l * g.ldb as i64
                        } else {
                            l + j * g.ldb as i64
                        };
                        acc += self.get(ab, ea, ai, "A") as f64 * self.get(bb, ea, bi, "B") as f64;
                    }
                    let ci = i + j * g.ldc as i64;
                    let old = if g.beta != 0.0 {
                        self.get(cb, ec, ci, "C")
                    } else {
                        0.0
                    };
                    let y = g.alpha as f64 * acc + g.beta as f64 * old as f64;
                    self.set(cb, ec, ci, y as f32, "C");
                }
            }
        }
    }
}

/// Runs [`attention_materialized_plan`] for storage elements of `esize` bytes on host
/// memory and compares with the CPU's attention.
fn run_plan<T: DeviceElem>(s: AttnShape, chunk: usize) {
    let esize = std::mem::size_of::<T>();
    let mut rng = crate::rng::SplitMix64(7 + chunk as u64);
    let mut randn = |n: usize| -> Vec<f32> {
        crate::rng::normals(&mut rng, n)
            .iter()
            .map(|&v| v as f32)
            .collect()
    };
    let hd = s.heads * s.head_dim;
    // Rows at their strides, with NaN between them: reading the padding would show.
    let strided = |dense: &[f32], ld: usize, rows: usize| -> Vec<f32> {
        let mut v = vec![f32::NAN; (rows - 1) * ld + hd];
        for r in 0..rows {
            v[r * ld..r * ld + hd].copy_from_slice(&dense[r * hd..(r + 1) * hd]);
        }
        v
    };
    let (q, k, v) = (
        randn(s.batch * s.lq * hd),
        randn(s.batch * s.lk * hd),
        randn(s.batch * s.lk * hd),
    );
    let mut want = vec![0f32; s.batch * s.lq * hd];
    crate::backend::cpu::attention(
        &mut want, &q, &k, &v, s.batch, s.lq, s.lk, s.heads, s.head_dim,
    );
    let per_chunk = s.heads * chunk.min(s.lq) * s.lk;
    let mut mem = Mem { bufs: Vec::new() };
    let at = MaterializedAddrs {
        q: mem.add(esize, strided(&q, s.ld_q, s.batch * s.lq)),
        k: mem.add(esize, strided(&k, s.ld_k, s.batch * s.lk)),
        v: mem.add(esize, strided(&v, s.ld_v, s.batch * s.lk)),
        out: mem.add(esize, vec![f32::NAN; (s.batch * s.lq - 1) * s.ld_o + hd]),
        scores: mem.add(4, vec![f32::NAN; per_chunk]),
        probs: mem.add(esize, vec![f32::NAN; per_chunk]),
    };
    for step in attention_materialized_plan::<T>(at, &s, chunk).expect("plan") {
        match step {
            MaterializedStep::Gemm {
                cfg,
                a,
                b,
                c,
                c_f32,
            } => mem.gemm(&cfg, (a, b, c), (esize, if c_f32 { 4 } else { esize })),
            MaterializedStep::Launch(l) => {
                assert_eq!(l.kernel, format!("softmax_rows_from_f32_{}", T::SUFFIX));
                let [Param::U64(y), Param::U64(x), Param::I64(rows), Param::I32(n)] = l.params[..]
                else {
                    panic!("softmax params {:?}", l.params)
                };
                let blocks = l.cfg.grid_dim.0 as i64 * (l.cfg.block_dim.0 as i64 / 32);
                assert!(blocks >= rows, "{blocks} warps for {rows} rows");
                let (rows, n) = (rows as usize, n as usize);
                let mut xs: Vec<f32> = (0..rows * n)
                    .map(|i| mem.get(x, 4, i as i64, "scores"))
                    .collect();
                crate::backend::cpu::softmax_rows(&mut xs, rows, n);
                for (i, p) in xs.into_iter().enumerate() {
                    mem.set(y, esize, i as i64, p, "probs");
                }
            }
        }
    }
    let mut worst = (0f32, 0usize);
    for r in 0..s.batch * s.lq {
        for c in 0..hd {
            let got = mem.get(at.out, esize, (r * s.ld_o + c) as i64, "out");
            let e = (got - want[r * hd + c]).abs();
            let e = if e.is_nan() { f32::INFINITY } else { e };
            if e > worst.0 {
                worst = (e, r * hd + c);
            }
        }
    }
    assert!(
        worst.0 <= 1e-5,
        "{s:?} chunk {chunk} ({esize}-byte elements): worst |err| {} at {}",
        worst.0,
        worst.1
    );
}

#[test]
fn the_materialized_plan_is_attention_under_cublas_semantics() {
    // Several heads (interleaved column blocks), batch 2, lq != lk, chunks of 1 row, of
    // rows that do not divide lq, and of all rows; dense and strided rows; 4- and 2-byte
    // storage (the f32 scores keep 4).
    let dense = AttnShape::dense(2, 3, 11, 7, 5);
    let strided = AttnShape {
        ld_q: 3 * 5 + 4,
        ld_k: 3 * 5 + 2,
        ld_v: 3 * 5 + 6,
        ld_o: 3 * 5 + 1,
        ..dense
    };
    for s in [dense, strided] {
        for chunk in [1, 4, 11, 100] {
            run_plan::<f32>(s, chunk);
            run_plan::<half::f16>(s, chunk);
        }
    }
}

#[test]
fn materialized_chunks_stay_within_the_budget() {
    let b = MATERIALIZED_SCORES_BYTES;
    // The VAE at 512 x 512 (4096 tokens): one chunk of every row, 64 MiB of f32 scores.
    let s = AttnShape::dense(1, 1, 4096, 4096, 512);
    assert_eq!(
        attention_materialized_chunk(&s, b),
        Some((4096, 4096 * 4096))
    );
    // At 1024 x 1024 (16384 tokens): 16 chunks of 1024 rows instead of 1 GiB at once.
    let s = AttnShape::dense(1, 1, 16384, 16384, 512);
    assert_eq!(
        attention_materialized_chunk(&s, b),
        Some((1024, 1024 * 16384))
    );
    // A row larger than the budget still makes progress, one row a chunk.
    let s = AttnShape::dense(1, 4, 10, 1 << 23, 512);
    assert_eq!(attention_materialized_chunk(&s, b), Some((1, 4 << 23)));
    // Fewer rows than fit: one chunk of all of them; empty shapes and overflow: None.
    let s = AttnShape::dense(2, 2, 3, 5, 264);
    assert_eq!(attention_materialized_chunk(&s, b), Some((3, 30)));
    assert_eq!(
        attention_materialized_chunk(&AttnShape::dense(1, 1, 0, 5, 264), b),
        None
    );
    assert_eq!(
        attention_materialized_chunk(&AttnShape::dense(1, 0, 5, 5, 264), b),
        None
    );
    let s = AttnShape {
        heads: usize::MAX,
        ..AttnShape::dense(1, 1, 5, 2, 264)
    };
    assert_eq!(attention_materialized_chunk(&s, b), None);
}
