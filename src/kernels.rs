//! Hand-fused CPU kernels for the training loops that must be fast: a packed matrix multiply
//! with the layer's bias, ReLU or ReLU mask folded into its output (or an Adam step on each
//! gradient tile it produces), weight packing, column sums, Adam over flat buffers, and a spin
//! barrier for two threads that meet twice per step.
//!
//! Why they exist: W1's VAE does ~99 MFLOP of matrix multiply per step on 100-row matrices. In
//! idiomatic dfdx (and in PyTorch) most of a step is per-op overhead (allocation, strided
//! elementwise loops, bias broadcasts, thread wake-ups); see `PERF.md` in the developer notes.
//! These kernels compute the same equations with no allocation inside a step.
//!
//! # The matrix multiply
//! C (m × n) = A (m × k) · B (k × n), then an [`Epilogue`] on each output element. A is read
//! in place through strides, or from tiles packed by [`pack_a_transposed`]; B is packed into
//! panels of 16 columns, each panel k × 16 contiguous, so the inner loop streams it from L1.
//! The inner kernel keeps a 5 × 16 tile of C in ten AVX2 registers and does 10 fused
//! multiply-adds per k (on x86-64 with AVX2 + FMA, detected at run time; elsewhere a portable
//! loop the compiler vectorises).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Rows of C one kernel call computes.
pub(crate) const MR: usize = 5;
/// Columns of a B panel (two AVX2 registers of 8 floats).
pub(crate) const NR: usize = 16;

/// A read in place: in the tile of rows i0..i0 + MR, element (i, p) is
/// `data[i0 * ts + (i − i0) * rs + p * cs]` (for a plain strided matrix ts = rs).
#[derive(Clone, Copy)]
pub(crate) struct StridedA<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
    pub ts: usize,
}

impl<'a> StridedA<'a> {
    /// A row-major matrix with `k` columns.
    pub fn rows(data: &'a [f32], k: usize) -> Self {
        StridedA {
            data,
            rs: k,
            cs: 1,
            ts: k,
        }
    }

    /// A matrix with k columns packed by [`pack_a_transposed`].
    pub fn packed(data: &'a [f32], k: usize) -> Self {
        StridedA {
            data,
            rs: 1,
            cs: MR,
            ts: k,
        }
    }
}

/// Packs A = columns `c0..c0 + m` of a row-major k × n matrix D, transposed (A(i, p) =
/// D(p, c0 + i)), into tiles of [`MR`] rows, each k × MR contiguous: the layout
/// [`StridedA::packed`] reads, so the kernel's loads of A are sequential.
pub(crate) fn pack_a_transposed(
    d: &[f32],
    n: usize,
    c0: usize,
    m: usize,
    k: usize,
    dst: &mut [f32],
) {
    debug_assert!(dst.len() >= m.div_ceil(MR) * MR * k);
    for p in 0..k {
        let row = &d[p * n + c0..p * n + c0 + m];
        let (whole, rest) = row.as_chunks::<MR>();
        for (t, piece) in whole.iter().enumerate() {
            let at = t * k * MR + p * MR;
            // A fixed-size copy: no call to memcpy.
            if let Ok(to) = <&mut [f32; MR]>::try_from(&mut dst[at..at + MR]) {
                *to = *piece;
            }
        }
        if !rest.is_empty() {
            let at = whole.len() * k * MR + p * MR;
            dst[at..at + rest.len()].copy_from_slice(rest);
        }
    }
}

/// What happens to each element c = Σₚ A(i, p) B(p, j) before it is stored.
#[derive(Clone, Copy)]
pub(crate) enum Epilogue<'a> {
    /// C(i, j) = c.
    Store,
    /// C(i, j) = c + bias(j): a linear layer.
    Bias(&'a [f32]),
    /// C(i, j) = max(c + bias(j), 0): a linear layer and its ReLU.
    BiasRelu(&'a [f32]),
    /// C(i, j) = c if H(i, j) > 0 else 0, H with C's layout: back-propagation through a ReLU
    /// whose output was H.
    ReluMask(&'a [f32]),
    /// c is the gradient of parameter (i, j): one Adam step on it, nothing stored in C.
    Adam(&'a AdamRows),
    /// C(i, j) = LeakyReLU_α(c + bias(j)).
    BiasLeaky(&'a [f32], f32),
    /// C(i, j) = c if H(i, j) > 0 else α c.
    LeakyMask(&'a [f32], f32),
}

/// Rows of C one kernel call computes (TEMPORARY).
pub(crate) fn tile_rows() -> usize {
    MR
}

/// Length of a `pack_a_transposed` buffer (TEMPORARY).
pub(crate) fn packed_a_len(m: usize, k: usize) -> usize {
    m.div_ceil(MR) * MR * k
}

impl AdamRows {
    /// TEMPORARY
    pub fn new(
        theta: &mut [f32],
        m: &mut [f32],
        v: &mut [f32],
        ld: usize,
        step: AdamConsts,
    ) -> Self {
        AdamRows {
            theta: theta.as_mut_ptr(),
            m: m.as_mut_ptr(),
            v: v.as_mut_ptr(),
            ld,
            step,
        }
    }
}

/// Parameters θ and Adam's moments m, v of a row-major block (row stride `ld`) that a
/// gradient C updates in place through [`Epilogue::Adam`].
pub(crate) struct AdamRows {
    pub theta: *mut f32,
    pub m: *mut f32,
    pub v: *mut f32,
    pub ld: usize,
    pub step: AdamConsts,
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

    /// One parameter's step. No fused multiply-adds: the vector form gives the same bits.
    #[inline(always)]
    fn apply(&self, g: f32, theta: &mut f32, m: &mut f32, v: &mut f32) {
        let mi = self.b1 * *m + self.c1 * g;
        let vi = self.b2 * *v + self.c2 * (g * g);
        *m = mi;
        *v = vi;
        *theta -= self.lr_t * mi / (vi.sqrt() * self.inv_sqrt_bc2 + self.eps);
    }
}

/// Size of `n` columns rounded up to whole panels.
pub(crate) fn panel_cols(n: usize) -> usize {
    n.div_ceil(NR) * NR
}

/// Packs B (k × n), B(p, j) = `src[p * rs + j * cs]`, into `dst` as panels of [`NR`] columns
/// (panel q holds rows 0..k of columns 16q..16q+16, row after row). Columns past n are zero.
#[cfg(test)]
pub(crate) fn pack_b(src: &[f32], rs: usize, cs: usize, k: usize, n: usize, dst: &mut [f32]) {
    debug_assert!(dst.len() >= k * panel_cols(n));
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
            let at = dst.add(q * k * NR + i * NR);
            if piece.len() == NR {
                std::ptr::copy_nonoverlapping(piece.as_ptr(), at, NR);
            } else {
                std::ptr::copy_nonoverlapping(piece.as_ptr(), at, piece.len());
                std::ptr::write_bytes(at.add(piece.len()), 0, NR - piece.len());
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
/// `fwd` must point to `inp · panel_cols(out)` floats and `bwd` to `out · panel_cols(inp)`.
/// Only the entries of these rows are written, so threads may pack disjoint row ranges of one
/// matrix at the same time (and nothing may read those entries meanwhile).
pub(crate) unsafe fn pack_weight_rows(
    rows: &[f32],
    r0: usize,
    inp: usize,
    out: usize,
    fwd: *mut f32,
    bwd: *mut f32,
) {
    debug_assert!(r0 + rows.len() / inp <= out);
    #[cfg(target_arch = "x86_64")]
    let whole_panels = r0.is_multiple_of(NR) && (rows.len() / inp).is_multiple_of(NR);
    if has_avx2_fma() && whole_panels && inp.is_multiple_of(8) {
        pack_transposed_avx2(rows, r0, inp, fwd);
        pack_b_rows(rows, r0, out, inp, bwd);
        return;
    }
    for (dr, row) in rows.chunks_exact(inp).enumerate() {
        let r = r0 + dr;
        // Forward panels: column r of Wᵀ lives in panel r / 16, lane r % 16.
        let base = (r / NR) * inp * NR + r % NR;
        for (p, &v) in row.iter().enumerate() {
            *fwd.add(base + p * NR) = v;
        }
    }
    // Backward panels: the rows of W as they are.
    pack_b_rows(rows, r0, out, inp, bwd);
}

/// The forward panels of [`pack_weight_rows`] for whole panels of 16 rows, by 8 × 8 block
/// transposes in registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn pack_transposed_avx2(rows: &[f32], r0: usize, inp: usize, fwd: *mut f32) {
    use std::arch::x86_64::*;
    let src = rows.as_ptr();
    for pr in (0..rows.len() / inp).step_by(NR) {
        let panel = fwd.add((r0 + pr) / NR * inp * NR);
        for half in 0..2 {
            let base = src.add((pr + 8 * half) * inp);
            for p in (0..inp).step_by(8) {
                let r: [__m256; 8] =
                    std::array::from_fn(|a| _mm256_loadu_ps(base.add(a * inp + p)));
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
                    _mm256_storeu_ps(panel.add((p + c) * NR + 8 * half), col);
                }
            }
        }
    }
}

/// C (m × n, row stride `ldc`) = A (m × k) · B (k × n, packed by [`pack_b`]), then `epi`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm(
    m: usize,
    n: usize,
    k: usize,
    a: StridedA<'_>,
    b: &[f32],
    c: &mut [f32],
    ldc: usize,
    epi: Epilogue<'_>,
) {
    if m == 0 || n == 0 {
        return;
    }
    debug_assert!(b.len() >= k * panel_cols(n));
    debug_assert!(matches!(epi, Epilogue::Adam(_)) || c.len() >= (m - 1) * ldc + n);
    debug_assert!(k == 0 || a.data.len() > (m - 1) / MR * MR * a.ts + (k - 1) * a.cs);
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() && !matches!(epi, Epilogue::BiasLeaky(..) | Epilogue::LeakyMask(..)) {
        // SAFETY: the CPU has AVX2 and FMA (checked above); the bounds are checked above
        // (debug) and by construction of every caller in this crate.
        unsafe { gemm_avx2(m, n, k, a, b, c, ldc, epi) };
        return;
    }
    gemm_portable(m, n, k, a, b, c, ldc, epi);
}

#[allow(clippy::too_many_arguments)]
fn gemm_portable(
    m: usize,
    n: usize,
    k: usize,
    a: StridedA<'_>,
    b: &[f32],
    c: &mut [f32],
    ldc: usize,
    epi: Epilogue<'_>,
) {
    for q in 0..n.div_ceil(NR) {
        let panel = &b[q * k * NR..(q + 1) * k * NR];
        for i0 in (0..m).step_by(MR) {
            let rows = MR.min(m - i0);
            let mut acc = [[0.0f32; NR]; MR];
            for p in 0..k {
                let brow = &panel[p * NR..(p + 1) * NR];
                for (r, acc_r) in acc.iter_mut().enumerate().take(rows) {
                    let x = a.data[i0 * a.ts + r * a.rs + p * a.cs];
                    for (cv, &bv) in acc_r.iter_mut().zip(brow) {
                        *cv += x * bv;
                    }
                }
            }
            finish_tile(&acc, c, ldc, i0, q * NR, rows, NR.min(n - q * NR), epi);
        }
    }
}

/// Applies the epilogue to a finished tile and stores its `rows × cols` valid part.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn finish_tile(
    acc: &[[f32; NR]; MR],
    c: &mut [f32],
    ldc: usize,
    i0: usize,
    j0: usize,
    rows: usize,
    cols: usize,
    epi: Epilogue<'_>,
) {
    for (r, acc_r) in acc.iter().enumerate().take(rows) {
        let at = (i0 + r) * ldc + j0;
        let acc_r = &acc_r[..cols];
        if let Epilogue::Adam(a) = epi {
            let at = (i0 + r) * a.ld + j0;
            for (jj, &g) in acc_r.iter().enumerate() {
                // SAFETY: the caller of `gemm` gives θ, m, v covering C's shape.
                unsafe {
                    a.step.apply(
                        g,
                        &mut *a.theta.add(at + jj),
                        &mut *a.m.add(at + jj),
                        &mut *a.v.add(at + jj),
                    )
                };
            }
            continue;
        }
        let out = &mut c[at..at + cols];
        match epi {
            Epilogue::Adam(_) => {}
            Epilogue::Store => out.copy_from_slice(acc_r),
            Epilogue::Bias(bias) => {
                for ((o, &v), &bb) in out.iter_mut().zip(acc_r).zip(&bias[j0..j0 + cols]) {
                    *o = v + bb;
                }
            }
            Epilogue::BiasRelu(bias) => {
                for ((o, &v), &bb) in out.iter_mut().zip(acc_r).zip(&bias[j0..j0 + cols]) {
                    *o = (v + bb).max(0.0);
                }
            }
            Epilogue::ReluMask(h) => {
                for ((o, &v), &hh) in out.iter_mut().zip(acc_r).zip(&h[at..at + cols]) {
                    *o = if hh > 0.0 { v } else { 0.0 };
                }
            }
            Epilogue::BiasLeaky(bias, al) => {
                for ((o, &v), &bb) in out.iter_mut().zip(acc_r).zip(&bias[j0..j0 + cols]) {
                    *o = (v + bb).max(al * (v + bb));
                }
            }
            Epilogue::LeakyMask(h, al) => {
                for ((o, &v), &hh) in out.iter_mut().zip(acc_r).zip(&h[at..at + cols]) {
                    *o = if hh > 0.0 { v } else { al * v };
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_avx2(
    m: usize,
    n: usize,
    k: usize,
    a: StridedA<'_>,
    b: &[f32],
    c: &mut [f32],
    ldc: usize,
    epi: Epilogue<'_>,
) {
    use std::arch::x86_64::*;
    let ap = a.data.as_ptr();
    for q in 0..n.div_ceil(NR) {
        let panel = b.as_ptr().add(q * k * NR);
        for i0 in (0..m).step_by(MR) {
            let rows = MR.min(m - i0);
            // Rows past m re-read the last valid row (never stored), so no load is out of
            // bounds and the loop has no branches.
            let mut off = [0usize; MR];
            for (r, o) in off.iter_mut().enumerate() {
                *o = i0 * a.ts + r.min(rows - 1) * a.rs;
            }
            if let Epilogue::Adam(a) = epi {
                // Ask for the next tile's θ, m, v now: they come from L3 while this tile's
                // multiply-adds run.
                let (ni, nq) = if i0 + MR < m {
                    (i0 + MR, q)
                } else {
                    (0, q + 1)
                };
                if nq * NR < n {
                    for r in 0..MR.min(m - ni) {
                        let at = (ni + r) * a.ld + nq * NR;
                        for base in [a.theta, a.m, a.v] {
                            _mm_prefetch::<_MM_HINT_T0>(base.add(at) as *const i8);
                            _mm_prefetch::<_MM_HINT_T0>(base.add(at + NR - 1) as *const i8);
                        }
                    }
                }
            }
            // The first tile of a panel also asks for the next panel, one line per k, so that
            // it is in cache when the next tiles start on it.
            let mut pf = if i0 == 0 && (q + 1) * NR < n {
                panel.add(k * NR)
            } else {
                panel
            };
            let mut acc = [[_mm256_setzero_ps(); 2]; MR];
            let mut pa = 0usize;
            let mut pb = panel;
            for _ in 0..k {
                _mm_prefetch::<_MM_HINT_T0>(pf as *const i8);
                pf = pf.add(NR);
                let b0 = _mm256_loadu_ps(pb);
                let b1 = _mm256_loadu_ps(pb.add(8));
                for r in 0..MR {
                    let x = _mm256_broadcast_ss(&*ap.add(off[r] + pa));
                    acc[r][0] = _mm256_fmadd_ps(x, b0, acc[r][0]);
                    acc[r][1] = _mm256_fmadd_ps(x, b1, acc[r][1]);
                }
                pa += a.cs;
                pb = pb.add(NR);
            }
            let cols = NR.min(n - q * NR);
            if rows == MR && cols == NR {
                // A whole tile: the epilogue in registers, stored straight to C.
                let j0 = q * NR;
                let cp = c.as_mut_ptr().add(i0 * ldc + j0);
                match epi {
                    Epilogue::Store => {}
                    Epilogue::Bias(bias) | Epilogue::BiasRelu(bias) => {
                        let b0 = _mm256_loadu_ps(bias.as_ptr().add(j0));
                        let b1 = _mm256_loadu_ps(bias.as_ptr().add(j0 + 8));
                        let relu = matches!(epi, Epilogue::BiasRelu(_));
                        let zero = _mm256_setzero_ps();
                        for acc_r in acc.iter_mut() {
                            acc_r[0] = _mm256_add_ps(acc_r[0], b0);
                            acc_r[1] = _mm256_add_ps(acc_r[1], b1);
                            if relu {
                                acc_r[0] = _mm256_max_ps(acc_r[0], zero);
                                acc_r[1] = _mm256_max_ps(acc_r[1], zero);
                            }
                        }
                    }
                    Epilogue::Adam(a) => {
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
                                let mi = _mm256_add_ps(
                                    _mm256_mul_ps(b1, _mm256_loadu_ps(mp)),
                                    _mm256_mul_ps(c1, g),
                                );
                                let vi = _mm256_add_ps(
                                    _mm256_mul_ps(b2, _mm256_loadu_ps(vp)),
                                    _mm256_mul_ps(c2, _mm256_mul_ps(g, g)),
                                );
                                let den =
                                    _mm256_add_ps(_mm256_mul_ps(_mm256_sqrt_ps(vi), inv), eps);
                                let upd = _mm256_div_ps(_mm256_mul_ps(lr_t, mi), den);
                                _mm256_storeu_ps(mp, mi);
                                _mm256_storeu_ps(vp, vi);
                                _mm256_storeu_ps(tp, _mm256_sub_ps(_mm256_loadu_ps(tp), upd));
                            }
                        }
                        continue;
                    }
                    Epilogue::BiasLeaky(..) | Epilogue::LeakyMask(..) => {}
                    Epilogue::ReluMask(h) => {
                        let zero = _mm256_setzero_ps();
                        for (r, acc_r) in acc.iter_mut().enumerate() {
                            let hp = h.as_ptr().add((i0 + r) * ldc + j0);
                            let m0 = _mm256_cmp_ps::<_CMP_GT_OQ>(_mm256_loadu_ps(hp), zero);
                            let m1 = _mm256_cmp_ps::<_CMP_GT_OQ>(_mm256_loadu_ps(hp.add(8)), zero);
                            acc_r[0] = _mm256_and_ps(acc_r[0], m0);
                            acc_r[1] = _mm256_and_ps(acc_r[1], m1);
                        }
                    }
                }
                for (r, acc_r) in acc.iter().enumerate() {
                    _mm256_storeu_ps(cp.add(r * ldc), acc_r[0]);
                    _mm256_storeu_ps(cp.add(r * ldc + 8), acc_r[1]);
                }
                continue;
            }
            let mut tile = [[0.0f32; NR]; MR];
            for r in 0..MR {
                _mm256_storeu_ps(tile[r].as_mut_ptr(), acc[r][0]);
                _mm256_storeu_ps(tile[r].as_mut_ptr().add(8), acc[r][1]);
            }
            finish_tile(&tile, c, ldc, i0, q * NR, rows, cols, epi);
        }
    }
}

/// Whether this CPU runs the AVX2 + FMA kernels (checked once).
#[cfg(target_arch = "x86_64")]
fn has_avx2_fma() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
}

/// Runs `f` compiled for AVX2 + FMA where the CPU has them (so its loops vectorise 8 wide),
/// and as plain code elsewhere.
#[inline(always)]
pub(crate) fn vectorised<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn wide<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        // SAFETY: the CPU has AVX2 and FMA.
        return unsafe { wide(f) };
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

/// A barrier for a fixed set of threads that spins (then yields) instead of sleeping: the
/// threads meet twice per training step, ~1 ms apart, where a sleeping barrier's wake-up
/// would cost as much as the work.
pub(crate) struct SpinBarrier {
    threads: usize,
    arrived: AtomicUsize,
    generation: AtomicUsize,
    poisoned: AtomicBool,
}

/// A thread stopped without reaching the barrier (it panicked); the others give up waiting.
#[derive(Debug)]
pub(crate) struct Poisoned;

impl SpinBarrier {
    pub fn new(threads: usize) -> Self {
        SpinBarrier {
            threads,
            arrived: AtomicUsize::new(0),
            generation: AtomicUsize::new(0),
            poisoned: AtomicBool::new(false),
        }
    }

    /// Waits until every thread has called it (everything written before the call by any
    /// thread is then visible to all of them); the last thread to arrive sets `counter` to 0
    /// before any thread leaves (a task counter, fresh for the next stretch of work).
    pub fn wait_then_reset(&self, counter: Option<&AtomicUsize>) -> Result<(), Poisoned> {
        let generation = self.generation.load(Ordering::Acquire);
        if self.arrived.fetch_add(1, Ordering::AcqRel) + 1 == self.threads {
            if let Some(c) = counter {
                c.store(0, Ordering::Relaxed);
            }
            self.arrived.store(0, Ordering::Relaxed);
            self.generation.fetch_add(1, Ordering::AcqRel);
            return Ok(());
        }
        let mut spins = 0u32;
        while self.generation.load(Ordering::Acquire) == generation {
            if self.poisoned.load(Ordering::Relaxed) {
                return Err(Poisoned);
            }
            spins += 1;
            if spins < 20_000 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        Ok(())
    }

    /// Marks the barrier poisoned when dropped during a panic (hold one per thread).
    pub fn guard(&self) -> PoisonOnPanic<'_> {
        PoisonOnPanic(self)
    }
}

/// See [`SpinBarrier::guard`].
pub(crate) struct PoisonOnPanic<'a>(&'a SpinBarrier);

impl Drop for PoisonOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.poisoned.store(true, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(m: usize, n: usize, k: usize, a: StridedA<'_>, b: &[f32], ldb: usize) -> Vec<f32> {
        let mut c = vec![0.0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0.0f64;
                for p in 0..k {
                    s += a.data[i * a.rs + p * a.cs] as f64 * b[p * ldb + j] as f64;
                }
                c[i * n + j] = s as f32;
            }
        }
        c
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let h = (i as u32 ^ seed).wrapping_mul(2_654_435_761);
                (h >> 8) as f32 / (1u32 << 24) as f32 - 0.5
            })
            .collect()
    }

    #[test]
    fn gemm_matches_the_definition_for_every_shape_and_epilogue() {
        for &(m, n, k) in &[
            (1, 1, 1),
            (7, 8, 3),
            (50, 256, 64),
            (13, 40, 17),
            (6, 16, 0),
        ] {
            let a = values(m * k, 1);
            let b = values(k * n, 2);
            let bias = values(n, 3);
            let h = values(m * n, 4);
            let mut packed = vec![0.0; k * panel_cols(n)];
            pack_b(&b, n, 1, k, n, &mut packed);
            let want = naive(m, n, k, StridedA::rows(&a, k), &b, n);
            // Aᵀ read in place gives the same product when A is stored transposed.
            let mut at = vec![0.0; m * k];
            for i in 0..m {
                for p in 0..k {
                    at[p * m + i] = a[i * k + p];
                }
            }
            let mut ap = vec![0.0; m.div_ceil(MR) * MR * k];
            pack_a_transposed(&at, m, 0, m, k, &mut ap);
            let transposed = StridedA {
                data: &at,
                rs: 1,
                cs: m,
                ts: 1,
            };
            for (ai, av) in [StridedA::rows(&a, k), transposed, StridedA::packed(&ap, k)]
                .into_iter()
                .enumerate()
            {
                for (ei, epi) in [
                    Epilogue::Store,
                    Epilogue::Bias(&bias),
                    Epilogue::BiasRelu(&bias),
                    Epilogue::ReluMask(&h),
                ]
                .into_iter()
                .enumerate()
                {
                    let mut c = vec![f32::NAN; m * n];
                    gemm(m, n, k, av, &packed, &mut c, n, epi);
                    for (idx, (&got, &w)) in c.iter().zip(&want).enumerate() {
                        let (j, w) = (idx % n, w);
                        let expect = match ei {
                            0 => w,
                            1 => w + bias[j],
                            2 => (w + bias[j]).max(0.0),
                            _ => {
                                if h[idx] > 0.0 {
                                    w
                                } else {
                                    0.0
                                }
                            }
                        };
                        assert!(
                            (got - expect).abs() <= 1e-5 * (1.0 + expect.abs()),
                            "m={m} n={n} k={k} a#{ai} epi#{ei} [{idx}]: {got} vs {expect}"
                        );
                    }
                    let mut p = vec![f32::NAN; m * n];
                    gemm_portable(m, n, k, av, &packed, &mut p, n, epi);
                    for (x, y) in p.iter().zip(&c) {
                        assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()));
                    }
                }
            }
        }
    }

    #[test]
    fn adam_epilogue_equals_gradient_then_adam() {
        let (m, n, k) = (13, 40, 9);
        let a = values(m * k, 6);
        let b = values(k * n, 7);
        let mut packed = vec![0.0; k * panel_cols(n)];
        pack_b(&b, n, 1, k, n, &mut packed);
        let mut g = vec![0.0; m * n];
        gemm(
            m,
            n,
            k,
            StridedA::rows(&a, k),
            &packed,
            &mut g,
            n,
            Epilogue::Store,
        );
        let step = AdamConsts::new(AdamStep {
            lr: 0.01,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            t: 3,
        });
        let (mut t1, mut m1, mut v1) = (values(m * n, 8), values(m * n, 9), values(m * n, 10));
        for x in v1.iter_mut() {
            *x = x.abs();
        }
        let (mut t2, mut m2, mut v2) = (t1.clone(), m1.clone(), v1.clone());
        adam_update(step, &mut t1, &mut m1, &mut v1, &g);
        let rows = AdamRows {
            theta: t2.as_mut_ptr(),
            m: m2.as_mut_ptr(),
            v: v2.as_mut_ptr(),
            ld: n,
            step,
        };
        gemm(
            m,
            n,
            k,
            StridedA::rows(&a, k),
            &packed,
            &mut [],
            n,
            Epilogue::Adam(&rows),
        );
        assert_eq!((t1, m1, v1), (t2, m2, v2));
    }

    #[test]
    fn weight_packing_equals_generic_packing() {
        for (inp, out, cut) in [(40, 24, 10), (64, 48, 16), (8, 32, 16)] {
            weight_packing_case(inp, out, cut);
        }
    }

    fn weight_packing_case(inp: usize, out: usize, cut: usize) {
        let w = values(inp * out, 5);
        let mut fwd = vec![0.0; inp * panel_cols(out)];
        let mut bwd = vec![0.0; out * panel_cols(inp)];
        let (pf, pb) = (fwd.as_mut_ptr(), bwd.as_mut_ptr());
        // SAFETY: the buffers have the sizes pack_weight_rows needs.
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
        // Step 1: m̂ = g, v̂ = g², so θ moves by lr·sign(g).
        assert!(
            (th[0] - 0.9).abs() < 1e-6 && (th[1] + 2.1).abs() < 1e-6,
            "{th:?}"
        );
        assert!((m[0] - 0.1).abs() < 1e-7 && (v[1] - 0.004).abs() < 1e-7);
    }

    #[test]
    fn barrier_orders_two_threads() {
        let barrier = SpinBarrier::new(2);
        let cell = AtomicUsize::new(0);
        std::thread::scope(|s| {
            s.spawn(|| {
                for i in 0..1000 {
                    cell.store(i, Ordering::Relaxed);
                    barrier.wait_then_reset(None).unwrap();
                    barrier.wait_then_reset(None).unwrap();
                }
            });
            for i in 0..1000 {
                barrier.wait_then_reset(None).unwrap();
                assert_eq!(cell.load(Ordering::Relaxed), i);
                barrier.wait_then_reset(None).unwrap();
            }
        });
    }
}
