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

    #[test]
    fn logsumexp_is_stable() {
        let v = [1000.0, 1000.0];
        assert!((logsumexp(&v) - (1000.0 + 2f64.ln())).abs() < 1e-12);
    }
}
