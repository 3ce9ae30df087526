//! Hand-fused CPU kernels for the training loops that must be fast: a packed matrix multiply
//! with the layer's bias, (leaky) ReLU or (leaky) ReLU mask folded into its output (or an Adam
//! step on each gradient tile it produces), weight packing, column sums and Adam over flat
//! buffers: one floor below the engine (`crate::mlp`), which calls them from its tasks.
//!
//! Why they exist: W1's VAE does ~99 MFLOP of matrix multiply per step on 100-row matrices. In
//! idiomatic dfdx (and in PyTorch) most of a step is per-op overhead (allocation, strided
//! elementwise loops, bias broadcasts, thread wake-ups); see `PERF.md` in the developer notes.
//! These kernels compute the same equations with no allocation inside a step.
//!
//! # The matrix multiply
//! C (m × n) = A (m × k) · B (k × n), then an [`Epilogue`] on each output element. A is read
//! in place through strides ([`StridedA`]: rows, or columns of a row-major matrix); B is read
//! in panels of [`NR`] = 16 columns: packed by [`pack_b`] (each panel k × 16 contiguous, so the
//! inner loop streams it from L1: weights), or a row-major matrix read in place, 16 columns of
//! each row ([`BLayout::Rows`]: a layer's input as ∂W's B, which would otherwise be copied
//! every step). Three inner kernels compute the same thing; [`gemm`] picks one once per process
//! ([`Kernel::best`]):
//! - AVX-512 (x86-64 with AVX-512F): a tile of [`MR_AVX512`] rows × 32 columns (two adjacent
//!   panels) in 2·MR zmm registers, A broadcast from memory; an odd last panel runs a
//!   MR × 16 variant, a last tile of at most 4 rows a 4-row one, and a last 1 or 2 rows a
//!   2 × 64 one (two rows across four panels); inner products of at most 4 terms run row by
//!   row (a tile's set-up costs more than their multiply-adds). Column tails (n % 16 ≠ 0) and
//!   the epilogue use masked loads and stores. Each tile shape runs in a never-inlined
//!   function of its own, and the epilogue reads the accumulators back from an L1 buffer: with
//!   several shapes inlined into one function, or the epilogue indexing the accumulators by
//!   the tile's run-time row count, unrelated edits made the build keep the accumulators on the
//!   stack (2x slower), and did so three times. With Adam in the epilogue (∂W) the tiles run row
//!   by row across every panel, so θ, m and v stream along their rows, and a whole tile also
//!   writes both packed copies of its new weights ([`PackedRows`] from its registers,
//!   [`Transposed`] by 8 × 8 transposes from L1).
//! - AVX2 + FMA: a tile of 5 × 16 in ten ymm registers; partial tiles finish in scalar code.
//! - portable: the same loop in plain Rust, which the compiler vectorises for its target.
//!
//! The `portable` cargo feature compiles out every x86-64 path (then the crate builds for any
//! target, e.g. aarch64).
//!
//! # Soundness
//! [`gemm`] and the packers are safe functions: at entry they `assert!` (once per call, with
//! overflow-checked arithmetic) that every slice covers every index the call will touch, then
//! run the kernels on raw pointers derived from those slices. The kernels only form addresses
//! inside these checked extents, except prefetch addresses, which are computed with
//! `wrapping_add` (a prefetch never faults and is not a memory access in Rust's model). A tile
//! past the last row re-reads the last valid row of A instead of reading past it. The AVX
//! kernels run only after run-time detection of their CPU features. [`pack_b_rows`] and
//! [`pack_weight_rows`] write through raw pointers into buffers shared by threads, so they stay
//! `unsafe fn` with their contracts in `# Safety`; so does [`PackedRows::new`], the packed copy
//! of W (and Wᵀ) that Adam's epilogue writes (its rows are checked by [`gemm`], its exclusivity
//! is the caller's contract). Every `unsafe` block says why it is sound.
//! The tests run under Miri: the portable and AVX2 paths in full, the AVX-512 path except its
//! (leaky) ReLU epilogues (Miri has no `vmaxps`/`vcmpps` on zmm). dfdx 0.13 does not build on
//! today's nightly, so Miri runs this file in a crate of its own
//! (`#[path = ".../src/kernels.rs"] mod kernels;` plus a `portable` feature).
//!
//! # Measured (GFLOP/s; `genlab-bench gemm`, 2-core AMD EPYC with AVX-512)
//! One thread, median of 5, what the engine pays per call (weights pre-packed; bias + ReLU,
//! the ReLU mask or Adam fused; for ∂W, ∂a and the input read in place, as the engine does).
//! The `gemm` crate 0.19 (stable: its AVX2 path) gets the same work with the epilogue as a
//! separate vectorised pass.
//!
//! | m × k × n | role | AVX-512 (ours) | AVX2 (ours) | `gemm` 0.19 |
//! | --- | --- | --- | --- | --- |
//! | 100 × 64 × 256 | forward | 247 | 129 | 122 |
//! | 100 × 256 × 256 | forward | 272 | 129 | 128 |
//! | 100 × 256 × 64 | forward | 266 | 130 | 129 |
//! | 128 × 512 × 512 | forward | 263 | 124 | 124 |
//! | 1000 × 512 × 512 | forward | 256 | 122 | 134 |
//! | 100 × 256 × 256 | ∂in, ReLU mask | 264 | 125 | 125 |
//! | 50 × 256 × 256 | ∂in, ReLU mask | 252 | 127 | 118 |
//! | 64 × 100 × 256 | ∂W + Adam | 226 | 100 | 113 |
//! | 64 × 256 × 512 | ∂W + Adam | 230 | 88 | 109 |
//! | 2048³ | plain | 248 | 122 | 132 |
//!
//! Conclusion: on stable Rust the `gemm` crate is as fast as our AVX2 kernel on the forward
//! and ∂in shapes (epilogue pass included) and 13-24 % faster on ∂W (it packs ∂a and h;
//! ours reads them in place, which pays on AVX-512), and our AVX-512 kernel is ~2× both on
//! every shape, so we keep our own. MR = 8 was chosen by measurement: MR = 6 was
//! 3 to 10 % slower on the 100-row shapes, MR = 10 and 12 (20 and 24 accumulators plus one
//! A pointer per row) fell to ~75 GFLOP/s; for ∂W, 4 × 64 tiles were 6 % slower than 8 × 32.
//! Two threads (rows split, threads spawned per call) only pay from about 128 × 512 × 512
//! (345 vs 263); below that the spawn costs more than it saves, so small products should run
//! on threads that already exist, or on one.
#![deny(unsafe_op_in_unsafe_fn)]

use std::cell::Cell;
use std::sync::OnceLock;

/// Columns of a B panel (one zmm or two ymm registers of floats).
pub(crate) const NR: usize = 16;
/// Rows of C one portable kernel tile computes.
pub(crate) const MR_PORTABLE: usize = 5;
/// Rows of C one AVX2 kernel tile computes (10 of the 16 ymm registers hold the tile).
pub(crate) const MR_AVX2: usize = 5;
/// Rows of C one AVX-512 kernel tile computes (2·MR of the 32 zmm registers hold the tile).
pub(crate) const MR_AVX512: usize = 8;

/// One of the inner matrix-multiply kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kernel {
    /// Plain Rust, any target.
    Portable,
    /// x86-64 with AVX2 and FMA.
    Avx2,
    /// x86-64 with AVX-512F (and AVX2, FMA, which it implies).
    Avx512,
}

impl Kernel {
    /// Every kernel, slowest first.
    pub const ALL: [Kernel; 3] = [Kernel::Portable, Kernel::Avx2, Kernel::Avx512];

    /// Whether this build and this CPU can run the kernel (checked once per process).
    pub fn available(self) -> bool {
        match self {
            Kernel::Portable => true,
            Kernel::Avx2 => cpu().avx2_fma,
            Kernel::Avx512 => cpu().avx512,
        }
    }

    /// The fastest available kernel: the one [`gemm`] runs.
    pub fn best() -> Kernel {
        let fastest = Kernel::ALL.into_iter().rev().find(|k| k.available());
        fastest.unwrap_or(Kernel::Portable)
    }

    /// Rows of C in one tile of this kernel.
    pub fn tile_rows(self) -> usize {
        match self {
            Kernel::Portable => MR_PORTABLE,
            Kernel::Avx2 => MR_AVX2,
            Kernel::Avx512 => MR_AVX512,
        }
    }
}

/// A kernel this build and this CPU can run: the x86-64 kernels exist as values only in a
/// build that compiles them, so a dispatch on it has no arm for a kernel the build lacks.
#[derive(Clone, Copy)]
enum Runnable {
    Portable,
    #[cfg(all(target_arch = "x86_64", not(feature = "portable")))]
    Avx2,
    #[cfg(all(target_arch = "x86_64", not(feature = "portable")))]
    Avx512,
}

impl Kernel {
    /// This kernel as one the build and the CPU can run, if it is.
    fn runnable(self) -> Option<Runnable> {
        match self {
            Kernel::Portable => Some(Runnable::Portable),
            #[cfg(all(target_arch = "x86_64", not(feature = "portable")))]
            Kernel::Avx2 => cpu().avx2_fma.then_some(Runnable::Avx2),
            #[cfg(all(target_arch = "x86_64", not(feature = "portable")))]
            Kernel::Avx512 => cpu().avx512.then_some(Runnable::Avx512),
            #[cfg(not(all(target_arch = "x86_64", not(feature = "portable"))))]
            Kernel::Avx2 | Kernel::Avx512 => None,
        }
    }
}

/// The CPU features the kernels use, detected once.
#[derive(Clone, Copy)]
struct Cpu {
    avx2_fma: bool,
    avx512: bool,
}

fn cpu() -> Cpu {
    static CPU: OnceLock<Cpu> = OnceLock::new();
    *CPU.get_or_init(|| {
        #[cfg(all(target_arch = "x86_64", not(feature = "portable")))]
        {
            let avx2_fma = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
            Cpu {
                avx2_fma,
                avx512: avx2_fma && is_x86_feature_detected!("avx512f"),
            }
        }
        #[cfg(not(all(target_arch = "x86_64", not(feature = "portable"))))]
        Cpu {
            avx2_fma: false,
            avx512: false,
        }
    })
}

/// Rows of C in one tile of the kernel [`gemm`] dispatches to on this CPU: the engine sizes its
/// row chunks as multiples of it.
pub(crate) fn tile_rows() -> usize {
    Kernel::best().tile_rows()
}

/// The rows a chunk of A may end at without making [`gemm`] compute rows it drops: AVX-512
/// has kernels for a last 4 and a last 1 or 2 rows (so 8t + 2 rows cost t + ¼ tiles), the
/// others compute whole tiles.
pub(crate) fn chunk_granule() -> usize {
    match Kernel::best() {
        Kernel::Avx512 => 2,
        other => other.tile_rows(),
    }
}

/// A read in place: element (i, p) is `data[i * rs + p * cs]`. A row-major matrix has
/// rs = k, cs = 1 ([`StridedA::rows`]); columns of a row-major matrix D read as the rows of A
/// (Aᵀ stored) have rs = 1, cs = D's row length ([`StridedA::columns`]).
#[derive(Clone, Copy)]
pub(crate) struct StridedA<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl<'a> StridedA<'a> {
    /// A row-major matrix with `k` columns.
    pub fn rows(data: &'a [f32], k: usize) -> Self {
        StridedA { data, rs: k, cs: 1 }
    }

    /// A = columns `c0..` of a row-major matrix D with `n` columns, transposed: A(i, p) =
    /// D(p, c0 + i). How ∂W = ∂aᵀ·h reads ∂a: the tile's broadcasts of one step p lie side
    /// by side in row p of D, so no packing is needed (measured: packing ∂aᵀ first cost W1
    /// ~2 % more than it saved). An empty view if c0 is past the end (then [`gemm`]'s bounds
    /// check refuses it).
    pub fn columns(d: &'a [f32], n: usize, c0: usize) -> Self {
        StridedA {
            data: d.get(c0..).unwrap_or(&[]),
            rs: 1,
            cs: n,
        }
    }

    /// Where row i starts.
    #[inline(always)]
    fn row_start(&self, i: usize) -> usize {
        i * self.rs
    }

    /// One past the largest index of `data` that rows 0..m, columns 0..k read, or None if it
    /// overflows: the bound [`gemm`] asserts.
    fn extent(&self, m: usize, k: usize) -> Option<usize> {
        if m == 0 || k == 0 {
            return Some(0);
        }
        (m - 1)
            .checked_mul(self.rs)?
            .checked_add((k - 1).checked_mul(self.cs)?)?
            .checked_add(1)
    }
}

/// How B lies in memory for [`gemm`]: packed by [`pack_b`], or a row-major matrix read in
/// place.
#[derive(Clone, Copy)]
pub(crate) enum BLayout {
    /// Panels of k × 16, one after another ([`pack_b`]'s layout).
    Packed,
    /// Row-major with row stride `ld`: panel q is columns 16q..16q + 16 of every row, read
    /// where they are (how ∂W reads a layer's input h: no copy). The lanes of a last partial
    /// panel read the floats after column n − 1 of each row (their products are never
    /// stored), so the slice must reach (k − 1)·ld + panel_cols(n).
    Rows { ld: usize },
}

/// The B operand of [`gemm`]: its floats and their [`BLayout`]. A plain slice is packed B.
#[derive(Clone, Copy)]
pub(crate) struct PanelsB<'a> {
    pub data: &'a [f32],
    pub layout: BLayout,
}

impl<'a> PanelsB<'a> {
    /// A row-major k × n matrix with row stride `ld`, read in place ([`BLayout::Rows`]).
    pub fn rows(data: &'a [f32], ld: usize) -> Self {
        PanelsB {
            data,
            layout: BLayout::Rows { ld },
        }
    }

    /// (panel stride, row stride) for a k-row B, or None if k · 16 overflows.
    fn strides(&self, k: usize) -> Option<(usize, usize)> {
        match self.layout {
            BLayout::Packed => Some((k.checked_mul(NR)?, NR)),
            BLayout::Rows { ld } => Some((NR, ld)),
        }
    }

    /// One past the largest index of `data` that a k × n product reads (whole panels), or
    /// None if it overflows: the bound [`gemm`] asserts.
    fn extent(&self, k: usize, n: usize) -> Option<usize> {
        if k == 0 || n == 0 {
            return Some(0);
        }
        let (ps, rs) = self.strides(k)?;
        (n.div_ceil(NR) - 1)
            .checked_mul(ps)?
            .checked_add((k - 1).checked_mul(rs)?)?
            .checked_add(NR)
    }
}

impl<'a> From<&'a [f32]> for PanelsB<'a> {
    fn from(data: &'a [f32]) -> Self {
        PanelsB {
            data,
            layout: BLayout::Packed,
        }
    }
}

impl<'a> From<&'a Vec<f32>> for PanelsB<'a> {
    fn from(data: &'a Vec<f32>) -> Self {
        PanelsB::from(data.as_slice())
    }
}

/// B as a kernel walks it: row p of panel q is the 16 floats at `data[q * ps + p * rs..]`.
#[derive(Clone, Copy)]
struct Panels<'a> {
    data: &'a [f32],
    ps: usize,
    rs: usize,
}

/// What happens to each element c = Σₚ A(i, p) B(p, j) before it is stored.
pub(crate) enum Epilogue<'a> {
    /// C(i, j) = c.
    Store,
    /// C(i, j) = c + bias(j): a linear layer.
    Bias(&'a [f32]),
    /// C(i, j) = max(c + bias(j), 0): a linear layer and its ReLU.
    BiasRelu(&'a [f32]),
    /// C(i, j) = max(c + bias(j), α·(c + bias(j))): a linear layer and its LeakyReLU with
    /// slope α in [0, 1).
    // For the GAN engine, which is being written; only the tests construct it so far.
    #[cfg_attr(not(test), allow(dead_code))]
    BiasLeaky(&'a [f32], f32),
    /// C(i, j) = c if H(i, j) > 0 else 0, H with C's layout: back-propagation through a ReLU
    /// whose output was H.
    ReluMask(&'a [f32]),
    /// C(i, j) = c if H(i, j) > 0 else α·c, H with C's layout: back-propagation through a
    /// LeakyReLU of slope α > 0 whose output was H (H has the sign of its input when α > 0).
    #[cfg_attr(not(test), allow(dead_code))]
    LeakyMask(&'a [f32], f32),
    /// c is the gradient of parameter (i, j): one Adam step on it, nothing stored in C (which
    /// may be empty).
    Adam(AdamRows<'a>),
}

/// Parameters θ and Adam's moments m, v of the m × n block that a gradient C updates in place
/// through [`Epilogue::Adam`]: parameter (i, j) is `theta[i * ld + j]` (likewise m, v). Each
/// slice must hold at least `(m − 1)·ld + n` floats ([`gemm`] asserts it); entries between the
/// rows (columns n..ld) are not touched.
pub(crate) struct AdamRows<'a> {
    pub theta: &'a mut [f32],
    pub m: &'a mut [f32],
    pub v: &'a mut [f32],
    pub ld: usize,
    pub step: AdamConsts,
    /// Where the updated parameters also go in [`pack_b`]'s layout, if anywhere.
    pub packed: Option<PackedRows>,
    /// Where they also go transposed, if anywhere: the forward pass's copy (Wᵀ's panels).
    pub transposed: Option<Transposed<'a>>,
    /// The parameters before the step, if not `theta` itself (same layout): θ is then
    /// `theta_in − update`, written to `theta`, and `theta_in` keeps the values before the step
    /// (a trainer that may undo the step keeps them there instead of copying them).
    pub theta_in: Option<&'a [f32]>,
}

/// The transposed copy of an Adam block's parameters: parameter (i, j) goes to row j, column
/// `first + i` of an n × `rows` matrix in [`pack_b`]'s panels (the layout of
/// [`pack_transposed_rows`]: W's rows `first..` into the forward pass's Wᵀ), and `finite` is
/// set to false if a value written there is NaN or infinite (else left as it is).
///
/// The AVX-512 kernel writes it from each finished tile of 8 rows, while the tile's new
/// parameters are in L1 (`gemm_on` arranges that when every tile is whole and `first` is a
/// multiple of 8); the other kernels and shapes repack the block's rows after the multiply.
/// Measured on W1 against the repack after every block: the same time with one thread,
/// −2 to −9 % with two when the cores share no cache (the copy's lines were read by the other
/// core in the last step, and every store to them waits for that core to let go of the line:
/// spread among the multiply-adds those waits overlap; back to back in a repack they did not).
pub(crate) struct Transposed<'a> {
    pub rows: PackedRows,
    pub finite: &'a Cell<bool>,
}

/// Rows `first..first + m` of a `rows` × n matrix packed as [`pack_b`] packs B (k = rows):
/// where [`Epilogue::Adam`] also stores each updated parameter (i, j), at
/// `(j / 16)·rows·16 + (first + i)·16 + j % 16`, so that the packed copy of a weight matrix is
/// written while the new values are still in registers instead of by a second pass over θ.
/// The entries of other rows, and the padding columns, are not touched.
#[derive(Clone, Copy)]
pub(crate) struct PackedRows {
    ptr: *mut f32,
    len: usize,
    first: usize,
    rows: usize,
}

impl PackedRows {
    /// # Safety
    /// `ptr..ptr + len` is a live buffer of floats, and while the [`gemm`] call that gets this
    /// runs, nobody else reads or writes its entries of rows `first..first + m` (m: the call's
    /// rows); [`gemm`] asserts that `first + m ≤ rows` and `rows · panel_cols(n) ≤ len`.
    pub unsafe fn new(ptr: *mut f32, len: usize, first: usize, rows: usize) -> PackedRows {
        PackedRows {
            ptr,
            len,
            first,
            rows,
        }
    }
}

/// Adam's update for step t, its constants folded (see [`adam_update`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct AdamConsts {
    b1: f32,
    b2: f32,
    c1: f32,
    c2: f32,
    lr_t: f32,
    inv_sqrt_bc2: f32,
    eps: f32,
}

impl AdamConsts {
    pub fn new(s: AdamStep) -> Self {
        AdamConsts {
            b1: s.beta1,
            b2: s.beta2,
            c1: 1.0 - s.beta1,
            c2: 1.0 - s.beta2,
            lr_t: s.lr / (1.0 - s.beta1.powi(s.t)),
            inv_sqrt_bc2: 1.0 / (1.0 - s.beta2.powi(s.t)).sqrt(),
            eps: s.eps,
        }
    }

    /// One parameter's step. No fused multiply-adds (Rust never contracts a·b + c on its
    /// own): the vector forms, written with separate multiplies and adds, give the same bits.
    #[inline(always)]
    fn apply(&self, g: f32, theta: &mut f32, m: &mut f32, v: &mut f32) {
        *theta = self.stepped(g, *theta, m, v);
    }

    /// θ after one step from θ = `theta` (moments updated in place; a moment that would be
    /// denormal is stored as 0, see [`flush_denormal`]).
    #[inline(always)]
    fn stepped(&self, g: f32, theta: f32, m: &mut f32, v: &mut f32) -> f32 {
        let mi = flush_denormal(self.b1 * *m + self.c1 * g);
        let vi = flush_denormal(self.b2 * *v + self.c2 * (g * g));
        *m = mi;
        *v = vi;
        theta - self.lr_t * mi / (vi.sqrt() * self.inv_sqrt_bc2 + self.eps)
    }
}

/// `x`, or +0 if it is denormal (its exponent bits are all 0): what flush-to-zero did to
/// Adam's moments. A parameter whose gradient stays 0 (a dead ReLU unit) has its first moment
/// shrink by β₁ a step, into the denormals after ~840 steps and through them for ~150 more,
/// and arithmetic on denormals costs ~100 cycles on many CPUs. The engine leaves every
/// thread's floating-point mode alone (Rust assumes the default one: code run under a changed
/// mode is undefined behaviour), so it flushes the moments it stores instead. The vector
/// kernels do the same with integer operations on the bits (`flush_avx2`, `flush_avx512`):
/// the same bits everywhere.
#[inline(always)]
pub(crate) fn flush_denormal(x: f32) -> f32 {
    if x.to_bits() & 0x7f80_0000 == 0 {
        0.0
    } else {
        x
    }
}

/// The epilogue as the kernels see it: raw pointers into the slices of an [`Epilogue`] whose
/// bounds [`gemm`] has checked, so that the kernels can copy it into every tile.
#[derive(Clone, Copy)]
enum Epi {
    Store,
    Bias(*const f32),
    BiasRelu(*const f32),
    BiasLeaky(*const f32, f32),
    ReluMask(*const f32),
    LeakyMask(*const f32, f32),
    Adam(AdamPtrs),
}

#[derive(Clone, Copy)]
struct AdamPtrs {
    theta: *mut f32,
    /// Where θ is read from (`theta` itself when updated in place).
    theta_in: *const f32,
    m: *mut f32,
    v: *mut f32,
    ld: usize,
    step: AdamConsts,
    /// [`PackedRows`]: its first float of row `first` (null: no packed copy), and the panel
    /// stride rows·16.
    packed: *mut f32,
    panel: usize,
    /// [`Transposed`] when the kernel's whole tiles write it (null: they do not): its row
    /// `first`, and the panel stride n·16 of the n × rows matrix.
    fwd: *mut f32,
    fwd_first: usize,
    fwd_panel: usize,
    /// [`Transposed::finite`], for the tiles that write the copy.
    finite: *mut bool,
}

impl AdamPtrs {
    /// Where parameter (i, j) of the call goes in the packed copy (an offset from `packed`).
    #[inline(always)]
    fn packed_at(&self, i: usize, j: usize) -> usize {
        (j / NR) * self.panel + i * NR + j % NR
    }
}

/// Where the kernels write: C's first element and row stride (unused by Adam).
#[derive(Clone, Copy)]
struct Out {
    c: *mut f32,
    ldc: usize,
}

/// Stores one finished element (i, j) through the epilogue: the scalar form of what the
/// vector kernels do in registers, used by the portable kernel and AVX2's partial tiles.
///
/// # Safety
/// (i, j) is inside the m × n result of a [`gemm`] call whose bounds were checked, and `out`,
/// `epi` come from that call.
#[inline(always)]
unsafe fn store_one(out: Out, epi: Epi, i: usize, j: usize, v: f32) {
    let at = i * out.ldc + j;
    // SAFETY: `gemm` asserted that C, H (C's layout) hold (m − 1)·ldc + n floats, the bias n
    // and θ, m, v (m − 1)·ld + n, so every offset formed here is inside its slice; the
    // slices do not overlap (they came from distinct live borrows, one of them &mut).
    unsafe {
        match epi {
            Epi::Store => *out.c.add(at) = v,
            Epi::Bias(b) => *out.c.add(at) = v + *b.add(j),
            Epi::BiasRelu(b) => *out.c.add(at) = (v + *b.add(j)).max(0.0),
            Epi::BiasLeaky(b, alpha) => {
                let y = v + *b.add(j);
                *out.c.add(at) = y.max(alpha * y);
            }
            Epi::ReluMask(h) => *out.c.add(at) = if *h.add(at) > 0.0 { v } else { 0.0 },
            Epi::LeakyMask(h, alpha) => {
                *out.c.add(at) = if *h.add(at) > 0.0 { v } else { alpha * v };
            }
            Epi::Adam(a) => {
                let at = i * a.ld + j;
                *a.theta.add(at) =
                    a.step
                        .stepped(v, *a.theta_in.add(at), &mut *a.m.add(at), &mut *a.v.add(at));
                if !a.packed.is_null() {
                    // gemm_on asserted first + m ≤ rows and rows · panel_cols(n) ≤ len.
                    *a.packed.add(a.packed_at(i, j)) = *a.theta.add(at);
                }
            }
        }
    }
}

/// Size of `n` columns rounded up to whole panels.
pub(crate) fn panel_cols(n: usize) -> usize {
    n.div_ceil(NR) * NR
}

/// Packs B (k × n), B(p, j) = `src[p * rs + j * cs]`, into `dst` as panels of [`NR`] columns
/// (panel q holds rows 0..k of columns 16q..16q+16, row after row). Columns past n are zero.
pub(crate) fn pack_b(src: &[f32], rs: usize, cs: usize, k: usize, n: usize, dst: &mut [f32]) {
    assert!(dst.len() >= k * panel_cols(n));
    if k == 0 {
        return;
    }
    for (q, panel) in dst
        .chunks_exact_mut(k * NR)
        .take(n.div_ceil(NR))
        .enumerate()
    {
        let j0 = q * NR;
        let width = NR.min(n - j0);
        for (p, row) in panel.as_chunks_mut::<NR>().0.iter_mut().enumerate() {
            if cs == 1 && width == NR {
                // A fixed-size copy, which compiles to two vector moves (not a memcpy call).
                let start = p * rs + j0;
                row.copy_from_slice(&src[start..start + NR]);
                continue;
            } else if cs == 1 {
                let start = p * rs + j0;
                row[..width].copy_from_slice(&src[start..start + width]);
            } else {
                for (jj, v) in row[..width].iter_mut().enumerate() {
                    *v = src[p * rs + (j0 + jj) * cs];
                }
            }
            row[width..].fill(0.0);
        }
    }
}

/// Writes rows `i0..` (given as `rows`, `n` values each) of a k × n matrix B into its packed
/// panels at `dst` ([`pack_b`]'s layout for the whole matrix), zero-filling the padding lanes.
///
/// # Safety
/// `dst` must point to `k · panel_cols(n)` floats, `i0 + rows.len() / n <= k`, and nothing else
/// may access these rows' entries meanwhile (other rows may be written by other threads).
pub(crate) unsafe fn pack_b_rows(rows: &[f32], i0: usize, k: usize, n: usize, dst: *mut f32) {
    for (di, row) in rows.chunks_exact(n).enumerate() {
        let i = i0 + di;
        debug_assert!(i < k);
        for (q, piece) in row.chunks(NR).enumerate() {
            // SAFETY: i < k and q < panel_cols(n) / 16, so the 16 floats at q·k·16 + i·16 lie
            // inside dst's k · panel_cols(n) (the caller's contract), and no one else touches
            // row i's entries; `piece` is a different allocation (a shared borrow).
            unsafe {
                let at = dst.add(q * k * NR + i * NR);
                if piece.len() == NR {
                    // A copy of constant size: a vector move, not a call to memcpy (this runs
                    // for every row of every layer's input and weights, every step).
                    std::ptr::copy_nonoverlapping(piece.as_ptr(), at, NR);
                } else {
                    std::ptr::copy_nonoverlapping(piece.as_ptr(), at, piece.len());
                    std::ptr::write_bytes(at.add(piece.len()), 0, NR - piece.len());
                }
            }
        }
    }
}

/// Packs rows `r0..r0 + rows.len() / inp` of a row-major weight matrix W (out × inp), given
/// as `rows`, into both packings a linear layer needs: `fwd` = the panels of Wᵀ (inp × out,
/// for the forward pass x·Wᵀ) and `bwd` = the panels of W (out × inp, for the input gradient
/// dy·W), each of [`pack_b`]'s layout.
///
/// # Safety
/// `fwd` must point to `inp · panel_cols(out)` floats and `bwd` to `out · panel_cols(inp)`,
/// and `r0 + rows.len() / inp <= out`. Only the entries of these rows are written, so threads
/// may pack disjoint row ranges of one matrix at the same time (and nothing may read those
/// entries meanwhile).
pub(crate) unsafe fn pack_weight_rows(
    rows: &[f32],
    r0: usize,
    inp: usize,
    out: usize,
    fwd: *mut f32,
    bwd: *mut f32,
) {
    // SAFETY: the caller's contract covers both.
    unsafe {
        pack_transposed_rows(rows, r0, inp, out, fwd);
        pack_b_rows(rows, r0, out, inp, bwd);
    }
}

/// The `fwd` half of [`pack_weight_rows`]: rows r0.. of W into the panels of Wᵀ (the other
/// half, W's own panels, can come from Adam's epilogue: [`PackedRows`]; this one too, from
/// whole AVX-512 tiles: [`Transposed`]). Returns whether every value is finite: the weight
/// update checks the rows it changed here, while it reads them anyway (the separate pass over
/// them it replaces had ~0.5 % of W1's profile samples).
///
/// # Safety
/// As [`pack_weight_rows`] for `fwd`.
pub(crate) unsafe fn pack_transposed_rows(
    rows: &[f32],
    r0: usize,
    inp: usize,
    out: usize,
    fwd: *mut f32,
) -> bool {
    debug_assert!(r0 + rows.len() / inp <= out);
    #[cfg(all(target_arch = "x86_64", not(feature = "portable")))]
    {
        let whole_panels = r0.is_multiple_of(NR) && (rows.len() / inp).is_multiple_of(NR);
        if Kernel::Avx2.available() && whole_panels && inp.is_multiple_of(8) {
            // SAFETY: the CPU has AVX2 + FMA; whole panels of 16 rows with inp a multiple of 8
            // is what pack_transposed_avx2 needs, and the buffer is the caller's contract.
            return unsafe { x86::pack_transposed_avx2(rows, r0, inp, fwd) };
        }
    }
    let mut finite = true;
    for (dr, row) in rows.chunks_exact(inp).enumerate() {
        let r = r0 + dr;
        // Forward panels: column r of Wᵀ lives in panel r / 16, lane r % 16.
        let base = (r / NR) * inp * NR + r % NR;
        for (p, &v) in row.iter().enumerate() {
            // SAFETY: r < out and p < inp, so the index is below inp · panel_cols(out), fwd's
            // length by the caller's contract; only this row's lane is written.
            unsafe { *fwd.add(base + p * NR) = v };
            finite &= v.is_finite();
        }
    }
    finite
}

/// C (m × n, row stride `ldc`) = A (m × k) · B (k × n, packed by [`pack_b`]), then `epi`, on
/// the fastest kernel this CPU runs ([`Kernel::best`]).
///
/// Panics (before touching anything) if a slice is too short for the shapes: A must cover
/// its m × k reads, `b` hold k · panel_cols(n) floats, `c` (unless the epilogue is Adam) and
/// a mask H hold (m − 1)·ldc + n, a bias n, Adam's slices (m − 1)·ld + n.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm<'b>(
    m: usize,
    n: usize,
    k: usize,
    a: StridedA<'_>,
    b: impl Into<PanelsB<'b>>,
    c: &mut [f32],
    ldc: usize,
    epi: Epilogue<'_>,
) {
    gemm_on(Kernel::best(), m, n, k, a, b, c, ldc, epi);
}

/// [`gemm`] on a chosen kernel (for the tests and the benchmarks). Panics if the kernel is
/// not [`Kernel::available`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_on<'b>(
    kernel: Kernel,
    m: usize,
    n: usize,
    k: usize,
    a: StridedA<'_>,
    b: impl Into<PanelsB<'b>>,
    c: &mut [f32],
    ldc: usize,
    mut epi: Epilogue<'_>,
) {
    let Some(runnable) = kernel.runnable() else {
        panic!("{kernel:?} does not run on this CPU");
    };
    if m == 0 || n == 0 {
        return;
    }
    let b = b.into();
    // The extent of C's layout (also H's): the last row's n entries.
    let c_len = (m - 1).checked_mul(ldc).and_then(|x| x.checked_add(n));
    let fits = |len: usize| c_len.is_some_and(|need| need <= len);
    assert!(
        b.extent(k, n).is_some_and(|need| need <= b.data.len()),
        "B shorter than its k × n reads (packed: k · panel_cols(n))"
    );
    let (ps, rs) = b.strides(k).unwrap_or((0, 0));
    let b = Panels {
        data: b.data,
        ps,
        rs,
    };
    assert!(
        a.extent(m, k).is_some_and(|need| need <= a.data.len()),
        "A shorter than its m × k reads"
    );
    let out = Out {
        c: c.as_mut_ptr(),
        ldc,
    };
    let bias_ok = |bias: &[f32]| assert!(bias.len() >= n, "bias shorter than n");
    let mask_ok = |h: &[f32]| assert!(fits(h.len()), "mask H shorter than (m − 1)·ldc + n");
    // The transposed copy of an Adam block: written by the kernel's tiles, or after it.
    let mut repack = false;
    // C is written by every epilogue but Adam's (which writes θ, m, v).
    let c_ok = || assert!(fits(c.len()), "C shorter than (m − 1)·ldc + n");
    let e = match &mut epi {
        Epilogue::Adam(rows) => {
            let mut ptrs = adam_ptrs(m, n, rows);
            if let Some(t) = &rows.transposed {
                transposed_ok(m, n, &t.rows);
                let whole_tiles = m.is_multiple_of(MR_AVX512)
                    && n.is_multiple_of(NR)
                    && t.rows.first.is_multiple_of(8);
                if kernel == Kernel::Avx512 && whole_tiles {
                    // Every tile has MR_AVX512 = 8 rows (m a multiple of 8: no 4-row tail) and
                    // whole panels, and its 8 rows land in one half of a 16-lane panel row.
                    ptrs.fwd = t.rows.ptr;
                    ptrs.fwd_first = t.rows.first;
                    ptrs.fwd_panel = n * NR;
                    ptrs.finite = t.finite.as_ptr();
                } else {
                    repack = true;
                }
            }
            Epi::Adam(ptrs)
        }
        Epilogue::Store => {
            c_ok();
            Epi::Store
        }
        Epilogue::Bias(bias) => {
            c_ok();
            bias_ok(bias);
            Epi::Bias(bias.as_ptr())
        }
        Epilogue::BiasRelu(bias) => {
            c_ok();
            bias_ok(bias);
            Epi::BiasRelu(bias.as_ptr())
        }
        Epilogue::BiasLeaky(bias, alpha) => {
            c_ok();
            bias_ok(bias);
            Epi::BiasLeaky(bias.as_ptr(), *alpha)
        }
        Epilogue::ReluMask(h) => {
            c_ok();
            mask_ok(h);
            Epi::ReluMask(h.as_ptr())
        }
        Epilogue::LeakyMask(h, alpha) => {
            c_ok();
            mask_ok(h);
            Epi::LeakyMask(h.as_ptr(), *alpha)
        }
    };
    // SAFETY (all arms): the asserts above cover every index the kernels form (see the module
    // docs); the pointers in `out` and `e` come from live borrows held for this whole call
    // (`c` and `epi`'s slices), mutable ones exclusive; the kernel's CPU features are present
    // (`kernel.runnable()`, checked above).
    match runnable {
        // SAFETY: as for all arms, above.
        Runnable::Portable => unsafe { gemm_portable(m, n, k, a, b, out, e) },
        #[cfg(all(target_arch = "x86_64", not(feature = "portable")))]
        // SAFETY: as for all arms, above.
        Runnable::Avx2 => unsafe { x86::gemm_avx2(m, n, k, a, b, out, e) },
        #[cfg(all(target_arch = "x86_64", not(feature = "portable")))]
        // SAFETY: as for all arms, above.
        Runnable::Avx512 => unsafe { x86::gemm_avx512::<MR_AVX512>(m, n, k, a, b, out, e) },
    }
    if let (true, Epilogue::Adam(rows)) = (repack, &epi) {
        if let Some(t) = &rows.transposed {
            // SAFETY: transposed_ok passed above, and t's contract is the caller's.
            unsafe { repack_transposed(rows.theta, m, n, rows.ld, t) };
        }
    }
}

fn panel_cols_checked(n: usize) -> Option<usize> {
    n.div_ceil(NR).checked_mul(NR)
}

/// The raw pointers of an Adam epilogue on an m × n block, after asserting that every index
/// the block touches is inside its slices (θ, m, v and θ's source: (m − 1)·ld + n; the packed
/// copy: its rows and panel_cols(n) columns).
fn adam_ptrs(m: usize, n: usize, rows: &mut AdamRows<'_>) -> AdamPtrs {
    let need = (m - 1).checked_mul(rows.ld).and_then(|x| x.checked_add(n));
    let ok = |len: usize| need.is_some_and(|need| need <= len);
    assert!(
        ok(rows.theta.len())
            && ok(rows.m.len())
            && ok(rows.v.len())
            && rows.theta_in.is_none_or(|t| ok(t.len())),
        "Adam's θ, m, v shorter than (m − 1)·ld + n"
    );
    let (packed, panel) = match rows.packed {
        None => (std::ptr::null_mut(), 0),
        Some(p) => {
            let panel = p.rows.checked_mul(NR);
            assert!(
                p.first.checked_add(m).is_some_and(|end| end <= p.rows)
                    && panel_cols_checked(n)
                        .and_then(|w| w.checked_mul(p.rows))
                        .is_some_and(|need| need <= p.len),
                "packed rows outside their buffer"
            );
            // In bounds: first < rows, so first·16 < rows·16 ≤ len.
            (p.ptr.wrapping_add(p.first * NR), panel.unwrap_or(0))
        }
    };
    let theta = rows.theta.as_mut_ptr();
    AdamPtrs {
        theta_in: rows.theta_in.map_or(theta.cast_const(), |t| t.as_ptr()),
        theta,
        m: rows.m.as_mut_ptr(),
        v: rows.v.as_mut_ptr(),
        ld: rows.ld,
        step: rows.step,
        packed,
        panel,
        fwd: std::ptr::null_mut(),
        fwd_first: 0,
        fwd_panel: 0,
        finite: std::ptr::null_mut(),
    }
}

/// Checks that the transposed copy `t` of an m × n block lies inside its buffer.
fn transposed_ok(m: usize, n: usize, t: &PackedRows) {
    assert!(
        t.first.checked_add(m).is_some_and(|end| end <= t.rows)
            && panel_cols_checked(t.rows)
                .and_then(|w| w.checked_mul(n))
                .is_some_and(|need| need <= t.len),
        "transposed rows outside their buffer"
    );
}

/// Writes the transposed copy of rows 0..m (row stride ld, n columns) of θ after their step,
/// clearing `t.finite` if one of them is not finite.
///
/// # Safety
/// `transposed_ok(m, n, &t.rows)` passed, and [`PackedRows::new`]'s contract holds for it.
unsafe fn repack_transposed(theta: &[f32], m: usize, n: usize, ld: usize, t: &Transposed<'_>) {
    let PackedRows {
        ptr, first, rows, ..
    } = t.rows;
    let finite = if ld == n {
        // SAFETY: the function's contract (rows first..first + m of the n × rows panels).
        unsafe { pack_transposed_rows(&theta[..m * n], first, n, rows, ptr) }
    } else {
        (0..m).fold(true, |all, i| {
            // SAFETY: as above, one row at a time.
            let row = unsafe {
                pack_transposed_rows(&theta[i * ld..i * ld + n], first + i, n, rows, ptr)
            };
            all & row
        })
    };
    if !finite {
        t.finite.set(false);
    }
}

/// What [`gemm`] with [`Epilogue::Adam`] does to an m × n block whose gradient is already
/// known, g(i, j) = `g[i * n + j]`: the same Adam step on every parameter (element by element
/// as the kernels' epilogue: the same bits), θ read from `theta_in` when given, the packed copy
/// written. For a layer with few inputs, whose gradient is cheaper to compute transposed.
/// Panics (before touching anything) on the bounds [`gemm`] checks, or if g is shorter than
/// m · n.
pub(crate) fn adam_block(m: usize, n: usize, g: &[f32], mut rows: AdamRows<'_>) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        m.checked_mul(n).is_some_and(|len| len <= g.len()),
        "gradient shorter than m · n"
    );
    let ptrs = adam_ptrs(m, n, &mut rows);
    if let Some(t) = &rows.transposed {
        transposed_ok(m, n, &t.rows);
    }
    let AdamRows {
        theta,
        m: mom,
        v,
        ld,
        step,
        theta_in,
        transposed,
        ..
    } = rows;
    // Rows that follow each other without gaps (ld = n: a narrow layer's block of W) are one
    // run of m · n parameters, stepped in one vectorised loop (by rows of n < 16 they were
    // scalar); otherwise row by row. Element by element either way: the same bits.
    let (runs, len, stride) = if ld == n { (1, m * n, 0) } else { (m, n, ld) };
    vectorised(
        #[inline(always)]
        || {
            for run in 0..runs {
                let r = run * stride..run * stride + len;
                let gi = &g[run * n..run * n + len];
                let (t, mm, vv) = (
                    &mut theta[r.clone()],
                    &mut mom[r.clone()],
                    &mut v[r.clone()],
                );
                match theta_in {
                    None => {
                        for j in 0..len {
                            step.apply(gi[j], &mut t[j], &mut mm[j], &mut vv[j]);
                        }
                    }
                    Some(src) => {
                        let src = &src[r];
                        for j in 0..len {
                            t[j] = step.stepped(gi[j], src[j], &mut mm[j], &mut vv[j]);
                        }
                    }
                }
            }
        },
    );
    if !ptrs.packed.is_null() {
        for i in 0..m {
            for (c, chunk) in theta[i * ld..i * ld + n].chunks(NR).enumerate() {
                // SAFETY: row i < m and columns 16c.. < n of the packed rows, which adam_ptrs
                // asserted lie inside their buffer; nobody else touches them (PackedRows::new's
                // contract).
                unsafe {
                    let dst = ptrs.packed.add(ptrs.packed_at(i, c * NR));
                    std::ptr::copy_nonoverlapping(chunk.as_ptr(), dst, chunk.len());
                }
            }
        }
    }
    if let Some(t) = &transposed {
        // SAFETY: transposed_ok passed above, and t's contract is the caller's.
        unsafe { repack_transposed(theta, m, n, ld, t) };
    }
}

/// The portable kernel: tiles of [`MR_PORTABLE`] × 16 in arrays the compiler keeps in vector
/// registers where it can.
///
/// # Safety
/// Called by [`gemm_on`] after its bounds checks, with `out` and `epi` from that call.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_portable(
    m: usize,
    n: usize,
    k: usize,
    a: StridedA<'_>,
    b: Panels<'_>,
    out: Out,
    epi: Epi,
) {
    const MR: usize = MR_PORTABLE;
    for q in 0..n.div_ceil(NR) {
        let cols = NR.min(n - q * NR);
        for i0 in (0..m).step_by(MR) {
            let rows = MR.min(m - i0);
            // Rows past m re-read the last valid row (never stored).
            let off: [usize; MR] = std::array::from_fn(|r| a.row_start((i0 + r).min(m - 1)));
            let mut acc = [[0.0f32; NR]; MR];
            for p in 0..k {
                // In bounds: gemm_on checked B's extent for whole panels.
                let at = q * b.ps + p * b.rs;
                let brow = &b.data[at..at + NR];
                for (acc_r, &o) in acc.iter_mut().zip(&off) {
                    let x = a.data[o + p * a.cs];
                    for (cv, &bv) in acc_r.iter_mut().zip(brow) {
                        *cv += x * bv;
                    }
                }
            }
            for (r, acc_r) in acc.iter().enumerate().take(rows) {
                for (jj, &v) in acc_r.iter().enumerate().take(cols) {
                    // SAFETY: i0 + r < m and q·16 + jj < n; `out`, `epi` from gemm_on.
                    unsafe { store_one(out, epi, i0 + r, q * NR + jj, v) };
                }
            }
        }
    }
}

/// The x86-64 kernels (compiled out by the `portable` feature and on other targets).
#[cfg(all(target_arch = "x86_64", not(feature = "portable")))]
mod x86 {
    use super::{store_one, Epi, Out, Panels, StridedA, MR_AVX2, NR};
    use std::arch::x86_64::*;

    /// [`super::flush_denormal`] on 8 lanes: a lane whose exponent bits are 0 becomes +0
    /// (exponent − 1 is negative only there; its sign, spread over the lane, clears it).
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn flush_avx2(x: __m256) -> __m256 {
        let bits = _mm256_castps_si256(x);
        let exponent = _mm256_and_si256(bits, _mm256_set1_epi32(0x7f80_0000));
        let tiny = _mm256_srai_epi32::<31>(_mm256_sub_epi32(exponent, _mm256_set1_epi32(1)));
        _mm256_castsi256_ps(_mm256_andnot_si256(tiny, bits))
    }

    /// [`flush_avx2`] on 16 lanes.
    #[target_feature(enable = "avx512f,avx2,fma")]
    #[inline]
    fn flush_avx512(x: __m512) -> __m512 {
        let bits = _mm512_castps_si512(x);
        let exponent = _mm512_and_si512(bits, _mm512_set1_epi32(0x7f80_0000));
        let tiny = _mm512_srai_epi32::<31>(_mm512_sub_epi32(exponent, _mm512_set1_epi32(1)));
        _mm512_castsi512_ps(_mm512_andnot_si512(tiny, bits))
    }

    /// The AVX2 + FMA kernel: tiles of 5 × 16 in ten ymm registers, 10 FMAs per k.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; called by `gemm_on` after its bounds checks, with `out` and
    /// `epi` from that call.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn gemm_avx2(
        m: usize,
        n: usize,
        k: usize,
        a: StridedA<'_>,
        b: Panels<'_>,
        out: Out,
        epi: Epi,
    ) {
        const MR: usize = MR_AVX2;
        let ap = a.data.as_ptr();
        for q in 0..n.div_ceil(NR) {
            // In bounds: gemm_on checked B's extent for whole panels.
            // Dereferenced only inside B's checked extent (k > 0 rows of whole panels).
            let panel = b.data.as_ptr().wrapping_add(q * b.ps);
            let j0 = q * NR;
            let cols = NR.min(n - j0);
            for i0 in (0..m).step_by(MR) {
                let rows = MR.min(m - i0);
                // Rows past m re-read the last valid row (never stored), so no load is out of
                // bounds and the loop has no branches.
                let off: [usize; MR] = std::array::from_fn(|r| a.row_start((i0 + r).min(m - 1)));
                if let Epi::Adam(ad) = epi {
                    // Ask for the next tile's θ, m, v now: they come from L3 while this tile's
                    // multiply-adds run. Prefetch addresses may lie past a row or a buffer
                    // (n % 16 ≠ 0): wrapping_add forms them without claiming they are in
                    // bounds, and a prefetch never faults.
                    let (ni, nq) = if i0 + MR < m {
                        (i0 + MR, q)
                    } else {
                        (0, q + 1)
                    };
                    if nq * NR < n {
                        for r in 0..MR.min(m - ni) {
                            let at = (ni + r) * ad.ld + nq * NR;
                            for base in [ad.theta, ad.m, ad.v] {
                                _mm_prefetch::<_MM_HINT_T0>(base.wrapping_add(at) as *const i8);
                                _mm_prefetch::<_MM_HINT_T0>(
                                    base.wrapping_add(at + NR - 1) as *const i8
                                );
                            }
                        }
                    }
                }
                // The first tile of a panel also asks for the next panel, one line per k, so
                // that it is in cache when the next tiles start on it.
                let mut pf = if i0 == 0 && (q + 1) * NR < n {
                    panel.wrapping_add(b.ps)
                } else {
                    panel
                };
                let mut acc = [[_mm256_setzero_ps(); 2]; MR];
                let mut pa = 0usize;
                let mut pb = panel;
                for _ in 0..k {
                    _mm_prefetch::<_MM_HINT_T0>(pf as *const i8);
                    pf = pf.wrapping_add(b.rs);
                    // SAFETY: pb walks panel q's k rows of 16 (inside B's checked extent); off[r] + pa is an
                    // element of A's checked extent (row ≤ m − 1, column < k).
                    unsafe {
                        let b0 = _mm256_loadu_ps(pb);
                        let b1 = _mm256_loadu_ps(pb.add(8));
                        for r in 0..MR {
                            let x = _mm256_broadcast_ss(&*ap.add(off[r] + pa));
                            acc[r][0] = _mm256_fmadd_ps(x, b0, acc[r][0]);
                            acc[r][1] = _mm256_fmadd_ps(x, b1, acc[r][1]);
                        }
                        pb = pb.wrapping_add(b.rs);
                    }
                    pa += a.cs;
                }
                if rows == MR && cols == NR {
                    // SAFETY: a whole tile: rows i0..i0 + 5 < m and columns j0..j0 + 16 ≤ n,
                    // inside the extents gemm_on checked for C, H, bias and θ, m, v.
                    unsafe { finish_avx2(&mut acc, out, epi, i0, j0) };
                    continue;
                }
                let mut tile = [[0.0f32; NR]; MR];
                for (row, acc_r) in tile.iter_mut().zip(&acc) {
                    // SAFETY: each row of `tile` holds 16 floats.
                    unsafe {
                        _mm256_storeu_ps(row.as_mut_ptr(), acc_r[0]);
                        _mm256_storeu_ps(row.as_mut_ptr().add(8), acc_r[1]);
                    }
                }
                for (r, row) in tile.iter().enumerate().take(rows) {
                    for (jj, &v) in row.iter().enumerate().take(cols) {
                        // SAFETY: i0 + r < m and j0 + jj < n; `out`, `epi` from gemm_on.
                        unsafe { store_one(out, epi, i0 + r, j0 + jj, v) };
                    }
                }
            }
        }
    }

    /// The epilogue of a whole 5 × 16 tile at (i0, j0), in registers, stored straight to C.
    ///
    /// # Safety
    /// AVX2 + FMA; rows i0..i0 + 5 and columns j0..j0 + 16 are inside the checked result.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn finish_avx2(
        acc: &mut [[__m256; 2]; MR_AVX2],
        out: Out,
        epi: Epi,
        i0: usize,
        j0: usize,
    ) {
        let zero = _mm256_setzero_ps();
        // SAFETY: every offset below is (i0 + r)·ld + j0 + {0, 8} with r < 5, 8 floats each:
        // inside the extents gemm_on checked (the caller's contract).
        unsafe {
            match epi {
                Epi::Store => {}
                Epi::Bias(bias) | Epi::BiasRelu(bias) | Epi::BiasLeaky(bias, _) => {
                    let b0 = _mm256_loadu_ps(bias.add(j0));
                    let b1 = _mm256_loadu_ps(bias.add(j0 + 8));
                    for acc_r in acc.iter_mut() {
                        acc_r[0] = _mm256_add_ps(acc_r[0], b0);
                        acc_r[1] = _mm256_add_ps(acc_r[1], b1);
                        match epi {
                            Epi::BiasRelu(_) => {
                                acc_r[0] = _mm256_max_ps(acc_r[0], zero);
                                acc_r[1] = _mm256_max_ps(acc_r[1], zero);
                            }
                            Epi::BiasLeaky(_, alpha) => {
                                let al = _mm256_set1_ps(alpha);
                                acc_r[0] = _mm256_max_ps(acc_r[0], _mm256_mul_ps(acc_r[0], al));
                                acc_r[1] = _mm256_max_ps(acc_r[1], _mm256_mul_ps(acc_r[1], al));
                            }
                            _ => {}
                        }
                    }
                }
                Epi::ReluMask(h) | Epi::LeakyMask(h, _) => {
                    let al = match epi {
                        Epi::LeakyMask(_, alpha) => alpha,
                        _ => 0.0,
                    };
                    let al = _mm256_set1_ps(al);
                    for (r, acc_r) in acc.iter_mut().enumerate() {
                        let hp = h.add((i0 + r) * out.ldc + j0);
                        for (half, x) in acc_r.iter_mut().enumerate() {
                            let hv = _mm256_loadu_ps(hp.add(8 * half));
                            let pos = _mm256_cmp_ps::<_CMP_GT_OQ>(hv, zero);
                            // ReLU masks with an AND (not a blend with 0·c, which is −0
                            // for c < 0): +0, as the scalar form stores.
                            *x = if matches!(epi, Epi::ReluMask(_)) {
                                _mm256_and_ps(*x, pos)
                            } else {
                                _mm256_blendv_ps(_mm256_mul_ps(*x, al), *x, pos)
                            };
                        }
                    }
                }
                Epi::Adam(a) => {
                    let s = a.step;
                    let (b1, b2) = (_mm256_set1_ps(s.b1), _mm256_set1_ps(s.b2));
                    let (c1, c2) = (_mm256_set1_ps(s.c1), _mm256_set1_ps(s.c2));
                    let lr_t = _mm256_set1_ps(s.lr_t);
                    let inv = _mm256_set1_ps(s.inv_sqrt_bc2);
                    let eps = _mm256_set1_ps(s.eps);
                    for (r, acc_r) in acc.iter().enumerate() {
                        for (h, &g) in acc_r.iter().enumerate() {
                            let at = (i0 + r) * a.ld + j0 + 8 * h;
                            let (tp, mp, vp) = (a.theta.add(at), a.m.add(at), a.v.add(at));
                            // Separate multiplies and adds, in AdamConsts::apply's order:
                            // the same bits as adam_update.
                            let mi = flush_avx2(_mm256_add_ps(
                                _mm256_mul_ps(b1, _mm256_loadu_ps(mp)),
                                _mm256_mul_ps(c1, g),
                            ));
                            let vi = flush_avx2(_mm256_add_ps(
                                _mm256_mul_ps(b2, _mm256_loadu_ps(vp)),
                                _mm256_mul_ps(c2, _mm256_mul_ps(g, g)),
                            ));
                            let den = _mm256_add_ps(_mm256_mul_ps(_mm256_sqrt_ps(vi), inv), eps);
                            let upd = _mm256_div_ps(_mm256_mul_ps(lr_t, mi), den);
                            _mm256_storeu_ps(mp, mi);
                            _mm256_storeu_ps(vp, vi);
                            let th = _mm256_sub_ps(_mm256_loadu_ps(a.theta_in.add(at)), upd);
                            _mm256_storeu_ps(tp, th);
                            if !a.packed.is_null() {
                                _mm256_storeu_ps(a.packed.add(a.packed_at(i0 + r, j0 + 8 * h)), th);
                            }
                        }
                    }
                    return;
                }
            }
            let cp = out.c.add(i0 * out.ldc + j0);
            for (r, acc_r) in acc.iter().enumerate() {
                _mm256_storeu_ps(cp.add(r * out.ldc), acc_r[0]);
                _mm256_storeu_ps(cp.add(r * out.ldc + 8), acc_r[1]);
            }
        }
    }

    /// The AVX-512 kernel: panels taken two at a time, a tile of MR × 32 in 2·MR zmm
    /// registers (2·MR FMAs per k for MR broadcasts of A and two loads of B); an odd last
    /// panel runs the MR × 16 form.
    ///
    /// # Safety
    /// The CPU has AVX-512F, AVX2 and FMA; called by `gemm_on` after its bounds checks, with
    /// `out` and `epi` from that call.
    #[target_feature(enable = "avx512f,avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn gemm_avx512<const MR: usize>(
        m: usize,
        n: usize,
        k: usize,
        a: StridedA<'_>,
        b: Panels<'_>,
        out: Out,
        epi: Epi,
    ) {
        if k <= SMALL_K && !matches!(epi, Epi::Adam(_)) {
            // SAFETY: the caller's contract.
            unsafe { small_k_avx512(m, n, k, a, b, out, epi) };
            return;
        }
        let panels = n.div_ceil(NR);
        // Rows 0..end in tiles of MR rows, the last one of at most 4 rows in a 4-row tile
        // (half the work of a full tile that computes rows it then drops): (rows in full
        // tiles, where that last 4-row tile starts).
        let split = |end: usize| -> (usize, Option<usize>) {
            if end == 0 {
                return (0, None);
            }
            let last = (end - 1) / MR * MR;
            if MR == 8 && m - last <= 4 {
                (last, Some(last))
            } else {
                (end, None)
            }
        };
        let pairs_end = panels / 2 * 2;
        if matches!(epi, Epi::Adam(_)) {
            // ∂W with Adam: tiles row by row (each 8 rows across every panel), not panel pair
            // by panel pair as below. Adam's θ, m, v (and θ's source and packed copy) then
            // stream along their rows instead of jumping a row (1 KB for 256 inputs) per tile,
            // and the tile's 8 columns of ∂a stay in L1 across the row while h streams from
            // L2. Measured on W1: one thread −2.5 %; two threads −5 %, −7 % when the cores
            // share no cache (then h and ∂a come from the other core).
            let (full, half) = split(m);
            // SAFETY (all calls): the caller's contract; the rows are < m and the panels
            // < panels (pairs below pairs_end ≤ panels, the odd one at pairs_end < panels).
            unsafe {
                tiles::<MR, 2, true>(m, n, k, a, b, out, epi, (0, full), (0, pairs_end));
                if let Some(h) = half {
                    tiles::<4, 2, true>(m, n, k, a, b, out, epi, (h, m), (0, pairs_end));
                }
                if pairs_end < panels {
                    tiles::<MR, 1, true>(m, n, k, a, b, out, epi, (0, full), (pairs_end, panels));
                    if let Some(h) = half {
                        tiles::<4, 1, true>(m, n, k, a, b, out, epi, (h, m), (pairs_end, panels));
                    }
                }
            }
            return;
        }
        let rem = m % MR;
        let m_tiles = if MR == 8 && (rem == 1 || rem == 2) {
            m - rem
        } else {
            m
        };
        let (full, half) = split(m_tiles);
        let mut q = 0;
        while q < panels {
            // Up to four panels at a time: two pairs of full tiles, then the last 1 or 2 rows
            // across all four (2 × 4 registers: as many multiply-adds in flight as a full
            // tile, so 2 rows cost a quarter of a tile; across two panels they would cost half)
            // while the panels are still in cache (after all of them, measured: no faster
            // than the 4-row kernel). A chunk of 8t + 2 rows costs t + ¼ tiles: W1's 100-row
            // batch splits 50 + 50 between the threads (`chunk_granule`).
            let group = (panels - q).min(4);
            let mut p = q;
            while p < q + group {
                let pair = p + 1 < q + group;
                // SAFETY (all calls): the caller's contract; p (and p + 1 for a pair) <
                // panels; the rows are < m.
                unsafe {
                    if pair {
                        tiles::<MR, 2, false>(m, n, k, a, b, out, epi, (0, full), (p, p + 2));
                        if let Some(h) = half {
                            tiles::<4, 2, false>(m, n, k, a, b, out, epi, (h, m_tiles), (p, p + 2));
                        }
                    } else {
                        tiles::<MR, 1, false>(m, n, k, a, b, out, epi, (0, full), (p, p + 1));
                        if let Some(h) = half {
                            tiles::<4, 1, false>(m, n, k, a, b, out, epi, (h, m_tiles), (p, p + 1));
                        }
                    }
                }
                p += if pair { 2 } else { 1 };
            }
            if m_tiles < m {
                let rows = (m_tiles, m);
                // SAFETY: the caller's contract; rows m_tiles.. < m, q + group ≤ panels.
                unsafe {
                    match group {
                        4 => tiles::<2, 4, false>(m, n, k, a, b, out, epi, rows, (q, q + 4)),
                        3 => {
                            tiles::<2, 2, false>(m, n, k, a, b, out, epi, rows, (q, q + 2));
                            tiles::<2, 1, false>(m, n, k, a, b, out, epi, rows, (q + 2, q + 3));
                        }
                        2 => tiles::<2, 2, false>(m, n, k, a, b, out, epi, rows, (q, q + 2)),
                        _ => tiles::<2, 1, false>(m, n, k, a, b, out, epi, rows, (q, q + 1)),
                    }
                }
            }
            q += group;
        }
    }

    /// The tiles of one shape, MR × 16·NP, at rows r0, r0 + MR, … < r1 of panels p0, p0 + NP,
    /// … < p1: row by row (ROWS_FIRST) or panel by panel. A function of its own, never
    /// inlined, so that each tile shape gets its registers allocated alone: inlined side by
    /// side into one function, an edit anywhere in that function has made the build put a
    /// tile's accumulators on the stack (W1 2x slower; seen three times).
    ///
    /// # Safety
    /// As [`gemm_avx512`], with r1 ≤ m and p1 ≤ the number of panels (p1 − p0 a multiple
    /// of NP).
    #[target_feature(enable = "avx512f,avx2,fma")]
    #[inline(never)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tiles<const MR: usize, const NP: usize, const ROWS_FIRST: bool>(
        m: usize,
        n: usize,
        k: usize,
        a: StridedA<'_>,
        b: Panels<'_>,
        out: Out,
        epi: Epi,
        (r0, r1): (usize, usize),
        (p0, p1): (usize, usize),
    ) {
        if ROWS_FIRST {
            for i0 in (r0..r1).step_by(MR) {
                for p in (p0..p1).step_by(NP) {
                    // SAFETY: the caller's contract (i0 < m, p + NP ≤ panels).
                    unsafe { tile_avx512::<MR, NP>(m, n, k, a, b, out, epi, p, i0) };
                }
            }
        } else {
            for p in (p0..p1).step_by(NP) {
                for i0 in (r0..r1).step_by(MR) {
                    // SAFETY: as above.
                    unsafe { tile_avx512::<MR, NP>(m, n, k, a, b, out, epi, p, i0) };
                }
            }
        }
    }

    /// Inner products this short (a layer with 1 or 2 inputs: the GAN's first layers and the
    /// input gradient of its 1- and 2-wide output layers) run row by row, one register per
    /// 16 columns: a tile's set-up (row offsets, prefetches, masks) costs more than its few
    /// multiply-adds. Measured on W2 (one thread): ~6 cycles per 16 outputs in tiles.
    const SMALL_K: usize = 4;

    /// C = A·B then the epilogue, one row and 16 columns at a time: the same multiply-adds in
    /// the same order as a tile (acc = 0, then acc = a·b + acc for p = 0..k), so the same bits.
    ///
    /// # Safety
    /// As [`gemm_avx512`]; `epi` is not Adam.
    #[target_feature(enable = "avx512f,avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn small_k_avx512(
        m: usize,
        n: usize,
        k: usize,
        a: StridedA<'_>,
        b: Panels<'_>,
        out: Out,
        epi: Epi,
    ) {
        let (ap, bp) = (a.data.as_ptr(), b.data.as_ptr());
        let zero = _mm512_setzero_ps();
        for i in 0..m {
            let row = a.row_start(i);
            let mut j0 = 0;
            while j0 < n {
                let q = j0 / NR;
                let cols = (n - j0).min(NR);
                let mask: __mmask16 = if cols == NR {
                    0xFFFF
                } else {
                    (1u16 << cols) - 1
                };
                // SAFETY: row i < m and p < k are inside A's checked extent; row p of panel
                // q < panels inside B's; (i, j0..j0 + cols) inside C's, H's and the bias's
                // (masked lanes are neither read nor written).
                unsafe {
                    let mut acc = zero;
                    for p in 0..k {
                        let x = _mm512_set1_ps(*ap.add(row + p * a.cs));
                        let bv = _mm512_loadu_ps(bp.add(q * b.ps + p * b.rs));
                        acc = _mm512_fmadd_ps(x, bv, acc);
                    }
                    finish_register(out, epi, acc, mask, i * out.ldc + j0, j0);
                }
                j0 += NR;
            }
        }
    }

    /// One MR × 16·NP tile of C at rows i0.., panels q..q + NP, epilogue included.
    ///
    /// # Safety
    /// As [`gemm_avx512`], with i0 < m and q + NP ≤ the number of panels.
    #[target_feature(enable = "avx512f,avx2,fma")]
    #[inline]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile_avx512<const MR: usize, const NP: usize>(
        m: usize,
        n: usize,
        k: usize,
        a: StridedA<'_>,
        b: Panels<'_>,
        out: Out,
        epi: Epi,
        q: usize,
        i0: usize,
    ) {
        let ap = a.data.as_ptr();
        // Dereferenced only inside B's checked extent (k > 0 rows of whole panels).
        let panel = b.data.as_ptr().wrapping_add(q * b.ps);
        let j0 = q * NR;
        let rows = MR.min(m - i0);
        // Rows past m re-read the last valid row (never stored).
        let off: [usize; MR] = std::array::from_fn(|r| a.row_start((i0 + r).min(m - 1)));
        // The first tile of a panel pair asks for the next pair, one line per k and panel
        // (addresses only prefetched: wrapping_add, no bounds claim).
        let ahead = if i0 == 0 && q + NP < n.div_ceil(NR) {
            NP * b.ps
        } else {
            0
        };
        let mut acc = [[_mm512_setzero_ps(); NP]; MR];
        let mut pa = 0usize;
        let mut pb = panel;
        for _ in 0..k {
            // SAFETY: pb walks row p of panels q..q + NP (inside b: q + NP ≤ panels); off[r] +
            // pa is an element of A's checked extent (row ≤ m − 1, column < k).
            unsafe {
                let bv: [__m512; NP] = std::array::from_fn(|h| _mm512_loadu_ps(pb.add(h * b.ps)));
                for h in 0..NP {
                    _mm_prefetch::<_MM_HINT_T0>(pb.wrapping_add(ahead + h * b.ps) as *const i8);
                }
                for r in 0..MR {
                    let x = _mm512_set1_ps(*ap.add(off[r] + pa));
                    for h in 0..NP {
                        acc[r][h] = _mm512_fmadd_ps(x, bv[h], acc[r][h]);
                    }
                }
                pb = pb.wrapping_add(b.rs);
            }
            pa += a.cs;
        }
        // The accumulators go to a buffer in L1 and the epilogue reads them from there: its
        // loops run over the tile's rows < m, a run-time count, and indexing `acc` by it made
        // the compiler keep all of `acc` in memory through the k-loop whenever it chose not to
        // unroll those loops (builds of the same code differed by 2x). Only constant loops
        // touch `acc`.
        let mut done = TileBuf([0.0; TILE_MAX]);
        let slot = |r: usize, h: usize| (r * NP + h) * NR;
        for (r, acc_r) in acc.iter().enumerate() {
            for (h, &x) in acc_r.iter().enumerate() {
                // SAFETY: MR · NP ≤ 16 registers of 16 floats fit the buffer (asserted at
                // compile time below).
                unsafe { _mm512_store_ps(done.0.as_mut_ptr().add(slot(r, h)), x) };
            }
        }
        const { assert!(MR * NP * NR <= TILE_MAX) };
        // SAFETY: as above.
        let val = |r: usize, h: usize| unsafe { _mm512_load_ps(done.0.as_ptr().add(slot(r, h))) };
        // Lanes of each panel that hold columns < n.
        let masks: [__mmask16; NP] = std::array::from_fn(|h| {
            let cols = (n - j0 - NR * h).min(NR);
            if cols == NR {
                0xFFFF
            } else {
                (1u16 << cols) - 1
            }
        });
        // SAFETY: rows i0..i0 + rows < m; the masked loads and stores touch only columns < n
        // of panels q..q + NP (unmasked lanes); every offset formed is that of an element
        // (i, j) with i < m, j < n of C, H, bias or θ, m, v: inside the extents gemm_on checked.
        unsafe {
            if let Epi::Adam(ad) = epi {
                let s = ad.step;
                let (b1, b2) = (_mm512_set1_ps(s.b1), _mm512_set1_ps(s.b2));
                let (c1, c2) = (_mm512_set1_ps(s.c1), _mm512_set1_ps(s.c2));
                let lr_t = _mm512_set1_ps(s.lr_t);
                let inv = _mm512_set1_ps(s.inv_sqrt_bc2);
                let eps = _mm512_set1_ps(s.eps);
                for r in 0..rows {
                    for (h, &mk) in masks.iter().enumerate() {
                        let g = val(r, h);
                        let at = (i0 + r) * ad.ld + j0 + NR * h;
                        let (tp, mp, vp) = (ad.theta.add(at), ad.m.add(at), ad.v.add(at));
                        // Separate multiplies and adds, in AdamConsts::apply's order: the
                        // same bits as adam_update.
                        let mi = flush_avx512(_mm512_add_ps(
                            _mm512_mul_ps(b1, _mm512_maskz_loadu_ps(mk, mp)),
                            _mm512_mul_ps(c1, g),
                        ));
                        let vi = flush_avx512(_mm512_add_ps(
                            _mm512_mul_ps(b2, _mm512_maskz_loadu_ps(mk, vp)),
                            _mm512_mul_ps(c2, _mm512_mul_ps(g, g)),
                        ));
                        let den = _mm512_add_ps(_mm512_mul_ps(_mm512_sqrt_ps(vi), inv), eps);
                        let upd = _mm512_div_ps(_mm512_mul_ps(lr_t, mi), den);
                        _mm512_mask_storeu_ps(mp, mk, mi);
                        _mm512_mask_storeu_ps(vp, mk, vi);
                        let th = _mm512_maskz_loadu_ps(mk, ad.theta_in.add(at));
                        let th = _mm512_sub_ps(th, upd);
                        _mm512_mask_storeu_ps(tp, mk, th);
                        if !ad.packed.is_null() {
                            // The copy the ∂h pass reads (packed panels).
                            let pp = ad.packed.add((q + h) * ad.panel + (i0 + r) * NR);
                            _mm512_mask_storeu_ps(pp, mk, th);
                        }
                    }
                }
                if !ad.fwd.is_null() {
                    // The forward pass's copy (Wᵀ's panels), from the rows just stored (in
                    // L1), 8 × 8 at a time: gemm_on set `fwd` only when every tile is whole
                    // (8 rows, 16·NP columns ≤ n) and fwd_first + i0 is a multiple of 8.
                    let o = ad.fwd_first + i0;
                    let panel = ad.fwd.add(o / NR * ad.fwd_panel + o % NR);
                    let mut bad = _mm256_setzero_ps();
                    for c in (0..NR * NP).step_by(8) {
                        let col = j0 + c;
                        let src = ad.theta.add(i0 * ad.ld + col);
                        bad = _mm256_or_ps(bad, transpose_8x8(src, ad.ld, panel.add(col * NR)));
                    }
                    let all_finite =
                        _mm256_testz_si256(_mm256_castps_si256(bad), _mm256_castps_si256(bad));
                    if all_finite == 0 {
                        *ad.finite = false;
                    }
                }
                return;
            }
            for r in 0..rows {
                for (h, &mk) in masks.iter().enumerate() {
                    let col = j0 + NR * h;
                    finish_register(out, epi, val(r, h), mk, (i0 + r) * out.ldc + col, col);
                }
            }
        }
    }

    /// One register of finished sums x, C's 16 columns from `col` (lanes outside `mask` left
    /// alone) at offset `at` of C (and H): the epilogue applied (bias, (leaky) ReLU, or the
    /// (leaky) ReLU's mask from H; Store and Adam store x as it is) and stored. Shared by the
    /// tiles and the row-by-row short products.
    ///
    /// # Safety
    /// AVX-512F; the masked lanes of C and H at `at` and of the bias at `col` are inside the
    /// extents `gemm_on` checked for this call's `out` and `epi`.
    #[target_feature(enable = "avx512f,avx2,fma")]
    #[inline]
    unsafe fn finish_register(
        out: Out,
        epi: Epi,
        x: __m512,
        mask: __mmask16,
        at: usize,
        col: usize,
    ) {
        let zero = _mm512_setzero_ps();
        // SAFETY: the function's contract (masked lanes only).
        unsafe {
            let with_bias =
                |bias: *const f32| _mm512_add_ps(x, _mm512_maskz_loadu_ps(mask, bias.add(col)));
            let positive = |hm: *const f32| {
                _mm512_cmp_ps_mask::<_CMP_GT_OQ>(_mm512_maskz_loadu_ps(mask, hm.add(at)), zero)
            };
            let y = match epi {
                Epi::Store | Epi::Adam(_) => x,
                Epi::Bias(bias) => with_bias(bias),
                Epi::BiasRelu(bias) => _mm512_max_ps(with_bias(bias), zero),
                Epi::BiasLeaky(bias, alpha) => {
                    let y = with_bias(bias);
                    _mm512_max_ps(y, _mm512_mul_ps(y, _mm512_set1_ps(alpha)))
                }
                Epi::ReluMask(hm) => _mm512_maskz_mov_ps(positive(hm), x),
                Epi::LeakyMask(hm, alpha) => {
                    _mm512_mask_blend_ps(positive(hm), _mm512_mul_ps(x, _mm512_set1_ps(alpha)), x)
                }
            };
            _mm512_mask_storeu_ps(out.c.add(at), mask, y);
        }
    }

    /// Floats of the largest tile (MR · NP ≤ 16 registers).
    const TILE_MAX: usize = 16 * NR;

    /// A finished tile's accumulators, aligned for whole-register stores.
    #[repr(C, align(64))]
    struct TileBuf([f32; TILE_MAX]);

    /// The forward panels of `pack_weight_rows` for whole panels of 16 rows, by 8 × 8 block
    /// transposes in registers.
    ///
    /// # Safety
    /// AVX2 + FMA; `rows.len() / inp` and `r0` are multiples of 16, inp a multiple of 8, and
    /// `fwd` points to `inp · panel_cols(out)` floats with r0 + rows.len() / inp ≤ out.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn pack_transposed_avx2(
        rows: &[f32],
        r0: usize,
        inp: usize,
        fwd: *mut f32,
    ) -> bool {
        let src = rows.as_ptr();
        let mut bad = _mm256_setzero_ps();
        for pr in (0..rows.len() / inp).step_by(NR) {
            // SAFETY: panel (r0 + pr) / 16 < panel_cols(out) / 16 holds inp · 16 floats of
            // fwd; the loads read rows pr.. pr + 16 (< rows.len() / inp), columns p..p + 8 ≤
            // inp, of `rows`.
            unsafe {
                let panel = fwd.add((r0 + pr) / NR * inp * NR);
                for half in 0..2 {
                    let base = src.add((pr + 8 * half) * inp);
                    for p in (0..inp).step_by(8) {
                        let x = transpose_8x8(base.add(p), inp, panel.add(p * NR + 8 * half));
                        bad = _mm256_or_ps(bad, x);
                    }
                }
            }
        }
        // All bits zero: every value was finite.
        _mm256_testz_si256(_mm256_castps_si256(bad), _mm256_castps_si256(bad)) == 1
    }

    /// The 8 × 8 block at `src` (row stride `ld`) transposed into a forward panel: column c's
    /// 8 values (rows 0..8) at `dst + 16·c`. Returns the OR of x − x over the 64 values: 0 for
    /// a finite x and NaN for ±∞ or NaN, so it has a set bit exactly when one of them is not
    /// finite. The repack's step, and the AVX-512 Adam epilogue's for a whole tile.
    ///
    /// # Safety
    /// AVX2; 8 floats at src + a·ld (a < 8) readable, 8 at dst + 16·c (c < 8) writable.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    pub(super) unsafe fn transpose_8x8(src: *const f32, ld: usize, dst: *mut f32) -> __m256 {
        // SAFETY: the function's contract.
        unsafe {
            let r: [__m256; 8] = std::array::from_fn(|a| _mm256_loadu_ps(src.add(a * ld)));
            let mut bad = _mm256_setzero_ps();
            for x in r {
                bad = _mm256_or_ps(bad, _mm256_sub_ps(x, x));
            }
            let t0 = _mm256_unpacklo_ps(r[0], r[1]);
            let t1 = _mm256_unpackhi_ps(r[0], r[1]);
            let t2 = _mm256_unpacklo_ps(r[2], r[3]);
            let t3 = _mm256_unpackhi_ps(r[2], r[3]);
            let t4 = _mm256_unpacklo_ps(r[4], r[5]);
            let t5 = _mm256_unpackhi_ps(r[4], r[5]);
            let t6 = _mm256_unpacklo_ps(r[6], r[7]);
            let t7 = _mm256_unpackhi_ps(r[6], r[7]);
            let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
            let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
            let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
            let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
            let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
            let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
            let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
            let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
            let cols = [
                _mm256_permute2f128_ps::<0x20>(u0, u4),
                _mm256_permute2f128_ps::<0x20>(u1, u5),
                _mm256_permute2f128_ps::<0x20>(u2, u6),
                _mm256_permute2f128_ps::<0x20>(u3, u7),
                _mm256_permute2f128_ps::<0x31>(u0, u4),
                _mm256_permute2f128_ps::<0x31>(u1, u5),
                _mm256_permute2f128_ps::<0x31>(u2, u6),
                _mm256_permute2f128_ps::<0x31>(u3, u7),
            ];
            for (c, col) in cols.into_iter().enumerate() {
                _mm256_storeu_ps(dst.add(c * NR), col);
            }
            bad
        }
    }
}

/// Runs `f` compiled for AVX-512 where the CPU has it (so its loops vectorise 16 wide), else
/// for AVX2 + FMA (8 wide), else as plain code. Element by element the same operations (no
/// reduction is reordered and no multiply-add contracted), so the same bits at every width;
/// 16 wide took W1 ~1 % less time than 8 (one thread).
#[inline(always)]
pub(crate) fn vectorised<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(all(target_arch = "x86_64", not(feature = "portable")))]
    {
        if Kernel::Avx512.available() {
            /// # Safety
            /// The CPU has AVX-512F, AVX2 and FMA.
            #[target_feature(enable = "avx512f,avx2,fma")]
            unsafe fn widest<R>(f: impl FnOnce() -> R) -> R {
                f()
            }
            // SAFETY: the CPU has AVX-512F, AVX2 and FMA (detected at run time).
            return unsafe { widest(f) };
        }
        if Kernel::Avx2.available() {
            /// # Safety
            /// The CPU has AVX2 and FMA.
            #[target_feature(enable = "avx2,fma")]
            unsafe fn wide<R>(f: impl FnOnce() -> R) -> R {
                f()
            }
            // SAFETY: the CPU has AVX2 and FMA (detected at run time).
            return unsafe { wide(f) };
        }
    }
    f()
}

/// db(j) = Σᵢ dY(i, j0 + j) for j < db.len(): bias gradients, column sums of an output
/// gradient dY with n columns.
pub(crate) fn column_sums(dy: &[f32], n: usize, j0: usize, db: &mut [f32]) {
    vectorised(
        #[inline(always)]
        || {
            db.fill(0.0);
            let w = db.len();
            for row in dy.chunks_exact(n) {
                for (d, &v) in db.iter_mut().zip(&row[j0..j0 + w]) {
                    *d += v;
                }
            }
        },
    )
}

/// Adam's settings and step count, for [`adam_update`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct AdamStep {
    /// Learning rate.
    pub lr: f32,
    /// First-moment decay β₁.
    pub beta1: f32,
    /// Second-moment decay β₂.
    pub beta2: f32,
    /// ε added to √v̂.
    pub eps: f32,
    /// This step's number t, from 1.
    pub t: i32,
}

/// One Adam step on a slice of parameters with gradient g:
/// m ← β₁ m + (1 − β₁) g,  v ← β₂ v + (1 − β₂) g²,
/// θ ← θ − lr/(1 − β₁ᵗ) · m / (√v / √(1 − β₂ᵗ) + ε)  (PyTorch's arrangement).
pub(crate) fn adam_update(
    s: AdamConsts,
    theta: &mut [f32],
    m: &mut [f32],
    v: &mut [f32],
    g: &[f32],
) {
    vectorised(
        #[inline(always)]
        || {
            let n = theta.len();
            let (m, v, g) = (&mut m[..n], &mut v[..n], &g[..n]);
            for i in 0..n {
                s.apply(g[i], &mut theta[i], &mut m[i], &mut v[i]);
            }
        },
    )
}

/// `n` reproducible values in [−½, ½) from a multiplicative hash of (index, seed): operands for
/// the kernels' tests and benchmarks, with no random generator.
pub(crate) fn hashed_values(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let h = (i as u32 ^ seed).wrapping_mul(2_654_435_761);
            (h >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::hashed_values as values;
    use super::*;

    fn naive(m: usize, n: usize, k: usize, a: &[f32], b: &[f32]) -> Vec<f32> {
        let mut c = vec![0.0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0.0f64;
                for p in 0..k {
                    s += a[i * k + p] as f64 * b[p * n + j] as f64;
                }
                c[i * n + j] = s as f32;
            }
        }
        c
    }

    /// The kernels this machine runs; natively on an AVX-512 CPU, all three. Under Miri,
    /// `is_x86_feature_detected!` reports the compile-time target features, so
    /// `RUSTFLAGS="-C target-feature=+avx2,+fma"` adds the AVX2 kernel.
    fn kernels() -> Vec<Kernel> {
        let ks: Vec<Kernel> = Kernel::ALL.into_iter().filter(|k| k.available()).collect();
        if cfg!(miri) {
            // Miri runs once per kernel (portable, +avx2, +avx512f: see `fn miri` in
            // xtask): each run tests the newest kernel it enables; the others have their run.
            ks.last().copied().into_iter().collect()
        } else {
            ks
        }
    }

    /// (m, n, k): whole and partial tiles of every kernel (for AVX-512 last rows 1 and 2, which
    /// run its 2-row kernel on groups of 4, 3, 2 and 1 panels, 4, which runs its 4-row kernel,
    /// and 5 and 6), an odd and an even number of panels, n % 16 ≠ 0, k = 0.
    fn shapes() -> Vec<(usize, usize, usize)> {
        let mut s = vec![
            (2, 64, 5),
            (10, 40, 6),
            (1, 1, 1),
            (7, 8, 3),
            (13, 40, 17),
            (6, 16, 0),
            (10, 48, 5),
            (9, 32, 4),
        ];
        if !cfg!(miri) {
            s.extend([(50, 256, 64), (33, 70, 31), (100, 64, 40)]);
        }
        s
    }

    const ALPHA: f32 = 0.2;

    fn epilogue<'a>(ei: usize, bias: &'a [f32], h: &'a [f32]) -> Epilogue<'a> {
        match ei {
            0 => Epilogue::Store,
            1 => Epilogue::Bias(bias),
            2 => Epilogue::BiasRelu(bias),
            3 => Epilogue::BiasLeaky(bias, ALPHA),
            4 => Epilogue::ReluMask(h),
            _ => Epilogue::LeakyMask(h, ALPHA),
        }
    }

    fn expected(ei: usize, w: f32, bias: f32, h: f32) -> f32 {
        match ei {
            0 => w,
            1 => w + bias,
            2 => (w + bias).max(0.0),
            3 => (w + bias).max(ALPHA * (w + bias)),
            4 => {
                if h > 0.0 {
                    w
                } else {
                    0.0
                }
            }
            _ => {
                if h > 0.0 {
                    w
                } else {
                    ALPHA * w
                }
            }
        }
    }

    #[test]
    fn every_kernel_matches_the_definition_for_every_shape_layout_and_epilogue() {
        let ks = kernels();
        // (`is_x86_feature_detected!` exists on x86 only: a `cfg!` beside it would not do.)
        #[cfg(all(target_arch = "x86_64", not(feature = "portable"), not(miri)))]
        if is_x86_feature_detected!("avx512f") {
            assert_eq!(ks.len(), 3, "this CPU should run all three kernels");
        }
        // Under Miri too: the kernels enabled at compile time are the ones tested.
        let x86 = cfg!(all(target_arch = "x86_64", not(feature = "portable")));
        if x86 && cfg!(all(target_feature = "avx2", target_feature = "fma")) {
            assert!(Kernel::Avx2.available());
            assert!(ks.contains(&Kernel::Avx2) || ks.contains(&Kernel::Avx512));
        }
        if x86 && cfg!(target_feature = "avx512f") {
            assert!(Kernel::Avx512.available() && ks.contains(&Kernel::Avx512));
        }
        for (si, (m, n, k)) in shapes().into_iter().enumerate() {
            let a = values(m * k, 1);
            let b = values(k * n, 2);
            let bias = values(n, 3);
            let h = values(m * n, 4);
            let mut packed = vec![0.0; k * panel_cols(n)];
            pack_b(&b, n, 1, k, n, &mut packed);
            let want = naive(m, n, k, &a, &b);
            // Aᵀ stored, read in place or packed, gives the same product.
            let mut at = vec![0.0; m * k];
            for i in 0..m {
                for p in 0..k {
                    at[p * m + i] = a[i * k + p];
                }
            }
            let layouts = [StridedA::rows(&a, k), StridedA::columns(&at, m, 0)];
            // B read in place: rows of stride n + 3 whose gaps, and the floats after the last
            // row's panels, are NaN: a lane past n never reaches C.
            let ld = n + 3;
            let mut b_rows = vec![f32::NAN; k.saturating_sub(1) * ld + panel_cols(n)];
            for p in 0..k {
                b_rows[p * ld..p * ld + n].copy_from_slice(&b[p * n..(p + 1) * n]);
            }
            let b_layouts = [PanelsB::from(&packed), PanelsB::rows(&b_rows, ld)];
            for &kernel in &ks {
                for (li, (&av, &bv)) in layouts
                    .iter()
                    .flat_map(|a| b_layouts.iter().map(move |b| (a, b)))
                    .enumerate()
                {
                    for ei in 0..6 {
                        // Miri implements neither vmaxps nor vcmpps (zmm): the AVX-512
                        // (leaky) ReLU epilogues are tested natively only.
                        if cfg!(miri) && kernel == Kernel::Avx512 && (2..6).contains(&ei) {
                            continue;
                        }
                        // Under Miri (~10⁴ times slower) each shape runs 3 of the 24 layout
                        // and epilogue pairs, and the 8 shapes together run each pair once:
                        // every code path and tail case, not every combination (natively,
                        // all of them).
                        if cfg!(miri) && (li * 6 + ei) % 8 != si % 8 {
                            continue;
                        }
                        let mut c = vec![f32::NAN; m * n];
                        let epi = epilogue(ei, &bias, &h);
                        gemm_on(kernel, m, n, k, av, bv, &mut c, n, epi);
                        for (idx, (&got, &w)) in c.iter().zip(&want).enumerate() {
                            let expect = expected(ei, w, bias[idx % n], h[idx]);
                            assert!(
                                (got - expect).abs() <= 1e-5 * (1.0 + expect.abs()),
                                "{kernel:?} m={m} n={n} k={k} layouts#{li} epi#{ei} [{idx}]: \
                                 {got} vs {expect}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn strided_c_leaves_the_gaps_alone() {
        let (m, n, k, ldc) = (11, 37, 6, 45);
        let a = values(m * k, 11);
        let b = values(k * n, 12);
        let mut packed = vec![0.0; k * panel_cols(n)];
        pack_b(&b, n, 1, k, n, &mut packed);
        let want = naive(m, n, k, &a, &b);
        for kernel in kernels() {
            // Exactly (m − 1)·ldc + n long: the last row's gap is not there at all.
            let mut c = vec![7.0f32; (m - 1) * ldc + n];
            let a_rows = StridedA::rows(&a, k);
            gemm_on(
                kernel,
                m,
                n,
                k,
                a_rows,
                &packed,
                &mut c,
                ldc,
                Epilogue::Store,
            );
            for i in 0..m {
                for j in 0..ldc.min(c.len() - i * ldc) {
                    let got = c[i * ldc + j];
                    if j < n {
                        assert!((got - want[i * n + j]).abs() <= 1e-5, "{kernel:?}");
                    } else {
                        assert_eq!(got, 7.0, "{kernel:?} wrote a gap");
                    }
                }
            }
        }
    }

    #[test]
    fn weight_gradient_reads_a_block_of_columns_in_place() {
        // dW = dOutᵀ·In for output rows c0..c0 + m: A is columns c0.. of dOut (batch × out),
        // read where they are; In (batch × 32) is read in place too, as the engine does.
        let (batch, out, inp, c0, m) = (if cfg!(miri) { 7 } else { 37 }, 29, 32, 3, 19);
        let d_out = values(batch * out, 21);
        let input = values(batch * inp, 22);
        let mut a = vec![0.0; m * batch];
        for i in 0..m {
            for p in 0..batch {
                a[i * batch + p] = d_out[p * out + c0 + i];
            }
        }
        let want = naive(m, inp, batch, &a, &input);
        for kernel in kernels() {
            let mut g = vec![0.0; m * inp];
            let av = StridedA::columns(&d_out, out, c0);
            gemm_on(
                kernel,
                m,
                inp,
                batch,
                av,
                PanelsB::rows(&input, inp),
                &mut g,
                inp,
                Epilogue::Store,
            );
            for (x, y) in g.iter().zip(&want) {
                assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "{kernel:?}");
            }
        }
    }

    #[test]
    fn adam_epilogue_equals_gradient_then_adam() {
        // 13 and 5 rows: a last tile of 5 (full kernel); 12: of 4 (the 4-row AVX-512 kernel).
        // Under Miri the two shapes with a last tile of 5 and of 4 rows (and a column tail).
        let mut shapes = vec![(13, 40, 9), (12, 40, 5)];
        if !cfg!(miri) {
            shapes.extend([(8, 32, 3), (5, 16, 2), (30, 100, 20), (16, 64, 7)]);
        }
        for (m, n, k) in shapes {
            for kernel in kernels() {
                adam_case(kernel, m, n, k);
            }
        }
    }

    fn adam_case(kernel: Kernel, m: usize, n: usize, k: usize) {
        let a = values(m * k, 6);
        let b = values(k * n, 7);
        let mut packed = vec![0.0; k * panel_cols(n)];
        pack_b(&b, n, 1, k, n, &mut packed);
        let mut g = vec![0.0; m * n];
        let av = StridedA::rows(&a, k);
        gemm_on(kernel, m, n, k, av, &packed, &mut g, n, Epilogue::Store);
        // The block's step on this kernel, ∂W = A·B fused with Adam.
        let adam_gemm = |rows: AdamRows<'_>| {
            gemm_on(
                kernel,
                m,
                n,
                k,
                av,
                &packed,
                &mut [],
                n,
                Epilogue::Adam(rows),
            )
        };
        let step = AdamConsts::new(AdamStep {
            lr: 0.01,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            t: 3,
        });
        // θ, m, v with a row stride ld > n: the gaps must stay as they are.
        let ld = n + 3;
        let len = (m - 1) * ld + n;
        let (mut t1, mut m1, mut v1) = (values(len, 8), values(len, 9), values(len, 10));
        for x in v1.iter_mut() {
            *x = x.abs();
        }
        let (mut t2, mut m2, mut v2) = (t1.clone(), m1.clone(), v1.clone());
        for i in 0..m {
            let r = i * ld..i * ld + n;
            let gi = &g[i * n..(i + 1) * n];
            let (t, mm, v) = (&mut t1[r.clone()], &mut m1[r.clone()], &mut v1[r]);
            adam_update(step, t, mm, v, gi);
        }
        // The updated rows also go to rows first..first + m of a packed copy (pack_b's layout
        // of a matrix of m + 3 rows); every other entry, padding included, stays as it was.
        let (first, total) = (2, m + 3);
        let mut copy = vec![7.5f32; total * panel_cols(n)];
        // And, transposed, to columns 8..8 + m of an n × (m + 11) matrix (pack_transposed_rows'
        // layout): written by whole tiles on AVX-512 when m is a multiple of 8 and n of 16.
        let (first_t, total_t) = (8, m + 11);
        let mut tcopy = vec![7.5f32; n * panel_cols(total_t)];
        let finite = Cell::new(true);
        let rows = AdamRows {
            theta: &mut t2,
            m: &mut m2,
            v: &mut v2,
            ld,
            step,
            // SAFETY: `copy` is a live local buffer of `total · panel_cols(n)` floats that
            // nothing else touches during the call.
            packed: Some(unsafe { PackedRows::new(copy.as_mut_ptr(), copy.len(), first, total) }),
            transposed: Some(Transposed {
                // SAFETY: as above, for `tcopy` (n · panel_cols(total_t) floats).
                rows: unsafe { PackedRows::new(tcopy.as_mut_ptr(), tcopy.len(), first_t, total_t) },
                finite: &finite,
            }),
            theta_in: None,
        };
        adam_gemm(rows);
        assert!(
            t1 == t2 && m1 == m2 && v1 == v2,
            "{kernel:?} m={m} n={n} k={k}"
        );
        let mut want = vec![7.5f32; copy.len()];
        for i in 0..m {
            for j in 0..n {
                want[(j / NR) * total * NR + (first + i) * NR + j % NR] = t1[i * ld + j];
            }
        }
        assert!(copy == want, "{kernel:?} m={m} n={n} k={k}: packed copy");
        let mut want_t = vec![7.5f32; tcopy.len()];
        for i in 0..m {
            let col = first_t + i;
            for j in 0..n {
                want_t[(col / NR) * n * NR + j * NR + col % NR] = t1[i * ld + j];
            }
        }
        assert!(
            tcopy == want_t,
            "{kernel:?} m={m} n={n} k={k}: transposed copy"
        );
        assert!(
            finite.get(),
            "{kernel:?} m={m} n={n} k={k}: finite reported not finite"
        );
        // The same step from the gradient already computed (adam_block): the same bits.
        let (mut t4, mut m4, mut v4) = (values(len, 8), values(len, 9), values(len, 10));
        for x in v4.iter_mut() {
            *x = x.abs();
        }
        let mut copy4 = vec![7.5f32; total * panel_cols(n)];
        let mut tcopy4 = vec![7.5f32; tcopy.len()];
        let rows = AdamRows {
            theta: &mut t4,
            m: &mut m4,
            v: &mut v4,
            ld,
            step,
            // SAFETY: as above, for `copy4`.
            packed: Some(unsafe { PackedRows::new(copy4.as_mut_ptr(), copy4.len(), first, total) }),
            transposed: Some(Transposed {
                // SAFETY: as above, for `tcopy4`.
                rows: unsafe {
                    PackedRows::new(tcopy4.as_mut_ptr(), tcopy4.len(), first_t, total_t)
                },
                finite: &finite,
            }),
            theta_in: None,
        };
        adam_block(m, n, &g, rows);
        assert!(
            t4 == t2 && m4 == m2 && v4 == v2 && copy4 == copy && tcopy4 == tcopy && finite.get(),
            "{kernel:?} m={m} n={n} k={k}: adam_block"
        );
        // One step with θ read from `before` into a θ that held NaN (the gaps between rows keep
        // `before`'s values), and the transposed copy into `tcopy` if given: (θ, m, v).
        let step_from = |before: &[f32], tcopy: Option<&mut [f32]>, finite: &Cell<bool>| {
            let (mut mm, mut vv) = (
                values(len, 9),
                values(len, 10).iter().map(|x| x.abs()).collect::<Vec<_>>(),
            );
            let mut t: Vec<f32> = (0..len)
                .map(|i| if (i % ld) < n { f32::NAN } else { before[i] })
                .collect();
            let transposed = tcopy.map(|c| Transposed {
                // SAFETY: `c` is a live local buffer of n · panel_cols(total_t) floats that
                // nothing else touches during the call.
                rows: unsafe { PackedRows::new(c.as_mut_ptr(), c.len(), first_t, total_t) },
                finite,
            });
            let rows = AdamRows {
                theta: &mut t,
                m: &mut mm,
                v: &mut vv,
                ld,
                step,
                packed: None,
                transposed,
                theta_in: Some(before),
            };
            adam_gemm(rows);
            (t, mm, vv)
        };
        // Reading θ from another buffer: the same step lands in `theta` (whatever it held),
        // the source keeps the values before the step, the gaps between rows stay.
        let before = values(len, 8);
        let (t3, m3, v3) = step_from(&before, None, &Cell::new(true));
        assert!(
            t3 == t1 && m3 == m1 && v3 == v1 && before == values(len, 8),
            "{kernel:?} m={m} n={n} k={k}: θ read from another buffer"
        );
        // A parameter that the step leaves infinite or NaN (its value before was), first or
        // last in the block: the writer of the transposed copy reports it.
        for (at, bad) in [(0, f32::INFINITY), ((m - 1) * ld + n - 1, f32::NAN)] {
            let mut before = values(len, 8);
            before[at] = bad;
            let mut tcopy5 = vec![0.0f32; tcopy.len()];
            let finite = Cell::new(true);
            step_from(&before, Some(&mut tcopy5), &finite);
            assert!(
                !finite.get(),
                "{kernel:?} m={m} n={n} k={k}: {bad} at {at} not reported"
            );
        }
    }

    #[test]
    fn gemm_runs_the_best_kernel_and_packs_for_it() {
        let best = Kernel::best();
        assert!(best.available());
        assert_eq!(tile_rows(), best.tile_rows());
        let (m, n, k) = (9, 20, 5);
        let a = values(m * k, 31);
        let b = values(k * n, 32);
        let mut packed = vec![0.0; k * panel_cols(n)];
        pack_b(&b, n, 1, k, n, &mut packed);
        let (mut c1, mut c2) = (vec![0.0; m * n], vec![0.0; m * n]);
        let av = StridedA::rows(&a, k);
        gemm(m, n, k, av, &packed, &mut c1, n, Epilogue::Store);
        gemm_on(best, m, n, k, av, &packed, &mut c2, n, Epilogue::Store);
        assert_eq!(c1, c2);
    }

    #[test]
    #[should_panic(expected = "C shorter")]
    fn short_c_is_refused() {
        let (a, b) = (vec![1.0; 6], vec![1.0; 2 * 16]);
        let mut c = vec![0.0; 5];
        gemm(
            3,
            2,
            2,
            StridedA::rows(&a, 2),
            &b,
            &mut c,
            2,
            Epilogue::Store,
        );
    }

    #[test]
    #[should_panic(expected = "A shorter")]
    fn short_a_is_refused() {
        let (a, b) = (vec![1.0; 5], vec![1.0; 2 * 16]);
        let mut c = vec![0.0; 6];
        gemm(
            3,
            2,
            2,
            StridedA::rows(&a, 2),
            &b,
            &mut c,
            2,
            Epilogue::Store,
        );
    }

    #[test]
    #[should_panic(expected = "B shorter than its k × n reads (packed: k · panel_cols(n))")]
    fn short_b_is_refused() {
        let (a, b) = (vec![1.0; 6], vec![1.0; 2 * 16 - 1]);
        let mut c = vec![0.0; 6];
        gemm(
            3,
            2,
            2,
            StridedA::rows(&a, 2),
            &b,
            &mut c,
            2,
            Epilogue::Store,
        );
    }

    /// Adam on a 3 × 2 block whose m has `m_len` floats (6 are needed), with a packed copy
    /// that claims rows 2..5 of a 4-row matrix when `packed`: gemm must refuse before writing.
    fn refused_adam(m_len: usize, packed: bool) {
        refused_adam_via(m_len, packed, false);
    }

    /// As `refused_adam`, through `gemm` or (`block`) through `adam_block`.
    fn refused_adam_via(m_len: usize, packed: bool, block: bool) {
        let (a, b) = (vec![1.0; 6], vec![1.0; 2 * 16]);
        let (mut t, mut m, mut v) = (vec![0.0; 6], vec![0.0; m_len], vec![0.0; 6]);
        let mut copy = vec![0.0; 4 * 16];
        let step = AdamConsts::new(AdamStep {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            t: 1,
        });
        let rows = AdamRows {
            theta: &mut t,
            m: &mut m,
            v: &mut v,
            ld: 2,
            step,
            // SAFETY: a live local buffer that nothing else touches during the call.
            packed: packed.then(|| unsafe { PackedRows::new(copy.as_mut_ptr(), copy.len(), 2, 4) }),
            transposed: None,
            theta_in: None,
        };
        if block {
            adam_block(3, 2, &[0.0; 6], rows);
            return;
        }
        let av = StridedA::rows(&a, 2);
        gemm(3, 2, 2, av, &b, &mut [], 2, Epilogue::Adam(rows));
    }

    #[test]
    fn adam_block_steps_rows_without_gaps_as_one_run() {
        // A narrow layer's block (ld = n = 8, rows back to back), θ read from another buffer,
        // its packed copy written: the same bits as Adam element by element.
        let (m, n) = (5, 8);
        let step = AdamConsts::new(AdamStep {
            lr: 0.01,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            t: 4,
        });
        let g = values(m * n, 31);
        let before = values(m * n, 32);
        let (mut m1, mut v1) = (values(m * n, 33), values(m * n, 34));
        for x in v1.iter_mut() {
            *x = x.abs();
        }
        let (mut m2, mut v2) = (m1.clone(), v1.clone());
        let mut want = before.clone();
        adam_update(step, &mut want, &mut m1, &mut v1, &g);
        let mut theta = vec![f32::NAN; m * n];
        let mut copy = vec![7.5f32; m * panel_cols(n)];
        let rows = AdamRows {
            theta: &mut theta,
            m: &mut m2,
            v: &mut v2,
            ld: n,
            step,
            // SAFETY: `copy` is a live local buffer of m · panel_cols(n) floats that nothing
            // else touches during the call.
            packed: Some(unsafe { PackedRows::new(copy.as_mut_ptr(), copy.len(), 0, m) }),
            transposed: None,
            theta_in: Some(&before),
        };
        adam_block(m, n, &g, rows);
        assert!(theta == want && m1 == m2 && v1 == v2);
        for i in 0..m {
            assert_eq!(&copy[i * NR..i * NR + n], &want[i * n..(i + 1) * n]);
            assert!(copy[i * NR + n..(i + 1) * NR].iter().all(|&x| x == 7.5));
        }
    }

    #[test]
    #[should_panic(expected = "Adam's")]
    fn adam_block_refuses_short_rows() {
        refused_adam_via(5, false, true);
    }

    #[test]
    #[should_panic(expected = "packed rows outside")]
    fn adam_block_refuses_packed_rows_past_their_buffer() {
        refused_adam_via(6, true, true);
    }

    #[test]
    #[should_panic(expected = "Adam's")]
    fn short_adam_rows_are_refused() {
        refused_adam(5, false);
    }

    #[test]
    #[should_panic(expected = "packed rows outside")]
    fn packed_rows_past_their_buffer_are_refused() {
        refused_adam(6, true);
    }

    #[test]
    #[should_panic(expected = "A shorter")]
    fn overflowing_strides_are_refused() {
        // The extent overflows: refused, not wrapped round into a small, "valid" index.
        let (a, b) = (vec![1.0; 6], vec![1.0; 2 * 16]);
        let mut c = vec![0.0; 6];
        let huge = StridedA {
            data: &a,
            rs: usize::MAX / 2,
            cs: 1,
        };
        gemm(3, 2, 2, huge, &b, &mut c, 2, Epilogue::Store);
    }

    #[test]
    #[should_panic(expected = "B shorter")]
    fn short_b_rows_are_refused() {
        // n = 20 read in place with ld = 20: the last row's second panel reads 12 floats
        // past its 20 (whole panels), so 4 · 20 floats are too few; 3 · 20 + 32 are enough.
        let (a, b) = (vec![1.0; 3 * 4], vec![1.0; 4 * 20]);
        let mut c = vec![0.0; 3 * 20];
        gemm(
            3,
            20,
            4,
            StridedA::rows(&a, 4),
            PanelsB::rows(&b, 20),
            &mut c,
            20,
            Epilogue::Store,
        );
    }

    #[test]
    fn weight_packing_equals_generic_packing() {
        for (inp, out, cut) in [(40, 24, 10), (64, 48, 16), (8, 32, 16)] {
            weight_packing_case(inp, out, cut);
        }
    }

    /// The repack reports a NaN or an infinity anywhere in the rows it packs, on its AVX2 path
    /// (whole panels of 16 rows, inputs a multiple of 8) and on the element-by-element one.
    #[test]
    fn transposed_packing_reports_values_that_are_not_finite() {
        // Under Miri without the largest shape, and with NaN and +∞ only (natively −∞ too).
        let shapes: &[(usize, usize)] = if cfg!(miri) {
            &[(8, 16), (5, 3), (8, 7)]
        } else {
            &[(8, 16), (24, 32), (5, 3), (8, 7)]
        };
        let bads: &[f32] = if cfg!(miri) {
            &[f32::NAN, f32::INFINITY]
        } else {
            &[f32::NAN, f32::INFINITY, f32::NEG_INFINITY]
        };
        for &(inp, rows) in shapes {
            let w = values(inp * rows, 9);
            let mut fwd = vec![0.0; inp * panel_cols(rows)];
            // SAFETY (all calls): fwd has inp · panel_cols(rows) floats and rows 0..rows of
            // a rows-row matrix are packed; nothing else touches fwd.
            let all = unsafe { pack_transposed_rows(&w, 0, inp, rows, fwd.as_mut_ptr()) };
            assert!(all, "{inp} × {rows}: finite values reported as not finite");
            for at in [0, inp * rows / 2 + 1, inp * rows - 1] {
                for &bad in bads {
                    let mut w = w.clone();
                    w[at] = bad;
                    // SAFETY: as above.
                    let all = unsafe { pack_transposed_rows(&w, 0, inp, rows, fwd.as_mut_ptr()) };
                    assert!(!all, "{inp} × {rows}: {bad} at {at} not reported");
                }
            }
        }
    }

    fn weight_packing_case(inp: usize, out: usize, cut: usize) {
        let w = values(inp * out, 5);
        let mut fwd = vec![0.0; inp * panel_cols(out)];
        let mut bwd = vec![0.0; out * panel_cols(inp)];
        let (pf, pb) = (fwd.as_mut_ptr(), bwd.as_mut_ptr());
        // SAFETY: the buffers have the sizes pack_weight_rows needs, the row ranges lie inside
        // W and nothing else touches the buffers meanwhile.
        unsafe {
            pack_weight_rows(&w[..cut * inp], 0, inp, out, pf, pb);
            pack_weight_rows(&w[cut * inp..], cut, inp, out, pf, pb);
        }
        let mut f2 = vec![0.0; fwd.len()];
        let mut b2 = vec![0.0; bwd.len()];
        pack_b(&w, 1, inp, inp, out, &mut f2);
        pack_b(&w, inp, 1, out, inp, &mut b2);
        assert_eq!(fwd, f2);
        assert_eq!(bwd, b2);
    }

    /// A moment that an Adam step would make denormal is stored as +0, on every kernel
    /// alike (what flush-to-zero did; the engine no longer changes the floating-point mode).
    #[test]
    fn adam_flushes_moments_that_would_be_denormal() {
        assert_eq!(
            flush_denormal(f32::MIN_POSITIVE).to_bits(),
            f32::MIN_POSITIVE.to_bits()
        );
        assert_eq!(flush_denormal(f32::MIN_POSITIVE * 0.5).to_bits(), 0);
        assert_eq!(flush_denormal(-f32::MIN_POSITIVE * 0.25).to_bits(), 0);
        assert_eq!(flush_denormal(-0.0).to_bits(), 0);
        assert!(flush_denormal(f32::NAN).is_nan());
        assert_eq!(flush_denormal(f32::INFINITY), f32::INFINITY);
        let s = AdamConsts::new(AdamStep {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            t: 3,
        });
        // g = 0: m shrinks by β₁ and v by β₂; the first two cross into the denormals.
        let m0 = [1.2e-38, -1.2e-38, 1e-30, 0.5];
        let v0 = [1.0e-38, 1.0e-38, 1e-30, 0.25];
        let mut theta = [1.0f32; 4];
        let (mut m, mut v) = (m0, v0);
        adam_update(s, &mut theta, &mut m, &mut v, &[0.0; 4]);
        assert_eq!(m.map(f32::to_bits)[..2], [0, 0]);
        assert_eq!(v.map(f32::to_bits)[..2], [0, 0]);
        assert_eq!(m[2], 0.9 * 1e-30);
        assert_eq!(v[3], 0.999 * 0.25);
        // The kernels' fused Adam epilogue gives the same moments: a 1 × 4 block whose
        // gradient (k = 1: a zero row times anything) is 0.
        for kernel in kernels() {
            let (mut th, mut mk, mut vk) = ([1.0f32; 4], m0, v0);
            let theta_in = th;
            let a = [0.0f32; 1];
            let mut packed = vec![0.0; panel_cols(4)];
            pack_b(&[1.0, 2.0, 3.0, 4.0], 4, 1, 1, 4, &mut packed);
            let rows = AdamRows {
                theta: &mut th,
                m: &mut mk,
                v: &mut vk,
                theta_in: Some(&theta_in),
                ld: 4,
                step: s,
                packed: None,
                transposed: None,
            };
            gemm_on(
                kernel,
                1,
                4,
                1,
                StridedA::rows(&a, 1),
                &packed,
                &mut [],
                4,
                Epilogue::Adam(rows),
            );
            assert_eq!(mk.map(f32::to_bits), m.map(f32::to_bits), "{kernel:?}: m");
            assert_eq!(vk.map(f32::to_bits), v.map(f32::to_bits), "{kernel:?}: v");
        }
    }

    #[test]
    fn adam_matches_its_equations() {
        let s = AdamStep {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            t: 1,
        };
        let (mut th, mut m, mut v) = (vec![1.0f32, -2.0], vec![0.0; 2], vec![0.0; 2]);
        adam_update(AdamConsts::new(s), &mut th, &mut m, &mut v, &[1.0, 2.0]);
        // Step 1: m̂ = g, v̂ = g², so θ moves by lr·sign(g). Miri perturbs powi by design,
        // and 1 − β₂¹ magnifies that by 1000.
        let tol = if cfg!(miri) { 1e-4 } else { 1e-6 };
        assert!(
            (th[0] - 0.9).abs() < tol && (th[1] + 2.1).abs() < tol,
            "{th:?}"
        );
        assert!((m[0] - 0.1).abs() < 1e-7 && (v[1] - 0.004).abs() < 1e-7);
    }

    #[test]
    fn adam_bias_correction_at_steps_two_and_three() {
        // Gradients that change sign and size, so m̂ and v̂ at t = 2, 3 depend on both bias
        // corrections. Expected θ worked out in f64 from the equations in the module doc
        // (m̂ = m/(1 − β₁ᵗ), v̂ = v/(1 − β₂ᵗ), θ ← θ − lr·m̂/(√v̂ + ε)), e.g. for θ₀ at t = 2:
        // m = 0.04, v = 0.001249, m̂ = 0.04/0.19, v̂ = 0.001249/0.001999, θ = 0.9 − 0.026634.
        let grads = [[1.0f32, 2.0], [-0.5, 0.25], [2.0, -1.0]];
        let want = [
            [0.9f32, -2.1],
            [0.873_366_3, -2.175_722_3],
            [0.807_555_1, -2.199_732_4],
        ];
        let (mut th, mut m, mut v) = (vec![1.0f32, -2.0], vec![0.0; 2], vec![0.0; 2]);
        let tol = if cfg!(miri) { 1e-4 } else { 2e-6 };
        for (t, (g, want)) in grads.iter().zip(&want).enumerate() {
            let s = AdamStep {
                lr: 0.1,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                t: t as i32 + 1,
            };
            adam_update(AdamConsts::new(s), &mut th, &mut m, &mut v, g);
            for j in 0..2 {
                assert!((th[j] - want[j]).abs() < tol, "t = {}: {th:?}", t + 1);
            }
        }
    }

    #[test]
    fn column_sums_add_up_columns() {
        let dy = values(5 * 7, 41);
        let mut db = vec![0.0; 4];
        column_sums(&dy, 7, 2, &mut db);
        for (j, &d) in db.iter().enumerate() {
            let s: f32 = (0..5).map(|i| dy[i * 7 + 2 + j]).sum();
            assert!((d - s).abs() < 1e-6);
        }
    }
}
