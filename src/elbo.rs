//! Chapter 2, 变分分布 / 变分推断 / ELBO: every line of the ELBO derivation, checked with numbers.
//!
//! The models have one latent z, so that log p(x) and the exact posterior can be computed by
//! quadrature and compared with what variational inference finds:
//!
//! z ~ N(0, 1),  xᵢ | z ~ N(f(z), σ²) for i = 1..n,
//!
//! with a link f chosen by [`Link`]: linear (conjugate: the posterior is Gaussian and known),
//! cubic (not conjugate, one mode) or square (x ≈ z², so z and −z explain x equally well: two modes).
//!
//! The variational family is q(z) = N(m, s²). For it:
//! - ELBO(q) = E_q[log p(x, z) − log q(z)] = E_q[log p(x | z)] − KL(q(z) ‖ p(z)),
//! - log p(x) = ELBO(q) + KL(q(z) ‖ p(z | x))  (the identity the chapter checks to 1e-4),
//! - Jensen: log E_q(w) ≥ E_q(log w) for the importance weight w = p(x, z) / q(z), with
//!   E_q(w) = p(x) exactly, so the gap is the KL above;
//! - the IWAE bound log (1/K) Σₖ wₖ, which tightens toward log p(x) as K grows.

use crate::error::{ensure, Error, Result};
use crate::math::{logsumexp, normal_log_pdf, simpson};
use crate::train::{AdamSettings, Dev, Trainer};
use dfdx::prelude::*;
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use std::f64::consts::PI;

/// The link f in xᵢ | z ~ N(f(z), σ²).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Link {
    /// f(z) = a·z: the conjugate case, whose posterior is Gaussian in closed form.
    Linear(f64),
    /// f(z) = z + z³/5: smooth, one-to-one, not conjugate (a skewed posterior).
    Cubic,
    /// f(z) = z²: z and −z give the same x, so the posterior has two modes.
    Square,
}

impl Link {
    /// f(z).
    pub fn f(&self, z: f64) -> f64 {
        match *self {
            Link::Linear(a) => a * z,
            Link::Cubic => z + z * z * z / 5.0,
            Link::Square => z * z,
        }
    }

    /// f′(z).
    pub fn df(&self, z: f64) -> f64 {
        match *self {
            Link::Linear(a) => a,
            Link::Cubic => 1.0 + 3.0 * z * z / 5.0,
            Link::Square => 2.0 * z,
        }
    }
}

/// A one-latent model z ~ N(0, 1), xᵢ | z ~ N(f(z), σ²), with its observations.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LatentModel {
    /// The link f.
    pub link: Link,
    /// Observation noise σ > 0.
    pub sigma: f64,
    /// The observations x₁..xₙ.
    pub xs: Vec<f64>,
}

/// Where quadrature over z looks: the prior N(0, 1) puts everything that matters in ±10.
const Z_RANGE: (f64, f64) = (-10.0, 10.0);
const Z_INTERVALS: usize = 20_000;

impl LatentModel {
    /// The model, or an error naming σ or the data when they are unusable.
    pub fn new(link: Link, sigma: f64, xs: Vec<f64>) -> Result<Self> {
        ensure(
            sigma > 0.0 && sigma.is_finite(),
            "sigma",
            sigma,
            "the noise σ must be positive, e.g. 0.5",
        )?;
        ensure(!xs.is_empty(), "xs", "[]", "give at least one observation")?;
        ensure(
            xs.iter().all(|x| x.is_finite()),
            "xs",
            format!("{xs:?}"),
            "observations must be finite numbers",
        )?;
        Ok(LatentModel { link, sigma, xs })
    }

    /// n observations drawn from the model with latent `z`, seeded.
    pub fn simulate(link: Link, sigma: f64, z: f64, n: usize, seed: u64) -> Result<Self> {
        let mut rng = StdRng::seed_from_u64(seed);
        let xs = (0..n)
            .map(|_| {
                let e: f64 = StandardNormal.sample(&mut rng);
                link.f(z) + sigma * e
            })
            .collect();
        Self::new(link, sigma, xs)
    }

    fn sums(&self) -> (f64, f64, f64) {
        let n = self.xs.len() as f64;
        let s1 = self.xs.iter().sum();
        let s2 = self.xs.iter().map(|x| x * x).sum();
        (n, s1, s2)
    }

    /// log p(x | z) = Σᵢ log N(xᵢ | f(z), σ²).
    pub fn log_likelihood(&self, z: f64) -> f64 {
        let f = self.link.f(z);
        self.xs
            .iter()
            .map(|&x| normal_log_pdf(x, f, self.sigma))
            .sum()
    }

    /// log p(x, z) = log N(z | 0, 1) + log p(x | z).
    pub fn log_joint(&self, z: f64) -> f64 {
        normal_log_pdf(z, 0.0, 1.0) + self.log_likelihood(z)
    }

    /// ∂/∂z log p(x, z) = −z + f′(z) Σᵢ (xᵢ − f(z)) / σ².
    pub fn dlog_joint(&self, z: f64) -> f64 {
        let f = self.link.f(z);
        let residual: f64 = self.xs.iter().map(|x| x - f).sum();
        -z + self.link.df(z) * residual / (self.sigma * self.sigma)
    }

    /// log p(x) = log ∫ p(x, z) dz by Simpson's rule on [−10, 10] (20,000 intervals), with the
    /// integrand scaled by its largest value so that nothing underflows.
    pub fn log_evidence(&self) -> f64 {
        let grid = crate::math::linspace(Z_RANGE.0, Z_RANGE.1, 2001);
        let shift = grid
            .iter()
            .map(|&z| self.log_joint(z))
            .fold(f64::NEG_INFINITY, f64::max);
        let integral = simpson(
            |z| (self.log_joint(z) - shift).exp(),
            Z_RANGE.0,
            Z_RANGE.1,
            Z_INTERVALS,
        );
        shift + integral.ln()
    }

    /// The exact posterior density p(z | x) = p(x, z) / p(x), given log p(x).
    pub fn posterior_pdf(&self, z: f64, log_evidence: f64) -> f64 {
        (self.log_joint(z) - log_evidence).exp()
    }

    /// Mean and standard deviation of the exact posterior, by quadrature.
    pub fn posterior_moments(&self) -> (f64, f64) {
        let le = self.log_evidence();
        let m1 = simpson(
            |z| z * self.posterior_pdf(z, le),
            Z_RANGE.0,
            Z_RANGE.1,
            Z_INTERVALS,
        );
        let m2 = simpson(
            |z| z * z * self.posterior_pdf(z, le),
            Z_RANGE.0,
            Z_RANGE.1,
            Z_INTERVALS,
        );
        (m1, (m2 - m1 * m1).max(0.0).sqrt())
    }

    /// The closed-form posterior of the conjugate (linear) case: precision 1 + n a²/σ²,
    /// mean = a Σxᵢ / σ² / precision. `None` for a nonlinear link.
    pub fn conjugate_posterior(&self) -> Option<Gaussian> {
        match self.link {
            Link::Linear(a) => {
                let (n, s1, _) = self.sums();
                let precision = 1.0 + n * a * a / (self.sigma * self.sigma);
                Some(Gaussian {
                    mean: a * s1 / (self.sigma * self.sigma) / precision,
                    std: precision.powf(-0.5),
                })
            }
            _ => None,
        }
    }
}

/// A Gaussian q(z) = N(mean, std²): the variational family of the chapter.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Gaussian {
    /// m.
    pub mean: f64,
    /// s > 0.
    pub std: f64,
}

impl Gaussian {
    /// N(mean, std²), or an error when std is not positive.
    pub fn new(mean: f64, std: f64) -> Result<Self> {
        ensure(
            std > 0.0 && std.is_finite(),
            "std",
            std,
            "a standard deviation must be positive",
        )?;
        ensure(
            mean.is_finite(),
            "mean",
            mean,
            "the mean must be a finite number",
        )?;
        Ok(Gaussian { mean, std })
    }

    /// log q(z).
    pub fn log_pdf(&self, z: f64) -> f64 {
        normal_log_pdf(z, self.mean, self.std)
    }

    /// The entropy H(q) = −E_q[log q] = ½ log(2πe s²).
    pub fn entropy(&self) -> f64 {
        0.5 * (2.0 * PI * std::f64::consts::E * self.std * self.std).ln()
    }

    /// z = m + s·ε with ε ~ N(0, 1): the reparameterised sample.
    pub fn sample(&self, rng: &mut StdRng) -> f64 {
        let e: f64 = StandardNormal.sample(rng);
        self.mean + self.std * e
    }

    /// ∫ g(z) q(z) dz by Simpson's rule over m ± 12 s.
    pub fn expectation(&self, g: impl Fn(f64) -> f64) -> f64 {
        let (lo, hi) = (self.mean - 12.0 * self.std, self.mean + 12.0 * self.std);
        simpson(|z| g(z) * self.log_pdf(z).exp(), lo, hi, 4000)
    }
}

/// ELBO(q) = E_q[log p(x, z)] + H(q), computed by quadrature (no sampling noise).
pub fn elbo_exact(model: &LatentModel, q: &Gaussian) -> f64 {
    q.expectation(|z| model.log_joint(z)) + q.entropy()
}

/// The ELBO's other form, term by term: (E_q[log p(x | z)], KL(q(z) ‖ p(z))), the expected
/// log-likelihood by quadrature and the KL to the prior N(0, 1) in closed form,
/// KL = −½ (1 + log s² − m² − s²). Their difference E_q[log p(x | z)] − KL(q ‖ p(z)) equals
/// [`elbo_exact`]'s E_q[log p(x, z) − log q(z)], since log p(x, z) = log p(x | z) + log p(z).
pub fn elbo_terms(model: &LatentModel, q: &Gaussian) -> (f64, f64) {
    let expected_log_likelihood = q.expectation(|z| model.log_likelihood(z));
    let log_var = 2.0 * q.std.ln();
    let kl_prior = -0.5 * (1.0 + log_var - q.mean * q.mean - q.std * q.std);
    (expected_log_likelihood, kl_prior)
}

/// KL(q(z) ‖ p(z | x)) = E_q[log q(z) − log p(z | x)], by quadrature, given log p(x).
pub fn kl_to_posterior(model: &LatentModel, q: &Gaussian, log_evidence: f64) -> f64 {
    q.expectation(|z| q.log_pdf(z) - (model.log_joint(z) - log_evidence))
}

/// One row of the identity table: log p(x), ELBO(q), KL(q ‖ p(z|x)) and
/// log p(x) − (ELBO + KL), which is 0 up to quadrature error.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct IdentityRow {
    /// The q evaluated.
    pub q: Gaussian,
    /// log p(x) by quadrature.
    pub log_evidence: f64,
    /// ELBO(q) by quadrature.
    pub elbo: f64,
    /// KL(q ‖ p(z | x)) by quadrature.
    pub kl: f64,
    /// log p(x) − ELBO − KL.
    pub difference: f64,
}

/// Evaluates log p(x) = ELBO(q) + KL(q ‖ p(z | x)) for each q.
pub fn identity_table(model: &LatentModel, qs: &[Gaussian]) -> Vec<IdentityRow> {
    let log_evidence = model.log_evidence();
    qs.iter()
        .map(|q| {
            let elbo = elbo_exact(model, q);
            let kl = kl_to_posterior(model, q, log_evidence);
            IdentityRow {
                q: *q,
                log_evidence,
                elbo,
                kl,
                difference: log_evidence - elbo - kl,
            }
        })
        .collect()
}

/// log wₖ = log p(x, zₖ) − log q(zₖ) for `k` draws zₖ ~ q.
pub fn log_weights(model: &LatentModel, q: &Gaussian, k: usize, rng: &mut StdRng) -> Vec<f64> {
    (0..k)
        .map(|_| {
            let z = q.sample(rng);
            model.log_joint(z) - q.log_pdf(z)
        })
        .collect()
}

/// The Monte Carlo ELBO estimate (1/K) Σₖ log wₖ.
pub fn elbo_monte_carlo(model: &LatentModel, q: &Gaussian, k: usize, rng: &mut StdRng) -> f64 {
    let w = log_weights(model, q, k.max(1), rng);
    w.iter().sum::<f64>() / w.len() as f64
}

/// The importance-weighted bound (IWAE) log (1/K) Σₖ wₖ: a lower bound on log p(x) in
/// expectation that is the ELBO at K = 1 and tightens toward log p(x) as K grows.
pub fn iwae_bound(model: &LatentModel, q: &Gaussian, k: usize, rng: &mut StdRng) -> f64 {
    let w = log_weights(model, q, k.max(1), rng);
    logsumexp(&w) - (w.len() as f64).ln()
}

/// The Gaussian closest to the posterior in KL(p ‖ q) (mass-covering): for the Gaussian family
/// the minimiser matches the posterior's mean and variance.
pub fn forward_kl_fit(model: &LatentModel) -> Gaussian {
    let (mean, std) = model.posterior_moments();
    Gaussian {
        mean,
        std: std.max(1e-12),
    }
}

/// One-sample gradient estimates of ∂ELBO/∂m and ∂ELBO/∂log s at q.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GradientSample {
    /// ∂/∂m.
    pub d_mean: f64,
    /// ∂/∂log s.
    pub d_log_std: f64,
}

/// The reparameterisation gradient from one ε: with z = m + s ε,
/// ∂/∂m = ∂ₖ log p(x, z), ∂/∂log s = ∂ₖ log p(x, z) · s ε + 1 (the +1 is ∂H/∂log s).
pub fn reparam_gradient(model: &LatentModel, q: &Gaussian, rng: &mut StdRng) -> GradientSample {
    let e: f64 = StandardNormal.sample(rng);
    let z = q.mean + q.std * e;
    let g = model.dlog_joint(z);
    GradientSample {
        d_mean: g,
        d_log_std: g * q.std * e + 1.0,
    }
}

/// The score-function (REINFORCE) gradient from one z ~ q:
/// ∇ELBO = E_q[∇ log q(z) · (log p(x, z) − log q(z))], with ∂ log q/∂m = (z − m)/s² and
/// ∂ log q/∂log s = (z − m)²/s² − 1.
pub fn score_gradient(model: &LatentModel, q: &Gaussian, rng: &mut StdRng) -> GradientSample {
    let z = q.sample(rng);
    let f = model.log_joint(z) - q.log_pdf(z);
    let u = (z - q.mean) / q.std;
    GradientSample {
        d_mean: u / q.std * f,
        d_log_std: (u * u - 1.0) * f,
    }
}

/// ∂ELBO/∂m and ∂ELBO/∂log s by central finite differences of the exact (quadrature) ELBO.
pub fn finite_difference_gradient(model: &LatentModel, q: &Gaussian, h: f64) -> GradientSample {
    let at = |m: f64, log_s: f64| {
        elbo_exact(
            model,
            &Gaussian {
                mean: m,
                std: log_s.exp(),
            },
        )
    };
    let log_s = q.std.ln();
    GradientSample {
        d_mean: (at(q.mean + h, log_s) - at(q.mean - h, log_s)) / (2.0 * h),
        d_log_std: (at(q.mean, log_s + h) - at(q.mean, log_s - h)) / (2.0 * h),
    }
}

/// KL(N(μ_q, diag e^{lv_q}) ‖ N(μ_p, diag e^{lv_p})) in closed form:
/// ½ Σ [lv_p − lv_q + (e^{lv_q} + (μ_q − μ_p)²) / e^{lv_p} − 1].
pub fn kl_diag_gaussians(
    mu_q: &[f64],
    log_var_q: &[f64],
    mu_p: &[f64],
    log_var_p: &[f64],
) -> Result<f64> {
    let d = mu_q.len();
    if log_var_q.len() != d || mu_p.len() != d || log_var_p.len() != d {
        return Err(Error::shape(
            "kl_diag_gaussians",
            format!("four slices of length {d}"),
            format!(
                "{}, {}, {}, {}",
                d,
                log_var_q.len(),
                mu_p.len(),
                log_var_p.len()
            ),
        ));
    }
    Ok(0.5
        * (0..d)
            .map(|i| {
                log_var_p[i] - log_var_q[i]
                    + (log_var_q[i].exp() + (mu_q[i] - mu_p[i]).powi(2)) / log_var_p[i].exp()
                    - 1.0
            })
            .sum::<f64>())
}

/// KL(N(μ, diag e^{lv}) ‖ N(0, I)) = −½ Σ (1 + lv − μ² − e^{lv}): the VAE's KL term.
pub fn kl_to_standard_normal(mu: &[f64], log_var: &[f64]) -> Result<f64> {
    let zeros = vec![0.0; mu.len()];
    kl_diag_gaussians(mu, log_var, &zeros, &zeros)
}

/// The Monte Carlo estimate of KL(q ‖ p) for diagonal Gaussians, with its standard error:
/// the mean and standard error of log q(z) − log p(z) over `n` draws z ~ q.
pub fn kl_diag_monte_carlo(
    mu_q: &[f64],
    log_var_q: &[f64],
    mu_p: &[f64],
    log_var_p: &[f64],
    n: usize,
    seed: u64,
) -> Result<(f64, f64)> {
    kl_diag_gaussians(mu_q, log_var_q, mu_p, log_var_p)?;
    ensure(
        n >= 2,
        "n",
        n,
        "use at least 2 samples for a standard error",
    )?;
    let mut rng = StdRng::seed_from_u64(seed);
    let values: Vec<f64> = (0..n)
        .map(|_| {
            (0..mu_q.len())
                .map(|i| {
                    let (sq, sp) = ((0.5 * log_var_q[i]).exp(), (0.5 * log_var_p[i]).exp());
                    let e: f64 = StandardNormal.sample(&mut rng);
                    let z = mu_q[i] + sq * e;
                    normal_log_pdf(z, mu_q[i], sq) - normal_log_pdf(z, mu_p[i], sp)
                })
                .sum()
        })
        .collect();
    Ok(mean_and_standard_error(&values))
}

/// Mean and standard error (sample std / √n) of a set of numbers.
pub fn mean_and_standard_error(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    (mean, (var / n).sqrt())
}

/// Settings of a variational fit: Adam on (m, log s) with a K-sample reparameterised ELBO.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ViConfig {
    /// Adam's learning rate.
    pub lr: f64,
    /// Optimiser steps.
    pub steps: usize,
    /// Samples of ε per step (K in the Monte Carlo ELBO).
    pub samples: usize,
    /// Starting mean m.
    pub init_mean: f64,
    /// Starting standard deviation s.
    pub init_std: f64,
    /// Seed of ε.
    pub seed: u64,
}

impl Default for ViConfig {
    fn default() -> Self {
        ViConfig {
            lr: 0.05,
            steps: 500,
            samples: 16,
            init_mean: 0.0,
            init_std: 1.0,
            seed: 0,
        }
    }
}

impl ViConfig {
    /// The config, or an error naming the first field outside its range.
    pub fn validate(&self) -> Result<()> {
        ensure(
            self.steps >= 1,
            "steps",
            self.steps,
            "take at least one step",
        )?;
        ensure(
            self.samples >= 1,
            "samples",
            self.samples,
            "draw at least one ε per step",
        )?;
        ensure(
            self.init_std > 0.0 && self.init_std.is_finite(),
            "init_std",
            self.init_std,
            "the starting standard deviation must be positive, e.g. 1.0",
        )?;
        ensure(
            self.init_mean.is_finite(),
            "init_mean",
            self.init_mean,
            "use a finite starting mean",
        )?;
        self.adam().validate()
    }

    /// Adam with this learning rate and PyTorch's default betas and ε.
    pub fn adam(&self) -> AdamSettings {
        AdamSettings {
            lr: self.lr,
            ..Default::default()
        }
    }
}

/// The variational parameters (m, log s) as dfdx tensors.
pub type ViParams = (Tensor<Rank0, f32, Dev>, Tensor<Rank0, f32, Dev>);

/// A variational fit: the trainer (continue it with [`VariationalFit::train`]) and the
/// history of the Monte Carlo ELBO estimate.
pub struct VariationalFit {
    /// The model being fitted.
    pub model: LatentModel,
    /// The settings.
    pub config: ViConfig,
    /// Adam on (m, log s).
    pub trainer: Trainer<ViParams>,
}

impl VariationalFit {
    /// Starts a fit at q = N(init_mean, init_std²).
    pub fn new(model: &LatentModel, config: ViConfig) -> Result<Self> {
        config.validate()?;
        let dev = Dev::seed_from_u64(config.seed);
        let params: ViParams = (
            dev.tensor(config.init_mean as f32),
            dev.tensor((config.init_std as f32).ln()),
        );
        Ok(VariationalFit {
            model: model.clone(),
            config,
            trainer: Trainer::with_device(params, dev, config.adam(), config.seed)?,
        })
    }

    /// The current q.
    pub fn q(&self) -> Gaussian {
        let (m, log_s) = &self.trainer.model;
        Gaussian {
            mean: m.array() as f64,
            std: (log_s.array() as f64).exp(),
        }
    }

    /// The ELBO estimate after each step so far (the negated training loss).
    pub fn elbo_history(&self) -> Vec<f64> {
        self.trainer.losses.iter().map(|l| -(*l as f64)).collect()
    }

    /// Takes `steps` more Adam steps on −ELBO, where
    /// ELBO ≈ (1/K) Σₖ log p(x, m + s εₖ) + log s + ½ log 2πe.
    ///
    /// log p(x | z) sums over the observations in closed form:
    /// −(n f² − 2 f Σxᵢ + Σxᵢ²) / (2σ²) − n log σ − (n/2) log 2π, with f = f(z).
    pub fn train(&mut self, steps: usize) -> Result<()> {
        let (n, s1, s2) = self.model.sums();
        let sigma2 = self.model.sigma * self.model.sigma;
        let const_lik =
            -n * self.model.sigma.ln() - 0.5 * n * (2.0 * PI).ln() - s2 / (2.0 * sigma2);
        let const_prior = -0.5 * (2.0 * PI).ln();
        let const_entropy = 0.5 * (2.0 * PI * std::f64::consts::E).ln();
        let k = self.config.samples;
        let link = self.model.link;
        for _ in 0..steps {
            self.trainer.step(|(m, log_s), grads, ctx| {
                let eps: Vec<f32> = (0..k)
                    .map(|_| StandardNormal.sample(&mut *ctx.rng))
                    .collect();
                let eps = ctx.dev.tensor_from_vec(eps, (k,));
                let m = m.trace(grads);
                let log_s = log_s.leaky_trace();
                let s = log_s.with_empty_tape().exp();
                // z = m + s ε (the reparameterisation).
                let z = m.broadcast_like(&(k,)) + s.broadcast_like(&(k,)) * eps;
                let f = match link {
                    Link::Linear(a) => z.with_empty_tape() * a as f32,
                    Link::Cubic => z.with_empty_tape() + z.with_empty_tape().powi(3) * 0.2,
                    Link::Square => z.with_empty_tape().square(),
                };
                let log_lik = f.with_empty_tape().square() * (-(n / (2.0 * sigma2)) as f32)
                    + f * ((s1 / sigma2) as f32)
                    + const_lik as f32;
                let log_prior = z.square() * -0.5 + const_prior as f32;
                let elbo = (log_lik + log_prior).mean() + log_s + (const_entropy as f32);
                Ok(elbo.negate())
            })?;
        }
        Ok(())
    }
}

/// Fits q = N(m, s²) to the posterior by maximising the Monte Carlo ELBO with Adam, recording
/// q every `snapshot_every` steps (for drawing q over the posterior as it moves).
pub fn fit_gaussian(
    model: &LatentModel,
    config: ViConfig,
    snapshot_every: usize,
) -> Result<(VariationalFit, Vec<(usize, Gaussian)>)> {
    let mut fit = VariationalFit::new(model, config)?;
    let every = snapshot_every.max(1);
    let mut snapshots = vec![(0, fit.q())];
    let mut done = 0;
    while done < config.steps {
        let chunk = every.min(config.steps - done);
        fit.train(chunk)?;
        done += chunk;
        snapshots.push((done, fit.q()));
    }
    Ok((fit, snapshots))
}

/// A 2-D latent model with a correlated Gaussian posterior: z ~ N(0, I₂),
/// xᵢ | z ~ N(w·z, σ²). Only w·z is observed, so the posterior is stretched along the
/// direction that leaves w·z unchanged: its precision is Λ = I + n w wᵀ / σ² and its mean
/// Λ⁻¹ w Σxᵢ / σ². A diagonal (mean-field) q cannot tilt to follow it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LinearModel2 {
    /// The weights w.
    pub w: [f64; 2],
    /// Observation noise σ > 0.
    pub sigma: f64,
    /// The observations.
    pub xs: Vec<f64>,
}

/// A 2-D Gaussian given by its mean and covariance.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Gaussian2 {
    /// The mean.
    pub mean: [f64; 2],
    /// The covariance [[c₀₀, c₀₁], [c₁₀, c₁₁]].
    pub cov: [[f64; 2]; 2],
}

impl Gaussian2 {
    /// log N(z | mean, cov).
    pub fn log_pdf(&self, z: [f64; 2]) -> f64 {
        let [[a, b], [c, d]] = self.cov;
        let det = a * d - b * c;
        let (u, v) = (z[0] - self.mean[0], z[1] - self.mean[1]);
        let quad = (d * u * u - (b + c) * u * v + a * v * v) / det;
        -0.5 * quad - 0.5 * det.ln() - (2.0 * PI).ln()
    }

    /// Points on the ellipse at `radius` standard deviations (for drawing), as (x, y) lists.
    pub fn ellipse(&self, radius: f64, points: usize) -> (Vec<f64>, Vec<f64>) {
        // cov = L Lᵀ (Cholesky); the ellipse is mean + radius · L (cos t, sin t).
        let [[a, b], [_, d]] = self.cov;
        let l00 = a.sqrt();
        let l10 = b / l00;
        let l11 = (d - l10 * l10).max(0.0).sqrt();
        (0..=points)
            .map(|i| {
                let t = 2.0 * PI * i as f64 / points as f64;
                let (c, s) = (radius * t.cos(), radius * t.sin());
                (self.mean[0] + l00 * c, self.mean[1] + l10 * c + l11 * s)
            })
            .unzip()
    }
}

impl LinearModel2 {
    /// n observations from the model with latent `z`, seeded.
    pub fn simulate(w: [f64; 2], sigma: f64, z: [f64; 2], n: usize, seed: u64) -> Result<Self> {
        ensure(
            sigma > 0.0 && sigma.is_finite(),
            "sigma",
            sigma,
            "the noise σ must be positive, e.g. 0.5",
        )?;
        ensure(n >= 1, "n", n, "give at least one observation")?;
        let mut rng = StdRng::seed_from_u64(seed);
        let mean = w[0] * z[0] + w[1] * z[1];
        let xs = (0..n)
            .map(|_| {
                let e: f64 = StandardNormal.sample(&mut rng);
                mean + sigma * e
            })
            .collect();
        Ok(LinearModel2 { w, sigma, xs })
    }

    /// The exact posterior N(Λ⁻¹ w Σxᵢ/σ², Λ⁻¹), Λ = I + n w wᵀ/σ².
    pub fn posterior(&self) -> Gaussian2 {
        let n = self.xs.len() as f64;
        let s2 = self.sigma * self.sigma;
        let [w0, w1] = self.w;
        let (a, b, d) = (
            1.0 + n * w0 * w0 / s2,
            n * w0 * w1 / s2,
            1.0 + n * w1 * w1 / s2,
        );
        let det = a * d - b * b;
        let cov = [[d / det, -b / det], [-b / det, a / det]];
        let sx: f64 = self.xs.iter().sum::<f64>() / s2;
        let mean = [
            (cov[0][0] * w0 + cov[0][1] * w1) * sx,
            (cov[1][0] * w0 + cov[1][1] * w1) * sx,
        ];
        Gaussian2 { mean, cov }
    }

    /// The best diagonal Gaussian in KL(q ‖ p) for a Gaussian posterior: the exact mean, with
    /// variances 1/Λⱼⱼ (the posterior's conditional variances, smaller than its marginal ones).
    pub fn mean_field_optimum(&self) -> Gaussian2 {
        let n = self.xs.len() as f64;
        let s2 = self.sigma * self.sigma;
        let exact = self.posterior();
        let [w0, w1] = self.w;
        Gaussian2 {
            mean: exact.mean,
            cov: [
                [1.0 / (1.0 + n * w0 * w0 / s2), 0.0],
                [0.0, 1.0 / (1.0 + n * w1 * w1 / s2)],
            ],
        }
    }
}

/// The diagonal q's parameters: mean and log standard deviation, each of 2 values.
pub type DiagParams = (Tensor<Rank1<2>, f32, Dev>, Tensor<Rank1<2>, f32, Dev>);

/// A diagonal Gaussian q(z) = N(m, diag s²) fitted to [`LinearModel2`]'s posterior by
/// maximising the K-sample reparameterised ELBO with Adam:
/// ELBO ≈ (1/K) Σₖ [log p(x | zₖ) + log p(zₖ)] + Σⱼ log sⱼ + log 2πe,  zₖ = m + s ⊙ εₖ.
pub struct DiagonalFit {
    /// The model.
    pub model: LinearModel2,
    /// Samples per step.
    pub samples: usize,
    /// Adam on (m, log s).
    pub trainer: Trainer<DiagParams>,
}

impl DiagonalFit {
    /// Starts at q = N(init_mean·1, init_std² I) and takes `config.steps` steps.
    pub fn fit(model: &LinearModel2, config: ViConfig) -> Result<Self> {
        config.validate()?;
        let dev = Dev::seed_from_u64(config.seed);
        let params: DiagParams = (
            dev.tensor([config.init_mean as f32; 2]),
            dev.tensor([(config.init_std as f32).ln(); 2]),
        );
        let mut fit = DiagonalFit {
            model: model.clone(),
            samples: config.samples,
            trainer: Trainer::with_device(params, dev, config.adam(), config.seed)?,
        };
        fit.train(config.steps)?;
        Ok(fit)
    }

    /// The current q, as a 2-D Gaussian with diagonal covariance.
    pub fn q(&self) -> Gaussian2 {
        let (m, log_s) = &self.trainer.model;
        let (m, ls) = (m.array(), log_s.array());
        Gaussian2 {
            mean: [m[0] as f64, m[1] as f64],
            cov: [
                [(2.0 * ls[0] as f64).exp(), 0.0],
                [0.0, (2.0 * ls[1] as f64).exp()],
            ],
        }
    }

    /// Takes `steps` more Adam steps on −ELBO.
    pub fn train(&mut self, steps: usize) -> Result<()> {
        let model = &self.model;
        let n = model.xs.len() as f64;
        let s2 = model.sigma * model.sigma;
        let s1: f64 = model.xs.iter().sum();
        let sq: f64 = model.xs.iter().map(|x| x * x).sum();
        let const_lik = -n * model.sigma.ln() - 0.5 * n * (2.0 * PI).ln() - sq / (2.0 * s2);
        let const_rest = -(2.0 * PI).ln() + (2.0 * PI * std::f64::consts::E).ln();
        let k = self.samples;
        let w = [model.w[0] as f32, model.w[1] as f32];
        for _ in 0..steps {
            self.trainer.step(|(m, log_s), grads, ctx| {
                let eps: Vec<f32> = (0..2 * k)
                    .map(|_| StandardNormal.sample(&mut *ctx.rng))
                    .collect();
                let eps = ctx.dev.tensor_from_vec(eps, (k, Const::<2>));
                let w = ctx.dev.tensor(w);
                let m = m.trace(grads);
                let log_s = log_s.leaky_trace();
                let s = log_s.with_empty_tape().exp();
                let z =
                    m.broadcast_like(&(k, Const::<2>)) + s.broadcast_like(&(k, Const::<2>)) * eps;
                // w·z for each sample; log p(x | z) summed over observations in closed form.
                let wz =
                    (z.with_empty_tape() * w.broadcast_like(&(k, Const::<2>))).sum::<(usize,), _>();
                let log_lik = wz.with_empty_tape().square() * (-(n / (2.0 * s2)) as f32)
                    + wz * ((s1 / s2) as f32)
                    + const_lik as f32;
                let log_prior = z.square().sum::<(usize,), _>() * -0.5;
                let elbo = (log_lik + log_prior).mean() + log_s.sum() + const_rest as f32;
                Ok(elbo.negate())
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cubic() -> LatentModel {
        LatentModel::simulate(Link::Cubic, 0.8, 0.9, 5, 1).unwrap()
    }

    /// log p(x, z) written out again from the model's definition (prior N(0, 1), likelihood
    /// N(xᵢ | f(z), σ²)), so that the references below share no code with `log_joint`.
    fn log_joint_by_hand(model: &LatentModel, z: f64) -> f64 {
        let ln_2pi = (2.0 * PI).ln();
        let f = model.link.f(z);
        let s2 = model.sigma * model.sigma;
        let lik: f64 = model
            .xs
            .iter()
            .map(|x| -(x - f) * (x - f) / (2.0 * s2) - 0.5 * (s2.ln() + ln_2pi))
            .sum();
        -0.5 * z * z - 0.5 * ln_2pi + lik
    }

    /// log p(x) on a plain midpoint grid over [−10, 10] (not Simpson, not `log_evidence`).
    fn log_evidence_on_grid(model: &LatentModel) -> f64 {
        let n = 100_000;
        let h = 20.0 / n as f64;
        let lj: Vec<f64> = (0..n)
            .map(|i| log_joint_by_hand(model, -10.0 + h * (i as f64 + 0.5)))
            .collect();
        logsumexp(&lj) + h.ln()
    }

    /// KL(q ‖ p(z | x)) against the grid posterior p(z | x) = p(x, z) / Z, Z normalised on the
    /// grid above, integrated by a midpoint rule over q's m ± 12 s.
    fn kl_on_grid(model: &LatentModel, q: &Gaussian, log_z: f64) -> f64 {
        let n = 40_000;
        let (lo, h) = (q.mean - 12.0 * q.std, 24.0 * q.std / n as f64);
        (0..n)
            .map(|i| {
                let z = lo + h * (i as f64 + 0.5);
                let e = (z - q.mean) / q.std;
                let log_q = -0.5 * e * e - q.std.ln() - 0.5 * (2.0 * PI).ln();
                log_q.exp() * (log_q - (log_joint_by_hand(model, z) - log_z)) * h
            })
            .sum()
    }

    /// The linear link's marginal in closed form: x ~ N(0, σ²I + a²11ᵀ), so
    /// log p(x) = −(n/2) log 2πσ² − ½ log(1 + n a²/σ²) − (Σx² − a²(Σx)²/(σ² + n a²)) / 2σ².
    fn linear_log_marginal(a: f64, sigma: f64, xs: &[f64]) -> f64 {
        let (n, s1, s2) = (
            xs.len() as f64,
            xs.iter().sum::<f64>(),
            xs.iter().map(|x| x * x).sum::<f64>(),
        );
        let v = sigma * sigma;
        -0.5 * n * (2.0 * PI * v).ln()
            - 0.5 * (1.0 + n * a * a / v).ln()
            - (s2 - a * a * s1 * s1 / (v + n * a * a)) / (2.0 * v)
    }

    #[test]
    fn evidence_identity_holds_for_many_q() {
        let linear = LatentModel::simulate(Link::Linear(1.5), 0.7, 0.5, 6, 3).unwrap();
        for model in [
            linear,
            cubic(),
            LatentModel::new(Link::Square, 0.5, vec![2.0, 1.6]).unwrap(),
        ] {
            let grid_evidence = log_evidence_on_grid(&model);
            if let Link::Linear(a) = model.link {
                let closed = linear_log_marginal(a, model.sigma, &model.xs);
                assert!(
                    (model.log_evidence() - closed).abs() < 1e-8,
                    "log p(x) {} vs closed form {closed}",
                    model.log_evidence()
                );
                assert!((grid_evidence - closed).abs() < 1e-8, "{grid_evidence}");
            }
            let qs = [
                Gaussian::new(0.0, 1.0).unwrap(),
                Gaussian::new(1.0, 0.3).unwrap(),
                Gaussian::new(-2.0, 0.1).unwrap(),
                Gaussian::new(3.0, 2.0).unwrap(),
            ];
            for row in identity_table(&model, &qs) {
                let kl = kl_on_grid(&model, &row.q, grid_evidence);
                assert!(
                    (row.log_evidence - grid_evidence).abs() < 1e-8,
                    "{row:?} vs grid log p(x) {grid_evidence}"
                );
                assert!(
                    (row.kl - kl).abs() < 1e-6 * kl.max(1.0),
                    "{row:?} vs grid KL {kl}"
                );
                assert!(
                    (row.elbo - (grid_evidence - kl)).abs() < 1e-6 * kl.max(1.0),
                    "{row:?} vs grid log p(x) − KL {}",
                    grid_evidence - kl
                );
                assert!(row.difference.abs() < 1e-4, "{row:?}");
                assert!(row.kl > 0.0, "{row:?}");
            }
        }
    }

    #[test]
    fn closed_form_kl_matches_monte_carlo() {
        let (mq, lq, mp, lp) = ([0.3, -1.0], [-0.5, 0.4], [0.0, 0.5], [0.2, -0.3]);
        let exact = kl_diag_gaussians(&mq, &lq, &mp, &lp).unwrap();
        let (mc, se) = kl_diag_monte_carlo(&mq, &lq, &mp, &lp, 200_000, 3).unwrap();
        assert!(
            (exact - mc).abs() < 3.0 * se,
            "exact {exact}, MC {mc} ± {se}"
        );
        let std_normal = kl_to_standard_normal(&[0.0, 0.0], &[0.0, 0.0]).unwrap();
        assert_eq!(std_normal, 0.0);
        assert!(kl_diag_gaussians(&[0.0], &[0.0, 1.0], &[0.0], &[0.0]).is_err());
    }

    #[test]
    fn both_gradient_estimators_are_unbiased() {
        let model = cubic();
        let q = Gaussian::new(0.4, 0.5).unwrap();
        let fd = finite_difference_gradient(&model, &q, 1e-4);
        let mut rng = StdRng::seed_from_u64(11);
        type Estimator = fn(&LatentModel, &Gaussian, &mut StdRng) -> GradientSample;
        for (name, estimator, n) in [
            ("reparam", reparam_gradient as Estimator, 20_000),
            ("score", score_gradient as Estimator, 400_000),
        ] {
            let draws: Vec<GradientSample> =
                (0..n).map(|_| estimator(&model, &q, &mut rng)).collect();
            let (m, se_m) =
                mean_and_standard_error(&draws.iter().map(|g| g.d_mean).collect::<Vec<_>>());
            let (s, se_s) =
                mean_and_standard_error(&draws.iter().map(|g| g.d_log_std).collect::<Vec<_>>());
            assert!(
                (m - fd.d_mean).abs() < 4.0 * se_m,
                "{name} ∂m: {m} ± {se_m} vs {}",
                fd.d_mean
            );
            assert!(
                (s - fd.d_log_std).abs() < 4.0 * se_s,
                "{name} ∂log s: {s} ± {se_s} vs {}",
                fd.d_log_std
            );
        }
    }

    #[test]
    fn vi_recovers_a_conjugate_posterior() {
        let model = LatentModel::simulate(Link::Linear(1.5), 1.0, 0.7, 8, 2).unwrap();
        let exact = model.conjugate_posterior().unwrap();
        let (m_quad, s_quad) = model.posterior_moments();
        assert!((exact.mean - m_quad).abs() < 1e-8 && (exact.std - s_quad).abs() < 1e-8);
        let config = ViConfig {
            lr: 0.02,
            steps: 3000,
            samples: 64,
            ..Default::default()
        };
        let mut fit = VariationalFit::new(&model, config).unwrap();
        fit.train(config.steps).unwrap();
        // Average the last iterates' noise out by a final low-learning-rate phase.
        fit.trainer.set_lr(0.002).unwrap();
        fit.train(1000).unwrap();
        let q = fit.q();
        assert!((q.mean - exact.mean).abs() < 1e-2, "{q:?} vs {exact:?}");
        assert!((q.std - exact.std).abs() < 1e-2, "{q:?} vs {exact:?}");
    }

    #[test]
    fn iwae_tightens_toward_log_evidence() {
        let model = cubic();
        let q = Gaussian::new(0.0, 1.0).unwrap();
        let le = model.log_evidence();
        let mut rng = StdRng::seed_from_u64(5);
        let avg = |k: usize, rng: &mut StdRng| {
            (0..200)
                .map(|_| iwae_bound(&model, &q, k, rng))
                .sum::<f64>()
                / 200.0
        };
        let (b1, b50, b500) = (avg(1, &mut rng), avg(50, &mut rng), avg(500, &mut rng));
        assert!(
            b1 < b50 && b50 < b500 && b500 <= le + 1e-3,
            "{b1} {b50} {b500} {le}"
        );
        // At K = 1 the bound is the ELBO: the mean of single log-weights matches it.
        let ones: Vec<f64> = (0..20_000)
            .map(|_| iwae_bound(&model, &q, 1, &mut rng))
            .collect();
        let (mean, se) = mean_and_standard_error(&ones);
        assert!(
            (mean - elbo_exact(&model, &q)).abs() < 4.0 * se,
            "{mean} ± {se}"
        );
    }

    #[test]
    fn mean_field_finds_its_optimum_in_2d() {
        let model = LinearModel2::simulate([1.0, 0.7], 0.6, [0.8, -0.4], 6, 4).unwrap();
        let exact = model.posterior();
        // Check the closed form against a brute-force 2-D grid of likelihood × prior,
        // normalised on the grid: its mean and covariance must be the closed form's.
        let g = crate::math::linspace(-6.0, 6.0, 601);
        let s2 = model.sigma * model.sigma;
        let log_post = |a: f64, b: f64| {
            let f = model.w[0] * a + model.w[1] * b;
            let lik: f64 = model
                .xs
                .iter()
                .map(|x| -(x - f) * (x - f) / (2.0 * s2))
                .sum();
            lik - 0.5 * (a * a + b * b)
        };
        let cells: Vec<(f64, f64, f64)> = g
            .iter()
            .flat_map(|&a| g.iter().map(move |&b| (a, b)))
            .map(|(a, b)| (a, b, log_post(a, b)))
            .collect();
        let top = cells.iter().map(|c| c.2).fold(f64::NEG_INFINITY, f64::max);
        let total: f64 = cells.iter().map(|c| (c.2 - top).exp()).sum();
        let moment = |f: &dyn Fn(f64, f64) -> f64| {
            cells
                .iter()
                .map(|&(a, b, l)| f(a, b) * (l - top).exp())
                .sum::<f64>()
                / total
        };
        let m = [moment(&|a, _| a), moment(&|_, b| b)];
        let cov = [
            [
                moment(&|a, _| (a - m[0]) * (a - m[0])),
                moment(&|a, b| (a - m[0]) * (b - m[1])),
            ],
            [
                moment(&|a, b| (a - m[0]) * (b - m[1])),
                moment(&|_, b| (b - m[1]) * (b - m[1])),
            ],
        ];
        for i in 0..2 {
            assert!((m[i] - exact.mean[i]).abs() < 1e-4, "{m:?} vs {exact:?}");
            for j in 0..2 {
                assert!(
                    (cov[i][j] - exact.cov[i][j]).abs() < 1e-4,
                    "{cov:?} vs {exact:?}"
                );
            }
        }
        let config = ViConfig {
            lr: 0.02,
            steps: 3000,
            samples: 64,
            ..Default::default()
        };
        let mut fit = DiagonalFit::fit(&model, config).unwrap();
        fit.trainer.set_lr(0.002).unwrap();
        fit.train(1000).unwrap();
        let q = fit.q();
        let best = model.mean_field_optimum();
        for j in 0..2 {
            assert!((q.mean[j] - best.mean[j]).abs() < 1e-2, "{q:?} vs {best:?}");
            assert!(
                (q.cov[j][j].sqrt() - best.cov[j][j].sqrt()).abs() < 1e-2,
                "{q:?} vs {best:?}"
            );
            // Mean field underestimates each marginal standard deviation.
            assert!(q.cov[j][j] < exact.cov[j][j]);
        }
    }

    #[test]
    fn bad_settings_are_named() {
        let bad = ViConfig {
            samples: 0,
            ..Default::default()
        };
        let err = VariationalFit::new(&cubic(), bad)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("`samples`"), "{err}");
        assert!(LatentModel::new(Link::Cubic, 0.0, vec![1.0]).is_err());
    }
}
