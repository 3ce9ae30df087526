//! Small numerical tools the chapters share: log-gamma and the Beta function, densities,
//! `logsumexp`, and quadrature (Simpson's rule) for checking closed forms against integrals.

use std::f64::consts::PI;

/// ln Γ(x) for x > 0, by the Lanczos approximation (g = 7, 9 terms; relative error ~1e-15).
///
/// Chapter 1 uses it for the Beta function B(a, b) = Γ(a)Γ(b)/Γ(a+b).
pub fn ln_gamma(x: f64) -> f64 {
    const G: f64 = 7.0;
    const C: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Reflection: Γ(x)Γ(1-x) = π / sin(πx).
        return (PI / (PI * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut sum = C[0];
    for (i, c) in C.iter().enumerate().skip(1) {
        sum += c / (x + i as f64);
    }
    let t = x + G + 0.5;
    0.5 * (2.0 * PI).ln() + (x + 0.5) * t.ln() - t + sum.ln()
}

/// ln B(a, b) = ln Γ(a) + ln Γ(b) − ln Γ(a + b), the log of the Beta function.
pub fn ln_beta(a: f64, b: f64) -> f64 {
    ln_gamma(a) + ln_gamma(b) - ln_gamma(a + b)
}

/// The normal density N(x | μ, σ²) = exp(−(x−μ)²/(2σ²)) / (σ√(2π)).
pub fn normal_pdf(x: f64, mu: f64, sigma: f64) -> f64 {
    normal_log_pdf(x, mu, sigma).exp()
}

/// log N(x | μ, σ²) = −(x−μ)²/(2σ²) − ln σ − ½ ln 2π.
pub fn normal_log_pdf(x: f64, mu: f64, sigma: f64) -> f64 {
    let z = (x - mu) / sigma;
    -0.5 * z * z - sigma.ln() - 0.5 * (2.0 * PI).ln()
}

/// ln P(X > x) for X ~ N(0, 1), x ≥ 0: the log of ½ erfc(x/√2), with erfc by the Chebyshev
/// fit of Numerical Recipes (`erfcc`, fractional error below 1.2·10⁻⁷ for every x), kept in
/// logs so that it stays finite far into the tail (where the tail itself underflows).
fn ln_upper_tail(x: f64) -> f64 {
    let z = x / std::f64::consts::SQRT_2;
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    (0.5 * t).ln() - z * z + poly
}

/// log P(lo < X ≤ hi) for X ~ N(μ, σ²), with `lo` = −∞ or `hi` = +∞ allowed: the log-mass of
/// one bin of a discretised Gaussian (Ho et al.'s decoder p(x₀ | x₁), and the likelihood that
/// turns a VAE's decoder into a probability over grey levels). The bin is measured from the
/// tail on its own side of μ, so a bin far from μ keeps its relative accuracy; relative error
/// ~10⁻⁷.
pub fn normal_interval_log_prob(lo: f64, hi: f64, mu: f64, sigma: f64) -> f64 {
    let (a, b) = ((lo - mu) / sigma, (hi - mu) / sigma);
    // ln(P(X > u) − P(X > v)) for 0 ≤ u < v ≤ ∞.
    let tail_between = |u: f64, v: f64| {
        let lu = ln_upper_tail(u);
        if v == f64::INFINITY {
            lu
        } else {
            lu + (-(ln_upper_tail(v) - lu).exp()).ln_1p()
        }
    };
    if a >= 0.0 {
        tail_between(a, b)
    } else if b <= 0.0 {
        tail_between(-b, -a)
    } else {
        // The bin holds μ: 1 − P(X ≤ lo) − P(X > hi), both tails ≤ ½.
        let below = if a == f64::NEG_INFINITY {
            0.0
        } else {
            ln_upper_tail(-a).exp()
        };
        let above = if b == f64::INFINITY {
            0.0
        } else {
            ln_upper_tail(b).exp()
        };
        (1.0 - below - above).ln()
    }
}

/// log P(level k) for N(μ, σ²) discretised to `levels` evenly spaced values v_k = lo + kΔ,
/// Δ = (hi − lo)/(levels − 1): the mass of the bin [v_k − Δ/2, v_k + Δ/2], the first bin open
/// to −∞ and the last to +∞ so that the masses of all levels sum to 1 (Ho et al.'s decoder,
/// there with 256 levels on [−1, 1]).
pub fn discretised_normal_log_prob(
    k: usize,
    levels: usize,
    (lo, hi): (f64, f64),
    mu: f64,
    sigma: f64,
) -> f64 {
    let half = 0.5 * (hi - lo) / (levels - 1) as f64;
    let v = lo + 2.0 * half * k as f64;
    let a = if k == 0 { f64::NEG_INFINITY } else { v - half };
    let b = if k + 1 == levels {
        f64::INFINITY
    } else {
        v + half
    };
    normal_interval_log_prob(a, b, mu, sigma)
}

/// log Σᵢ exp(vᵢ), computed without overflow by factoring out the maximum.
pub fn logsumexp(values: &[f64]) -> f64 {
    let max = values.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    if !max.is_finite() {
        return max;
    }
    max + values.iter().map(|v| (v - max).exp()).sum::<f64>().ln()
}

/// `n` evenly spaced points from `lo` to `hi`, both included (NumPy's `linspace`).
pub fn linspace(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    match n {
        0 => vec![],
        1 => vec![lo],
        _ => (0..n)
            .map(|i| lo + (hi - lo) * i as f64 / (n - 1) as f64)
            .collect(),
    }
}

/// ∫ₐᵇ f(x) dx by composite Simpson's rule on `intervals` (rounded up to even) intervals.
///
/// Error ~ (b−a) h⁴ max|f⁗| / 180: for the smooth densities of the chapters, 2,000
/// intervals reach 1e-10.
pub fn simpson(f: impl Fn(f64) -> f64, a: f64, b: f64, intervals: usize) -> f64 {
    let n = intervals.max(2).div_ceil(2) * 2;
    let h = (b - a) / n as f64;
    let mut sum = f(a) + f(b);
    for i in 1..n {
        let weight = if i % 2 == 1 { 4.0 } else { 2.0 };
        sum += weight * f(a + h * i as f64);
    }
    sum * h / 3.0
}

/// ∫ y dx by the trapezoid rule over tabulated points `(xs[i], ys[i])`.
pub fn trapezoid(xs: &[f64], ys: &[f64]) -> f64 {
    xs.windows(2)
        .zip(ys.windows(2))
        .map(|(x, y)| 0.5 * (x[1] - x[0]) * (y[0] + y[1]))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ln_gamma_matches_factorials() {
        for n in 1..20u32 {
            let fact: f64 = (1..n).map(f64::from).product();
            assert!((ln_gamma(n as f64) - fact.ln()).abs() < 1e-10, "n = {n}");
        }
        // Γ(1/2) = √π
        assert!((ln_gamma(0.5) - PI.sqrt().ln()).abs() < 1e-12);
    }

    #[test]
    fn simpson_integrates_a_density_to_one() {
        let total = simpson(|x| normal_pdf(x, 0.3, 0.7), -10.0, 10.0, 2000);
        assert!((total - 1.0).abs() < 1e-10);
    }

    /// Bins of a discretised Gaussian against Simpson's rule on the density (near μ and far in
    /// both tails), and the masses of a full set of bins summing to 1.
    #[test]
    fn interval_log_prob_matches_quadrature_and_sums_to_one() {
        let (mu, sigma) = (0.3, 0.07);
        for (lo, hi) in [
            (0.25, 0.375),
            (0.5, 0.625),
            (-0.5, -0.375),
            (1.0, 1.125),
            (0.29, 0.31),
        ] {
            let exact = simpson(|x| normal_pdf(x, mu, sigma), lo, hi, 20_000).ln();
            let got = normal_interval_log_prob(lo, hi, mu, sigma);
            assert!(
                (got - exact).abs() < 1e-6 * exact.abs().max(1.0),
                "[{lo}, {hi}]: {got} vs {exact}"
            );
        }
        // 17 levels on [−1, 1], the outer bins open to ±∞.
        let edges: Vec<f64> = (0..=17)
            .map(|k| match k {
                0 => f64::NEG_INFINITY,
                17 => f64::INFINITY,
                k => -1.0 + (k as f64 - 0.5) * 0.125,
            })
            .collect();
        for mu in [-1.3, -0.2, 0.0, 0.55, 2.0] {
            let total: f64 = edges
                .windows(2)
                .map(|e| normal_interval_log_prob(e[0], e[1], mu, 0.2).exp())
                .sum();
            assert!((total - 1.0).abs() < 1e-6, "μ = {mu}: {total}");
        }
        // 40 standard deviations out (the tail itself underflows in f64 past ~38): finite,
        // and equal to the Mills-ratio expansion of the tails in standard units,
        // ln P(X > a) ≈ −a²/2 − ln(a√(2π)) + ln(1 − 1/a² + 3/a⁴), of both edges.
        let far = normal_interval_log_prob(3.0, 3.01, 0.0, 0.075);
        let mills = |a: f64| {
            -0.5 * a * a - (a * (2.0 * PI).sqrt()).ln()
                + (1.0 - 1.0 / (a * a) + 3.0 / a.powi(4)).ln()
        };
        let (a, b) = (3.0 / 0.075, 3.01 / 0.075);
        let expected = mills(a) + (-(mills(b) - mills(a)).exp()).ln_1p();
        assert!(
            far.is_finite() && (far - expected).abs() < 1e-5,
            "{far} vs {expected}"
        );
    }

    #[test]
    fn logsumexp_is_stable() {
        let v = [1000.0, 1000.0];
        assert!((logsumexp(&v) - (1000.0 + 2f64.ln())).abs() < 1e-12);
    }
}
