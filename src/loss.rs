//! Losses and their gradients with respect to a network's output, in the form the engine's
//! backward pass takes them (∂L/∂output, one row per example).
//!
//! - Binary cross-entropy with logits (the VAE's Bernoulli pixels, a GAN's discriminator):
//!   BCE(y, x) = −x log σ(y) − (1 − x) log(1 − σ(y)) = max(y, 0) − y·x + log(1 + e^{−|y|}),
//!   ∂BCE/∂y = σ(y) − x.
//! - Squared error (a Gaussian likelihood, diffusion's ε-prediction): ½(y − x)², ∂/∂y = y − x.
//!
//! The BCE loop is vectorised: e^{−|y|} and log(1 + e) are polynomials (below) that the
//! compiler turns into 8- or 16-wide vector code, instead of one libm call per pixel.

/// Σ BCE(yᵢ, xᵢ) over all elements, and ∂yᵢ = scale · (σ(yᵢ) − xᵢ) written to `dy`.
/// `y`, `x` and `dy` have one length; rows of `row` values are summed in f32, rows in f64.
pub fn bce_with_logits(y: &[f32], x: &[f32], dy: &mut [f32], scale: f32, row: usize) -> f64 {
    crate::kernels::vectorised(
        #[inline(always)]
        || {
            let mut total = 0.0f64;
            let row = row.max(1);
            for ((y, x), dy) in y.chunks(row).zip(x.chunks(row)).zip(dy.chunks_mut(row)) {
                let mut terms = [0.0f32; 64];
                let mut row_sum = 0.0f32;
                for ((y, x), dy) in y.chunks(64).zip(x.chunks(64)).zip(dy.chunks_mut(64)) {
                    let terms = &mut terms[..y.len()];
                    for (((&y, &x), dy), t) in
                        y.iter().zip(x).zip(dy.iter_mut()).zip(terms.iter_mut())
                    {
                        let e = exp_nonpositive(-y.abs());
                        *t = y.max(0.0) - y * x + ln_1p_unit(e);
                        let inv = 1.0 / (1.0 + e);
                        let sigmoid = if y >= 0.0 { inv } else { e * inv };
                        *dy = (sigmoid - x) * scale;
                    }
                    row_sum += sum_f32(terms);
                }
                total += row_sum as f64;
            }
            total
        },
    )
}

/// eˣ for x ≤ 0 (below −87 it returns ~1e-38): x = n ln 2 + r, |r| ≤ ½ ln 2, eʳ by its Taylor
/// polynomial to degree 7 (relative error < 2e-7), times 2ⁿ built from the exponent bits.
#[inline(always)]
pub(crate) fn exp_nonpositive(x: f32) -> f32 {
    // 1.5·2²³: adding it rounds x·log₂e to the nearest integer n and leaves n in the low bits
    // of the sum (no float-to-int conversion: that one the compiler would not vectorise).
    const MAGIC: f32 = 12_582_912.0;
    let x = x.max(-87.0);
    let t = x * std::f32::consts::LOG2_E + MAGIC;
    let n = t - MAGIC;
    // ln 2 split in two so that n·ln 2 is exact to f32 precision.
    let r = (x - n * 0.693_145_75) - n * 1.428_606_8e-6;
    let p = horner(
        r,
        &[
            1.0 / 5040.0,
            1.0 / 720.0,
            1.0 / 120.0,
            1.0 / 24.0,
            1.0 / 6.0,
            0.5,
            1.0,
            1.0,
        ],
    );
    // 2ⁿ from its exponent bits (n ≥ −126: a normal number).
    let n_bits = t.to_bits().wrapping_sub(MAGIC.to_bits());
    p * f32::from_bits(n_bits.wrapping_add(127) << 23)
}

/// log(1 + e) for e in [0, 1]: 2 atanh(s) with s = e / (2 + e) ≤ ⅓, whose odd series
/// 2 (s + s³/3 + … + s¹⁷/17) is exact to f32 precision there.
#[inline(always)]
pub(crate) fn ln_1p_unit(e: f32) -> f32 {
    let s = e / (2.0 + e);
    let s2 = s * s;
    let p = horner(
        s2,
        &[
            1.0 / 17.0,
            1.0 / 15.0,
            1.0 / 13.0,
            1.0 / 11.0,
            1.0 / 9.0,
            1.0 / 7.0,
            1.0 / 5.0,
            1.0 / 3.0,
            1.0,
        ],
    );
    2.0 * s * p
}

/// c₀xⁿ + c₁xⁿ⁻¹ + … + cₙ by Horner's rule.
#[inline(always)]
fn horner(x: f32, coefficients: &[f32]) -> f32 {
    coefficients.iter().fold(0.0, |p, &c| p * x + c)
}

/// A sum in eight lanes (vectorisable, and the same every time).
#[inline(always)]
fn sum_f32(v: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    for chunk in v.chunks_exact(8) {
        for (l, &x) in lanes.iter_mut().zip(chunk) {
            *l += x;
        }
    }
    let tail: f32 = v.chunks_exact(8).remainder().iter().sum();
    lanes.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_polynomials_match_the_library_functions() {
        for i in 0..=20_000 {
            let x = -30.0 * i as f32 / 20_000.0;
            let (got, want) = (exp_nonpositive(x), x.exp());
            assert!(
                (got - want).abs() <= 3e-7 * want,
                "exp({x}): {got} vs {want}"
            );
            let e = i as f32 / 20_000.0;
            let (got, want) = (ln_1p_unit(e), e.ln_1p());
            assert!(
                (got - want).abs() <= 3e-7 * want.max(1e-30),
                "ln_1p({e}): {got} vs {want}"
            );
        }
        assert!(exp_nonpositive(-200.0) < 1e-37);
    }

    #[test]
    fn bce_and_its_gradient_match_the_definition() {
        let y: Vec<f32> = (0..150).map(|i| (i as f32 - 75.0) / 7.0).collect();
        let x: Vec<f32> = (0..150).map(|i| (i % 17) as f32 / 16.0).collect();
        let mut dy = vec![0.0; 150];
        let total = bce_with_logits(&y, &x, &mut dy, 0.5, 70);
        let mut want = 0.0f64;
        for i in 0..150 {
            let (y, x) = (y[i] as f64, x[i] as f64);
            let s = 1.0 / (1.0 + (-y).exp());
            want += -(x * s.ln() + (1.0 - x) * (1.0 - s).ln());
            assert!((dy[i] as f64 - 0.5 * (s - x)).abs() < 1e-6, "∂y[{i}]");
        }
        assert!((total - want).abs() < 1e-4 * want, "{total} vs {want}");
    }
}
