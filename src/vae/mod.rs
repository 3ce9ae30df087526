//! Chapter 3, VAE (Variational AutoEncoder): an encoder q(z|x), a decoder p(x|z), the
//! reparameterisation trick and the loss "reconstruction + KL", trained on the 8×8 digits.
//!
//! - Encoder: x (64 pixels in [0, 1]) → Linear(64, H) ReLU → Linear(H, H) ReLU → two heads
//!   Linear(H, L) giving μ and log σ² (two heads of L are one Linear(H, 2L) split in half).
//! - Reparameterisation: z = μ + exp(½ log σ²) ⊙ ε, ε ~ N(0, I).
//! - Decoder: z → Linear(L, H) ReLU → Linear(H, H) ReLU → Linear(H, 64): the logits of
//!   p(x | z) = Π Bernoulli(xⱼ | sigmoid(logitⱼ)) (or the means of a Gaussian likelihood).
//! - Loss per image, the negative ELBO in nats:
//!   −ELBO = Σⱼ BCE(logitⱼ, xⱼ) + β · KL(N(μ, diag σ²) ‖ N(0, I)),
//!   KL = −½ Σ (1 + log σ² − μ² − σ²)  (chapter 2's closed form).
//!
//! With H = 256, L = 8, β = 1, Adam 1e-3, batch 100 and 100 epochs this is workload W1 of the
//! benchmark spec.
//!
//! Two implementations of one model. The dfdx model here (`Core`) holds the parameters for
//! inference (encode, decode, sample, IWAE) and defines the loss in a few lines of autodiff
//! code. Training runs on the hand-written step of `vae/fused.rs`: the same loss, its gradient
//! by the chain rule layer by layer, and Adam, fused into a few matrix multiplies on two
//! threads, 3 to 4 times faster than PyTorch on W1 (see the README). A test checks its
//! gradient against dfdx's autodiff on the same batch and noise; after every epoch the trained
//! parameters are copied into the dfdx model.

use crate::data::{load_digits, Batches, Digits, Images, Scale, PIXELS};
use crate::error::{ensure, Error, Result};
use crate::train::{AdamSettings, Dev, Trainer};
use dfdx::prelude::*;
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use std::path::Path;

mod fused;

/// How p(x | z) scores a pixel.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Likelihood {
    /// Bernoulli with logits: −log p = BCE(logit, x) (pixels in [0, 1] as probabilities).
    Bernoulli,
    /// Gaussian with fixed standard deviation σ: −log p = (x − μ)²/(2σ²) + log(σ√2π).
    Gaussian {
        /// The fixed σ of every pixel.
        std: f64,
    },
}

/// Hidden widths the VAE can be built with (dfdx 0.13 fixes layer sizes at compile time).
pub const HIDDEN_SIZES: [usize; 2] = [128, 256];
/// Latent sizes the VAE can be built with.
pub const LATENT_SIZES: [usize; 3] = [2, 8, 16];

/// The VAE's hyperparameters. `Default` is workload W1.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct VaeConfig {
    /// Width H of both hidden layers of encoder and decoder (one of [`HIDDEN_SIZES`]).
    pub hidden: usize,
    /// Latent size L (one of [`LATENT_SIZES`]).
    pub latent: usize,
    /// Weight β of the KL term (β = 1 is the ELBO; β > 1 is the β-VAE).
    pub beta: f64,
    /// Adam's learning rate.
    pub lr: f64,
    /// Images per minibatch (the last incomplete batch of an epoch is dropped).
    pub batch_size: usize,
    /// Passes over the 1,497 training images.
    pub epochs: usize,
    /// Seed of the initial weights, the shuffling and ε.
    pub seed: u64,
    /// The decoder's likelihood.
    pub likelihood: Likelihood,
}

impl Default for VaeConfig {
    fn default() -> Self {
        VaeConfig {
            hidden: 256,
            latent: 8,
            beta: 1.0,
            lr: 1e-3,
            batch_size: 100,
            epochs: 100,
            seed: 0,
            likelihood: Likelihood::Bernoulli,
        }
    }
}

impl VaeConfig {
    /// The config, or an error naming the first field outside its range and what to use.
    pub fn validate(&self) -> Result<()> {
        ensure(
            HIDDEN_SIZES.contains(&self.hidden),
            "hidden",
            self.hidden,
            &format!("use one of {HIDDEN_SIZES:?} (layer sizes are fixed when genlab compiles)"),
        )?;
        ensure(
            LATENT_SIZES.contains(&self.latent),
            "latent",
            self.latent,
            &format!("use one of {LATENT_SIZES:?}"),
        )?;
        ensure(
            self.beta >= 0.0 && self.beta.is_finite(),
            "beta",
            self.beta,
            "β weighs the KL term: use a number ≥ 0, 1 for the plain VAE",
        )?;
        ensure(
            (1..=1497).contains(&self.batch_size),
            "batch_size",
            self.batch_size,
            "use a batch size between 1 and 1497 (the training images), e.g. 100",
        )?;
        if let Likelihood::Gaussian { std } = self.likelihood {
            ensure(
                std > 0.0 && std.is_finite(),
                "likelihood.std",
                std,
                "use a positive σ, e.g. 0.1",
            )?;
        }
        AdamSettings {
            lr: self.lr,
            ..Default::default()
        }
        .validate()
    }
}

/// One epoch's record.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EpochRecord {
    /// Epochs completed (1 for the first).
    pub epoch: usize,
    /// Mean minibatch loss (reconstruction + β·KL) over the epoch.
    pub train_loss: f64,
    /// Mean reconstruction term over the epoch.
    pub reconstruction: f64,
    /// Mean KL term (unweighted) over the epoch.
    pub kl: f64,
    /// Negative ELBO on the 300 test images (each averaged over 10 draws of ε).
    pub test_neg_elbo: f64,
}

type Trunk<const H: usize> = (Linear<PIXELS, H>, ReLU, Linear<H, H>, ReLU);
type Decoder<const H: usize, const L: usize> =
    (Linear<L, H>, ReLU, Linear<H, H>, ReLU, Linear<H, PIXELS>);
type Arch<const H: usize, const L: usize> = (Trunk<H>, Linear<H, L>, Linear<H, L>, Decoder<H, L>);
type Net<const H: usize, const L: usize> = <Arch<H, L> as BuildOnDevice<Dev, f32>>::Built;

/// The VAE at fixed sizes H and L; [`Vae`] picks one at run time.
struct Core<const H: usize, const L: usize> {
    trainer: Trainer<Net<H, L>>,
}

impl<const H: usize, const L: usize> Core<H, L> {
    fn new(config: &VaeConfig) -> Result<Self> {
        let adam = AdamSettings {
            lr: config.lr,
            ..Default::default()
        };
        Ok(Core {
            trainer: Trainer::build::<Arch<H, L>>(adam, config.seed)?,
        })
    }

    /// The loss of a minibatch `x` with noise `eps` and its gradient, by dfdx's autodiff
    /// (flattened like [`Trainer::parameters`]): the reference the fused step is tested against.
    #[cfg(test)]
    fn autodiff_gradient(&self, x: Vec<f32>, eps: Vec<f32>, config: &VaeConfig) -> (f64, Vec<f32>) {
        let b = x.len() / PIXELS;
        let (beta, likelihood) = (config.beta as f32, config.likelihood);
        let dev = self.trainer.dev().clone();
        let net = &self.trainer.model;
        let x = dev.tensor_from_vec(x, (b, Const::<PIXELS>));
        let eps = dev.tensor_from_vec(eps, (b, Const::<L>));
        let (trunk, mu_head, log_var_head, decoder) = net;
        let h = trunk.forward(x.trace(net.alloc_grads()));
        let mu = mu_head.forward(h.with_empty_tape());
        let log_var = log_var_head.forward(h);
        let z = mu.with_empty_tape() + (log_var.with_empty_tape() * 0.5).exp() * eps;
        let out = decoder.forward(z);
        let reconstruction = match likelihood {
            Likelihood::Bernoulli => out.bce_with_logits(x).sum::<(usize,), _>().mean(),
            Likelihood::Gaussian { std } => {
                let c = (PIXELS as f64 * (std * (2.0 * std::f64::consts::PI).sqrt()).ln()) as f32;
                ((out - x).square() * (0.5 / (std * std)) as f32)
                    .sum::<(usize,), _>()
                    .mean()
                    + c
            }
        };
        let kl = ((log_var.with_empty_tape() + 1.0 - mu.square() - log_var.exp()) * -0.5)
            .sum::<(usize,), _>()
            .mean();
        let loss = reconstruction + kl * beta;
        let value = loss.array() as f64;
        let grads = loss.backward();
        (value, crate::train::gradient_of(net, &grads))
    }

    /// Encoder outputs (μ, log σ²) for row-major images, L values each.
    fn encode(&self, x: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let b = x.len() / PIXELS;
        let dev = self.trainer.dev();
        let x = dev.tensor_from_vec(x.to_vec(), (b, Const::<PIXELS>));
        let (trunk, mu_head, log_var_head, _) = &self.trainer.model;
        let h = trunk.forward(x);
        (
            mu_head.forward(h.clone()).as_vec(),
            log_var_head.forward(h).as_vec(),
        )
    }

    /// Decoder outputs (logits or means) for row-major latents, L values each.
    fn decode(&self, z: &[f32]) -> Vec<f32> {
        let b = z.len() / L;
        let z = self
            .trainer
            .dev()
            .tensor_from_vec(z.to_vec(), (b, Const::<L>));
        self.trainer.model.3.forward(z).as_vec()
    }
}

/// Runs `$body` with `$core` bound to the inner `Core<H, L>` of whichever size is in use.
macro_rules! with_core {
    ($net:expr, $core:ident => $body:expr) => {
        match $net {
            Net_::H128L2($core) => $body,
            Net_::H128L8($core) => $body,
            Net_::H128L16($core) => $body,
            Net_::H256L2($core) => $body,
            Net_::H256L8($core) => $body,
            Net_::H256L16($core) => $body,
        }
    };
}

#[allow(clippy::large_enum_variant)]
enum Net_ {
    H128L2(Core<128, 2>),
    H128L8(Core<128, 8>),
    H128L16(Core<128, 16>),
    H256L2(Core<256, 2>),
    H256L8(Core<256, 8>),
    H256L16(Core<256, 16>),
}

/// A VAE with its data, optimiser, shuffling and history: train it in one cell, train more in
/// the next, inspect it in any. Introduced in chapter 3 (`03_vae`).
pub struct Vae {
    config: VaeConfig,
    /// The dfdx model: encode, decode, sample (kept equal to `fused` after every epoch).
    net: Net_,
    /// Parameters and Adam state as the fused training step keeps them.
    fused: fused::FusedVae,
    batches: Batches,
    /// Draws ε for training.
    noise_rng: StdRng,
    eval_rng: StdRng,
    data: Digits,
    /// One record per epoch trained.
    pub history: Vec<EpochRecord>,
    /// The loss of every minibatch step.
    pub step_losses: Vec<f64>,
    /// Print progress while training (on by default): the first and last epoch of each
    /// `train` call, and an epoch whenever 2 seconds have passed since the last line.
    pub verbose: bool,
}

impl Vae {
    /// A fresh VAE for `config`, with the digits loaded (scaled to [0, 1]).
    pub fn new(config: VaeConfig) -> Result<Self> {
        config.validate()?;
        let data = load_digits(Scale::Unit)?;
        let net = match (config.hidden, config.latent) {
            (128, 2) => Net_::H128L2(Core::new(&config)?),
            (128, 8) => Net_::H128L8(Core::new(&config)?),
            (128, 16) => Net_::H128L16(Core::new(&config)?),
            (256, 2) => Net_::H256L2(Core::new(&config)?),
            (256, 8) => Net_::H256L8(Core::new(&config)?),
            (256, 16) => Net_::H256L16(Core::new(&config)?),
            (h, l) => {
                return Err(Error::param(
                    "hidden/latent",
                    format!("{h}/{l}"),
                    "see VaeConfig::validate",
                ))
            }
        };
        let parameters = with_core!(&net, core => core.trainer.parameters())?;
        let fused = fused::FusedVae::new(
            config.hidden,
            config.latent,
            config.beta,
            config.likelihood,
            config.lr,
            &parameters,
        )?;
        Ok(Vae {
            fused,
            noise_rng: StdRng::seed_from_u64(config.seed ^ 0x9e37_79b9_7f4a_7c15),
            batches: Batches::new(
                data.train.len(),
                config.batch_size,
                true,
                config.seed ^ 0x5eed,
            )?,
            eval_rng: StdRng::seed_from_u64(config.seed ^ 0xe7a1),
            config,
            net,
            data,
            history: vec![],
            step_losses: vec![],
            verbose: true,
        })
    }

    /// The config it was built with.
    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// The training and test digits.
    pub fn data(&self) -> &Digits {
        &self.data
    }

    /// Epochs trained so far.
    pub fn epochs_done(&self) -> usize {
        self.history.len()
    }

    /// Trains `epochs` more epochs (reshuffled each epoch), recording and printing each.
    pub fn train(&mut self, epochs: usize) -> Result<&[EpochRecord]> {
        let start = self.history.len();
        let mut last_print: Option<std::time::Instant> = None;
        for e in 0..epochs {
            let clock = std::time::Instant::now();
            let (loss, rec, kl) = self.train_epoch_only()?;
            let test = self.test_neg_elbo(10)?;
            let record = EpochRecord {
                epoch: self.history.len() + 1,
                train_loss: loss,
                reconstruction: rec,
                kl,
                test_neg_elbo: test,
            };
            let due = e == 0
                || e + 1 == epochs
                || last_print.is_none_or(|t| t.elapsed().as_secs_f64() >= 2.0);
            if self.verbose && due {
                last_print = Some(std::time::Instant::now());
                println!(
                    "epoch {:>4}  loss {:8.3}  reconstruction {:8.3}  KL {:7.3}  test −ELBO {:8.3}  ({:.2} s)",
                    record.epoch,
                    record.train_loss,
                    record.reconstruction,
                    record.kl,
                    record.test_neg_elbo,
                    clock.elapsed().as_secs_f64()
                );
            }
            self.history.push(record);
        }
        Ok(&self.history[start..])
    }

    /// One pass over the training set without evaluation or a history record; returns the
    /// epoch's mean loss, reconstruction and KL.
    pub fn train_epoch_only(&mut self) -> Result<(f64, f64, f64)> {
        self.train_epochs_only(1)
    }

    /// `epochs` passes over the training set without evaluation or history records (the
    /// benchmark's timed loop: one set of training threads for all of them); returns the last
    /// epoch's mean loss, reconstruction and KL. The loss of every step is in `step_losses`.
    ///
    /// The step runs on the fused kernels of `vae/fused.rs` (the same gradient as dfdx's
    /// autodiff of the loss, checked by a test), on [`training_threads`] threads.
    pub fn train_epochs_only(&mut self, epochs: usize) -> Result<(f64, f64, f64)> {
        let mut batches: Vec<Vec<usize>> = vec![];
        for _ in 0..epochs {
            batches.extend(self.batches.epoch());
        }
        let draws = batches.iter().map(Vec::len).sum::<usize>() * self.config.latent;
        let eps: Vec<f32> = (0..draws)
            .map(|_| StandardNormal.sample(&mut self.noise_rng))
            .collect();
        let (records, outcome) =
            self.fused
                .train(&self.data.train.x, &batches, &eps, training_threads());
        self.step_losses.extend(records.iter().map(|r| r.0));
        let trained = self.fused.parameters();
        with_core!(&mut self.net, core => core.trainer.set_parameters(&trained))?;
        outcome?;
        let per_epoch = batches.len() / epochs.max(1);
        let last = &records[records.len().saturating_sub(per_epoch)..];
        let n = last.len().max(1) as f64;
        let mean = |f: fn(&fused::StepParts) -> f64| last.iter().map(f).sum::<f64>() / n;
        Ok((mean(|r| r.0), mean(|r| r.1), mean(|r| r.2)))
    }

    /// (μ, log σ²) of q(z | x) for row-major images (`latent` values per image each).
    pub fn encode(&self, x: &[f32]) -> Result<(Vec<f32>, Vec<f32>)> {
        check_rows("encode", x, PIXELS)?;
        Ok(with_core!(&self.net, core => core.encode(x)))
    }

    /// The decoder's mean image for each latent: sigmoid(logits) for Bernoulli, the means for
    /// Gaussian. `z` holds `latent` values per image.
    pub fn decode(&self, z: &[f32]) -> Result<Vec<f32>> {
        check_rows("decode", z, self.config.latent)?;
        let out = with_core!(&self.net, core => core.decode(z));
        Ok(match self.config.likelihood {
            Likelihood::Bernoulli => out.into_iter().map(|l| 1.0 / (1.0 + (-l).exp())).collect(),
            Likelihood::Gaussian { .. } => out,
        })
    }

    /// Reconstructions: decode the encoder's mean μ (no sampling).
    pub fn reconstruct(&self, x: &[f32]) -> Result<Vec<f32>> {
        let (mu, _) = self.encode(x)?;
        self.decode(&mu)
    }

    /// `n` new digits: z ~ N(0, I) from the prior, decoded to mean images.
    pub fn sample(&self, n: usize, seed: u64) -> Result<Vec<f32>> {
        let mut rng = StdRng::seed_from_u64(seed);
        let z: Vec<f32> = (0..n * self.config.latent)
            .map(|_| StandardNormal.sample(&mut rng))
            .collect();
        self.decode(&z)
    }

    /// The negative ELBO of each image (reconstruction + KL, β not applied), averaged over
    /// `draws` draws of ε. The encoder runs once and the KL is exact; only the reconstruction
    /// term is averaged, all draws decoded in one batch.
    pub fn neg_elbo_per_image(&mut self, images: &Images, draws: usize) -> Result<Vec<f64>> {
        ensure(
            draws >= 1,
            "draws",
            draws,
            "average over at least one draw of ε",
        )?;
        let l = self.config.latent;
        let (mu, log_var) = self.encode(&images.x)?;
        let mut rng = self.eval_rng.clone();
        let mut z = Vec::with_capacity(draws * mu.len());
        for _ in 0..draws {
            z.extend(mu.iter().zip(&log_var).map(|(m, lv)| {
                let e: f32 = StandardNormal.sample(&mut rng);
                m + (0.5 * lv).exp() * e
            }));
        }
        self.eval_rng = rng;
        let out = with_core!(&self.net, core => core.decode(&z));
        let n = images.len();
        let mut total: Vec<f64> = mu
            .chunks(l)
            .zip(log_var.chunks(l))
            .map(|(m, lv)| {
                // KL(N(μ, σ²) ‖ N(0, I)) = −½ Σ (1 + log σ² − μ² − σ²)
                m.iter()
                    .zip(lv)
                    .map(|(&m, &lv)| {
                        -0.5 * (1.0 + lv as f64 - (m as f64).powi(2) - (lv as f64).exp())
                    })
                    .sum()
            })
            .collect();
        for (row, o) in out.chunks(PIXELS).enumerate() {
            let i = row % n;
            let x = &images.x[i * PIXELS..(i + 1) * PIXELS];
            total[i] += neg_log_likelihood(x, o, self.config.likelihood) / draws as f64;
        }
        Ok(total)
    }

    /// The negative ELBO on the 300 test images, each averaged over `draws` draws of ε (W1's
    /// metric uses 10).
    pub fn test_neg_elbo(&mut self, draws: usize) -> Result<f64> {
        let test = self.data.test.clone();
        let v = self.neg_elbo_per_image(&test, draws)?;
        Ok(v.iter().sum::<f64>() / v.len() as f64)
    }

    /// Importance-weighted estimate of log p(x) for each image with K samples from q(z|x):
    /// log (1/K) Σₖ p(x | zₖ) p(zₖ) / q(zₖ | x). It is ≥ the ELBO in expectation and tightens
    /// toward log p(x) as K grows (chapter 2's IWAE bound, on a real model).
    pub fn log_likelihood_iwae(&self, x: &[f32], k: usize, seed: u64) -> Result<Vec<f64>> {
        check_rows("log_likelihood_iwae", x, PIXELS)?;
        ensure(
            k >= 1,
            "k",
            k,
            "use at least one importance sample, e.g. 100",
        )?;
        let l = self.config.latent;
        let (mu, log_var) = self.encode(x)?;
        let n = x.len() / PIXELS;
        let mut rng = StdRng::seed_from_u64(seed);
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let (m, lv) = (&mu[i * l..(i + 1) * l], &log_var[i * l..(i + 1) * l]);
            let mut z = Vec::with_capacity(k * l);
            let mut log_w = Vec::with_capacity(k);
            for _ in 0..k {
                let mut lw = 0.0;
                for j in 0..l {
                    let s = (0.5 * lv[j] as f64).exp();
                    let e: f64 = StandardNormal.sample(&mut rng);
                    let zj = m[j] as f64 + s * e;
                    z.push(zj as f32);
                    lw += crate::math::normal_log_pdf(zj, 0.0, 1.0)
                        - crate::math::normal_log_pdf(zj, m[j] as f64, s);
                }
                log_w.push(lw);
            }
            let logits = with_core!(&self.net, core => core.decode(&z));
            let xi = &x[i * PIXELS..(i + 1) * PIXELS];
            for (w, o) in log_w.iter_mut().zip(logits.chunks(PIXELS)) {
                *w -= neg_log_likelihood(xi, o, self.config.likelihood);
            }
            out.push(crate::math::logsumexp(&log_w) - (k as f64).ln());
        }
        Ok(out)
    }

    /// Every parameter, flattened (encoder, heads, decoder).
    pub fn parameters(&self) -> Result<Vec<f32>> {
        with_core!(&self.net, core => core.trainer.parameters())
    }

    /// Adam steps taken so far.
    pub fn steps_done(&self) -> usize {
        self.fused.steps
    }

    /// Saves a checkpoint (config, parameters, Adam's moments, history) as JSON: training
    /// resumed from it with [`Vae::load`] continues exactly as if it had never stopped.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let checkpoint = Checkpoint {
            genlab: crate::VERSION.to_string(),
            config: self.config,
            parameters: self.parameters()?,
            adam: Some({
                let (m, v) = self.fused.moments();
                AdamState {
                    m,
                    v,
                    steps: self.fused.steps,
                }
            }),
            history: self.history.clone(),
            step_losses: self.step_losses.clone(),
        };
        let json = serde_json::to_string(&checkpoint).map_err(|e| Error::Dfdx(e.to_string()))?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::io(dir, e, "choose a folder you can write to"))?;
        }
        std::fs::write(path, json)
            .map_err(|e| Error::io(path, e, "choose a folder you can write to"))
    }

    /// Loads a checkpoint written by [`Vae::save`]; train it further with [`Vae::train`].
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::io(
                path,
                e,
                "pass the path a checkpoint was saved to with Vae::save",
            )
        })?;
        let checkpoint: Checkpoint = serde_json::from_str(&text).map_err(|e| Error::Data {
            path: path.to_path_buf(),
            message: format!("not a genlab VAE checkpoint ({e})"),
        })?;
        let mut vae = Vae::new(checkpoint.config)?;
        let expected = vae.parameters()?.len();
        if checkpoint.parameters.len() != expected {
            return Err(Error::shape(
                "Vae::load (parameters)",
                expected,
                checkpoint.parameters.len(),
            ));
        }
        with_core!(&mut vae.net, core => core.trainer.set_parameters(&checkpoint.parameters))?;
        match &checkpoint.adam {
            Some(a) => vae
                .fused
                .restore(&checkpoint.parameters, &a.m, &a.v, a.steps)?,
            // A checkpoint without Adam's state resumes with fresh moments.
            None => vae.fused.set_parameters(&checkpoint.parameters)?,
        }
        // Continue the shuffling and the noise where they would be after as many epochs.
        let mut noise_draws = 0;
        for _ in 0..checkpoint.history.len() {
            noise_draws += vae.batches.epoch().map(|b| b.len()).sum::<usize>();
        }
        for _ in 0..noise_draws * vae.config.latent {
            let _: f32 = StandardNormal.sample(&mut vae.noise_rng);
        }
        vae.history = checkpoint.history;
        vae.step_losses = checkpoint.step_losses;
        Ok(vae)
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Checkpoint {
    genlab: String,
    config: VaeConfig,
    parameters: Vec<f32>,
    #[serde(default)]
    adam: Option<AdamState>,
    history: Vec<EpochRecord>,
    step_losses: Vec<f64>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct AdamState {
    m: Vec<f32>,
    v: Vec<f32>,
    steps: usize,
}

/// Threads the VAE trains on: 2 where the machine has two cores or more (a minibatch of 100 is
/// cut in two halves; more threads would wait more than they work), else 1. Set
/// `GENLAB_THREADS=1` to force one. The result is the same for any number of threads.
pub fn training_threads() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let wanted = std::env::var("GENLAB_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(2);
    wanted.clamp(1, 2).min(cores)
}

/// −log p(x | decoder output) summed over the pixels of one image.
fn neg_log_likelihood(x: &[f32], out: &[f32], likelihood: Likelihood) -> f64 {
    match likelihood {
        Likelihood::Bernoulli => x
            .iter()
            .zip(out)
            .map(|(&x, &l)| {
                let (x, l) = (x as f64, l as f64);
                // BCE with logits, stably: max(l, 0) − l·x + log(1 + e^{−|l|}).
                l.max(0.0) - l * x + (-l.abs()).exp().ln_1p()
            })
            .sum(),
        Likelihood::Gaussian { std } => x
            .iter()
            .zip(out)
            .map(|(&x, &m)| -crate::math::normal_log_pdf(x as f64, m as f64, std))
            .sum(),
    }
}

fn check_rows(what: &str, values: &[f32], width: usize) -> Result<()> {
    if values.is_empty() || !values.len().is_multiple_of(width) {
        return Err(Error::shape(
            what,
            format!("a whole number of rows of {width} values"),
            format!("{} values", values.len()),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fused step's loss and gradient against dfdx's autodiff of the same loss, at the
    /// initial weights and after some training, for several sizes, likelihoods, β and an odd
    /// batch (halves of unequal size).
    #[test]
    fn fused_gradient_equals_dfdx_autodiff() {
        let cases = [
            (VaeConfig::default(), 100, 0),
            (VaeConfig::default(), 100, 3),
            (
                VaeConfig {
                    hidden: 128,
                    latent: 2,
                    beta: 2.0,
                    batch_size: 7,
                    ..VaeConfig::default()
                },
                7,
                1,
            ),
            (
                VaeConfig {
                    latent: 16,
                    likelihood: Likelihood::Gaussian { std: 0.3 },
                    batch_size: 33,
                    ..VaeConfig::default()
                },
                33,
                2,
            ),
        ];
        for (config, b, epochs) in cases {
            let mut vae = Vae::new(config).unwrap();
            vae.verbose = false;
            vae.train(epochs).unwrap();
            let idx: Vec<usize> = (0..b).map(|i| (i * 37) % vae.data.train.len()).collect();
            let x = vae.data.train.gather(&idx).unwrap();
            let mut rng = StdRng::seed_from_u64(9);
            let eps: Vec<f32> = (0..b * config.latent)
                .map(|_| StandardNormal.sample(&mut rng))
                .collect();
            let (loss, grad) = vae.fused.gradient(&x, &eps);
            let (want_loss, want) = with_core!(&vae.net, core => core.autodiff_gradient(x.clone(), eps.clone(), &config));
            assert_eq!(grad.len(), want.len());
            assert!(
                (loss - want_loss).abs() < 1e-4 * want_loss.abs(),
                "{config:?}: loss {loss} vs dfdx {want_loss}"
            );
            let scale = want.iter().fold(0.0f32, |m, g| m.max(g.abs()));
            let worst = grad
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(
                worst < 1e-4 * scale,
                "{config:?} after {epochs} epochs: gradient differs by {worst} (largest |g| {scale})"
            );
            let nonzero = grad.iter().filter(|g| **g != 0.0).count();
            eprintln!(
                "{config:?}: loss {loss:.5}, worst {worst:e} of {scale:e}, {nonzero}/{} nonzero",
                grad.len()
            );
            assert!(
                nonzero > grad.len() / 4,
                "the comparison must cover most parameters"
            );
        }
    }

    /// A loss that stops being finite ends training with `Diverged`, before any update.
    #[test]
    fn a_non_finite_loss_is_a_diverged_error() {
        let mut vae = Vae::new(VaeConfig::default()).unwrap();
        let mut bad = vae.parameters().unwrap();
        // The decoder's last bias: the logit of the last pixel (no ReLU to hide a NaN).
        let last = bad.len() - 1;
        bad[last] = f32::NAN;
        vae.fused.set_parameters(&bad).unwrap();
        let err = vae.train_epoch_only().unwrap_err();
        assert!(matches!(err, Error::Diverged { step: 0, .. }), "{err}");
        assert!(err.to_string().contains("learning rate"), "{err}");
        assert_eq!(vae.steps_done(), 0);
        assert!(vae.step_losses.is_empty());
    }

    /// Two threads and one give bit-identical training.
    #[test]
    fn one_or_two_threads_train_identically() {
        let mut runs = vec![];
        for threads in [1, 2] {
            let mut vae = Vae::new(VaeConfig::default()).unwrap();
            let batches: Vec<Vec<usize>> = vae.batches.epoch().collect();
            let eps: Vec<f32> = (0..batches.len() * 100 * 8)
                .map(|_| StandardNormal.sample(&mut vae.noise_rng))
                .collect();
            let (records, outcome) = vae.fused.train(&vae.data.train.x, &batches, &eps, threads);
            outcome.unwrap();
            runs.push((records, vae.fused.parameters()));
        }
        assert_eq!(runs[0], runs[1]);
    }
}
