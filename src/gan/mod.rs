//! Chapter 4, GAN (generative adversarial network): a generator G and a discriminator D trained
//! against each other, on any data set of points in ℝᵈ (the 8-Gaussian ring, a 1-D mixture,
//! the 8×8 digits).
//!
//! - Generator: z ~ N(0, I_L) → MLP (ReLU) → a sample G(z) ∈ ℝᵈ (optionally squashed by a
//!   sigmoid into [0, 1]ᵈ, for pixels).
//! - Discriminator: x → MLP (LeakyReLU 0.2) → one logit y; D(x) = σ(y) is the probability that
//!   x is real. With PacGAN packing m > 1, D sees m samples at once (input width m·d), all real
//!   or all fake.
//! - D's loss (binary cross-entropy, a mean over each half of the batch):
//!   L_D = −E_x[log D(x)] − E_z[log(1 − D(G(z)))] = BCE(D(x), 1) + BCE(D(G(z)), 0).
//! - G's loss, either the original minimax game, G minimises E_z[log(1 − D(G(z)))] = −BCE(D(G(z)), 0),
//!   whose gradient ∂/∂y = −D(G(z)) vanishes when D confidently rejects the fakes, or the
//!   non-saturating loss −E_z[log D(G(z))] = BCE(D(G(z)), 1), ∂/∂y = D(G(z)) − 1.
//! - For a fixed G the best discriminator is D*(x) = p_data(x) / (p_data(x) + p_g(x)); at the
//!   equilibrium p_g = p_data and D* = ½ everywhere.
//!
//! One iteration is `d_steps` discriminator steps, then one generator step, each on a fresh
//! real batch and fresh z; [`Gan::d_step`] and [`Gan::g_step`] are the two pages of engine calls.
//! The defaults are workload W2 (`gan-ring`): both networks 2 → 128 → 128 → 2 (or 1),
//! Adam 2e-4 with betas (0.5, 0.999), batch 256, 5,000 iterations, the non-saturating loss.

mod dirac;
pub use dirac::{dirac_gan, DiracUpdate};

use crate::data::{check_rows, load_digits, Scale};
use crate::error::{ensure, Error, Result};
use crate::loss::bce_with_logits;
use crate::mlp::{rowwise, update_nets_with, Activation, Mlp, MlpState, Team, Update};
use crate::plot::Figure;
use crate::train::AdamSettings;
use rand::{Rng as _, SeedableRng};
use rand_chacha::ChaCha12Rng;
use rand_distr::{Distribution, StandardNormal};
use std::path::Path;

/// The generator's loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum GanLoss {
    /// −log D(G(z)) = BCE(D(G(z)), 1): strong gradients while D rejects the fakes.
    NonSaturating,
    /// log(1 − D(G(z))) = −BCE(D(G(z)), 0), the original minimax game: its gradient vanishes
    /// when D is confident.
    Minimax,
}

/// What the generator's last layer is followed by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum GenOutput {
    /// G(z) = the last layer's output (points anywhere in ℝᵈ).
    Identity,
    /// G(z) = σ(last layer), in [0, 1]ᵈ (pixels).
    Sigmoid,
}

/// Widest hidden layer either network may have (a guard against typos).
pub const MAX_HIDDEN: usize = 4096;
/// Most hidden layers either network may have.
pub const MAX_DEPTH: usize = 8;
/// Largest latent size.
pub const MAX_LATENT: usize = 512;
/// Most iterations a config may ask for (a guard against typos).
pub const MAX_ITERATIONS: usize = 100_000_000;
/// Largest PacGAN pack.
pub const MAX_PACK: usize = 16;

/// The GAN's hyperparameters. `Default` is workload W2 (`gan-ring`).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GanConfig {
    /// Latent size L of z ~ N(0, I_L).
    pub latent: usize,
    /// Width of the generator's hidden layers.
    pub g_hidden: usize,
    /// Number of hidden layers of the generator (2 in W2).
    pub g_depth: usize,
    /// Width of the discriminator's hidden layers.
    pub d_hidden: usize,
    /// Number of hidden layers of the discriminator (2 in W2).
    pub d_depth: usize,
    /// The generator's Adam learning rate.
    pub g_lr: f64,
    /// The generator's Adam β₁.
    pub g_beta1: f64,
    /// The generator's Adam β₂.
    pub g_beta2: f64,
    /// The discriminator's Adam learning rate.
    pub d_lr: f64,
    /// The discriminator's Adam β₁.
    pub d_beta1: f64,
    /// The discriminator's Adam β₂.
    pub d_beta2: f64,
    /// Discriminator steps per generator step (1 in W2).
    pub d_steps: usize,
    /// The generator's loss.
    pub loss: GanLoss,
    /// PacGAN packing m: D judges m samples at once (1 = the plain GAN). `batch_size` must be
    /// a multiple of it.
    pub pack: usize,
    /// What follows the generator's last layer.
    pub output: GenOutput,
    /// Real samples and fake samples per step (256 each in W2).
    pub batch_size: usize,
    /// Iterations a full run takes (5,000 in W2); [`Gan::train`] takes any count.
    pub iterations: usize,
    /// Seed of both networks' initial weights and of every draw of data and z.
    pub seed: u64,
}

impl Default for GanConfig {
    fn default() -> Self {
        GanConfig {
            latent: 2,
            g_hidden: 128,
            g_depth: 2,
            d_hidden: 128,
            d_depth: 2,
            g_lr: 2e-4,
            g_beta1: 0.5,
            g_beta2: 0.999,
            d_lr: 2e-4,
            d_beta1: 0.5,
            d_beta2: 0.999,
            d_steps: 1,
            loss: GanLoss::NonSaturating,
            pack: 1,
            output: GenOutput::Identity,
            batch_size: 256,
            iterations: 5000,
            seed: 0,
        }
    }
}

impl GanConfig {
    /// The config, or an error naming the first field outside its range and what to use.
    pub fn validate(&self) -> Result<()> {
        ensure(
            (1..=MAX_LATENT).contains(&self.latent),
            "latent",
            self.latent,
            &format!("use a latent size between 1 and {MAX_LATENT}, e.g. 2"),
        )?;
        for (name, w) in [("g_hidden", self.g_hidden), ("d_hidden", self.d_hidden)] {
            ensure(
                (1..=MAX_HIDDEN).contains(&w),
                name,
                w,
                &format!("use a hidden width between 1 and {MAX_HIDDEN}, e.g. 128"),
            )?;
        }
        for (name, n) in [("g_depth", self.g_depth), ("d_depth", self.d_depth)] {
            ensure(
                (1..=MAX_DEPTH).contains(&n),
                name,
                n,
                &format!("use between 1 and {MAX_DEPTH} hidden layers, e.g. 2"),
            )?;
        }
        for (prefix, adam) in [("g_", self.g_adam()), ("d_", self.d_adam())] {
            adam.validate().map_err(|e| match e {
                Error::InvalidParameter { name, value, fix } => Error::InvalidParameter {
                    name: format!("{prefix}{name}"),
                    value,
                    fix,
                },
                other => other,
            })?;
        }
        ensure(
            self.iterations <= MAX_ITERATIONS,
            "iterations",
            self.iterations,
            &format!("use at most {MAX_ITERATIONS} iterations, e.g. 5000"),
        )?;
        ensure(
            (1..=100).contains(&self.d_steps),
            "d_steps",
            self.d_steps,
            "use between 1 and 100 discriminator steps per generator step, e.g. 1",
        )?;
        ensure(
            (1..=MAX_PACK).contains(&self.pack),
            "pack",
            self.pack,
            &format!("use a pack between 1 (the plain GAN) and {MAX_PACK}, e.g. 2 (PacGAN2)"),
        )?;
        ensure(
            (1..=65_536).contains(&self.batch_size),
            "batch_size",
            self.batch_size,
            "use a batch size between 1 and 65536, e.g. 256",
        )?;
        ensure(
            self.batch_size.is_multiple_of(self.pack),
            "batch_size",
            self.batch_size,
            &format!(
                "with pack = {} the batch must be a multiple of it, e.g. {}",
                self.pack,
                self.pack * (self.batch_size / self.pack).max(1)
            ),
        )
    }

    /// The generator's Adam settings.
    pub fn g_adam(&self) -> AdamSettings {
        AdamSettings {
            lr: self.g_lr,
            beta1: self.g_beta1,
            beta2: self.g_beta2,
            eps: 1e-8,
        }
    }

    /// The discriminator's Adam settings.
    pub fn d_adam(&self) -> AdamSettings {
        AdamSettings {
            lr: self.d_lr,
            beta1: self.d_beta1,
            beta2: self.d_beta2,
            eps: 1e-8,
        }
    }
}

/// Where real samples come from. Every step draws a fresh batch.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum GanData {
    /// W2's 8-Gaussian ring in ℝ²: centre k uniform in 0..8 at radius 2, angle 2πk/8, plus
    /// `std` · N(0, I) (W2: std = 0.02). Drawn afresh from the distribution every step.
    Ring8 {
        /// Standard deviation of each Gaussian.
        std: f32,
    },
    /// A 1-D Gaussian mixture p(x) = Σₖ πₖ N(x | μₖ, σₖ²), drawn afresh every step.
    Mixture1d {
        /// Mixture weights πₖ (normalised here).
        weights: Vec<f64>,
        /// Means μₖ.
        means: Vec<f64>,
        /// Standard deviations σₖ.
        stds: Vec<f64>,
    },
    /// A fixed set of points (rows of `dim` values), drawn uniformly with replacement.
    Set {
        /// Values per point.
        dim: usize,
        /// The points, row-major.
        rows: Vec<f32>,
    },
}

/// The 8 centres of the ring: (2 cos 2πk/8, 2 sin 2πk/8).
pub fn ring_centres() -> [[f32; 2]; 8] {
    let mut c = [[0.0; 2]; 8];
    for (k, c) in c.iter_mut().enumerate() {
        let a = 2.0 * std::f64::consts::PI * k as f64 / 8.0;
        *c = [(2.0 * a.cos()) as f32, (2.0 * a.sin()) as f32];
    }
    c
}

impl GanData {
    /// W2's ring (std 0.02).
    pub fn ring() -> GanData {
        GanData::Ring8 { std: 0.02 }
    }

    /// The 1,497 training digits as points in [0, 1]⁶⁴ (`Scale::Unit`) or [−1, 1]⁶⁴.
    pub fn digits(scale: Scale) -> Result<GanData> {
        let d = load_digits(scale)?;
        Ok(GanData::Set {
            dim: d.train.dim,
            rows: d.train.x,
        })
    }

    /// Values per sample.
    pub fn dim(&self) -> usize {
        match self {
            GanData::Ring8 { .. } => 2,
            GanData::Mixture1d { .. } => 1,
            GanData::Set { dim, .. } => *dim,
        }
    }

    /// The density p_data(x) of a 1-D mixture (an error for the other sources).
    pub fn density_1d(&self, x: f64) -> Result<f64> {
        match self {
            GanData::Mixture1d {
                weights,
                means,
                stds,
            } => {
                let total: f64 = weights.iter().sum();
                Ok(weights
                    .iter()
                    .zip(means)
                    .zip(stds)
                    .map(|((w, m), s)| w / total * crate::math::normal_pdf(x, *m, *s))
                    .sum())
            }
            _ => Err(Error::param(
                "data",
                "not a 1-D mixture",
                "p_data(x) is known exactly only for GanData::Mixture1d",
            )),
        }
    }

    fn validate(&self) -> Result<()> {
        match self {
            GanData::Ring8 { std } => ensure(
                *std > 0.0 && *std <= 1e3,
                "std",
                std,
                "use a standard deviation between 0 (excluded) and 1e3, e.g. 0.02",
            ),
            GanData::Mixture1d {
                weights,
                means,
                stds,
            } => {
                if weights.is_empty() || weights.len() != means.len() || means.len() != stds.len() {
                    return Err(Error::shape(
                        "GanData::Mixture1d (weights, means, stds)",
                        "three non-empty lists of one length",
                        format!("{}, {}, {}", weights.len(), means.len(), stds.len()),
                    ));
                }
                ensure(
                    weights.iter().all(|w| *w >= 0.0 && w.is_finite())
                        && weights.iter().sum::<f64>() > 0.0,
                    "weights",
                    format!("{weights:?}"),
                    "mixture weights must be non-negative with a positive sum",
                )?;
                ensure(
                    means.iter().all(|m| m.is_finite()),
                    "means",
                    format!("{means:?}"),
                    "means must be finite",
                )?;
                ensure(
                    stds.iter().all(|s| *s > 0.0 && s.is_finite()),
                    "stds",
                    format!("{stds:?}"),
                    "standard deviations must be positive",
                )
            }
            GanData::Set { dim, rows } => {
                ensure(*dim >= 1, "dim", dim, "points need at least one value each")?;
                check_rows("GanData::Set rows", rows, *dim)
            }
        }
    }

    /// Fills `out` (rows of `dim` values) with fresh real samples.
    fn sample_into(&self, rng: &mut ChaCha12Rng, out: &mut [f32]) {
        match self {
            GanData::Ring8 { std } => {
                let centres = ring_centres();
                for p in out.chunks_exact_mut(2) {
                    let c = centres[rng.gen_range(0..8)];
                    let (e0, e1): (f32, f32) =
                        (StandardNormal.sample(rng), StandardNormal.sample(rng));
                    p[0] = c[0] + std * e0;
                    p[1] = c[1] + std * e1;
                }
            }
            GanData::Mixture1d {
                weights,
                means,
                stds,
            } => {
                let total: f64 = weights.iter().sum();
                for x in out.iter_mut() {
                    let k = crate::data::pick_component(weights, total, rng);
                    let e: f64 = StandardNormal.sample(rng);
                    *x = (means[k] + stds[k] * e) as f32;
                }
            }
            GanData::Set { dim, rows } => {
                let n = rows.len() / dim;
                for p in out.chunks_exact_mut(*dim) {
                    let i = rng.gen_range(0..n);
                    p.copy_from_slice(&rows[i * dim..(i + 1) * dim]);
                }
            }
        }
    }

    /// `n` fresh real samples (rows of `dim` values) from `seed`.
    pub fn sample(&self, n: usize, seed: u64) -> Result<Vec<f32>> {
        self.validate()?;
        let mut out = vec![0.0; n * self.dim()];
        self.sample_into(&mut ChaCha12Rng::seed_from_u64(seed), &mut out);
        Ok(out)
    }
}

/// One iteration's record: both losses and what D says about real and fake samples.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct IterRecord {
    /// Iterations completed (1 for the first).
    pub iteration: usize,
    /// L_D of the iteration's last D step (ln 4 ≈ 1.386 at the equilibrium D = ½).
    pub d_loss: f64,
    /// The generator's loss of the G step (ln 2 ≈ 0.693 at D = ½ for the non-saturating loss).
    pub g_loss: f64,
    /// Mean D(x) on the real batch of the last D step.
    pub d_real: f64,
    /// Mean D(G(z)) on the fake batch of the last D step.
    pub d_fake: f64,
}

/// The ring's quality metrics at one point of training.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RingRecord {
    /// Iterations completed.
    pub iteration: usize,
    /// The metrics on 2,500 samples.
    pub metrics: RingMetrics,
}

/// W2's metrics on generator samples in ℝ².
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RingMetrics {
    /// Fraction of samples within 3 std (0.06) of their nearest centre.
    pub high_quality: f64,
    /// Centres with at least 20 high-quality samples (out of 8; W2 uses 2,500 samples).
    pub modes: usize,
    /// High-quality samples per centre.
    pub per_centre: [usize; 8],
}

/// W2's `high_quality` and `modes` for samples (rows of 2 values): a sample is high quality
/// when it lies within 3·0.02 of its nearest centre; a mode is covered when at least 20
/// high-quality samples sit at it.
pub fn ring_metrics(samples: &[f32]) -> Result<RingMetrics> {
    check_rows("ring_metrics", samples, 2)?;
    let centres = ring_centres();
    let mut per_centre = [0usize; 8];
    let mut hq = 0usize;
    for p in samples.chunks_exact(2) {
        let (mut best, mut k) = (f32::INFINITY, 0);
        for (j, c) in centres.iter().enumerate() {
            let d = ((p[0] - c[0]).powi(2) + (p[1] - c[1]).powi(2)).sqrt();
            if d < best {
                (best, k) = (d, j);
            }
        }
        if best <= 3.0 * 0.02 {
            hq += 1;
            per_centre[k] += 1;
        }
    }
    Ok(RingMetrics {
        high_quality: hq as f64 / (samples.len() / 2) as f64,
        modes: per_centre.iter().filter(|&&c| c >= 20).count(),
        per_centre,
    })
}

/// The optimal discriminator for a fixed generator: D*(x) = p_data(x) / (p_data(x) + p_g(x))
/// (½ where both densities are 0).
pub fn optimal_discriminator(p_data: f64, p_g: f64) -> f64 {
    if p_data + p_g > 0.0 {
        p_data / (p_data + p_g)
    } else {
        0.5
    }
}

/// A notebook's check of a claim it has just demonstrated: `Ok` when `holds`, otherwise an
/// error naming the claim, so that a run whose demonstration stopped demonstrating fails
/// instead of printing a wrong sentence.
pub fn check_claim(holds: bool, claim: &str) -> Result<()> {
    ensure(
        holds,
        "claim",
        claim,
        "the run did not show what the text says: use the default parameters (or more \
         iterations), or see what changed",
    )
}

/// The generator's gradient under both losses on one batch (see [`Gan::generator_gradients`]).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GradientComparison {
    /// Mean D(G(z)) on the batch.
    pub mean_d_fake: f64,
    /// ‖∂/∂θ_G‖ of the minimax loss E[log(1 − D(G(z)))].
    pub minimax_norm: f64,
    /// ‖∂/∂θ_G‖ of the non-saturating loss −E[log D(G(z))].
    pub non_saturating_norm: f64,
}

/// A picture of the ring model at one point of training: samples and D's surface.
#[derive(Debug, Clone, PartialEq)]
pub struct RingSnapshot {
    /// Iterations completed.
    pub iteration: usize,
    /// Generator samples, rows of 2.
    pub samples: Vec<f32>,
    /// D(x) on a grid over [−3, 3]² (row 0 at the bottom), see [`Gan::discriminator_grid`].
    pub surface: Vec<Vec<f64>>,
}

/// Which network a divergence check is about.
#[derive(Clone, Copy)]
enum Net {
    G,
    D,
}

/// What a step draws from the random stream: a D step a real batch and z, a G step z.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Draw {
    DStep,
    GStep,
}

/// A GAN with its data, both networks (each with its own Adam state), the random stream and
/// the history: train it in one cell, train more in the next, sample in any. Introduced in
/// chapter 4 (`04_gan`).
pub struct Gan {
    config: GanConfig,
    data: GanData,
    g: Mlp,
    d: Mlp,
    /// Draws every real batch and every z of training: ChaCha12 (what rand's `StdRng` is),
    /// whose position a checkpoint saves.
    rng: ChaCha12Rng,
    /// One record per iteration trained.
    pub history: Vec<IterRecord>,
    /// The ring metrics every [`Gan::metrics_every`] iterations (ring data only).
    pub ring_history: Vec<RingRecord>,
    /// Print progress while training (on by default): the first and last iteration of each
    /// `train` call, and one whenever 2 seconds have passed since the last line.
    pub verbose: bool,
    /// How often to record the ring metrics (0 = never); 250 by default.
    pub metrics_every: usize,
    /// A time budget and autosaving for [`Gan::train`] (none by default): with
    /// `limits.autosave` set, a checkpoint ([`Gan::save`]) is written between iterations every
    /// so often and when the call ends.
    pub limits: crate::train::Limits,
    /// A step's buffers: [real; fake] for D, z, the targets of D's BCE.
    x: Vec<f32>,
    z: Vec<f32>,
    d_targets: Vec<f32>,
    g_targets: Vec<f32>,
    /// Each chunk's sums of a D step (BCE, Σ D(real), Σ D(fake)) and of a G step (BCE).
    d_sums: Vec<[f64; 3]>,
    g_sums: Vec<[f64; 3]>,
    /// The next step's draws, made ahead by [`Gan::train`] while the helper thread starts on
    /// an update (into `x` and `z`), with the stream as it is after them. The step that uses
    /// them moves `rng` there; anything else (an error, a save, the end of `train`) drops
    /// them, and `rng` never moved: the draws, and so the training, are the same as without.
    ahead: Option<(Draw, ChaCha12Rng)>,
    /// Tests only: when set, a step stores its network's gradient here instead of taking its
    /// Adam step ([`Update::Gradient`]; the parameters stay as they are), so that the tests can
    /// check the very code `train` runs against finite differences.
    #[cfg(test)]
    capture: Option<Vec<f32>>,
}

impl Gan {
    /// A fresh GAN for `config` on `data` (the generator's output width is the data's).
    pub fn new(config: GanConfig, data: GanData) -> Result<Gan> {
        config.validate()?;
        data.validate()?;
        let (g_widths, d_widths) = widths(&config, data.dim());
        let g = Mlp::new(&g_widths, Activation::Relu, config.g_adam(), config.seed)?;
        let d = Mlp::new(
            &d_widths,
            Activation::LeakyRelu(0.2),
            config.d_adam(),
            config.seed ^ 0xd15c_0000,
        )?;
        Ok(Gan {
            rng: ChaCha12Rng::seed_from_u64(config.seed ^ 0x9e37_79b9_7f4a_7c15),
            config,
            data,
            g,
            d,
            history: vec![],
            ring_history: vec![],
            verbose: true,
            metrics_every: 250,
            limits: Default::default(),
            x: vec![],
            z: vec![],
            d_targets: vec![],
            g_targets: vec![],
            d_sums: vec![],
            g_sums: vec![],
            ahead: None,
            #[cfg(test)]
            capture: None,
        })
    }

    /// The config it was built with.
    pub fn config(&self) -> &GanConfig {
        &self.config
    }

    /// Where its real samples come from.
    pub fn data(&self) -> &GanData {
        &self.data
    }

    /// The generator network (L → hidden… → d).
    pub fn generator(&self) -> &Mlp {
        &self.g
    }

    /// The discriminator network (m·d → hidden… → 1 logit).
    pub fn discriminator(&self) -> &Mlp {
        &self.d
    }

    /// Changes both learning rates (each network keeps its Adam moments): to go on after a
    /// divergence with smaller steps, or to fit D alone faster with [`Gan::train_discriminator`].
    pub fn set_learning_rates(&mut self, g_lr: f64, d_lr: f64) -> Result<()> {
        let config = GanConfig {
            g_lr,
            d_lr,
            ..self.config
        };
        config.validate()?;
        self.g.set_adam(config.g_adam())?;
        self.d.set_adam(config.d_adam())?;
        self.config = config;
        Ok(())
    }

    /// Iterations trained so far.
    pub fn iterations_done(&self) -> usize {
        self.history.len()
    }

    /// Sizes the step buffers for the config's batch (allocates only the first time).
    fn size_buffers(&mut self) {
        let (b, dim, l, m) = (
            self.config.batch_size,
            self.data.dim(),
            self.config.latent,
            self.config.pack,
        );
        let rows = b / m;
        self.x.resize(2 * b * dim, 0.0);
        self.z.resize(b * l, 0.0);
        if self.d_targets.len() != 2 * rows {
            // [1; 0] for the D step; the G step's target (1 or 0) is set per loss.
            self.d_targets = (0..2 * rows)
                .map(|i| if i < rows { 1.0 } else { 0.0 })
                .collect();
        }
        let g_target = match self.config.loss {
            GanLoss::NonSaturating => 1.0,
            GanLoss::Minimax => 0.0,
        };
        self.g_targets.clear();
        self.g_targets.resize(rows, g_target);
    }

    /// One discriminator step: push D(x) → 1 on real data and D(G(z)) → 0 on fakes, G only
    /// read. Returns (L_D, mean D(x), mean D(G(z))).
    pub fn d_step(&mut self, team: &Team, iteration: usize) -> Result<(f64, f64, f64)> {
        self.guarded(Net::D, |gan| gan.d_step_inner(team, iteration, None))
    }

    /// This step's draws: the ones made ahead for it (the stream then moves past them), or
    /// fresh ones.
    fn take_draws(&mut self, what: Draw) {
        match self.ahead.take() {
            Some((drawn, after)) if drawn == what => self.rng = after,
            _ => {
                let real = &mut self.x[..self.config.batch_size * self.data.dim()];
                draw_into(what, &self.data, &mut self.rng, real, &mut self.z);
            }
        }
    }

    /// The weight update of `net` (Adam fused in); meanwhile the calling thread draws the next
    /// step's noise (`next`, if any) ahead, into `ahead`.
    fn update(&mut self, team: &Team, net: Net, next: Option<Draw>) -> Result<()> {
        let real = self.config.batch_size * self.data.dim();
        let (data, rng, ahead) = (&self.data, &self.rng, &mut self.ahead);
        let (x, z) = (&mut self.x[..real], &mut self.z);
        let mlp = match net {
            Net::D => &mut self.d,
            Net::G => &mut self.g,
        };
        #[cfg(test)]
        let update = match self.capture.as_mut() {
            Some(grad) => {
                grad.resize(mlp.parameters().len(), 0.0);
                Update::Gradient(grad)
            }
            None => Update::Adam,
        };
        #[cfg(not(test))]
        let update = Update::Adam;
        update_nets_with(team, [(mlp, update)], &mut || {
            if let Some(what) = next {
                let mut after = rng.clone();
                draw_into(what, data, &mut after, x, z);
                *ahead = Some((what, after));
            }
        })
    }

    fn d_step_inner(
        &mut self,
        team: &Team,
        iteration: usize,
        next: Option<Draw>,
    ) -> Result<(f64, f64, f64)> {
        self.size_buffers();
        let (b, dim) = (self.config.batch_size, self.data.dim());
        let rows = b / self.config.pack;
        // x = [real; fake]: a fresh real batch, and fake = G(z) for fresh z (G not updated)
        self.take_draws(Draw::DStep);
        let out = self.g.infer(team, &self.z)?;
        apply_output(self.config.output, out, &mut self.x[b * dim..]);
        let (x, targets, width) = (&self.x, &self.d_targets, self.d.input_width());
        let scale = 1.0 / rows as f32;
        // One chunk of rows per task: logits = D([real; fake]) (each row of the packed view is
        // m samples side by side), L_D = mean BCE(D(real), 1) + mean BCE(D(fake), 0), its
        // gradient, and back through D.
        rowwise(team, [&mut self.d], [2 * rows], &mut self.d_sums, &|[d]| {
            let (i0, i1) = d.range();
            d.input_mut().copy_from_slice(&x[i0 * width..i1 * width]);
            d.forward();
            let (logits, dlogits) = d.output_and_grad();
            let bce = bce_with_logits(logits, &targets[i0..i1], dlogits, scale, i1 - i0);
            // Σ D(x) over the real rows and over the fake rows of this chunk
            let (mut real, mut fake) = (0.0, 0.0);
            for (i, &y) in (i0..i1).zip(logits.iter()) {
                if i < rows {
                    real += sigmoid(y) as f64;
                } else {
                    fake += sigmoid(y) as f64;
                }
            }
            d.backward(false);
            [bce, real, fake]
        })?;
        let [bce, real, fake] = sum_chunks(&self.d_sums);
        let loss = bce / rows as f64;
        let (d_real, d_fake) = (real / rows as f64, fake / rows as f64);
        self.check_loss(Net::D, iteration, loss)?;
        // D's weight update, Adam fused in
        self.update(team, Net::D, next)?;
        self.check_update(Net::D, iteration)?;
        Ok((loss, d_real, d_fake))
    }

    /// One generator step on fresh z: push D(G(z)) toward "real" through a frozen D. Returns
    /// the generator's loss (non-saturating −mean log D(G(z)), or minimax mean log(1 − D(G(z)))).
    pub fn g_step(&mut self, team: &Team, iteration: usize) -> Result<f64> {
        self.guarded(Net::G, |gan| gan.g_step_inner(team, iteration, None))
    }

    /// Runs a D or G step that either completes or leaves the GAN as it was before it
    /// (parameters, step counts, the random stream; Adam's moments where finite): a step that
    /// fails (an error, a panicking thread, a non-finite loss) or makes a parameter NaN or
    /// infinite is undone.
    fn guarded<T>(&mut self, net: Net, step: impl FnOnce(&mut Gan) -> Result<T>) -> Result<T> {
        let rng = self.rng.clone();
        let mlp = match net {
            Net::D => &mut self.d,
            Net::G => &mut self.g,
        };
        let steps = mlp.steps();
        // The update keeps the parameters it replaces (copied by its own tasks).
        mlp.keep_before_update(true);
        let result = step(self);
        if result.is_err() {
            self.rng = rng;
            self.ahead = None;
            let mlp = match net {
                Net::D => &mut self.d,
                Net::G => &mut self.g,
            };
            mlp.undo_update(steps)?;
        }
        result
    }

    fn g_step_inner(&mut self, team: &Team, iteration: usize, next: Option<Draw>) -> Result<f64> {
        self.size_buffers();
        let rows = self.config.batch_size / self.config.pack;
        self.take_draws(Draw::GStep);
        // the G loss and ∂/∂logits: BCE(y, 1), or −BCE(y, 0) (its gradient is −σ(y))
        let sign = match self.config.loss {
            GanLoss::NonSaturating => 1.0,
            GanLoss::Minimax => -1.0,
        };
        let scale = sign / rows as f32;
        let (z, targets, output) = (&self.z, &self.g_targets, self.config.output);
        let width = self.g.input_width();
        // One chunk of rows per task, through G and then D and back (a PacGAN D row is m of G's
        // rows side by side: the same floats).
        rowwise(
            team,
            [&mut self.g, &mut self.d],
            [self.config.batch_size, rows],
            &mut self.g_sums,
            &|[g, d]| {
                let (i0, i1) = d.range();
                let (j0, j1) = g.range();
                g.input_mut().copy_from_slice(&z[j0 * width..j1 * width]);
                // fake = G(z), keeping what G's backward needs
                apply_output(output, g.forward(), d.input_mut());
                // logits = D(fake)
                d.forward();
                let (logits, dlogits) = d.output_and_grad();
                let bce = bce_with_logits(logits, &targets[i0..i1], dlogits, scale, i1 - i0);
                // ∂L/∂fake through D, which is left unchanged (no update below)
                d.backward(true);
                let (_, d_out) = g.output_and_grad();
                output_backward(output, d.input(), d.input_grad(), d_out);
                // Back through G
                g.backward(false);
                [bce, 0.0, 0.0]
            },
        )?;
        let loss = sign as f64 * sum_chunks(&self.g_sums)[0] / rows as f64;
        self.check_loss(Net::G, iteration, loss)?;
        // G's weight update, Adam fused in
        self.update(team, Net::G, next)?;
        self.check_update(Net::G, iteration)?;
        Ok(loss)
    }

    fn check_loss(&self, net: Net, iteration: usize, loss: f64) -> Result<()> {
        if loss.is_finite() {
            return Ok(());
        }
        let which = match net {
            Net::D => "discriminator's loss",
            Net::G => "generator's loss",
        };
        Err(Error::Diverged {
            step: iteration,
            loss: loss as f32,
            fix: format!(
                "The {which} stopped being finite at iteration {iteration}, before its update: \
                 {kept}. Lower the learning rates (d_lr = {:e}, g_lr = {:e}; W2 uses 2e-4).",
                self.config.d_lr,
                self.config.g_lr,
                kept = match net {
                    Net::D => "both networks keep their last finite parameters",
                    // D's step of this iteration ran before G's loss was computed.
                    Net::G => {
                        "the generator keeps its last finite parameters; the discriminator's \
                         step of this iteration had already run, and its parameters, though \
                         finite, are likely what made the loss overflow"
                    }
                }
            ),
        })
    }

    /// After an update: an error if a parameter stopped being finite (an overflowing step);
    /// [`Gan::guarded`] then puts the network back as it was before the update.
    fn check_update(&self, net: Net, iteration: usize) -> Result<()> {
        let (which, lr, mlp) = match net {
            Net::D => ("d_lr", self.config.d_lr, &self.d),
            Net::G => ("g_lr", self.config.g_lr, &self.g),
        };
        let Some((_, value)) = mlp.first_non_finite() else {
            return Ok(());
        };
        Err(Error::Diverged {
            step: iteration,
            loss: value,
            fix: format!(
                "An update at iteration {iteration} made a parameter {value}; it was undone, \
                 so both networks keep their last finite parameters. Lower {which} (now {lr:e}; \
                 W2 uses 2e-4)."
            ),
        })
    }

    /// Trains `iterations` more iterations (each `d_steps` D steps, then one G step), recording
    /// each and printing progress.
    ///
    /// [`Gan::limits`] can give the call a time budget (checked between iterations) and
    /// autosave it: a checkpoint between iterations every so often, and one when the call ends.
    pub fn train(&mut self, iterations: usize) -> Result<&[IterRecord]> {
        let start = self.history.len();
        let trained = self.train_loop(iterations);
        // Draws made ahead for an iteration that did not run (a time budget, an error) are
        // dropped: the stream stays where the last step left it.
        self.ahead = None;
        trained?;
        Ok(&self.history[start..])
    }

    fn train_loop(&mut self, iterations: usize) -> Result<()> {
        let mut watch = crate::train::Watch::start(&self.limits)?;
        let team = Team::default_size();
        let clock = std::time::Instant::now();
        let mut last_print: Option<std::time::Instant> = None;
        for i in 0..iterations {
            if watch.out_of_time() {
                if self.verbose {
                    println!(
                        "time budget reached after {i} of {iterations} iterations ({:.1} s): call train again to go on",
                        watch.seconds()
                    );
                }
                break;
            }
            let iteration = self.history.len() + 1;
            let mut d = (f64::NAN, f64::NAN, f64::NAN);
            // Each update draws the next step's noise ahead (the last one of this call none).
            let d_steps = self.config.d_steps;
            for j in 0..d_steps {
                let next = if j + 1 < d_steps {
                    Draw::DStep
                } else {
                    Draw::GStep
                };
                d = self.guarded(Net::D, |gan| gan.d_step_inner(&team, iteration, Some(next)))?;
            }
            let next = (i + 1 < iterations).then_some(Draw::DStep);
            let g_loss = self.guarded(Net::G, |gan| gan.g_step_inner(&team, iteration, next))?;
            let record = IterRecord {
                iteration,
                d_loss: d.0,
                g_loss,
                d_real: d.1,
                d_fake: d.2,
            };
            self.history.push(record);
            let ring = matches!(self.data, GanData::Ring8 { .. });
            let mut ring_text = String::new();
            if ring && self.metrics_every > 0 && iteration.is_multiple_of(self.metrics_every) {
                let metrics = self.ring_metrics(2500, 0x5eed)?;
                self.ring_history.push(RingRecord { iteration, metrics });
                ring_text = format!(
                    "  modes {}/8  high quality {:5.1}%",
                    metrics.modes,
                    100.0 * metrics.high_quality
                );
            }
            let due = i == 0
                || i + 1 == iterations
                || last_print.is_none_or(|t| t.elapsed().as_secs_f64() >= 2.0);
            if self.verbose && due {
                last_print = Some(std::time::Instant::now());
                println!(
                    "iteration {:>6}  D loss {:6.3}  G loss {:6.3}  D(x) {:5.3}  D(G(z)) {:5.3}{ring_text}  ({:.1} s)",
                    iteration,
                    record.d_loss,
                    record.g_loss,
                    record.d_real,
                    record.d_fake,
                    clock.elapsed().as_secs_f64()
                );
            }
            watch.autosave(false, |path| self.save(path))?;
        }
        watch.autosave(true, |path| self.save(path))?;
        Ok(())
    }

    /// Trains the discriminator alone for `steps` steps with the generator held fixed (the
    /// inner maximisation of the game: D approaches D* = p_data / (p_data + p_g)). Returns the
    /// last step's L_D. Does not add to the history.
    pub fn train_discriminator(&mut self, steps: usize) -> Result<f64> {
        let team = Team::default_size();
        let mut loss = f64::NAN;
        let it = self.history.len();
        for _ in 0..steps {
            loss = self.d_step(&team, it)?.0;
        }
        Ok(loss)
    }

    /// `n` generator samples (rows of d values) from z drawn with `seed`; G is only read.
    pub fn sample(&self, n: usize, seed: u64) -> Result<Vec<f32>> {
        ensure(n >= 1, "n", n, "ask for at least one sample")?;
        let mut z = vec![0.0; n * self.config.latent];
        fill_normal(&mut ChaCha12Rng::seed_from_u64(seed), &mut z);
        let out = self.g.predict(&team_for(n), &z)?;
        let mut x = vec![0.0; out.len()];
        apply_output(self.config.output, &out, &mut x);
        Ok(x)
    }

    /// G(z) for latent points `z` of your choosing (rows of `latent` values), e.g. a circle
    /// or a line in the latent plane, to see how G maps them; G is only read.
    pub fn generate(&self, z: &[f32]) -> Result<Vec<f32>> {
        check_rows("Gan::generate", z, self.config.latent)?;
        let out = self.g.predict(&team_for(z.len() / self.config.latent), z)?;
        let mut x = vec![0.0; out.len()];
        apply_output(self.config.output, &out, &mut x);
        Ok(x)
    }

    /// D(x) = σ(logit) for points `x` (rows of d values). With packing m > 1, each point is
    /// judged as a pack of m copies of itself.
    pub fn discriminate(&self, x: &[f32]) -> Result<Vec<f32>> {
        let dim = self.data.dim();
        check_rows("Gan::discriminate", x, dim)?;
        let m = self.config.pack;
        let packed: Vec<f32> = if m == 1 {
            x.to_vec()
        } else {
            x.chunks_exact(dim)
                .flat_map(|p| std::iter::repeat_n(p, m).flatten().copied())
                .collect()
        };
        let rows = x.len() / dim;
        let logits = self.d.predict(&team_for(rows), &packed)?;
        Ok(logits.iter().map(|&y| sigmoid(y)).collect())
    }

    /// D(x) on an `n`×`n` grid over the rectangle `x` × `y` of the plane (2-D data), row 0 at
    /// the bottom: ready for [`Figure::heatmap`].
    pub fn discriminator_grid(
        &self,
        x: (f64, f64),
        y: (f64, f64),
        n: usize,
    ) -> Result<Vec<Vec<f64>>> {
        ensure(
            self.data.dim() == 2,
            "data",
            format!("{} values a point", self.data.dim()),
            "a decision surface is drawn for 2-D data (the ring)",
        )?;
        ensure(
            (2..=1000).contains(&n),
            "n",
            n,
            "use a grid of 2 to 1000 cells a side",
        )?;
        let cell = |lo: f64, hi: f64, i: usize| lo + (hi - lo) * (i as f64 + 0.5) / n as f64;
        let mut pts = Vec::with_capacity(2 * n * n);
        for i in 0..n {
            for j in 0..n {
                pts.push(cell(x.0, x.1, j) as f32);
                pts.push(cell(y.0, y.1, i) as f32);
            }
        }
        let d = self.discriminate(&pts)?;
        Ok(d.chunks(n)
            .map(|r| r.iter().map(|&v| v as f64).collect())
            .collect())
    }

    /// W2's metrics on `n` generator samples (2,500 in W2) drawn with `seed`.
    pub fn ring_metrics(&self, n: usize, seed: u64) -> Result<RingMetrics> {
        ensure(
            self.data.dim() == 2,
            "data",
            format!("{} values a point", self.data.dim()),
            "the ring metrics are for 2-D samples",
        )?;
        ring_metrics(&self.sample(n, seed)?)
    }

    /// Samples and D's surface over [−3, 3]² (40×40 cells) now, for a grid of snapshots.
    pub fn ring_snapshot(&self, n: usize, seed: u64) -> Result<RingSnapshot> {
        Ok(RingSnapshot {
            iteration: self.iterations_done(),
            samples: self.sample(n, seed)?,
            surface: self.discriminator_grid((-3.0, 3.0), (-3.0, 3.0), 40)?,
        })
    }

    /// The generator's density p_g on `bins` equal bins over [lo, hi] (1-D data, latent 1),
    /// computed exactly up to the z grid: G maps each small interval [zⱼ, zⱼ₊₁] of a fine grid
    /// over [−6, 6] linearly (ReLU networks are piecewise linear), so its probability mass
    /// Φ(zⱼ₊₁) − Φ(zⱼ) is spread uniformly over [G(zⱼ), G(zⱼ₊₁)]. Returns (bin centres, density).
    pub fn generator_density_1d(
        &self,
        lo: f64,
        hi: f64,
        bins: usize,
    ) -> Result<(Vec<f64>, Vec<f64>)> {
        ensure(
            self.data.dim() == 1 && self.config.latent == 1,
            "latent",
            self.config.latent,
            "p_g is computed exactly for 1-D data and latent = 1",
        )?;
        ensure(
            lo < hi && lo.is_finite() && hi.is_finite(),
            "lo, hi",
            format!("{lo}, {hi}"),
            "give a finite range with lo < hi",
        )?;
        ensure(
            (1..=100_000).contains(&bins),
            "bins",
            bins,
            "use 1 to 100000 bins",
        )?;
        // Δz = 12 / 50,000 = 2.4e-4: even where G is steep (slope 10) an interval spans 0.0024,
        // far under a bin (the chapter's are 0.05 wide). A chapter calls this every few hundred
        // iterations, so the grid is no finer than that needs.
        let nz = 50_000;
        let zs: Vec<f32> = (0..=nz)
            .map(|i| (-6.0 + 12.0 * i as f64 / nz as f64) as f32)
            .collect();
        let out = self.g.predict(&Team::default_size(), &zs)?;
        let mut gx = vec![0.0; out.len()];
        apply_output(self.config.output, &out, &mut gx);
        let width = (hi - lo) / bins as f64;
        let mut mass = vec![0.0f64; bins];
        for j in 0..nz {
            // Φ(zⱼ₊₁) − Φ(zⱼ) by the midpoint rule (error O(Δz³) per interval).
            let (z0, z1) = (zs[j] as f64, zs[j + 1] as f64);
            let p = crate::math::normal_pdf(0.5 * (z0 + z1), 0.0, 1.0) * (z1 - z0);
            let (a, b) = (gx[j] as f64, gx[j + 1] as f64);
            let (a, b) = if a <= b { (a, b) } else { (b, a) };
            if b - a < 1e-12 {
                let k = ((a - lo) / width).floor();
                if k >= 0.0 && (k as usize) < bins {
                    mass[k as usize] += p;
                }
                continue;
            }
            // Spread p over [a, b] and add each bin's overlap.
            let k0 = ((a - lo) / width).floor().max(0.0) as usize;
            let k1 = (((b - lo) / width).floor().max(-1.0) + 1.0).min(bins as f64) as usize;
            for (k, m) in mass.iter_mut().enumerate().take(k1).skip(k0) {
                let (e0, e1) = (lo + k as f64 * width, lo + (k + 1) as f64 * width);
                let overlap = (b.min(e1) - a.max(e0)).max(0.0);
                *m += p * overlap / (b - a);
            }
        }
        let centres = (0..bins).map(|k| lo + (k as f64 + 0.5) * width).collect();
        Ok((centres, mass.iter().map(|m| m / width).collect()))
    }

    /// The generator's gradient on one batch of `n` fresh z (drawn with `seed`) under both
    /// losses, with D as it is now: the minimax loss's ∂/∂logit = −D(G(z)) is small where D is
    /// confident (D(G(z)) ≈ 0), the non-saturating one's, D(G(z)) − 1, is not. Nothing is
    /// updated.
    pub fn generator_gradients(&mut self, n: usize, seed: u64) -> Result<GradientComparison> {
        let m = self.config.pack;
        ensure(
            n >= 1 && n.is_multiple_of(m),
            "n",
            n,
            &format!("use a positive multiple of pack = {m}"),
        )?;
        let team = Team::default_size();
        let dim = self.data.dim();
        let rows = n / m;
        let mut z = vec![0.0; n * self.config.latent];
        fill_normal(&mut ChaCha12Rng::seed_from_u64(seed), &mut z);
        let mut fake = vec![0.0; n * dim];
        let mut dfake = vec![0.0; n * dim];
        let mut dy = vec![0.0; rows];
        let mut grad = vec![0.0; self.g.parameters().len()];
        let mut norms = [0.0; 2];
        let mut mean_d_fake = 0.0;
        for (k, (target, sign)) in [(0.0f32, -1.0f32), (1.0, 1.0)].into_iter().enumerate() {
            let out = self.g.forward(&team, &z)?;
            apply_output(self.config.output, out, &mut fake);
            let logits = self.d.forward(&team, &fake)?;
            mean_d_fake = mean_sigmoid(logits);
            crate::loss::bce_with_logits(
                logits,
                &vec![target; rows],
                &mut dy,
                sign / rows as f32,
                rows,
            );
            let dx = self.d.backward_with_input(&team, &dy, Update::None)?;
            output_backward(self.config.output, &fake, dx, &mut dfake);
            self.g
                .backward(&team, &dfake, Update::Gradient(&mut grad))?;
            norms[k] = grad.iter().map(|&g| (g as f64).powi(2)).sum::<f64>().sqrt();
        }
        Ok(GradientComparison {
            mean_d_fake,
            minimax_norm: norms[0],
            non_saturating_norm: norms[1],
        })
    }
}

impl Gan {
    /// Saves a checkpoint as JSON: the config, the data source (a fixed set with its rows),
    /// both networks with their Adam state, the history, `metrics_every` and the random
    /// stream's exact position, so that training resumed from it with [`Gan::load`] continues
    /// bit for bit as if it had never stopped. The file is written whole or not at all (a
    /// temporary file, then renamed).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let word_pos = u64::try_from(self.rng.get_word_pos()).map_err(|_| {
            Error::param(
                "random stream position",
                self.rng.get_word_pos(),
                "a position past 2⁶⁴ words was not reached by training: nothing to save",
            )
        })?;
        let checkpoint = Checkpoint {
            genlab: crate::VERSION.to_string(),
            config: self.config,
            data: self.data.clone(),
            generator: self.g.state(),
            discriminator: self.d.state(),
            history: self.history.clone(),
            ring_history: self.ring_history.clone(),
            metrics_every: self.metrics_every,
            rng: RngState {
                seed: self.rng.get_seed(),
                stream: self.rng.get_stream(),
                word_pos,
            },
        };
        crate::train::save_json(path, &checkpoint)
    }

    /// Loads a checkpoint written by [`Gan::save`], checking it: the config and the data are
    /// valid, both networks match the config and the data's width (layers, activations, Adam
    /// settings), the counts agree (iterations recorded, steps of each network), and the random
    /// stream is the one the config's seed starts. Train it further with [`Gan::train`].
    pub fn load(path: impl AsRef<Path>) -> Result<Gan> {
        let path = path.as_ref();
        let c: Checkpoint = crate::train::load_json(path, "GAN", "Gan::save")?;
        let bad = |message: String| Error::Data {
            path: path.to_path_buf(),
            message,
        };
        let mut gan = Gan::new(c.config, c.data)
            .map_err(|e| bad(format!("its config or data is invalid ({e})")))?;
        for (name, state, fresh) in [
            ("generator", &c.generator, &gan.g),
            ("discriminator", &c.discriminator, &gan.d),
        ] {
            let (got, want) = (state.widths(), fresh.state().widths());
            if got != want {
                return Err(bad(format!(
                    "its {name} has widths {got:?}, but its config and data say {want:?}"
                )));
            }
            if state.layers != fresh.layers() {
                return Err(bad(format!(
                    "its {name}'s activations are {:?}, but a GAN's are {:?}",
                    state
                        .layers
                        .iter()
                        .map(|l| l.activation)
                        .collect::<Vec<_>>(),
                    fresh
                        .layers()
                        .iter()
                        .map(|l| l.activation)
                        .collect::<Vec<_>>()
                )));
            }
        }
        for (name, state, want) in [
            ("generator", &c.generator, gan.config.g_adam()),
            ("discriminator", &c.discriminator, gan.config.d_adam()),
        ] {
            if state.adam != want {
                return Err(bad(format!(
                    "its {name}'s Adam settings {:?} differ from its config's {want:?}",
                    state.adam
                )));
            }
        }
        gan.g = Mlp::from_state(c.generator).map_err(|e| bad(e.to_string()))?;
        gan.d = Mlp::from_state(c.discriminator).map_err(|e| bad(e.to_string()))?;
        // Every iteration is one G step and `d_steps` D steps (more where d_step, g_step or
        // train_discriminator were called alone); the records count 1, 2, 3, …
        let n = c.history.len();
        let consistent = c
            .history
            .iter()
            .enumerate()
            .all(|(i, r)| r.iteration == i + 1)
            && c.ring_history.len() <= n
            && c.ring_history
                .iter()
                .all(|r| (1..=n).contains(&r.iteration))
            && gan.g.steps() >= n
            && n.checked_mul(gan.config.d_steps)
                .is_some_and(|s| gan.d.steps() >= s);
        if !consistent {
            return Err(bad(format!(
                "its counts disagree (history {n} iterations, ring records {}, generator steps \
                 {}, discriminator steps {}, {} D steps an iteration): the checkpoint was \
                 edited or damaged",
                c.ring_history.len(),
                gan.g.steps(),
                gan.d.steps(),
                gan.config.d_steps
            )));
        }
        // The stream must be the one this config starts (its seed and stream), at the saved
        // position: set directly, no replay.
        if c.rng.seed != gan.rng.get_seed() || c.rng.stream != gan.rng.get_stream() {
            return Err(bad(format!(
                "its random stream (stream {}) is not the one its config's seed {} starts: the \
                 checkpoint was edited or damaged",
                c.rng.stream, gan.config.seed
            )));
        }
        gan.rng.set_word_pos(c.rng.word_pos as u128);
        gan.history = c.history;
        gan.ring_history = c.ring_history;
        gan.metrics_every = c.metrics_every;
        Ok(gan)
    }
}

/// What [`Gan::save`] writes.
#[derive(serde::Serialize, serde::Deserialize)]
struct Checkpoint {
    genlab: String,
    config: GanConfig,
    data: GanData,
    generator: MlpState,
    discriminator: MlpState,
    history: Vec<IterRecord>,
    ring_history: Vec<RingRecord>,
    metrics_every: usize,
    rng: RngState,
}

/// The ChaCha12 stream's key (seed), stream number and position in 32-bit words.
#[derive(serde::Serialize, serde::Deserialize)]
struct RngState {
    seed: [u8; 32],
    stream: u64,
    word_pos: u64,
}

/// The generator's widths (L → hidden… → d) and the discriminator's (m·d → hidden… → 1).
fn widths(config: &GanConfig, dim: usize) -> (Vec<usize>, Vec<usize>) {
    let mut g = vec![config.latent];
    g.extend(std::iter::repeat_n(config.g_hidden, config.g_depth));
    g.push(dim);
    let mut d = vec![dim * config.pack];
    d.extend(std::iter::repeat_n(config.d_hidden, config.d_depth));
    d.push(1);
    (g, d)
}

/// D against the optimal D* on a 1-D grid, with the generator as it is now.
#[derive(Debug, Clone, PartialEq)]
pub struct OptimalD1d {
    /// Bin centres.
    pub x: Vec<f64>,
    /// p_data at the centres.
    pub p_data: Vec<f64>,
    /// p_g per bin, exact up to the z grid ([`Gan::generator_density_1d`]).
    pub p_g: Vec<f64>,
    /// D*(x) = p_data / (p_data + p_g).
    pub d_star: Vec<f64>,
    /// The trained D(x).
    pub d: Vec<f64>,
    /// Σ w |D − D*| / Σ w with w = ½(p_data + p_g), the mixture D is trained on.
    pub mean_abs_error: f64,
}

impl Gan {
    /// D and D* on `bins` bins over [lo, hi] (1-D mixture data, latent 1), and their mean
    /// distance weighted by where D is trained.
    pub fn optimal_discriminator_1d(&self, lo: f64, hi: f64, bins: usize) -> Result<OptimalD1d> {
        let (x, p_g) = self.generator_density_1d(lo, hi, bins)?;
        let p_data = x
            .iter()
            .map(|&x| self.data.density_1d(x))
            .collect::<Result<Vec<f64>>>()?;
        let d_star: Vec<f64> = p_data
            .iter()
            .zip(&p_g)
            .map(|(&a, &b)| optimal_discriminator(a, b))
            .collect();
        let grid: Vec<f32> = x.iter().map(|&v| v as f32).collect();
        let d: Vec<f64> = self
            .discriminate(&grid)?
            .iter()
            .map(|&v| v as f64)
            .collect();
        let (mut w, mut total) = (0.0, 0.0);
        for i in 0..x.len() {
            let wi = 0.5 * (p_data[i] + p_g[i]);
            w += wi;
            total += wi * (d[i] - d_star[i]).abs();
        }
        Ok(OptimalD1d {
            x,
            p_data,
            p_g,
            d_star,
            d,
            mean_abs_error: total / w.max(f64::MIN_POSITIVE),
        })
    }
}

/// Which run to show when a chapter pictures "the worst seed": the index of the fewest modes in
/// `modes` (one count per run, as [`RingMetrics::modes`] gives them, here as `f64` so that a
/// notebook's table of results passes as it is), the lowest index on a tie, and `None` when
/// `modes` is empty (no run, nothing to show). A NaN counts as more modes than any number.
pub fn worst_seed(modes: &[f64]) -> Option<usize> {
    modes
        .iter()
        .enumerate()
        .min_by(|(_, a), (_, b)| {
            a.partial_cmp(b)
                .unwrap_or_else(|| a.is_nan().cmp(&b.is_nan()))
        })
        .map(|(i, _)| i)
}

/// A grid of ring snapshots in one figure: each snapshot's D(x) surface as a heatmap tile (one
/// colour scale for all tiles, so a flattening D shows as a fading contrast), its samples on
/// top, `cols` tiles a row, left to right then top to bottom. Each tile spans [−3, 3]².
pub fn ring_snapshots_figure(
    title: &str,
    snapshots: &[RingSnapshot],
    cols: usize,
) -> Result<Figure> {
    ensure(
        !snapshots.is_empty(),
        "snapshots",
        0,
        "take at least one snapshot",
    )?;
    ensure(cols >= 1, "cols", cols, "use at least one column")?;
    let n = snapshots[0].surface.len();
    ensure(
        n >= 1 && snapshots.iter().all(|s| s.surface.len() == n),
        "snapshots",
        "surfaces of different sizes",
        "take every snapshot with Gan::ring_snapshot",
    )?;
    let rows_of_tiles = snapshots.len().div_ceil(cols);
    let gap = 2usize; // cells between tiles
    let tile = 6.0; // each tile spans 6 units
    let cell = tile / n as f64;
    let step = tile + gap as f64 * cell;
    let (w, h) = (cols * (n + gap) - gap, rows_of_tiles * (n + gap) - gap);
    let mut grid = vec![vec![f64::NAN; w]; h];
    let mut xs = vec![];
    let mut ys = vec![];
    let mut cx = vec![];
    let mut cy = vec![];
    for (s, snap) in snapshots.iter().enumerate() {
        let (tc, tr) = (s % cols, rows_of_tiles - 1 - s / cols); // row 0 of tiles at the bottom
        for (i, row) in snap.surface.iter().enumerate() {
            for (j, &v) in row.iter().enumerate().take(n) {
                grid[tr * (n + gap) + i][tc * (n + gap) + j] = v;
            }
        }
        let (ox, oy) = (tc as f64 * step + 3.0, tr as f64 * step + 3.0);
        for p in snap.samples.chunks_exact(2) {
            let (px, py) = (p[0] as f64, p[1] as f64);
            if px.abs() < 3.0 && py.abs() < 3.0 {
                xs.push(ox + px);
                ys.push(oy + py);
            }
        }
        for c in ring_centres() {
            cx.push(ox + c[0] as f64);
            cy.push(oy + c[1] as f64);
        }
    }
    let (x1, y1) = (w as f64 * cell, h as f64 * cell);
    Ok(Figure::new(title)
        .x_label("x₁ (每格一个快照，各格范围 [−3, 3])")
        .y_label("x₂")
        .size(260 * cols as u32 + 120, 260 * rows_of_tiles as u32 + 110)
        .x_range(0.0, x1)
        .y_range(0.0, y1)
        .heatmap((0.0, x1), (0.0, y1), grid)
        .scatter("生成样本 G(z)", &xs, &ys)
        .scatter("数据的 8 个中心", &cx, &cy))
}

/// A step's draws, in the order training has always made them: a D step's real batch, then
/// its z; a G step's z.
fn draw_into(what: Draw, data: &GanData, rng: &mut ChaCha12Rng, real: &mut [f32], z: &mut [f32]) {
    if what == Draw::DStep {
        data.sample_into(rng, real);
    }
    fill_normal(rng, z);
}

/// Rows of N(0, 1) draws.
fn fill_normal(rng: &mut ChaCha12Rng, out: &mut [f32]) {
    for v in out.iter_mut() {
        *v = StandardNormal.sample(rng);
    }
}

fn sigmoid(y: f32) -> f32 {
    1.0 / (1.0 + (-y).exp())
}

/// The chunks' partial sums of a step, added in chunk order.
fn sum_chunks(parts: &[[f64; 3]]) -> [f64; 3] {
    parts.iter().fold([0.0; 3], |acc, p| {
        [acc[0] + p[0], acc[1] + p[1], acc[2] + p[2]]
    })
}

fn mean_sigmoid(logits: &[f32]) -> f64 {
    logits.iter().map(|&y| sigmoid(y) as f64).sum::<f64>() / logits.len().max(1) as f64
}

/// G(z) from the last layer's output.
fn apply_output(output: GenOutput, out: &[f32], x: &mut [f32]) {
    match output {
        GenOutput::Identity => x.copy_from_slice(out),
        GenOutput::Sigmoid => {
            for (x, &o) in x.iter_mut().zip(out) {
                *x = sigmoid(o);
            }
        }
    }
}

/// ∂L/∂(last layer) from ∂L/∂G(z): σ′ = G(z)(1 − G(z)) for the sigmoid.
fn output_backward(output: GenOutput, x: &[f32], dx: &[f32], d_out: &mut [f32]) {
    match output {
        GenOutput::Identity => d_out.copy_from_slice(dx),
        GenOutput::Sigmoid => {
            for ((d, &g), &x) in d_out.iter_mut().zip(dx).zip(x) {
                *d = g * x * (1.0 - x);
            }
        }
    }
}

fn team_for(rows: usize) -> Team {
    if rows >= 256 {
        Team::default_size()
    } else {
        Team::new(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::RngCore as _;

    #[test]
    fn worst_seed_is_the_fewest_modes_lowest_index_on_ties() {
        assert_eq!(worst_seed(&[]), None);
        assert_eq!(worst_seed(&[8.0]), Some(0));
        assert_eq!(worst_seed(&[8.0, 8.0]), Some(0));
        assert_eq!(worst_seed(&[8.0, 5.0, 5.0]), Some(1));
        assert_eq!(worst_seed(&[7.0, 8.0, 3.0, 6.0]), Some(2));
        assert_eq!(worst_seed(&[f64::NAN, 6.0]), Some(1));
        assert_eq!(worst_seed(&[6.0, f64::NAN, 6.0]), Some(0));
    }

    #[test]
    fn ring_metrics_count_modes_and_quality() {
        let c = ring_centres();
        let mut s = vec![];
        for _ in 0..25 {
            for centre in &c[..3] {
                s.extend_from_slice(centre);
            }
        }
        s.extend_from_slice(&[0.0, 0.0]);
        let m = ring_metrics(&s).unwrap();
        assert_eq!(m.modes, 3);
        assert!((m.high_quality - 75.0 / 76.0).abs() < 1e-12);
        assert!(ring_metrics(&[1.0]).is_err());
    }

    /// The D and G steps themselves (`d_step`, `g_step`: the code `train` runs), for both
    /// losses, with and without packing and through either output: each step's loss is the
    /// textbook one, computed here from D's and G's outputs on the step's own batch
    /// (L_D = −mean log D(x) − mean log(1 − D(G(z))); L_G = −mean log D(G(z)), or
    /// mean log(1 − D(G(z))) for minimax), and the gradient each step computes for its own
    /// network equals central finite differences of that loss (the same batch each time: the
    /// random stream is put back before every step).
    #[test]
    fn d_and_g_steps_match_plain_losses_and_finite_differences() {
        for (loss, output, pack) in [
            (GanLoss::NonSaturating, GenOutput::Identity, 1),
            (GanLoss::Minimax, GenOutput::Sigmoid, 2),
            (GanLoss::Minimax, GenOutput::Identity, 1),
        ] {
            let config = GanConfig {
                g_hidden: 6,
                d_hidden: 5,
                latent: 3,
                loss,
                output,
                pack,
                batch_size: 8,
                d_lr: 1e-2,
                g_lr: 1e-2,
                ..GanConfig::default()
            };
            let mut gan = Gan::new(config, GanData::ring()).unwrap();
            gan.verbose = false;
            gan.metrics_every = 0;
            // Away from the initialisation first (D then tells real from fake a little).
            gan.train(30).unwrap();
            let team = Team::new(1);
            gan.capture = Some(vec![]);
            let rows = 8 / pack;
            let dim = gan.data.dim();
            for net in [Net::D, Net::G] {
                let stream = gan.rng.clone();
                let step = |gan: &mut Gan| -> f64 {
                    gan.rng = stream.clone();
                    match net {
                        Net::D => gan.d_step(&team, 1).unwrap().0,
                        Net::G => gan.g_step(&team, 1).unwrap(),
                    }
                };
                let at = step(&mut gan);
                let grad = gan.capture.clone().unwrap();
                // The loss from the outputs, as the notes write it (f64 from here on).
                let d_of = |x: &[f32]| -> Vec<f64> {
                    let logits = gan.d.predict(&team, x).unwrap();
                    logits
                        .iter()
                        .map(|&y| 1.0 / (1.0 + (-y as f64).exp()))
                        .collect()
                };
                let mean = |v: Vec<f64>| v.iter().sum::<f64>() / v.len() as f64;
                let plain = match net {
                    Net::D => {
                        // x = [real; fake], each row of the packed view m points side by side
                        let (real, fake) = gan.x.split_at(8 * dim);
                        let on_real = d_of(real).into_iter().map(|d| -d.ln());
                        let on_fake = d_of(fake).into_iter().map(|d| -(1.0 - d).ln());
                        mean(on_real.collect()) + mean(on_fake.collect())
                    }
                    Net::G => {
                        let out = gan.g.predict(&team, &gan.z).unwrap();
                        let mut fake = vec![0.0; out.len()];
                        apply_output(output, &out, &mut fake);
                        let d = d_of(&fake);
                        assert_eq!(d.len(), rows);
                        match loss {
                            GanLoss::NonSaturating => mean(d.iter().map(|d| -d.ln()).collect()),
                            GanLoss::Minimax => mean(d.iter().map(|d| (1.0 - d).ln()).collect()),
                        }
                    }
                };
                assert!(
                    (at - plain).abs() < 1e-5 * (1.0 + plain.abs()),
                    "{loss:?} pack {pack}: the step's loss {at} vs the plain one {plain}"
                );
                let theta = match net {
                    Net::D => gan.d.parameters().to_vec(),
                    Net::G => gan.g.parameters().to_vec(),
                };
                assert_eq!(grad.len(), theta.len());
                let set = |gan: &mut Gan, p: &[f32]| match net {
                    Net::D => gan.d.set_parameters(p).unwrap(),
                    Net::G => gan.g.set_parameters(p).unwrap(),
                };
                // Central differences at h, then at h/4 and h/16 where a (leaky) ReLU's kink
                // between θ − h and θ + h spoils the larger one.
                let mut checked = 0;
                for i in (0..theta.len()).step_by(2) {
                    let mut fds = vec![];
                    for h in [2e-3f32, 5e-4, 1.25e-4] {
                        let mut p = theta.clone();
                        p[i] = theta[i] + h;
                        set(&mut gan, &p);
                        let up = step(&mut gan);
                        p[i] = theta[i] - h;
                        set(&mut gan, &p);
                        let down = step(&mut gan);
                        let fd = (up - down) / (2.0 * h as f64);
                        fds.push(fd);
                        if (fd - grad[i] as f64).abs() < 2e-3 * (1.0 + fd.abs()) {
                            break;
                        }
                        assert!(
                            fds.len() < 3,
                            "{loss:?} pack {pack}, {} step: parameter {i}: the step's gradient \
                             {} vs finite differences {fds:?} (h = 2e-3, 5e-4, 1.25e-4)",
                            if matches!(net, Net::D) { "D" } else { "G" },
                            grad[i]
                        );
                    }
                    checked += (grad[i] != 0.0) as usize;
                }
                set(&mut gan, &theta);
                // A gradient of zeros would pass against a flat loss: it is not flat here.
                assert!(checked > theta.len() / 4, "{checked} non-zero entries");
            }
        }
    }

    /// `train` draws each step's noise ahead, during the previous update: the same draws in the
    /// same order, so training in one call, in many calls, or step by step (no drawing ahead)
    /// gives the same bits, and the stream ends where the last step left it.
    #[test]
    fn drawing_ahead_changes_nothing() {
        let config = GanConfig {
            batch_size: 32,
            g_hidden: 16,
            d_hidden: 16,
            d_steps: 2,
            ..GanConfig::default()
        };
        let fresh = || {
            let mut gan = Gan::new(config, GanData::ring()).unwrap();
            gan.verbose = false;
            gan.metrics_every = 0;
            gan
        };
        let mut one_call = fresh();
        one_call.train(5).unwrap();
        assert!(one_call.ahead.is_none(), "nothing drawn ahead after train");
        let mut calls = fresh();
        for _ in 0..5 {
            calls.train(1).unwrap();
        }
        let mut steps = fresh();
        let team = Team::new(2);
        for it in 1..=5 {
            steps.d_step(&team, it).unwrap();
            steps.d_step(&team, it).unwrap();
            steps.g_step(&team, it).unwrap();
        }
        for other in [&calls, &steps] {
            for (a, b) in [(&one_call.g, &other.g), (&one_call.d, &other.d)] {
                let same = a.parameters().iter().zip(b.parameters());
                assert!(same.clone().all(|(x, y)| x.to_bits() == y.to_bits()));
            }
            let (mut r1, mut r2) = (one_call.rng.clone(), other.rng.clone());
            assert_eq!(r1.next_u64(), r2.next_u64(), "the stream's position");
        }
        let losses = |g: &Gan| {
            g.history
                .iter()
                .map(|r| (r.d_loss, r.g_loss))
                .collect::<Vec<_>>()
        };
        assert_eq!(losses(&one_call), losses(&calls));
    }

    /// The GAN's stream is rand 0.8's `StdRng` under its own name: the same seed gives the same
    /// numbers, so switching to it (for checkpoints) changed no result.
    #[test]
    fn the_stream_is_rands_std_rng() {
        use rand::RngCore as _;
        for seed in [0u64, 2, 0x9e37_79b9_7f4a_7c15] {
            let mut a = ChaCha12Rng::seed_from_u64(seed);
            let mut b = rand::rngs::StdRng::seed_from_u64(seed);
            for _ in 0..1000 {
                assert_eq!(a.next_u64(), b.next_u64());
            }
            let (x, y): (f32, f32) = (StandardNormal.sample(&mut a), StandardNormal.sample(&mut b));
            assert_eq!(x.to_bits(), y.to_bits());
        }
    }

    #[test]
    fn bad_configs_name_the_field() {
        let bad = [
            (
                GanConfig {
                    latent: 0,
                    ..GanConfig::default()
                },
                "latent",
            ),
            (
                GanConfig {
                    d_lr: -1.0,
                    ..GanConfig::default()
                },
                "d_lr",
            ),
            (
                GanConfig {
                    g_beta1: 1.0,
                    ..GanConfig::default()
                },
                "g_beta1",
            ),
            (
                GanConfig {
                    pack: 3,
                    ..GanConfig::default()
                },
                "batch_size",
            ),
            (
                GanConfig {
                    d_steps: 0,
                    ..GanConfig::default()
                },
                "d_steps",
            ),
            (
                GanConfig {
                    g_depth: 0,
                    ..GanConfig::default()
                },
                "g_depth",
            ),
        ];
        for (config, name) in bad {
            let err = config.validate().unwrap_err().to_string();
            assert!(err.contains(&format!("`{name}`")), "{name}: {err}");
        }
        assert!(GanConfig::default().validate().is_ok());
    }
}
