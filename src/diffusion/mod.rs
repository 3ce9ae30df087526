//! Chapter 5, diffusion (DDPM, Denoising Diffusion Probabilistic Models): destroy the data
//! with Gaussian noise in T small steps, and learn to undo one step at a time.
//!
//! - Forward process, one step: q(x_t | x_{t−1}) = N(√α_t x_{t−1}, β_t I), α_t = 1 − β_t, i.e.
//!   x_t = √α_t x_{t−1} + √β_t ε with ε ~ N(0, I) independent of x_{t−1}.
//! - Its marginal in closed form: q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I), ᾱ_t = Π_{s≤t} α_s,
//!   so x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε in one draw ([`NoiseSchedule::q_sample`]). The
//!   signal-to-noise ratio is SNR(t) = ᾱ_t / (1 − ᾱ_t).
//! - The reverse step q(x_{t−1} | x_t) depends on the whole data distribution (Bayes:
//!   q(x_{t−1} | x_t) = q(x_t | x_{t−1}) q(x_{t−1}) / q(x_t)); for a 1-D mixture it is computed
//!   by quadrature in [`reverse_conditional_1d`]. Given x_0 it is Gaussian
//!   ([`NoiseSchedule::posterior`]):
//!   q(x_{t−1} | x_t, x_0) = N(μ̃, β̃_t), μ̃ = √ᾱ_{t−1} β_t/(1 − ᾱ_t) x_0
//!   + √α_t (1 − ᾱ_{t−1})/(1 − ᾱ_t) x_t, β̃_t = (1 − ᾱ_{t−1})/(1 − ᾱ_t) β_t.
//! - Training (`Ddpm::step`): a denoiser ε_θ(x_t, t) predicts the noise; the loss is
//!   ‖ε − ε_θ(√ᾱ_t x_0 + √(1 − ᾱ_t) ε, t)‖², averaged over every element.
//! - Sampling, DDPM ([`Ddpm::sample`]): x_T ~ N(0, I), then for t = T … 1
//!   x_{t−1} = (x_t − β_t/√(1 − ᾱ_t) ε_θ(x_t, t)) / √α_t + σ_t z, σ_t² = β_t, z = 0 at t = 1.
//! - Sampling, DDIM with η = 0 ([`Ddpm::sample_ddim`]): deterministic, on a subsequence
//!   τ_S > … > τ_1 of the steps: x̂_0 = (x_τ − √(1 − ᾱ_τ) ε_θ)/√ᾱ_τ, then
//!   x_{τ'} = √ᾱ_{τ'} x̂_0 + √(1 − ᾱ_{τ'}) ε_θ.
//! - The bound ([`Ddpm::neg_elbo`]): the DDPM is a VAE with the forward process as its fixed
//!   encoder, so −log p(x_0) ≤ L_T + Σ_{t≥2} L_{t−1} + L_0 with L_{t−1} = w_t‖ε − ε_θ‖² + c_t
//!   ([`NoiseSchedule::elbo_weight`]); the training loss drops the weights w_t (L_simple).
//!
//! The denoiser is one network of the engine ([`crate::mlp`]) on concat(x_t, emb(t)), with the
//! sinusoidal time embedding of [`time_embedding`]. [`DdpmConfig::default`] is workload W3 of
//! the benchmark spec (the 8×8 digits, T = 200, widths 128 → 512 → 512 → 512 → 64, 4,000 steps).

use crate::data::{check_rows, load_digits, Digits, Scale, PIXELS};
use crate::error::{ensure, Error, Result};
use crate::mlp::{rowwise, update_nets, Activation, Mlp, MlpState, Team, Update};
use crate::train::AdamSettings;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};
use std::path::Path;

/// Longest chain T a schedule may have (a guard against typos).
pub const MAX_STEPS: usize = 100_000;

/// How β_t grows with t.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Schedule {
    /// β_t linear from `beta_start` (t = 1) to `beta_end` (t = T) (Ho et al.; W3 uses 5e-4 to
    /// 0.1 at T = 200).
    Linear {
        /// β_1.
        beta_start: f64,
        /// β_T.
        beta_end: f64,
    },
    /// ᾱ_t = f(t)/f(0), f(t) = cos²(π/2 · (t/T + s)/(1 + s)) (Nichol & Dhariwal), β_t =
    /// 1 − ᾱ_t/ᾱ_{t−1} clipped to at most 0.999; `s` = 0.008 keeps β_1 from being tiny.
    Cosine {
        /// The offset s.
        s: f64,
    },
}

impl Schedule {
    /// W3's schedule (W3 v2): linear from 5e-4 to 0.1 over T = 200 steps, i.e. Ho et al.'s
    /// 1e-4 to 0.02 for T = 1,000 scaled by 1000/T ([`Schedule::linear_scaled`]`(200)`), so
    /// ᾱ_T ≈ 3e-5 and x_T is noise.
    pub fn w3() -> Schedule {
        Schedule::linear_scaled(200)
    }

    /// Ho et al.'s linear schedule (1e-4 to 0.02 at T = 1,000) scaled to `steps` steps: β from
    /// 1e-4·1000/T to 0.02·1000/T, so that ᾱ_T is about as small at any T (3e-5 at T = 200:
    /// x_T is noise). At T = 200 this is W3 v2's 5e-4 to 0.1.
    pub fn linear_scaled(steps: usize) -> Schedule {
        let scale = 1000.0 / steps.max(1) as f64;
        Schedule::Linear {
            beta_start: 1e-4 * scale,
            beta_end: 0.02 * scale,
        }
    }

    /// W3 v1, a misconfiguration kept to learn from: Ho et al.'s 1e-4 to 0.02, which is meant
    /// for T = 1,000, used at T = 200, where it leaves ᾱ_T ≈ 0.13 (x_T still holds 36 % of
    /// x_0's amplitude, so N(0, I) is not q(x_T)).
    pub fn w3_v1() -> Schedule {
        Schedule::Linear {
            beta_start: 1e-4,
            beta_end: 0.02,
        }
    }

    /// The cosine schedule with s = 0.008.
    pub fn cosine() -> Schedule {
        Schedule::Cosine { s: 0.008 }
    }
}

/// β_t, α_t and ᾱ_t for t = 1..=T (index t − 1), in f64. Introduced in chapter 5.
#[derive(Debug, Clone, PartialEq)]
pub struct NoiseSchedule {
    /// β_t, the variance each step adds.
    pub betas: Vec<f64>,
    /// α_t = 1 − β_t.
    pub alphas: Vec<f64>,
    /// ᾱ_t = Π_{s≤t} α_s, how much of x_0 survives to step t.
    pub alpha_bars: Vec<f64>,
}

impl NoiseSchedule {
    /// The schedule `kind` over `steps` = T steps.
    pub fn new(kind: Schedule, steps: usize) -> Result<NoiseSchedule> {
        ensure(
            (1..=MAX_STEPS).contains(&steps),
            "steps",
            steps,
            &format!("use a number of diffusion steps T between 1 and {MAX_STEPS}, e.g. 200"),
        )?;
        let betas: Vec<f64> = match kind {
            Schedule::Linear {
                beta_start,
                beta_end,
            } => {
                for (name, b) in [("beta_start", beta_start), ("beta_end", beta_end)] {
                    ensure(
                        b > 0.0 && b < 1.0,
                        name,
                        b,
                        "a step's variance β must be in (0, 1), e.g. 1e-4 to 0.02",
                    )?;
                }
                (0..steps)
                    .map(|i| {
                        let f = if steps == 1 {
                            0.0
                        } else {
                            i as f64 / (steps - 1) as f64
                        };
                        beta_start + f * (beta_end - beta_start)
                    })
                    .collect()
            }
            Schedule::Cosine { s } => {
                ensure(
                    s > 0.0 && s < 1.0,
                    "s",
                    s,
                    "the cosine schedule's offset s must be in (0, 1), e.g. 0.008",
                )?;
                let f = |t: f64| {
                    let c =
                        (std::f64::consts::FRAC_PI_2 * (t / steps as f64 + s) / (1.0 + s)).cos();
                    c * c
                };
                (1..=steps)
                    .map(|t| (1.0 - f(t as f64) / f(t as f64 - 1.0)).clamp(1e-8, 0.999))
                    .collect()
            }
        };
        let alphas: Vec<f64> = betas.iter().map(|b| 1.0 - b).collect();
        let alpha_bars = alphas
            .iter()
            .scan(1.0, |prod, a| {
                *prod *= a;
                Some(*prod)
            })
            .collect();
        Ok(NoiseSchedule {
            betas,
            alphas,
            alpha_bars,
        })
    }

    /// T, the number of steps.
    pub fn steps(&self) -> usize {
        self.betas.len()
    }

    fn index(&self, t: usize) -> Result<usize> {
        ensure(
            (1..=self.steps()).contains(&t),
            "t",
            t,
            &format!("t counts steps from 1 to T = {}", self.steps()),
        )?;
        Ok(t - 1)
    }

    /// β_t for t in 1..=T.
    pub fn beta(&self, t: usize) -> Result<f64> {
        Ok(self.betas[self.index(t)?])
    }

    /// α_t = 1 − β_t for t in 1..=T.
    pub fn alpha(&self, t: usize) -> Result<f64> {
        Ok(self.alphas[self.index(t)?])
    }

    /// ᾱ_t = Π_{s≤t} α_s for t in 0..=T (ᾱ_0 = 1: nothing added yet).
    pub fn alpha_bar(&self, t: usize) -> Result<f64> {
        if t == 0 {
            return Ok(1.0);
        }
        Ok(self.alpha_bars[self.index(t)?])
    }

    /// The signal-to-noise ratio of q(x_t | x_0): SNR(t) = ᾱ_t / (1 − ᾱ_t).
    pub fn snr(&self, t: usize) -> Result<f64> {
        let ab = self.alpha_bar(t)?;
        Ok(ab / (1.0 - ab))
    }

    /// One draw of q(x_t | x_0) in closed form: x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε, elementwise
    /// (`eps` as long as `x0`).
    pub fn q_sample(&self, x0: &[f32], t: usize, eps: &[f32]) -> Result<Vec<f32>> {
        check_rows("q_sample (x0)", x0, 1)?;
        check_len("q_sample (eps)", x0.len(), eps.len())?;
        check_rows("q_sample (eps)", eps, 1)?;
        let ab = self.alpha_bar(t)?;
        let (a, b) = (ab.sqrt() as f32, (1.0 - ab).sqrt() as f32);
        Ok(x0.iter().zip(eps).map(|(&x, &e)| a * x + b * e).collect())
    }

    /// The mean and variance of q(x_{t−1} | x_t, x_0) for one coordinate, t in 1..=T:
    /// μ̃ = √ᾱ_{t−1} β_t/(1 − ᾱ_t) x_0 + √α_t (1 − ᾱ_{t−1})/(1 − ᾱ_t) x_t,
    /// β̃_t = (1 − ᾱ_{t−1})/(1 − ᾱ_t) β_t.
    pub fn posterior(&self, t: usize, x_t: f64, x0: f64) -> Result<(f64, f64)> {
        let (beta, alpha) = (self.beta(t)?, self.alpha(t)?);
        let (ab, ab_prev) = (self.alpha_bar(t)?, self.alpha_bar(t - 1)?);
        let mean = ab_prev.sqrt() * beta / (1.0 - ab) * x0
            + alpha.sqrt() * (1.0 - ab_prev) / (1.0 - ab) * x_t;
        Ok((mean, (1.0 - ab_prev) / (1.0 - ab) * beta))
    }

    /// L_T = KL(q(x_T | x_0) ‖ N(0, I)) = ½ Σ_pixels [(1 − ᾱ_T) + ᾱ_T x_0² − 1 − ln(1 − ᾱ_T)],
    /// averaged over the rows of `x0s` (`dim` values each): the bound's price for starting the
    /// sampler at N(0, I) when x_T still holds some of x_0 (nats per image; no parameters).
    pub fn prior_term(&self, x0s: &[f32], dim: usize) -> Result<f64> {
        check_rows("prior_term (x0s)", x0s, dim)?;
        let ab = self.alpha_bars[self.steps() - 1];
        let sum: f64 = x0s
            .iter()
            .map(|&x| 0.5 * ((1.0 - ab) + ab * (x as f64).powi(2) - 1.0 - (1.0 - ab).ln()))
            .sum();
        Ok(sum / (x0s.len() / dim) as f64)
    }

    /// The part of L_{t−1} (t ≥ 2) that no ε_θ can remove, per pixel, when the reverse step's
    /// variance is β_t instead of the true posterior's β̃_t: c_t/d = ½(r − 1 − ln r),
    /// r = β̃_t/β_t = (1 − ᾱ_{t−1})/(1 − ᾱ_t) (0 when the variances agree; large at small t,
    /// where β̃_t ≪ β_t).
    pub fn variance_gap(&self, t: usize) -> Result<f64> {
        let i = self.index(t)?;
        ensure(
            t >= 2,
            "t",
            t,
            "the gap is a term of L_{t−1} for t from 2 to T",
        )?;
        let r = (1.0 - self.alpha_bars[i - 1]) / (1.0 - self.alpha_bars[i]);
        Ok(0.5 * (r - 1.0 - r.ln()))
    }

    /// The weight w_t that turns the ε-prediction error into the bound's term at step t ≥ 2
    /// when the reverse step's variance is σ_t² = β_t (the sampler's): the means of
    /// q(x_{t−1} | x_t, x_0) and p_θ(x_{t−1} | x_t) differ by β_t/(√α_t √(1 − ᾱ_t))·(ε − ε_θ),
    /// so L_{t−1} = w_t‖ε − ε_θ‖² + (a constant), w_t = β_t / (2 α_t (1 − ᾱ_t)).
    /// L_simple is the bound with every w_t replaced by 1 (Ho et al., 2020, eq. 14).
    pub fn elbo_weight(&self, t: usize) -> Result<f64> {
        let i = self.index(t)?;
        Ok(self.betas[i] / (2.0 * self.alphas[i] * (1.0 - self.alpha_bars[i])))
    }
}

/// A 1-D Gaussian mixture p(x) = Σₖ πₖ N(x | μₖ, σₖ²): the data distribution of the chapter's
/// question, for which every q(x_t) is again a mixture (in closed form).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Mixture1d {
    /// πₖ (summing to 1).
    pub weights: Vec<f64>,
    /// μₖ.
    pub means: Vec<f64>,
    /// σₖ.
    pub stds: Vec<f64>,
}

impl Mixture1d {
    /// A mixture, checked (weights are normalised to sum to 1).
    pub fn new(weights: &[f64], means: &[f64], stds: &[f64]) -> Result<Mixture1d> {
        // The sampler's checks name the bad slice.
        crate::data::gaussian_mixture_1d(0, weights, means, stds, 0)?;
        let total: f64 = weights.iter().sum();
        Ok(Mixture1d {
            weights: weights.iter().map(|w| w / total).collect(),
            means: means.to_vec(),
            stds: stds.to_vec(),
        })
    }

    /// Two equal modes at ±`at`, each with standard deviation `std`.
    pub fn bimodal(at: f64, std: f64) -> Result<Mixture1d> {
        Mixture1d::new(&[0.5, 0.5], &[-at, at], &[std, std])
    }

    /// p(x).
    pub fn pdf(&self, x: f64) -> f64 {
        self.weights
            .iter()
            .zip(&self.means)
            .zip(&self.stds)
            .map(|((w, m), s)| w * crate::math::normal_pdf(x, *m, *s))
            .sum()
    }

    /// The score ∇ₓ log p(x) = Σₖ πₖ N(x; μₖ, σₖ²)·(μₖ − x)/σₖ² / p(x), in closed form
    /// (0 where p(x) underflows to 0).
    pub fn score(&self, x: f64) -> f64 {
        let (mut weighted, mut total) = (0.0, 0.0);
        for ((w, m), s) in self.weights.iter().zip(&self.means).zip(&self.stds) {
            let density = w * crate::math::normal_pdf(x, *m, *s);
            weighted += density * (m - x) / (s * s);
            total += density;
        }
        if total > 0.0 {
            weighted / total
        } else {
            0.0
        }
    }

    /// The best possible noise prediction for x_t = √ᾱ x_0 + √(1 − ᾱ) ε with x_0 from this
    /// mixture: ε*(x_t) = E[ε | x_t] = −√(1 − ᾱ) ∇log q(x_t) (Tweedie's formula), q the mixture
    /// noised to ᾱ. What a DDPM's ε_θ(x_t, t) approximates: its training loss is minimised
    /// there.
    pub fn optimal_eps(&self, alpha_bar: f64, x_t: f64) -> Result<f64> {
        Ok(-(1.0 - alpha_bar).sqrt() * self.noised(alpha_bar)?.score(x_t))
    }

    /// n draws with the given seed.
    pub fn sample(&self, n: usize, seed: u64) -> Result<Vec<f64>> {
        Ok(crate::data::gaussian_mixture_1d(n, &self.weights, &self.means, &self.stds, seed)?.0)
    }

    /// The distribution of √ᾱ x_0 + √(1 − ᾱ) ε when x_0 follows this mixture: the mixture of
    /// N(√ᾱ μₖ, ᾱ σₖ² + 1 − ᾱ), i.e. q(x_t) for ᾱ = ᾱ_t.
    pub fn noised(&self, alpha_bar: f64) -> Result<Mixture1d> {
        ensure(
            (0.0..=1.0).contains(&alpha_bar),
            "alpha_bar",
            alpha_bar,
            "ᾱ is a product of α's in (0, 1]: use a value in [0, 1]",
        )?;
        Ok(Mixture1d {
            weights: self.weights.clone(),
            means: self.means.iter().map(|m| alpha_bar.sqrt() * m).collect(),
            stds: self
                .stds
                .iter()
                .map(|s| (alpha_bar * s * s + 1.0 - alpha_bar).sqrt())
                .collect(),
        })
    }
}

/// The true reverse conditional q(x_t | x_{t+1}) of one forward step
/// x_{t+1} = √α x_t + √(1 − α) ε, by Bayes' rule on a grid:
///
/// q(x_t | x_{t+1}) = N(x_{t+1} | √α x_t, 1 − α) q(x_t) / q(x_{t+1}),
///
/// where q(x_t) = `data` noised to ᾱ = `alpha_bar_t` and the evidence q(x_{t+1}) = `data` noised
/// to ᾱ_t α, both in closed form (so the density's integral over the grid is a check, not a
/// normalisation). Returns the density at each grid point.
pub fn reverse_conditional_1d(
    data: &Mixture1d,
    alpha_bar_t: f64,
    alpha: f64,
    x_next: f64,
    grid: &[f64],
) -> Result<Vec<f64>> {
    ensure(
        alpha > 0.0 && alpha < 1.0,
        "alpha",
        alpha,
        "one step keeps √α of the signal: use α in (0, 1), e.g. 0.99",
    )?;
    let q_t = data.noised(alpha_bar_t)?;
    let evidence = data.noised(alpha_bar_t * alpha)?.pdf(x_next);
    ensure(
        evidence > 0.0,
        "x_next",
        x_next,
        "q(x_{t+1}) underflows there: pick x_{t+1} nearer the data",
    )?;
    let step_std = (1.0 - alpha).sqrt();
    Ok(grid
        .iter()
        .map(|&x| {
            crate::math::normal_pdf(x_next, alpha.sqrt() * x, step_std) * q_t.pdf(x) / evidence
        })
        .collect())
}

/// The naive reverse step, x_t = (x_{t+1} − √(1 − α_{t+1}) ε)/√α_{t+1} with a fresh
/// ε ~ N(0, 1), run from x_T ~ N(0, 1) down to x_0 for `n` chains in 1-D: what the rearranged
/// forward equation would sample if ε were independent of x_{t+1} (it is not).
pub fn naive_reverse_1d(schedule: &NoiseSchedule, n: usize, seed: u64) -> Vec<f64> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let mut x: f64 = StandardNormal.sample(&mut rng);
            for t in (0..schedule.steps()).rev() {
                let e: f64 = StandardNormal.sample(&mut rng);
                x = (x - schedule.betas[t].sqrt() * e) / schedule.alphas[t].sqrt();
            }
            x
        })
        .collect()
}

/// `n` independent draws of N(0, 1) from `seed` (the notebook's Monte Carlo checks).
pub fn standard_normal(n: usize, seed: u64) -> Vec<f64> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n).map(|_| StandardNormal.sample(&mut rng)).collect()
}

/// The sinusoidal embedding of step t (`dim` values, `dim` even): with h = dim/2 and
/// f_i = exp(−ln(10000) · i/h), emb = [sin(t f_0) … sin(t f_{h−1}), cos(t f_0) … cos(t f_{h−1})]
/// (W3's, with dim = 64).
pub fn time_embedding(t: usize, dim: usize) -> Vec<f32> {
    let h = dim / 2;
    let freq = |i: usize| (-(10000f32).ln() * i as f32 / h as f32).exp();
    let a: Vec<f32> = (0..h).map(|i| t as f32 * freq(i)).collect();
    a.iter()
        .map(|a| a.sin())
        .chain(a.iter().map(|a| a.cos()))
        .collect()
}

/// Most training steps a config may ask for (a guard against typos).
pub const MAX_ITERS: usize = 100_000_000;

/// Widest hidden layer the denoiser may have.
pub const MAX_HIDDEN: usize = 4096;

/// The DDPM's hyperparameters. `Default` is workload W3 (the digits);
/// [`DdpmConfig::toy_2d`] is the chapter's small 2-D model.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DdpmConfig {
    /// The number of diffusion steps T.
    pub steps: usize,
    /// How β_t grows.
    pub schedule: Schedule,
    /// The denoiser's hidden widths (ReLU after each), between the input
    /// (data dim + `embedding`) and the output (data dim).
    pub hidden: Vec<usize>,
    /// Size of the time embedding (even).
    pub embedding: usize,
    /// Adam's learning rate.
    pub lr: f64,
    /// Examples per training step (drawn uniformly with replacement).
    pub batch_size: usize,
    /// Training steps (what [`Ddpm::train`] runs when asked for `config.iters`).
    pub iters: usize,
    /// Final samples (and DDIM's x̂_0) are clipped to [−clip, clip]; `None` leaves them.
    pub clip: Option<f32>,
    /// Seed of the initial weights, the batches, t and ε.
    pub seed: u64,
}

impl Default for DdpmConfig {
    fn default() -> Self {
        DdpmConfig {
            steps: 200,
            schedule: Schedule::w3(),
            hidden: vec![512, 512, 512],
            embedding: 64,
            lr: 1e-3,
            batch_size: 128,
            iters: 4000,
            clip: Some(1.0),
            seed: 0,
        }
    }
}

impl DdpmConfig {
    /// A small model for 2-D toy data: T = 100 on the cosine schedule (ᾱ_T ≈ 0, so x_T is
    /// pure noise), widths (2 + 32) → 128 → 128 → 128 → 2, batch 256, 3,000 steps, no clipping.
    pub fn toy_2d() -> DdpmConfig {
        DdpmConfig {
            steps: 100,
            schedule: Schedule::cosine(),
            hidden: vec![128, 128, 128],
            embedding: 32,
            lr: 1e-3,
            batch_size: 256,
            iters: 3000,
            clip: None,
            seed: 0,
        }
    }

    /// The config, or an error naming the first field outside its range and what to use.
    pub fn validate(&self) -> Result<()> {
        ensure(
            (2..=MAX_STEPS).contains(&self.steps),
            "steps",
            self.steps,
            &format!("use between 2 and {MAX_STEPS} diffusion steps T, e.g. 200"),
        )?;
        NoiseSchedule::new(self.schedule, self.steps)?;
        ensure(
            !self.hidden.is_empty() && self.hidden.iter().all(|h| (1..=MAX_HIDDEN).contains(h)),
            "hidden",
            format!("{:?}", self.hidden),
            &format!(
                "give one or more hidden widths between 1 and {MAX_HIDDEN}, e.g. [512, 512, 512]"
            ),
        )?;
        ensure(
            self.embedding >= 2 && self.embedding.is_multiple_of(2) && self.embedding <= 1024,
            "embedding",
            self.embedding,
            "the time embedding has a sine and a cosine half: use an even size from 2 to 1024, e.g. 64",
        )?;
        ensure(
            (1..=65_536).contains(&self.batch_size),
            "batch_size",
            self.batch_size,
            "use a batch size between 1 and 65536, e.g. 128",
        )?;
        ensure(
            self.iters <= MAX_ITERS,
            "iters",
            self.iters,
            &format!("use at most {MAX_ITERS} training steps, e.g. 4000"),
        )?;
        if let Some(c) = self.clip {
            ensure(
                c > 0.0 && c.is_finite(),
                "clip",
                c,
                "clip samples to [−c, c] with c > 0 (1.0 for the digits), or use None",
            )?;
        }
        self.adam().validate()
    }

    fn adam(&self) -> AdamSettings {
        AdamSettings {
            lr: self.lr,
            ..Default::default()
        }
    }

    fn widths(&self, dim: usize) -> Vec<usize> {
        std::iter::once(dim + self.embedding)
            .chain(self.hidden.iter().copied())
            .chain(std::iter::once(dim))
            .collect()
    }
}

/// The training record every `record_every` steps.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StepRecord {
    /// Steps completed.
    pub step: usize,
    /// Mean loss of the steps since the previous record.
    pub loss: f64,
}

/// Steps per history record.
pub const RECORD_EVERY: usize = 100;

/// A DDPM with its data, denoiser, optimiser and history: train it in one cell, train more in
/// the next, sample in any. Introduced in chapter 5 (`05_diffusion`).
pub struct Ddpm {
    config: DdpmConfig,
    schedule: NoiseSchedule,
    denoiser: Mlp,
    /// Training rows, `dim` values each.
    data: Vec<f32>,
    dim: usize,
    /// emb(t) for t = 1..=T, `embedding` values each (row t − 1).
    embeddings: Vec<f32>,
    /// Draws the batches, t and ε.
    rng: StdRng,
    /// One record per [`RECORD_EVERY`] steps.
    pub history: Vec<StepRecord>,
    /// The loss of every step.
    pub step_losses: Vec<f64>,
    /// Print progress while training (on by default): the first and last record of each
    /// `train` call, and a record whenever 2 seconds have passed since the last line.
    pub verbose: bool,
    /// A time budget and autosaving for [`Ddpm::train`] (none by default).
    pub limits: crate::train::Limits,
    /// A step's buffers: the denoiser's input [x_t, emb(t)], ε, and each chunk's Σ (ε̂ − ε)².
    input: Vec<f32>,
    eps: Vec<f32>,
    chunk_sums: Vec<f64>,
}

impl Ddpm {
    /// A fresh DDPM for `config` on the training rows `data` (`dim` values each).
    pub fn new(config: DdpmConfig, data: &[f32], dim: usize) -> Result<Ddpm> {
        config.validate()?;
        ensure(
            dim >= 1,
            "dim",
            dim,
            "each example needs at least one value",
        )?;
        check_rows("Ddpm::new (data)", data, dim)?;
        let schedule = NoiseSchedule::new(config.schedule, config.steps)?;
        let denoiser = Mlp::new(
            &config.widths(dim),
            Activation::Relu,
            config.adam(),
            config.seed,
        )?;
        let embeddings = (1..=config.steps)
            .flat_map(|t| time_embedding(t, config.embedding))
            .collect();
        Ok(Ddpm {
            rng: StdRng::seed_from_u64(config.seed ^ 0x9e37_79b9_7f4a_7c15),
            config,
            schedule,
            denoiser,
            data: data.to_vec(),
            dim,
            embeddings,
            history: vec![],
            step_losses: vec![],
            verbose: true,
            limits: Default::default(),
            input: vec![],
            eps: vec![],
            chunk_sums: vec![],
        })
    }

    /// A DDPM on the 1,497 training digits in [−1, 1] (W3 with the default config).
    pub fn digits(config: DdpmConfig) -> Result<Ddpm> {
        let d = load_digits(Scale::Symmetric)?;
        Ddpm::new(config, &d.train.x, PIXELS)
    }

    /// A DDPM on 2-D points.
    pub fn points(config: DdpmConfig, points: &[[f32; 2]]) -> Result<Ddpm> {
        let flat: Vec<f32> = points.iter().flatten().copied().collect();
        Ddpm::new(config, &flat, 2)
    }

    /// The config it was built with.
    pub fn config(&self) -> &DdpmConfig {
        &self.config
    }

    /// Its noise schedule.
    pub fn schedule(&self) -> &NoiseSchedule {
        &self.schedule
    }

    /// Changes the learning rate (the denoiser keeps its Adam moments): to go on with smaller
    /// steps after a divergence.
    pub fn set_learning_rate(&mut self, lr: f64) -> Result<()> {
        let config = DdpmConfig {
            lr,
            ..self.config.clone()
        };
        config.validate()?;
        self.denoiser.set_adam(config.adam())?;
        self.config = config;
        Ok(())
    }

    /// The denoiser network ε_θ.
    pub fn denoiser(&self) -> &Mlp {
        &self.denoiser
    }

    /// Values per example.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The trained network's noise prediction ε_θ(x_t, t) for rows of `dim` values at step t
    /// (1..=T): what the sampler subtracts, and what approximates the optimal
    /// ε*(x_t) = −√(1 − ᾱ_t) ∇log q(x_t) (see [`Mixture1d::optimal_eps`]).
    pub fn predict_eps(&self, x_t: &[f32], t: usize) -> Result<Vec<f32>> {
        let big_t = self.config.steps;
        ensure(
            (1..=big_t).contains(&t),
            "t",
            t,
            &format!("a step from 1 to T = {big_t}"),
        )?;
        let (d, e) = (self.dim, self.config.embedding);
        check_rows("predict_eps (x_t)", x_t, d)?;
        let emb = &self.embeddings[(t - 1) * e..t * e];
        let mut input = Vec::with_capacity(x_t.len() / d * (d + e));
        for x in x_t.chunks_exact(d) {
            input.extend_from_slice(x);
            input.extend_from_slice(emb);
        }
        self.denoiser.predict(&team_for(x_t.len() / d), &input)
    }

    /// The training rows.
    pub fn data(&self) -> &[f32] {
        &self.data
    }

    /// Adam steps taken so far.
    pub fn steps_done(&self) -> usize {
        self.denoiser.steps()
    }

    /// Draws a batch: x_0 uniformly with replacement, t uniform in 1..=T, ε ~ N(0, I), and
    /// writes the denoiser's input [x_t, emb(t)] with x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε.
    fn load_batch(&mut self) {
        let (d, e, b) = (self.dim, self.config.embedding, self.config.batch_size);
        let n = self.data.len() / d;
        self.input.resize(b * (d + e), 0.0);
        self.eps.resize(b * d, 0.0);
        for (row, eps) in self
            .input
            .chunks_exact_mut(d + e)
            .zip(self.eps.chunks_exact_mut(d))
        {
            let i = self.rng.gen_range(0..n);
            let t = self.rng.gen_range(1..=self.config.steps);
            let ab = self.schedule.alpha_bars[t - 1];
            let (a, s) = (ab.sqrt() as f32, (1.0 - ab).sqrt() as f32);
            let x0 = &self.data[i * d..(i + 1) * d];
            for j in 0..d {
                eps[j] = StandardNormal.sample(&mut self.rng);
                row[j] = a * x0[j] + s * eps[j];
            }
            row[d..].copy_from_slice(&self.embeddings[(t - 1) * e..t * e]);
        }
    }

    /// One training step on the batch in the buffers: the whole of DDPM training.
    fn step(&mut self, team: &Team, update: Update<'_>) -> Result<f64> {
        let (input, eps, d) = (&self.input, &self.eps, self.dim);
        let (width, rows) = (self.denoiser.input_width(), eps.len() / d);
        // L = mean over all elements of (ε̂ − ε)², ∂ε̂ = 2(ε̂ − ε)/(B·d)
        let scale = 2.0 / eps.len() as f32;
        // One chunk of rows per task: forward, the loss and its gradient, backward.
        rowwise(
            team,
            [&mut self.denoiser],
            [rows],
            &mut self.chunk_sums,
            &|[net]| {
                let (i0, i1) = net.range();
                net.input_mut()
                    .copy_from_slice(&input[i0 * width..i1 * width]);
                // ε̂ = ε_θ(x_t, t)
                net.forward();
                let (eps_hat, grad) = net.output_and_grad();
                let mut sum = 0.0f64;
                for ((&y, &e), g) in eps_hat.iter().zip(&eps[i0 * d..i1 * d]).zip(grad) {
                    let diff = y - e;
                    sum += (diff * diff) as f64;
                    *g = scale * diff;
                }
                net.backward(false);
                sum
            },
        )?;
        let loss = self.chunk_sums.iter().sum::<f64>() / eps.len() as f64;
        if !loss.is_finite() {
            // Stop before any update: the denoiser keeps its last finite parameters.
            return Err(Error::Diverged {
                step: self.denoiser.steps(),
                loss: loss as f32,
                fix: format!("Lower the learning rate (now {}).", self.config.lr),
            });
        }
        // The denoiser's weight update, Adam fused in
        update_nets(team, [(&mut self.denoiser, update)])?;
        Ok(loss)
    }

    /// One training step on a fresh batch that either completes or leaves the DDPM as it was
    /// before it (parameters, step count, the random stream; Adam's moments where finite): a
    /// step that fails (an error, a panicking thread) or makes a parameter NaN or infinite is
    /// undone, so the next `train` continues exactly as the DDPM's checkpoint would.
    fn guarded_step(&mut self, team: &Team) -> Result<f64> {
        let rng = self.rng.clone();
        let steps = self.denoiser.steps();
        // The update keeps the parameters it replaces (copied by its own tasks).
        self.denoiser.keep_before_update(true);
        self.load_batch();
        let result =
            self.step(team, Update::Adam)
                .and_then(|loss| match self.denoiser.first_non_finite() {
                    None => Ok(loss),
                    Some((i, value)) => Err(Error::Diverged {
                        step: steps,
                        loss: value,
                        fix: format!(
                        "The update at step {steps} made the denoiser's parameter {i} {value}; \
                         it was undone, so the DDPM keeps its parameters from before that step. \
                         Lower the learning rate (now {:e}; W3 uses 1e-3).",
                        self.config.lr
                    ),
                    }),
                });
        if result.is_err() {
            self.rng = rng;
            self.denoiser.undo_update(steps)?;
        }
        result
    }

    /// Trains `iters` more steps, recording the mean loss every [`RECORD_EVERY`] steps and
    /// printing progress. [`Ddpm::limits`] can give the call a time budget and autosave it.
    pub fn train(&mut self, iters: usize) -> Result<&[StepRecord]> {
        let start = self.history.len();
        let mut watch = crate::train::Watch::start(&self.limits)?;
        let team = Team::default_size();
        let clock = std::time::Instant::now();
        let mut last_print: Option<std::time::Instant> = None;
        let mut sum = 0.0;
        for i in 0..iters {
            if watch.out_of_time() {
                if self.verbose {
                    println!(
                        "time budget reached after {i} of {iters} steps ({:.1} s): call train again to go on",
                        watch.seconds()
                    );
                }
                break;
            }
            let loss = self.guarded_step(&team)?;
            self.step_losses.push(loss);
            sum += loss;
            let done = self.steps_done();
            if done.is_multiple_of(RECORD_EVERY) || i + 1 == iters {
                let since = self.history.last().map_or(0, |r| r.step);
                let record = StepRecord {
                    step: done,
                    loss: sum / (done - since).max(1) as f64,
                };
                sum = 0.0;
                let due = self.history.len() == start
                    || i + 1 == iters
                    || last_print.is_none_or(|t| t.elapsed().as_secs_f64() >= 2.0);
                if self.verbose && due {
                    last_print = Some(std::time::Instant::now());
                    println!(
                        "step {:>6}  loss {:.4}  ({:.1} s)",
                        record.step,
                        record.loss,
                        clock.elapsed().as_secs_f64()
                    );
                }
                self.history.push(record);
            }
            watch.autosave(false, |path| self.save(path))?;
        }
        watch.autosave(true, |path| self.save(path))?;
        Ok(&self.history[start..])
    }

    /// Trains `iters` more steps without records or printing (the benchmark's timed loop);
    /// each step's loss is in `step_losses`.
    pub fn train_steps_only(&mut self, iters: usize) -> Result<()> {
        let team = Team::default_size();
        for _ in 0..iters {
            let loss = self.guarded_step(&team)?;
            self.step_losses.push(loss);
        }
        Ok(())
    }

    /// Fills the denoiser's input rows [x_t, emb(t)] and their noise: row k takes x_0 = row
    /// k mod (rows of `x0s`), draws ε (d values, in order from `rng`) into `eps`, and writes
    /// x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε.
    fn fill_noised(
        &self,
        x0s: &[f32],
        t: usize,
        rng: &mut StdRng,
        input: &mut [f32],
        eps: &mut [f32],
    ) {
        let (d, e) = (self.dim, self.config.embedding);
        let rows = x0s.len() / d;
        let ab = self.schedule.alpha_bars[t - 1];
        let (a, s) = (ab.sqrt() as f32, (1.0 - ab).sqrt() as f32);
        for (k, (row, ep)) in input
            .chunks_exact_mut(d + e)
            .zip(eps.chunks_exact_mut(d))
            .enumerate()
        {
            let x0 = &x0s[(k % rows) * d..(k % rows + 1) * d];
            for j in 0..d {
                ep[j] = StandardNormal.sample(rng);
                row[j] = a * x0[j] + s * ep[j];
            }
            row[d..].copy_from_slice(&self.embeddings[(t - 1) * e..t * e]);
        }
    }

    /// The mean ε-prediction loss at one fixed t over `n` draws of (x_0, ε) from `x0s` (rows of
    /// `dim`), without training: E‖ε − ε_θ(x_t, t)‖² per element.
    pub fn loss_at(&mut self, x0s: &[f32], t: usize, n: usize, seed: u64) -> Result<f64> {
        let (d, e) = (self.dim, self.config.embedding);
        check_rows("loss_at (x0s)", x0s, d)?;
        self.schedule.index(t)?;
        ensure(n >= 1, "n", n, "use at least one draw, e.g. 1000")?;
        let mut rng = StdRng::seed_from_u64(seed);
        let mut input = vec![0.0f32; n * (d + e)];
        let mut eps = vec![0.0f32; n * d];
        self.fill_noised(x0s, t, &mut rng, &mut input, &mut eps);
        let out = self.denoiser.infer(&team_for(n), &input)?;
        let sum: f64 = out
            .iter()
            .zip(&eps)
            .map(|(&y, &e)| ((y - e) * (y - e)) as f64)
            .sum();
        Ok(sum / eps.len() as f64)
    }

    /// The variational bound on −log p(x_0) of each row of `x0s` (values on `levels` evenly
    /// spaced levels from −1 to 1: the digits of [`Ddpm::digits`] take 17), averaged over the
    /// rows, in nats per image, with the reverse step p_θ(x_{t−1} | x_t) = N(μ_θ, β_t I) of
    /// the sampler, μ_θ = (x_t − β_t/√(1 − ᾱ_t) ε_θ(x_t, t))/√α_t:
    /// - L_T = KL(N(√ᾱ_T x_0, 1 − ᾱ_T) ‖ N(0, 1)) per pixel, exactly
    ///   ([`NoiseSchedule::prior_term`]);
    /// - for t ≥ 2, L_{t−1} = ½ Σ_pixels [β̃_t/β_t − 1 − ln(β̃_t/β_t) + (μ̃ − μ_θ)²/β_t], with
    ///   μ̃ − μ_θ = β_t/(√α_t √(1 − ᾱ_t))·(ε_θ − ε) at x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε, i.e.
    ///   L_{t−1} = w_t‖ε − ε_θ‖² + d·gap_t ([`NoiseSchedule::elbo_weight`],
    ///   [`NoiseSchedule::variance_gap`]);
    /// - L_0 = −Σ_pixels log P(x_0's level | N(μ_θ(x_1, 1), β_1)), the Gaussian's mass on the
    ///   level's bin (outer bins open, [`crate::math::discretised_normal_log_prob`]).
    ///
    /// Every t is evaluated for every row with `draws` draws of ε each (seeded by `seed`), so
    /// the only Monte Carlo error is over ε; the result is an estimate of the bound, not a
    /// sampled t.
    pub fn neg_elbo(&self, x0s: &[f32], levels: usize, draws: usize, seed: u64) -> Result<NegElbo> {
        let (d, e, big_t) = (self.dim, self.config.embedding, self.config.steps);
        check_rows("neg_elbo (x0s)", x0s, d)?;
        ensure(
            draws >= 1,
            "draws",
            draws,
            "use at least one draw of ε per step, e.g. 4",
        )?;
        let level = crate::data::level_indices(x0s, (-1.0, 1.0), levels)?;
        let rows = x0s.len() / d;
        let n = rows * draws;
        let team = team_for(n);
        let mut rng = StdRng::seed_from_u64(seed);
        let prior = self.schedule.prior_term(x0s, d)?;
        let mut by_t = vec![0.0; big_t];
        let mut input = vec![0.0f32; n * (d + e)];
        let mut eps = vec![0.0f32; n * d];
        for t in 1..=big_t {
            let (beta, alpha, ab) = (
                self.schedule.betas[t - 1],
                self.schedule.alphas[t - 1],
                self.schedule.alpha_bars[t - 1],
            );
            self.fill_noised(x0s, t, &mut rng, &mut input, &mut eps);
            let eps_hat = self.denoiser.predict(&team, &input)?;
            let term = if t == 1 {
                // L_0: the mean μ_θ(x_1, 1) and σ_1 = √β_1, scored on x_0's level.
                let coef = beta / (1.0 - ab).sqrt();
                let sigma = beta.sqrt();
                let mut sum = 0.0;
                for (k, (row, eh)) in input
                    .chunks_exact(d + e)
                    .zip(eps_hat.chunks_exact(d))
                    .enumerate()
                {
                    for j in 0..d {
                        let mu = (row[j] as f64 - coef * eh[j] as f64) / alpha.sqrt();
                        let lv = level[(k % rows) * d + j];
                        sum -= crate::math::discretised_normal_log_prob(
                            lv,
                            levels,
                            (-1.0, 1.0),
                            mu,
                            sigma,
                        );
                    }
                }
                sum
            } else {
                let constant = d as f64 * self.schedule.variance_gap(t)?;
                let w = self.schedule.elbo_weight(t)?;
                let sq: f64 = eps_hat
                    .iter()
                    .zip(&eps)
                    .map(|(&y, &e)| ((y - e) as f64).powi(2))
                    .sum();
                n as f64 * constant + w * sq
            };
            by_t[t - 1] = term / n as f64;
        }
        let decoder = by_t[0];
        let steps = by_t[1..].iter().sum();
        Ok(NegElbo {
            prior,
            steps,
            decoder,
            by_t,
        })
    }

    /// `n` samples by DDPM's ancestral sampling from x_T ~ N(0, I):
    /// x_{t−1} = (x_t − β_t/√(1 − ᾱ_t) ε_θ(x_t, t))/√α_t + √β_t z (z = 0 at t = 1), the final
    /// x_0 clipped as the config says. Rows of `dim` values.
    pub fn sample(&mut self, n: usize, seed: u64) -> Result<Vec<f32>> {
        Ok(self.sample_trajectory(n, seed, &[])?.0)
    }

    /// [`Ddpm::sample`], with the estimate x̂_0 = (x_t − √(1 − ᾱ_t) ε̂)/√ᾱ_t also clipped at
    /// every step when `clip_each_step` (and ε̂ replaced by the noise the clipped x̂_0 implies,
    /// as [`Ddpm::sample_ddim_clipping`] does; the mean is then q(x_{t−1} | x_t, x̂_0)'s, as in
    /// Ho et al.'s code): the like-for-like comparison with DDIM, which clips every step.
    pub fn sample_clipping(
        &mut self,
        n: usize,
        seed: u64,
        clip_each_step: bool,
    ) -> Result<Vec<f32>> {
        Ok(self.ancestral(n, seed, &[], clip_each_step)?.0)
    }

    /// [`Ddpm::sample`], also returning x_t (unclipped) at each t of `keep` (t = T is x_T,
    /// t = 0 the final samples before clipping), in the order of `keep`.
    pub fn sample_trajectory(
        &mut self,
        n: usize,
        seed: u64,
        keep: &[usize],
    ) -> Result<(Vec<f32>, Vec<Vec<f32>>)> {
        self.ancestral(n, seed, keep, false)
    }

    fn ancestral(
        &mut self,
        n: usize,
        seed: u64,
        keep: &[usize],
        clip_each_step: bool,
    ) -> Result<(Vec<f32>, Vec<Vec<f32>>)> {
        let (chain, mut network) = self.sampler(n);
        chain.ancestral(n, seed, keep, clip_each_step, &mut network)
    }

    /// The chain the samplers run and the network that predicts its noise, for `rows` rows.
    fn sampler(&mut self, rows: usize) -> (Chain<'_>, Network<'_>) {
        let chain = Chain {
            schedule: &self.schedule,
            d: self.dim,
            e: self.config.embedding,
            embeddings: &self.embeddings,
            clip: self.config.clip,
        };
        let network = Network {
            denoiser: &mut self.denoiser,
            team: team_for(rows),
        };
        (chain, network)
    }

    /// `n` samples by deterministic DDIM (η = 0) in `steps` steps τ_S > … > τ_1 evenly spread
    /// over 1..=T, from x_T ~ N(0, I) drawn with `seed`: at each τ with next τ' (τ' = 0 last),
    /// x̂_0 = (x_τ − √(1 − ᾱ_τ) ε̂)/√ᾱ_τ, then x_{τ'} = √ᾱ_{τ'} x̂_0 + √(1 − ᾱ_{τ'}) ε̂.
    /// Where the config clips, x̂_0 is clipped and ε̂ replaced by the noise the clipped x̂_0
    /// implies, (x_τ − √ᾱ_τ x̂_0)/√(1 − ᾱ_τ) (as the diffusers library does), so the two stay
    /// consistent.
    pub fn sample_ddim(&mut self, n: usize, steps: usize, seed: u64) -> Result<Vec<f32>> {
        ensure(
            (1..=crate::mlp::MAX_ROWS).contains(&n),
            "n",
            n,
            "ask for at least one sample (and at most about a million)",
        )?;
        let mut rng = StdRng::seed_from_u64(seed);
        let x_t: Vec<f32> = (0..n * self.dim)
            .map(|_| StandardNormal.sample(&mut rng))
            .collect();
        self.sample_ddim_from(&x_t, steps)
    }

    /// `n` draws of x_T from the Gaussian that matches q(x_T) coordinate by coordinate:
    /// N(√ᾱ_T m_j, ᾱ_T s_j² + 1 − ᾱ_T), with m_j and s_j² the training data's mean and variance
    /// of coordinate j. When ᾱ_T is not near 0 (W3 v1: ᾱ_T ≈ 0.13), N(0, I) is a poor stand-in for
    /// q(x_T); DDPM's added noise forgives it, deterministic DDIM carries the mismatch to x_0.
    pub fn matched_start(&self, n: usize, seed: u64) -> Result<Vec<f32>> {
        ensure(
            (1..=crate::mlp::MAX_ROWS).contains(&n),
            "n",
            n,
            "ask for at least one sample (and at most about a million)",
        )?;
        let d = self.dim;
        let rows = (self.data.len() / d) as f64;
        let ab = self.schedule.alpha_bars[self.config.steps - 1];
        let (mut mean, mut var) = (vec![0.0f64; d], vec![0.0f64; d]);
        for x in self.data.chunks_exact(d) {
            for j in 0..d {
                mean[j] += x[j] as f64 / rows;
            }
        }
        for x in self.data.chunks_exact(d) {
            for j in 0..d {
                var[j] += (x[j] as f64 - mean[j]).powi(2) / rows;
            }
        }
        let mut rng = StdRng::seed_from_u64(seed);
        let mut out = Vec::with_capacity(n * d);
        for _ in 0..n {
            for j in 0..d {
                let z: f64 = StandardNormal.sample(&mut rng);
                out.push((ab.sqrt() * mean[j] + (ab * var[j] + 1.0 - ab).sqrt() * z) as f32);
            }
        }
        Ok(out)
    }

    /// Deterministic DDIM as in [`Ddpm::sample_ddim`], from the given x_T (rows of `dim`
    /// values): the same x_T always gives the same samples. x̂_0 is clipped to the config's
    /// `clip` at every step (and the final x_0 too).
    pub fn sample_ddim_from(&mut self, x_t: &[f32], steps: usize) -> Result<Vec<f32>> {
        self.sample_ddim_clipping(x_t, steps, true)
    }

    /// [`Ddpm::sample_ddim_from`], with x̂_0 clipped at every step (`clip_each_step`, as
    /// `sample_ddim_from` does) or only the final x_0, as [`Ddpm::sample`] clips DDPM's: the
    /// like-for-like comparison of the two samplers.
    pub fn sample_ddim_clipping(
        &mut self,
        x_t: &[f32],
        steps: usize,
        clip_each_step: bool,
    ) -> Result<Vec<f32>> {
        let rows = x_t.len() / self.dim.max(1);
        let (chain, mut network) = self.sampler(rows);
        chain.ddim(x_t, steps, clip_each_step, &mut network)
    }

    /// Saves a checkpoint (config, data, the denoiser with Adam's state, history) as JSON:
    /// training resumed from it with [`Ddpm::load`] continues exactly as if it had never
    /// stopped. The file is written whole or not at all (a temporary file, then renamed).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let checkpoint = Checkpoint {
            genlab: crate::VERSION.to_string(),
            config: self.config.clone(),
            dim: self.dim,
            data: self.data.clone(),
            denoiser: self.denoiser.state(),
            history: self.history.clone(),
            step_losses: self.step_losses.clone(),
        };
        crate::train::save_json(path.as_ref(), &checkpoint)
    }

    /// Loads a checkpoint written by [`Ddpm::save`] (checking its network against its config);
    /// train it further with [`Ddpm::train`].
    pub fn load(path: impl AsRef<Path>) -> Result<Ddpm> {
        let path = path.as_ref();
        let c: Checkpoint = crate::train::load_json(path, "DDPM", "Ddpm::save")?;
        let bad = |message: String| Error::Data {
            path: path.to_path_buf(),
            message,
        };
        let mut ddpm = Ddpm::new(c.config, &c.data, c.dim)
            .map_err(|e| bad(format!("its config or data is invalid ({e})")))?;
        let got = c.denoiser.widths();
        let want = ddpm.config.widths(ddpm.dim);
        if got != want {
            return Err(bad(format!(
                "its denoiser has widths {got:?}, but its config says {want:?}"
            )));
        }
        ddpm.denoiser = Mlp::from_state(c.denoiser).map_err(|e| bad(e.to_string()))?;
        // The step count says how far to replay the random stream: it must agree with the
        // losses recorded (an edited count would otherwise replay for hours).
        let steps = ddpm.denoiser.steps();
        let recorded = c.history.last().map_or(0, |r| r.step);
        if c.step_losses.len() != steps || recorded > steps {
            return Err(bad(format!(
                "its counts disagree (denoiser steps {steps}, step losses {}, last record at \
                 step {recorded}): the checkpoint was edited or damaged",
                c.step_losses.len()
            )));
        }
        // Continue the random stream where it would be after as many steps.
        for _ in 0..ddpm.denoiser.steps() {
            ddpm.load_batch();
        }
        ddpm.history = c.history;
        ddpm.step_losses = c.step_losses;
        Ok(ddpm)
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Checkpoint {
    genlab: String,
    config: DdpmConfig,
    dim: usize,
    data: Vec<f32>,
    denoiser: MlpState,
    history: Vec<StepRecord>,
    step_losses: Vec<f64>,
}

/// The mean over the rows of `a` of the Euclidean distance to the nearest row of `b` (both
/// rows of `dim` values), computed exactly (no ‖a‖² + ‖b‖² − 2a·b shortcut).
pub fn nearest_distance_mean(a: &[f32], b: &[f32], dim: usize) -> Result<f64> {
    check_rows("nearest_distance_mean (a)", a, dim)?;
    check_rows("nearest_distance_mean (b)", b, dim)?;
    let total: f64 = a
        .chunks_exact(dim)
        .map(|x| {
            let best = b
                .chunks_exact(dim)
                .map(|y| x.iter().zip(y).map(|(p, q)| (p - q) * (p - q)).sum::<f32>())
                .fold(f32::INFINITY, f32::min);
            (best as f64).sqrt()
        })
        .sum();
    Ok(total / (a.len() / dim) as f64)
}

/// W3's quality metric: (mean distance from each sample to its nearest training digit) /
/// (mean distance from each test digit to its nearest training digit), all in [−1, 1] pixel
/// units. Near 1 when samples sit as close to the data as held-out digits do.
pub fn nn_ratio(samples: &[f32], digits: &Digits) -> Result<f64> {
    Ok(nearest_distance_mean(samples, &digits.train.x, PIXELS)?
        / nearest_distance_mean(&digits.test.x, &digits.train.x, PIXELS)?)
}

/// The ε-prediction loss at step t of a predictor that knows only each pixel's own
/// distribution over the grey levels it takes in `train` (rows of `dim`; the 8×8 digits take
/// 17 levels, 0.125 apart in [−1, 1]) and nothing about the other pixels: per pixel,
/// E[x_0 | x_t] = Σ_l l·p(l) N(x_t; √ᾱ_t l, 1 − ᾱ_t) / Σ_l p(l) N(…), then
/// ε̂ = (x_t − √ᾱ_t E[x_0 | x_t])/√(1 − ᾱ_t). Measured like [`Ddpm::loss_at`]: the same `n`
/// draws of (x_0 from `x0s`, ε) for the same `seed`, E‖ε − ε̂‖² per element. While the noise
/// is much smaller than the gap between levels, rounding x_t/√ᾱ_t to a level recovers x_0,
/// and so ε, almost exactly: this predictor's loss is near 0 at small t, where predicting
/// ε = 0 scores 1.
pub fn level_oracle_loss(
    train: &[f32],
    x0s: &[f32],
    dim: usize,
    schedule: &NoiseSchedule,
    t: usize,
    n: usize,
    seed: u64,
) -> Result<f64> {
    check_rows("level_oracle_loss (train)", train, dim)?;
    check_rows("level_oracle_loss (x0s)", x0s, dim)?;
    schedule.index(t)?;
    ensure(n >= 1, "n", n, "use at least one draw, e.g. 1000")?;
    ensure(!x0s.is_empty(), "x0s", 0, "give at least one row of x_0")?;
    let mut levels: Vec<f32> = train.to_vec();
    levels.sort_by(f32::total_cmp);
    levels.dedup();
    ensure(
        levels.len() <= 256,
        "train",
        format!("{} distinct values", levels.len()),
        "the data must take few levels (the digits take 17): this predictor is for quantised data",
    )?;
    // p(level | pixel j), with half a count added to each level so none is impossible.
    let nl = levels.len();
    let mut prior = vec![0.5f64; dim * nl];
    for row in train.chunks_exact(dim) {
        for (j, v) in row.iter().enumerate() {
            if let Ok(l) = levels.binary_search_by(|x| x.total_cmp(v)) {
                prior[j * nl + l] += 1.0;
            }
        }
    }
    for p in prior.chunks_exact_mut(nl) {
        let total: f64 = p.iter().sum();
        p.iter_mut().for_each(|v| *v /= total);
    }
    let ab = schedule.alpha_bars[t - 1];
    let (a, s) = (ab.sqrt(), (1.0 - ab).sqrt());
    let (af, sf) = (a as f32, s as f32);
    let rows = x0s.len() / dim;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut sum = 0.0f64;
    let mut log_w = vec![0.0f64; nl];
    for k in 0..n {
        let x0 = &x0s[(k % rows) * dim..(k % rows + 1) * dim];
        for j in 0..dim {
            let e: f32 = StandardNormal.sample(&mut rng);
            // The same float arithmetic as `loss_at` builds its x_t with.
            let x_t = (af * x0[j] + sf * e) as f64;
            for (l, lw) in log_w.iter_mut().enumerate() {
                let r = (x_t - a * levels[l] as f64) / s;
                *lw = prior[j * nl + l].ln() - 0.5 * r * r;
            }
            let top = log_w.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let (mut num, mut den) = (0.0, 0.0);
            for (l, lw) in log_w.iter().enumerate() {
                let w = (lw - top).exp();
                num += w * levels[l] as f64;
                den += w;
            }
            let eps_hat = (x_t - a * num / den) / s;
            sum += (eps_hat - e as f64).powi(2);
        }
    }
    Ok(sum / (n * dim) as f64)
}

/// The DDPM's variational bound on −log p(x_0) (nats per image), term by term: the DDPM is a
/// VAE whose encoder q(x_{1:T} | x_0) is the fixed forward process, and chapter 2's ELBO
/// becomes −log p(x_0) ≤ L_T + Σ_{t=2}^T L_{t−1} + L_0 (Ho et al., 2020, eq. 5).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct NegElbo {
    /// L_T = KL(q(x_T | x_0) ‖ N(0, I)): no parameters; how far the schedule's end is from
    /// the sampler's start.
    pub prior: f64,
    /// Σ_{t=2}^T L_{t−1}, L_{t−1} = KL(q(x_{t−1} | x_t, x_0) ‖ p_θ(x_{t−1} | x_t)).
    pub steps: f64,
    /// L_0 = −log p_θ(x_0 | x_1), the reverse step's Gaussian discretised to the data's levels.
    pub decoder: f64,
    /// The term of each step: `by_t[0]` is L_0 (t = 1), `by_t[t − 1]` is L_{t−1} for t ≥ 2.
    pub by_t: Vec<f64>,
}

impl NegElbo {
    /// The whole bound L_T + Σ L_{t−1} + L_0 in nats per image (≥ −log p(x_0)).
    pub fn total(&self) -> f64 {
        self.prior + self.steps + self.decoder
    }
}

/// −log p(x) in nats per image of the best model that treats pixels as independent: each
/// pixel's histogram over the `levels` levels in `train` (half a count added to every level),
/// scored on `test` (rows of `dim`, values on `levels` levels of `range`). The baseline any
/// generative model of the digits must beat; the uniform distribution scores dim·ln(levels).
pub fn independent_levels_nll(
    train: &[f32],
    test: &[f32],
    dim: usize,
    range: (f32, f32),
    levels: usize,
) -> Result<f64> {
    check_rows("independent_levels_nll (train)", train, dim)?;
    check_rows("independent_levels_nll (test)", test, dim)?;
    let (tr, te) = (
        crate::data::level_indices(train, range, levels)?,
        crate::data::level_indices(test, range, levels)?,
    );
    let mut counts = vec![0.5f64; dim * levels];
    for (i, &k) in tr.iter().enumerate() {
        counts[(i % dim) * levels + k] += 1.0;
    }
    let total = (tr.len() / dim) as f64 + 0.5 * levels as f64;
    let nll: f64 = te
        .iter()
        .enumerate()
        .map(|(i, &k)| -(counts[(i % dim) * levels + k] / total).ln())
        .sum();
    Ok(nll / (te.len() / dim) as f64)
}

/// The other half of a quality reading: (mean distance from each **test** digit to its nearest
/// sample) / (mean distance from each test digit to its nearest training digit). `nn_ratio`
/// asks whether samples are near some data (precision: one real digit repeated scores well);
/// this asks whether the data are near some sample (coverage: a model that draws only some
/// digits, or one blurry average, leaves test digits far from every sample). Near 1 when the
/// samples cover the test digits as well as the training set does; with fewer samples than
/// training digits a perfect model scores somewhat above 1 (the chapter prints that floor).
pub fn coverage_ratio(samples: &[f32], digits: &Digits) -> Result<f64> {
    Ok(nearest_distance_mean(&digits.test.x, samples, PIXELS)?
        / nearest_distance_mean(&digits.test.x, &digits.train.x, PIXELS)?)
}

/// x̂_0 = (x_t − √(1 − ᾱ) ε̂)/√ᾱ from one value x_t and its ε̂ (`s` = √(1 − ᾱ), `inv_a` =
/// 1/√ᾱ), with the ε̂ to use next: where `clip` is set and x̂_0 lies outside it, the clipped
/// x̂_0 and the noise it implies, ε = (x_t − √ᾱ x̂_0)/√(1 − ᾱ), so that x_t is still
/// √ᾱ x̂_0 + √(1 − ᾱ) ε (as the diffusers library does); else x̂_0 and ε̂ as they are.
/// DDPM's and DDIM's samplers share it.
fn x0_and_eps(x_t: f32, eps_hat: f32, s: f32, inv_a: f32, clip: Option<f32>) -> (f32, f32) {
    let x0 = (x_t - s * eps_hat) * inv_a;
    match clip {
        Some(c) if x0.abs() > c => {
            let x0 = x0.clamp(-c, c);
            (x0, (x_t - x0 / inv_a) / s)
        }
        _ => (x0, eps_hat),
    }
}

/// One thread for small batches (waking a second costs more than it saves), the default team
/// for large ones.
fn team_for(rows: usize) -> Team {
    if rows >= 256 {
        Team::default_size()
    } else {
        Team::new(1)
    }
}

fn check_len(what: &str, want: usize, got: usize) -> Result<()> {
    if want != got {
        return Err(Error::shape(
            what,
            format!("{want} values"),
            format!("{got} values"),
        ));
    }
    Ok(())
}

/// The x part of rows [x (d values), emb(t) (e values)].
/// A noise predictor for the samplers: given the rows [x_t, emb(t)] (the embedding empty
/// for [`sample_ddpm_with`] and [`sample_ddim_with`]) and t, ε̂ for each row (`d` values),
/// lent from the predictor's own buffer (the network's output, copied nowhere).
trait Predictor {
    fn predict(&mut self, input: &[f32], t: usize) -> Result<&[f32]>;
}

/// The network ε_θ on its team.
struct Network<'a> {
    denoiser: &'a mut Mlp,
    team: Team,
}

impl Predictor for Network<'_> {
    fn predict(&mut self, input: &[f32], _t: usize) -> Result<&[f32]> {
        self.denoiser.infer(&self.team, input)
    }
}

/// A function of (x_t rows, t), its answer kept in a buffer.
struct Function<F> {
    f: F,
    out: Vec<f32>,
}

impl<F: FnMut(&[f32], usize) -> Result<Vec<f32>>> Predictor for Function<F> {
    fn predict(&mut self, input: &[f32], t: usize) -> Result<&[f32]> {
        self.out = (self.f)(input, t)?;
        Ok(&self.out)
    }
}

/// What DDPM's and DDIM's samplers need besides the noise predictor: the schedule, the sizes,
/// the time embeddings (rows of `e` for t = 1..=T) and the clipping range. The network's
/// samplers and the oracle samplers run the same chain.
struct Chain<'a> {
    schedule: &'a NoiseSchedule,
    d: usize,
    e: usize,
    embeddings: &'a [f32],
    clip: Option<f32>,
}

impl<'a> Chain<'a> {
    /// The chain of an oracle sampler: no time embedding, no clipping.
    fn bare(schedule: &'a NoiseSchedule, dim: usize) -> Result<Chain<'a>> {
        ensure(
            dim >= 1,
            "dim",
            dim,
            "each example needs at least one value",
        )?;
        Ok(Chain {
            schedule,
            d: dim,
            e: 0,
            embeddings: &[],
            clip: None,
        })
    }

    /// DDPM's ancestral sampling (see [`Ddpm::sample`], [`Ddpm::sample_clipping`],
    /// [`Ddpm::sample_trajectory`]).
    fn ancestral(
        &self,
        n: usize,
        seed: u64,
        keep: &[usize],
        clip_each_step: bool,
        predict: &mut impl Predictor,
    ) -> Result<(Vec<f32>, Vec<Vec<f32>>)> {
        ensure(
            (1..=crate::mlp::MAX_ROWS).contains(&n),
            "n",
            n,
            "ask for at least one sample (and at most about a million)",
        )?;
        let big_t = self.schedule.steps();
        if let Some(t) = keep.iter().find(|&&t| t > big_t) {
            return Err(Error::param(
                "keep",
                t,
                format!("keep steps between 0 and T = {big_t}"),
            ));
        }
        let (d, e) = (self.d, self.e);
        let mut rng = StdRng::seed_from_u64(seed);
        // The denoiser's input rows [x_t, emb(t)]: x_t lives in the first d columns.
        let mut input = vec![0.0f32; n * (d + e)];
        for row in input.chunks_exact_mut(d + e) {
            for v in &mut row[..d] {
                *v = StandardNormal.sample(&mut rng);
            }
        }
        let mut kept: Vec<Option<Vec<f32>>> = vec![None; keep.len()];
        let snapshot = |input: &[f32], t: usize, kept: &mut Vec<Option<Vec<f32>>>| {
            for (slot, _) in kept.iter_mut().zip(keep).filter(|(_, &k)| k == t) {
                *slot = Some(strip_embedding(input, d, e));
            }
        };
        snapshot(&input, big_t, &mut kept);
        for t in (1..=big_t).rev() {
            let emb = &self.embeddings[(t - 1) * e..t * e];
            for row in input.chunks_exact_mut(d + e) {
                row[d..].copy_from_slice(emb);
            }
            let (beta, alpha, ab) = (
                self.schedule.betas[t - 1],
                self.schedule.alphas[t - 1],
                self.schedule.alpha_bars[t - 1],
            );
            let c_x = (1.0 / alpha.sqrt()) as f32;
            let c_eps = (beta / (1.0 - ab).sqrt() / alpha.sqrt()) as f32;
            let sigma = if t > 1 { beta.sqrt() as f32 } else { 0.0 };
            let eps_hat = predict.predict(&input, t)?;
            check_len("the noise predictor's output", n * d, eps_hat.len())?;
            let clip = self.clip.filter(|_| clip_each_step);
            let (s, inv_a) = ((1.0 - ab).sqrt() as f32, (1.0 / ab.sqrt()) as f32);
            for (row, eh) in input.chunks_exact_mut(d + e).zip(eps_hat.chunks_exact(d)) {
                for j in 0..d {
                    let (_, eps) = x0_and_eps(row[j], eh[j], s, inv_a, clip);
                    row[j] = c_x * row[j] - c_eps * eps;
                }
                if sigma > 0.0 {
                    for v in &mut row[..d] {
                        let z: f32 = StandardNormal.sample(&mut rng);
                        *v += sigma * z;
                    }
                }
            }
            snapshot(&input, t - 1, &mut kept);
        }
        let mut x = strip_embedding(&input, d, e);
        self.clip_final(&mut x);
        Ok((x, kept.into_iter().map(Option::unwrap_or_default).collect()))
    }

    /// Deterministic DDIM from `x_t` (see [`Ddpm::sample_ddim_clipping`]).
    fn ddim(
        &self,
        x_t: &[f32],
        steps: usize,
        clip_each_step: bool,
        predict: &mut impl Predictor,
    ) -> Result<Vec<f32>> {
        let big_t = self.schedule.steps();
        ensure(
            (1..=big_t).contains(&steps),
            "steps",
            steps,
            &format!("DDIM takes between 1 and T = {big_t} steps, e.g. 20"),
        )?;
        let (d, e) = (self.d, self.e);
        check_rows("sample_ddim_from (x_t)", x_t, d)?;
        let n = x_t.len() / d;
        // τ_i = round(i · T / S) for i = 1..=S: distinct, ending at T.
        let taus: Vec<usize> = (1..=steps)
            .map(|i| ((i * big_t) as f64 / steps as f64).round() as usize)
            .collect();
        let mut input = vec![0.0f32; n * (d + e)];
        for (row, x) in input.chunks_exact_mut(d + e).zip(x_t.chunks_exact(d)) {
            row[..d].copy_from_slice(x);
        }
        let clip = self.clip.filter(|_| clip_each_step);
        for i in (0..steps).rev() {
            let t = taus[i];
            let ab = self.schedule.alpha_bars[t - 1];
            let ab_next = if i == 0 {
                1.0
            } else {
                self.schedule.alpha_bars[taus[i - 1] - 1]
            };
            let emb = &self.embeddings[(t - 1) * e..t * e];
            for row in input.chunks_exact_mut(d + e) {
                row[d..].copy_from_slice(emb);
            }
            let (s, inv_a) = ((1.0 - ab).sqrt() as f32, (1.0 / ab.sqrt()) as f32);
            let (a_next, s_next) = (ab_next.sqrt() as f32, (1.0 - ab_next).sqrt() as f32);
            let eps_hat = predict.predict(&input, t)?;
            check_len("the noise predictor's output", n * d, eps_hat.len())?;
            for (row, eh) in input.chunks_exact_mut(d + e).zip(eps_hat.chunks_exact(d)) {
                for j in 0..d {
                    let (x0, eps) = x0_and_eps(row[j], eh[j], s, inv_a, clip);
                    row[j] = a_next * x0 + s_next * eps;
                }
            }
        }
        let mut x = strip_embedding(&input, d, e);
        self.clip_final(&mut x);
        Ok(x)
    }

    fn clip_final(&self, x: &mut [f32]) {
        if let Some(c) = self.clip {
            for v in x {
                *v = v.clamp(-c, c);
            }
        }
    }
}

/// DDPM's ancestral sampler ([`Ddpm::sample`]) with any noise predictor in place of the
/// network, no clipping: `predict(x_t, t)` gets `n` rows of `dim` values at step t and returns
/// ε̂ for each row. The network's sampler runs this same chain with ε_θ; given the exact
/// E[ε | x_t] (Gaussian data have it in closed form) it is the sampler's oracle: its samples
/// must have the data's distribution, up to the discretisation of T steps.
pub fn sample_ddpm_with(
    schedule: &NoiseSchedule,
    dim: usize,
    n: usize,
    seed: u64,
    predict: impl FnMut(&[f32], usize) -> Result<Vec<f32>>,
) -> Result<Vec<f32>> {
    let chain = Chain::bare(schedule, dim)?;
    let mut predict = Function {
        f: predict,
        out: vec![],
    };
    Ok(chain.ancestral(n, seed, &[], false, &mut predict)?.0)
}

/// Deterministic DDIM ([`Ddpm::sample_ddim_from`]) with any noise predictor, from the rows
/// `x_t` (of `dim` values) at t = T, in `steps` steps, no clipping; see [`sample_ddpm_with`].
pub fn sample_ddim_with(
    schedule: &NoiseSchedule,
    dim: usize,
    x_t: &[f32],
    steps: usize,
    predict: impl FnMut(&[f32], usize) -> Result<Vec<f32>>,
) -> Result<Vec<f32>> {
    let chain = Chain::bare(schedule, dim)?;
    let mut predict = Function {
        f: predict,
        out: vec![],
    };
    chain.ddim(x_t, steps, false, &mut predict)
}

fn strip_embedding(input: &[f32], d: usize, e: usize) -> Vec<f32> {
    input
        .chunks_exact(d + e)
        .flat_map(|r| &r[..d])
        .copied()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A training thread that panics in the middle of a step: `train` returns an error instead
    /// of hanging or aborting, the step is undone (parameters, step count, random stream), and
    /// the DDPM trains on exactly as its checkpoint does.
    #[test]
    fn a_panicking_training_thread_is_an_error_and_the_ddpm_stays_consistent() {
        let data = crate::data::swiss_roll(200, 0.05, 0).xy;
        let config = DdpmConfig {
            hidden: vec![100, 100],
            embedding: 8,
            batch_size: 32,
            ..DdpmConfig::toy_2d()
        };
        let mut a = Ddpm::points(config, &data).unwrap();
        a.verbose = false;
        a.train(5).unwrap();
        let before = a.denoiser.parameters().to_vec();
        a.denoiser.fault = Some(1);
        let err = a.train(5).unwrap_err();
        assert!(err.to_string().contains("training thread"), "{err}");
        assert_eq!(a.steps_done(), 5);
        assert_eq!(a.denoiser.parameters(), &before[..]);
        let path = std::env::temp_dir().join(format!(
            "genlab-ddpm-after-panic-{}.json",
            std::process::id()
        ));
        a.save(&path).unwrap();
        let mut b = Ddpm::load(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        b.verbose = false;
        a.train(10).unwrap();
        b.train(10).unwrap();
        assert_eq!(a.step_losses, b.step_losses);
        assert_eq!(a.denoiser.parameters(), b.denoiser.parameters());
    }
}
