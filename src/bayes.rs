//! Chapter 1, 先验/后验分布 (prior and posterior): Bayes' rule with numbers.
//!
//! p(θ | x) = p(x | θ) p(θ) / p(x),   p(x) = ∫ p(x | θ) p(θ) dθ.
//!
//! Two conjugate models give closed forms to check every numerical step against:
//! - a coin: θ ~ Beta(a, b), each flip xᵢ ~ Bernoulli(θ). After h heads and t tails the
//!   posterior is Beta(a + h, b + t) and the evidence of that sequence is
//!   p(x) = B(a + h, b + t) / B(a, b);
//! - a Normal mean with known variance: θ ~ N(μ₀, τ₀²), xᵢ ~ N(θ, σ²), whose posterior is
//!   N(μₙ, τₙ²) with 1/τₙ² = 1/τ₀² + n/σ² and μₙ = τₙ² (μ₀/τ₀² + Σxᵢ/σ²).
//!
//! Alongside each closed form is the brute-force version the notes' definitions suggest:
//! a grid posterior (likelihood × prior, normalised numerically) and the evidence by
//! quadrature.

use crate::error::{ensure, Error, Result};
use crate::math::{ln_beta, normal_log_pdf, simpson, trapezoid};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A Beta(a, b) distribution on θ ∈ [0, 1]: density θ^(a−1) (1−θ)^(b−1) / B(a, b).
///
/// As a prior for a coin, a and b are pseudo-counts in two senses: the mode
/// (a − 1)/(a + b − 2) counts a − 1 prior heads and b − 1 prior tails, while the mean
/// a/(a + b), and so the predictive (a + h)/(a + b + n), counts a and b (Beta(1, 1) gives
/// Laplace's (h + 1)/(n + 2)).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Beta {
    /// Shape a > 0 (a − 1 prior heads for the mode, a for the mean).
    pub a: f64,
    /// Shape b > 0 (b − 1 prior tails for the mode, b for the mean).
    pub b: f64,
}

impl Beta {
    /// Beta(a, b), or an error when a shape is not positive.
    pub fn new(a: f64, b: f64) -> Result<Self> {
        ensure(
            a > 0.0 && a.is_finite(),
            "a",
            a,
            "Beta shapes must be positive, e.g. a = 2",
        )?;
        ensure(
            b > 0.0 && b.is_finite(),
            "b",
            b,
            "Beta shapes must be positive, e.g. b = 2",
        )?;
        Ok(Beta { a, b })
    }

    /// The density p(θ) = θ^(a−1) (1−θ)^(b−1) / B(a, b); 0 outside [0, 1].
    pub fn pdf(&self, theta: f64) -> f64 {
        self.ln_pdf(theta).exp()
    }

    /// The log density ln p(θ) = (a−1) ln θ + (b−1) ln(1−θ) − ln B(a, b); −∞ outside [0, 1].
    pub fn ln_pdf(&self, theta: f64) -> f64 {
        if !(0.0..=1.0).contains(&theta) {
            return f64::NEG_INFINITY;
        }
        // x·ln(0) with x = 0 is 0 (θ⁰ = 1), not NaN.
        let term = |power: f64, base: f64| if power == 0.0 { 0.0 } else { power * base.ln() };
        term(self.a - 1.0, theta) + term(self.b - 1.0, 1.0 - theta) - ln_beta(self.a, self.b)
    }

    /// The mean a / (a + b).
    pub fn mean(&self) -> f64 {
        self.a / (self.a + self.b)
    }

    /// The variance ab / ((a + b)² (a + b + 1)).
    pub fn variance(&self) -> f64 {
        let s = self.a + self.b;
        self.a * self.b / (s * s * (s + 1.0))
    }

    /// The conjugate update: after `heads` and `tails`, Beta(a + heads, b + tails).
    pub fn posterior(&self, heads: u64, tails: u64) -> Beta {
        Beta {
            a: self.a + heads as f64,
            b: self.b + tails as f64,
        }
    }
}

/// The Bernoulli likelihood of one sequence with `heads` ones and `tails` zeros:
/// p(x | θ) = θ^h (1 − θ)^t.
///
/// As a function of θ it is not a probability distribution: its integral over θ is
/// B(h + 1, t + 1), not 1 (see [`likelihood_integral`]).
pub fn bernoulli_likelihood(theta: f64, heads: u64, tails: u64) -> f64 {
    bernoulli_log_likelihood(theta, heads, tails).exp()
}

/// The log-likelihood ln p(x | θ) = h ln θ + t ln(1 − θ) (−∞ outside [0, 1]). Unlike
/// [`bernoulli_likelihood`] it stays finite for any number of flips: θ^h underflows to 0 at
/// about 2,000 flips, its logarithm does not.
pub fn bernoulli_log_likelihood(theta: f64, heads: u64, tails: u64) -> f64 {
    if !(0.0..=1.0).contains(&theta) {
        return f64::NEG_INFINITY;
    }
    let (h, t) = (heads as f64, tails as f64);
    // 0^0 = 1: with no heads, θ = 0 is fine.
    (if h > 0.0 { h * theta.ln() } else { 0.0 })
        + if t > 0.0 { t * (1.0 - theta).ln() } else { 0.0 }
}

/// The evidence of a sequence, in closed form: p(x) = ∫ θ^h (1−θ)^t Beta(θ | a, b) dθ
/// = B(a + h, b + t) / B(a, b). It underflows to 0 beyond about 1,000 flips (it is the
/// probability of one exact sequence); use [`log_evidence_closed_form`] there.
pub fn evidence_closed_form(prior: &Beta, heads: u64, tails: u64) -> f64 {
    log_evidence_closed_form(prior, heads, tails).exp()
}

/// The log evidence ln p(x) = ln B(a + h, b + t) − ln B(a, b), finite for any number of flips.
pub fn log_evidence_closed_form(prior: &Beta, heads: u64, tails: u64) -> f64 {
    ln_beta(prior.a + heads as f64, prior.b + tails as f64) - ln_beta(prior.a, prior.b)
}

/// The log evidence by Simpson's rule in log space:
/// ln p(x) = m + ln ∫₀¹ exp(ln p(x | θ) + ln p(θ) − m) dθ, with m the largest value of the log
/// integrand on the rule's points, so the integrand's peak is exp(0) = 1 and nothing underflows
/// to an all-zero sum. Equals ln [`evidence_quadrature`] where that does not underflow.
pub fn log_evidence_quadrature(prior: &Beta, heads: u64, tails: u64, intervals: usize) -> f64 {
    let log_f = |theta: f64| bernoulli_log_likelihood(theta, heads, tails) + prior.ln_pdf(theta);
    let n = intervals.max(2).div_ceil(2) * 2;
    let m = (0..=n)
        .map(|i| log_f(i as f64 / n as f64))
        .fold(f64::NEG_INFINITY, f64::max);
    m + simpson(|theta| (log_f(theta) - m).exp(), 0.0, 1.0, n).ln()
}

/// The evidence p(x) = ∫₀¹ p(x | θ) p(θ) dθ by Simpson's rule on `intervals` intervals.
///
/// Accurate to ~1e-10 with 2,000 intervals when a, b ≥ 1 (a smooth integrand); a shape below 1
/// puts an integrable spike at an end point, which Simpson's rule resolves slowly.
pub fn evidence_quadrature(prior: &Beta, heads: u64, tails: u64, intervals: usize) -> f64 {
    simpson(
        |theta| bernoulli_likelihood(theta, heads, tails) * prior.pdf(theta),
        0.0,
        1.0,
        intervals,
    )
}

/// ∫₀¹ p(x | θ) dθ for the Bernoulli likelihood, by quadrature: the number that shows the
/// likelihood is not a distribution over θ (it equals B(h + 1, t + 1), e.g. 1/2 for one head).
pub fn likelihood_integral(heads: u64, tails: u64, intervals: usize) -> f64 {
    simpson(
        |theta| bernoulli_likelihood(theta, heads, tails),
        0.0,
        1.0,
        intervals,
    )
}

/// The posterior on a grid: p(θᵢ | x) ∝ p(x | θᵢ) p(θᵢ), normalised so its trapezoid
/// integral over the grid is 1. This is Bayes' rule with p(x) computed numerically.
///
/// It works in log space: ℓᵢ = ln p(x | θᵢ) + ln p(θᵢ), then exp(ℓᵢ − maxⱼ ℓⱼ) before
/// normalising, so the peak is 1 however many flips there are (in linear space every value
/// underflows to 0 beyond about 1,200 flips at θ ≈ 0.7).
///
/// The posterior is Beta(a + h, b + t); with a + h < 1 (or b + t < 1) its density is infinite
/// at θ = 0 (or 1), which no grid value can hold: such an end point gets weight 0, and the grid
/// posterior is then a poor approximation near that end (chapter 1's grid check says so).
pub fn grid_posterior(grid: &[f64], prior: &Beta, heads: u64, tails: u64) -> Result<Vec<f64>> {
    // One exponent per side, so that θ⁰ = 1 even where a − 1 and h cancel (ln 0 · 0).
    let (up, down) = (prior.a - 1.0 + heads as f64, prior.b - 1.0 + tails as f64);
    let term = |power: f64, base: f64| if power == 0.0 { 0.0 } else { power * base.ln() };
    let logs: Vec<f64> = grid
        .iter()
        .map(|&t| {
            let l = if (0.0..=1.0).contains(&t) {
                term(up, t) + term(down, 1.0 - t)
            } else {
                f64::NEG_INFINITY
            };
            if l.is_nan() || l == f64::INFINITY {
                f64::NEG_INFINITY
            } else {
                l
            }
        })
        .collect();
    let max = logs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    normalise_on_grid(grid, logs.iter().map(|l| (l - max).exp()).collect())
}

/// The mean and standard deviation of a density tabulated on a grid, by the trapezoid rule:
/// m = ∫ θ p(θ) dθ, s² = ∫ (θ − m)² p(θ) dθ (the density is divided by its integral first).
/// Chapter 1 compares the s of a grid posterior with a closed form's.
pub fn grid_mean_std(grid: &[f64], density: &[f64]) -> Result<(f64, f64)> {
    let p = normalise_on_grid(grid, density.to_vec())?;
    let weighted: Vec<f64> = grid.iter().zip(&p).map(|(t, p)| t * p).collect();
    let m = trapezoid(grid, &weighted);
    let spread: Vec<f64> = grid
        .iter()
        .zip(&p)
        .map(|(t, p)| (t - m).powi(2) * p)
        .collect();
    Ok((m, trapezoid(grid, &spread).sqrt()))
}

/// The exponent k of a power law err ≈ C · nᵏ fitted by least squares to (ln nᵢ, ln errᵢ):
/// the slope of the error against the number of intervals on log-log axes (−4 for Simpson's
/// rule on a smooth integrand whose odd derivatives do not vanish at the ends). Points whose
/// error is 0 or not finite (round-off reached) are left out; fewer than two left is an error.
pub fn power_law_slope(intervals: &[usize], errors: &[f64]) -> Result<f64> {
    let pts: Vec<(f64, f64)> = intervals
        .iter()
        .zip(errors)
        .filter(|(_, e)| **e > 0.0 && e.is_finite())
        .map(|(&n, &e)| ((n as f64).ln(), e.ln()))
        .collect();
    ensure(
        pts.len() >= 2,
        "errors",
        format!("{errors:?}"),
        "fit a slope to at least two positive, finite errors",
    )?;
    let k = pts.len() as f64;
    let (mx, my) = (
        pts.iter().map(|p| p.0).sum::<f64>() / k,
        pts.iter().map(|p| p.1).sum::<f64>() / k,
    );
    let sxy: f64 = pts.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
    let sxx: f64 = pts.iter().map(|p| (p.0 - mx).powi(2)).sum();
    Ok(sxy / sxx)
}

/// Divides tabulated values by their trapezoid integral, so they integrate to 1 on the grid.
pub fn normalise_on_grid(grid: &[f64], values: Vec<f64>) -> Result<Vec<f64>> {
    if grid.len() != values.len() || grid.len() < 2 {
        return Err(Error::shape(
            "normalise_on_grid",
            format!(
                "a grid of at least 2 points and one value per point ({})",
                grid.len()
            ),
            format!("{} values", values.len()),
        ));
    }
    let z = trapezoid(grid, &values);
    ensure(
        z > 0.0 && z.is_finite(),
        "grid",
        format!("[{}, …, {}]", grid[0], grid[grid.len() - 1]),
        "the unnormalised values integrate to 0 (or overflow) on this grid: tabulate them \
         in log space and subtract their maximum before exponentiating, or widen the grid if \
         it misses the density's mass",
    )?;
    Ok(values.into_iter().map(|v| v / z).collect())
}

/// The posterior predictive probability that the next flip is heads:
/// p(x_new = 1 | x) = ∫ θ p(θ | x) dθ = (a + h) / (a + b + h + t).
pub fn predictive_heads(prior: &Beta, heads: u64, tails: u64) -> f64 {
    prior.posterior(heads, tails).mean()
}

/// The posterior predictive by simulation: draw θ ~ p(θ | x), then a flip ~ Bernoulli(θ),
/// `draws` times; the fraction of heads estimates ∫ θ p(θ | x) dθ.
pub fn predictive_heads_monte_carlo(posterior: &Beta, draws: usize, seed: u64) -> Result<f64> {
    ensure(draws > 0, "draws", draws, "draw at least one sample")?;
    let beta = rand_distr::Beta::new(posterior.a, posterior.b)
        .map_err(|e| Error::param("posterior", format!("{posterior:?}"), e.to_string()))?;
    let mut rng = StdRng::seed_from_u64(seed);
    let heads = (0..draws)
        .filter(|_| {
            let theta: f64 = rand_distr::Distribution::sample(&beta, &mut rng);
            rng.gen::<f64>() < theta
        })
        .count();
    Ok(heads as f64 / draws as f64)
}

/// `n` coin flips with P(heads) = `theta`, seeded (true = heads).
pub fn flip_coins(theta: f64, n: usize, seed: u64) -> Result<Vec<bool>> {
    ensure(
        (0.0..=1.0).contains(&theta),
        "theta",
        theta,
        "a coin's probability of heads lies in [0, 1]",
    )?;
    let mut rng = StdRng::seed_from_u64(seed);
    Ok((0..n).map(|_| rng.gen::<f64>() < theta).collect())
}

/// Heads and tails among the first `n` flips.
pub fn count_heads(flips: &[bool], n: usize) -> (u64, u64) {
    let seen = &flips[..n.min(flips.len())];
    let heads = seen.iter().filter(|&&f| f).count() as u64;
    (heads, seen.len() as u64 - heads)
}

/// The Normal-Normal model with known observation noise σ: prior θ ~ N(μ₀, τ₀²),
/// observations xᵢ ~ N(θ, σ²).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct NormalNormal {
    /// Prior mean μ₀.
    pub prior_mean: f64,
    /// Prior standard deviation τ₀ > 0.
    pub prior_std: f64,
    /// Known observation noise σ > 0.
    pub noise_std: f64,
}

impl NormalNormal {
    /// The model, or an error naming a standard deviation that is not positive.
    pub fn new(prior_mean: f64, prior_std: f64, noise_std: f64) -> Result<Self> {
        ensure(
            prior_std > 0.0,
            "prior_std",
            prior_std,
            "use a positive prior standard deviation",
        )?;
        ensure(
            noise_std > 0.0,
            "noise_std",
            noise_std,
            "use a positive noise standard deviation",
        )?;
        Ok(NormalNormal {
            prior_mean,
            prior_std,
            noise_std,
        })
    }

    /// The closed-form posterior (μₙ, τₙ): 1/τₙ² = 1/τ₀² + n/σ², μₙ = τₙ² (μ₀/τ₀² + Σxᵢ/σ²).
    pub fn posterior(&self, xs: &[f64]) -> (f64, f64) {
        let precision = 1.0 / self.prior_std.powi(2) + xs.len() as f64 / self.noise_std.powi(2);
        let var = 1.0 / precision;
        let sum: f64 = xs.iter().sum();
        let mean = var * (self.prior_mean / self.prior_std.powi(2) + sum / self.noise_std.powi(2));
        (mean, var.sqrt())
    }

    /// log p(x | θ) p(θ), the unnormalised log posterior at θ.
    pub fn log_joint(&self, theta: f64, xs: &[f64]) -> f64 {
        normal_log_pdf(theta, self.prior_mean, self.prior_std)
            + xs.iter()
                .map(|&x| normal_log_pdf(x, theta, self.noise_std))
                .sum::<f64>()
    }

    /// The posterior on a grid, by Bayes' rule with the evidence computed numerically
    /// (the log joint is shifted by its maximum before exponentiating, for stability).
    pub fn grid_posterior(&self, grid: &[f64], xs: &[f64]) -> Result<Vec<f64>> {
        let logs: Vec<f64> = grid.iter().map(|&t| self.log_joint(t, xs)).collect();
        let max = logs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        normalise_on_grid(grid, logs.iter().map(|l| (l - max).exp()).collect())
    }

    /// n observations from the model with true mean `theta`, seeded.
    pub fn observe(&self, theta: f64, n: usize, seed: u64) -> Vec<f64> {
        use rand_distr::{Distribution, StandardNormal};
        let mut rng = StdRng::seed_from_u64(seed);
        (0..n)
            .map(|_| {
                let e: f64 = StandardNormal.sample(&mut rng);
                theta + self.noise_std * e
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::math::{linspace, normal_pdf};

    /// A prior with a, b < 1 and no heads (or no tails) has a posterior whose density is
    /// infinite at an end point: the grid posterior gives that point weight 0 instead of an
    /// error (it was ∞ − ∞ = NaN there), and still integrates to 1.
    #[test]
    fn grid_posterior_with_an_infinite_end_point_is_finite() {
        let grid = linspace(0.0, 1.0, 11);
        let prior = Beta::new(0.5, 0.5).unwrap();
        for (h, t) in [(0, 0), (0, 3), (3, 0), (2, 2)] {
            let p = grid_posterior(&grid, &prior, h, t).unwrap();
            assert!(
                p.iter().all(|v| v.is_finite() && *v >= 0.0),
                "{h} {t}: {p:?}"
            );
            assert!((trapezoid(&grid, &p) - 1.0).abs() < 1e-12);
        }
        // Where the density is finite everywhere, nothing changes: Beta(3, 2) from Beta(2, 2).
        let p = grid_posterior(
            &linspace(0.0, 1.0, 2001),
            &Beta::new(2.0, 2.0).unwrap(),
            1,
            0,
        )
        .unwrap();
        let exact = Beta::new(3.0, 2.0).unwrap();
        for (i, t) in linspace(0.0, 1.0, 2001).iter().enumerate().step_by(100) {
            assert!((p[i] - exact.pdf(*t)).abs() < 1e-5, "{t}");
        }
    }

    #[test]
    fn evidence_closed_form_matches_quadrature() {
        for (a, b, h, t) in [
            (1.0, 1.0, 3, 2),
            (2.0, 2.0, 7, 13),
            (5.0, 1.5, 0, 4),
            (2.0, 3.0, 40, 60),
        ] {
            let prior = Beta::new(a, b).unwrap();
            let exact = evidence_closed_form(&prior, h, t);
            let quad = evidence_quadrature(&prior, h, t, 4000);
            assert!(
                ((exact - quad) / exact).abs() < 1e-6,
                "{a} {b} {h} {t}: {exact} vs {quad}"
            );
        }
    }

    #[test]
    fn grid_posterior_matches_closed_form() {
        let prior = Beta::new(2.0, 2.0).unwrap();
        let grid = linspace(0.0, 1.0, 20001);
        let numeric = grid_posterior(&grid, &prior, 7, 3).unwrap();
        let exact = prior.posterior(7, 3);
        let worst = grid
            .iter()
            .zip(&numeric)
            .map(|(&t, &p)| (p - exact.pdf(t)).abs())
            .fold(0.0, f64::max);
        assert!(worst < 1e-6, "max |grid − closed form| = {worst}");
    }

    /// 100,000 flips at θ = 0.7: every p(x | θ) underflows in linear space, the log-space
    /// grid posterior still matches Beta(a + h, b + t) and the log evidence is finite.
    #[test]
    fn grid_posterior_and_log_evidence_survive_100000_flips() {
        let prior = Beta::new(2.0, 2.0).unwrap();
        let coin = flip_coins(0.7, 100_000, 0).unwrap();
        let (h, t) = count_heads(&coin, coin.len());
        assert_eq!(
            bernoulli_likelihood(0.7, h, t),
            0.0,
            "linear space underflows"
        );
        let grid = linspace(0.0, 1.0, 2001);
        let numeric = grid_posterior(&grid, &prior, h, t).unwrap();
        let exact = prior.posterior(h, t);
        let peak = exact.pdf(exact.mean());
        let worst = grid
            .iter()
            .zip(&numeric)
            .map(|(&th, &p)| (p - exact.pdf(th)).abs())
            .fold(0.0, f64::max);
        // ~3 grid points per posterior standard deviation (0.0014): the trapezoid normaliser
        // is still accurate to well under 0.1 % of the peak.
        assert!(worst < 1e-3 * peak, "max |Δ| = {worst} of a peak {peak}");
        let (m, s) = grid_mean_std(&grid, &numeric).unwrap();
        assert!((m - exact.mean()).abs() < 1e-6, "{m} vs {}", exact.mean());
        let sd = exact.variance().sqrt();
        assert!((s - sd).abs() < 1e-3 * sd, "{s} vs {sd}");
        let exact_log = log_evidence_closed_form(&prior, h, t);
        assert!(
            exact_log.is_finite() && exact_log < -60_000.0,
            "{exact_log}"
        );
        let quad = log_evidence_quadrature(&prior, h, t, 20_000);
        assert!((quad - exact_log).abs() < 1e-6, "{quad} vs {exact_log}");
        // Where linear space still works, the two agree.
        let small = log_evidence_quadrature(&prior, 7, 13, 4000);
        assert!((small - evidence_quadrature(&prior, 7, 13, 4000).ln()).abs() < 1e-12);
    }

    /// Simpson's error falls as n⁻⁴ where the integrand's third derivative does not vanish at
    /// the ends (3 heads, 2 tails: θ⁴(1−θ)³ under a Beta(2, 2) prior), and faster than that
    /// when many flips flatten it at both ends.
    #[test]
    fn simpson_error_slope_is_minus_four() {
        let prior = Beta::new(2.0, 2.0).unwrap();
        let ns = [4usize, 8, 16, 32, 64, 128, 256];
        let rel = |h, t| -> Vec<f64> {
            let exact = evidence_closed_form(&prior, h, t);
            ns.iter()
                .map(|&n| ((evidence_quadrature(&prior, h, t, n) - exact) / exact).abs())
                .collect()
        };
        let slope = power_law_slope(&ns, &rel(3, 2)).unwrap();
        assert!((slope + 4.0).abs() < 0.15, "slope {slope}");
        let many = rel(70, 30);
        assert!(many[5] < 1e-12, "100 flips: {many:?}");
        assert!(power_law_slope(&[4], &[0.1]).is_err());
    }

    #[test]
    fn likelihood_does_not_integrate_to_one() {
        let one_head = likelihood_integral(1, 0, 2000);
        assert!((one_head - 0.5).abs() < 1e-9);
        let exact = ln_beta(4.0, 3.0).exp();
        assert!((likelihood_integral(3, 2, 2000) - exact).abs() < 1e-9);
    }

    #[test]
    fn predictive_is_posterior_mean() {
        let prior = Beta::new(1.0, 1.0).unwrap();
        // Laplace's rule of succession: (h + 1) / (n + 2).
        assert!((predictive_heads(&prior, 3, 1) - 4.0 / 6.0).abs() < 1e-12);
        let post = prior.posterior(3, 1);
        let by_quadrature = simpson(|t| t * post.pdf(t), 0.0, 1.0, 2000);
        assert!((by_quadrature - predictive_heads(&prior, 3, 1)).abs() < 1e-9);
    }

    #[test]
    fn normal_normal_matches_grid() {
        let model = NormalNormal::new(0.0, 2.0, 1.0).unwrap();
        let xs = model.observe(1.3, 10, 7);
        let (m, s) = model.posterior(&xs);
        let grid = linspace(-6.0, 6.0, 24001);
        let numeric = model.grid_posterior(&grid, &xs).unwrap();
        let worst = grid
            .iter()
            .zip(&numeric)
            .map(|(&t, &p)| (p - normal_pdf(t, m, s)).abs())
            .fold(0.0, f64::max);
        assert!(worst < 1e-6, "max |grid − closed form| = {worst}");
    }

    #[test]
    fn bad_parameters_are_errors() {
        assert!(Beta::new(0.0, 1.0).is_err());
        assert!(NormalNormal::new(0.0, -1.0, 1.0).is_err());
        assert!(flip_coins(1.5, 3, 0).is_err());
        let err = Beta::new(-1.0, 1.0).unwrap_err().to_string();
        assert!(err.contains("`a`") && err.contains("-1"), "{err}");
    }
}
