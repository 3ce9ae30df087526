//! Measured speed of the matrix-multiply kernels on the engine's shapes, against the `gemm`
//! crate (`genlab-bench gemm`; the `gemm` column needs `--features bench-gemm`).
//!
//! Each row times what the engine pays per call: B is pre-packed weights (not timed); the
//! forward rows fold bias + ReLU into our kernel, the input-gradient rows the ReLU mask; the
//! weight-gradient rows read A = dOut's columns and B = In where they are and run Adam in the
//! epilogue. The `gemm` crate
//! gets the same work: its multiply on unpacked row-major B, then the same epilogue as a
//! separate vectorised pass (Adam through `kernels::adam_update`).

#[cfg(feature = "bench-gemm")]
use crate::kernels::{adam_update, vectorised};
use crate::kernels::{
    gemm_on, pack_b, panel_cols, tile_rows, AdamConsts, AdamRows, AdamStep, Epilogue, Kernel,
    PanelsB, StridedA,
};
use std::fmt::Write as _;
use std::time::Instant;

/// What a benchmarked multiply stands for in the engine.
#[derive(Clone, Copy, PartialEq)]
enum Role {
    /// A layer's forward pass: C = A·B + bias, ReLU.
    Forward,
    /// An input gradient through a ReLU: C = (dOut·W) masked by H > 0.
    InputGrad,
    /// A weight gradient with Adam: dW = dOutᵀ·In, dOut's columns and In read in place.
    WeightGrad,
    /// A plain product (the large "peak" case).
    Plain,
}

impl Role {
    fn label(self) -> &'static str {
        match self {
            Role::Forward => "forward, bias+ReLU",
            Role::InputGrad => "input grad, ReLU mask",
            Role::WeightGrad => "weight grad + Adam, A and B read in place",
            Role::Plain => "plain C = A·B (peak)",
        }
    }
}

const CASES: [(usize, usize, usize, Role); 13] = [
    (100, 64, 256, Role::Forward),
    (100, 256, 256, Role::Forward),
    (100, 256, 64, Role::Forward),
    (128, 128, 512, Role::Forward),
    (128, 512, 512, Role::Forward),
    (1000, 512, 512, Role::Forward),
    (50, 256, 256, Role::InputGrad),
    (100, 256, 256, Role::InputGrad),
    (128, 512, 512, Role::InputGrad),
    (64, 100, 64, Role::WeightGrad),
    (64, 100, 256, Role::WeightGrad),
    (64, 256, 512, Role::WeightGrad),
    (2048, 2048, 2048, Role::Plain),
];

use crate::kernels::hashed_values as values;

/// GFLOP/s of `f` (one m × k × n multiply per call): the median of `rounds` timings, each of
/// enough calls to last ≥ 50 ms.
fn gflops(m: usize, k: usize, n: usize, rounds: usize, mut f: impl FnMut()) -> f64 {
    let flop = 2.0 * (m * k * n) as f64;
    let start = Instant::now();
    f();
    let once = start.elapsed().as_secs_f64().max(1e-7);
    let reps = ((0.05 / once).ceil() as usize).max(1);
    let mut per_call: Vec<f64> = (0..rounds.max(1))
        .map(|_| {
            let start = Instant::now();
            for _ in 0..reps {
                f();
            }
            start.elapsed().as_secs_f64() / reps as f64
        })
        .collect();
    per_call.sort_by(f64::total_cmp);
    flop / per_call[per_call.len() / 2] / 1e9
}

/// The operands of one case, and its epilogue's buffers.
struct Operands {
    m: usize,
    k: usize,
    n: usize,
    role: Role,
    /// A, row-major m × k; for WeightGrad, dOut (k × m, row-major: batch × outputs).
    a: Vec<f32>,
    /// B row-major k × n (for the gemm crate) and packed (for ours).
    #[cfg_attr(not(feature = "bench-gemm"), allow(dead_code))]
    b: Vec<f32>,
    b_packed: Vec<f32>,
    bias: Vec<f32>,
    h: Vec<f32>,
    adam: AdamConsts,
}

impl Operands {
    fn new(m: usize, k: usize, n: usize, role: Role) -> Self {
        let b = values(k * n, 2);
        let mut b_packed = vec![0.0; k * panel_cols(n)];
        pack_b(&b, n, 1, k, n, &mut b_packed);
        let adam = AdamConsts::new(AdamStep {
            lr: 1e-6,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            t: 10,
        });
        Operands {
            m,
            k,
            n,
            role,
            a: values(m * k, 1),
            b,
            b_packed,
            bias: values(n, 3),
            h: values(m * n, 4),
            adam,
        }
    }

    /// Runs our kernel on rows r0..r1 of C, writing `c` (those rows) or θ, m, v (those rows).
    #[allow(clippy::too_many_arguments)]
    fn ours(
        &self,
        kernel: Kernel,
        (r0, r1): (usize, usize),
        c: &mut [f32],
        state: &mut [Vec<f32>; 3],
    ) {
        let (k, n, rows) = (self.k, self.n, r1 - r0);
        let a = StridedA::rows(&self.a[r0 * k..r1 * k], k);
        let b = &self.b_packed;
        match self.role {
            Role::Forward => gemm_on(
                kernel,
                rows,
                n,
                k,
                a,
                b,
                c,
                n,
                Epilogue::BiasRelu(&self.bias),
            ),
            Role::InputGrad => {
                let h = Epilogue::ReluMask(&self.h[r0 * n..r1 * n]);
                gemm_on(kernel, rows, n, k, a, b, c, n, h)
            }
            Role::Plain => gemm_on(kernel, rows, n, k, a, b, c, n, Epilogue::Store),
            Role::WeightGrad => {
                // As the engine: ∂a's columns and the input rows, both read in place.
                let a = StridedA::columns(&self.a, self.m, r0);
                let [theta, m, v] = state;
                let rows_adam = AdamRows {
                    theta,
                    m,
                    v,
                    ld: n,
                    step: self.adam,
                    packed: None,
                    transposed: None,
                    theta_in: None,
                };
                gemm_on(
                    kernel,
                    rows,
                    n,
                    k,
                    a,
                    PanelsB::rows(&self.b, n),
                    &mut [],
                    n,
                    Epilogue::Adam(rows_adam),
                );
            }
        }
    }

    /// GFLOP/s of our kernel on `threads` (1 or 2) threads: two threads split the rows of C
    /// at a whole tile.
    fn time_ours(&self, kernel: Kernel, threads: usize, rounds: usize) -> f64 {
        let (m, n) = (self.m, self.n);
        let t = tile_rows();
        let half = if threads > 1 {
            (m / 2).div_ceil(t) * t
        } else {
            m
        };
        let half = half.min(m);
        let parts = [(0, half), (half, m)];
        let mut c = vec![0.0f32; m * n];
        let mut states: [[Vec<f32>; 3]; 2] = std::array::from_fn(|p| {
            let rows = parts[p].1 - parts[p].0;
            [
                values(rows * n, 5),
                vec![0.0; rows * n],
                vec![0.0; rows * n],
            ]
        });
        gflops(m, self.k, n, rounds, || {
            let (c0, c1) = c.split_at_mut(half * n);
            let [s0, s1] = &mut states;
            if half == m {
                self.ours(kernel, parts[0], c0, s0);
                return;
            }
            std::thread::scope(|s| {
                s.spawn(|| self.ours(kernel, parts[0], c0, s0));
                self.ours(kernel, parts[1], c1, s1);
            });
        })
    }

    /// GFLOP/s of the `gemm` crate on `threads` threads, plus the epilogue as a separate pass.
    #[cfg(feature = "bench-gemm")]
    fn time_gemm_crate(&self, threads: usize, rounds: usize) -> f64 {
        let (m, k, n) = (self.m, self.k, self.n);
        let mut c = vec![0.0f32; m * n];
        let mut state = [values(m * n, 5), vec![0.0; m * n], vec![0.0; m * n]];
        let par = if threads > 1 {
            gemm::Parallelism::Rayon(threads)
        } else {
            gemm::Parallelism::None
        };
        // A(i, p): row-major m × k, or for the weight gradient dOut (k × m) read transposed.
        let (a_cs, a_rs) = if self.role == Role::WeightGrad {
            (m as isize, 1)
        } else {
            (1, k as isize)
        };
        gflops(m, k, n, rounds, || {
            // SAFETY: every pointer covers the m × n, m × k and k × n matrices at the strides
            // given (c and b are row-major m × n and k × n; a as above), and c does not
            // overlap a or b.
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    k,
                    c.as_mut_ptr(),
                    1,
                    n as isize,
                    false,
                    self.a.as_ptr(),
                    a_cs,
                    a_rs,
                    self.b.as_ptr(),
                    1,
                    n as isize,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    par,
                )
            };
            match self.role {
                Role::Plain => {}
                Role::Forward => vectorised(
                    #[inline(always)]
                    || {
                        for row in c.chunks_exact_mut(n) {
                            for (x, &b) in row.iter_mut().zip(&self.bias) {
                                *x = (*x + b).max(0.0);
                            }
                        }
                    },
                ),
                Role::InputGrad => vectorised(
                    #[inline(always)]
                    || {
                        for (x, &h) in c.iter_mut().zip(&self.h) {
                            *x = if h > 0.0 { *x } else { 0.0 };
                        }
                    },
                ),
                Role::WeightGrad => {
                    let [theta, mm, v] = &mut state;
                    adam_update(self.adam, theta, mm, v, &c);
                }
            }
        })
    }
}

fn cell(x: Option<f64>) -> String {
    x.map_or("-".to_string(), |g| format!("{g:.0}"))
}

/// A Markdown table of GFLOP/s (median of `rounds` timings, each ≥ 50 ms) for the engine's
/// shapes: our dispatched kernel on 1 and 2 threads, our AVX2 and AVX-512 kernels on one, and
/// the `gemm` crate on 1 and 2 threads (with `--features bench-gemm`).
pub fn gemm_table(rounds: usize) -> String {
    let mut s = String::new();
    let best = Kernel::best();
    let _ = writeln!(
        s,
        "GFLOP/s, median of {rounds}; ours = {best:?} kernel (tile {} rows); 2T splits C's \
         rows over two scoped threads (spawned per call).\n",
        tile_rows()
    );
    let _ = writeln!(
        s,
        "| m x k x n | what | ours 1T | ours 2T | AVX2 1T | AVX-512 1T | gemm crate 1T | gemm crate 2T |"
    );
    let _ = writeln!(s, "| --- | --- | --- | --- | --- | --- | --- | --- |");
    for (m, k, n, role) in CASES {
        let ops = Operands::new(m, k, n, role);
        let one = |kernel: Kernel| kernel.available().then(|| ops.time_ours(kernel, 1, rounds));
        let ours1 = ops.time_ours(best, 1, rounds);
        let ours2 = ops.time_ours(best, 2, rounds);
        let avx2 = if best == Kernel::Avx2 {
            Some(ours1)
        } else {
            one(Kernel::Avx2)
        };
        let avx512 = if best == Kernel::Avx512 {
            Some(ours1)
        } else {
            one(Kernel::Avx512)
        };
        #[cfg(feature = "bench-gemm")]
        let (g1, g2) = (
            cell(Some(ops.time_gemm_crate(1, rounds))),
            cell(Some(ops.time_gemm_crate(2, rounds))),
        );
        #[cfg(not(feature = "bench-gemm"))]
        let (g1, g2) = (
            "n/a (build with --features bench-gemm)".to_string(),
            "n/a".to_string(),
        );
        let _ = writeln!(
            s,
            "| {m} x {k} x {n} | {} | {} | {} | {} | {} | {g1} | {g2} |",
            role.label(),
            cell(Some(ours1)),
            cell(Some(ours2)),
            cell(avx2),
            cell(avx512),
        );
    }
    s
}

/// GFLOP/s of a 2048 × 2048 × 2048 multiply by our dispatched kernel on `threads` threads (1
/// or 2; median of 3): the machine's measured peak for other benchmarks.
pub fn sgemm_peak_gflops(threads: usize) -> f64 {
    let ops = Operands::new(2048, 2048, 2048, Role::Plain);
    ops.time_ours(Kernel::best(), threads.clamp(1, 2), 3)
}
