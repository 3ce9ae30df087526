//! Chapter 3, VAE (Variational AutoEncoder): an encoder q(z|x), a decoder p(x|z), the
//! reparameterisation trick and the loss "reconstruction + KL", trained on the 8×8 digits.
//!
//! - Encoder: x (64 pixels in [0, 1]) → Linear(64, H) ReLU → Linear(H, H) ReLU →
//!   Linear(H, 2L), whose two halves are μ and log σ² of q(z|x) = N(μ, diag σ²).
//! - Reparameterisation: z = μ + exp(½ log σ²) ⊙ ε, ε ~ N(0, I).
//! - Decoder: z → Linear(L, H) ReLU → Linear(H, H) ReLU → Linear(H, 64): the logits of
//!   p(x | z) = Π Bernoulli(xⱼ | sigmoid(logitⱼ)) (or the means of a Gaussian likelihood).
//! - Loss per image, the negative ELBO in nats:
//!   −ELBO = Σⱼ BCE(logitⱼ, xⱼ) + β · KL(N(μ, diag σ²) ‖ N(0, I)),
//!   KL = −½ Σ (1 + log σ² − μ² − σ²)  (chapter 2's closed form).
//!
//! With H = 256, L = 8, β = 1, Adam 1e-3, batch 100 and 100 epochs this is workload W1 of the
//! benchmark spec. Any H and L work.
//!
//! The encoder and the decoder are two networks of the engine ([`crate::mlp`]); one training
//! step is the page of calls in `Vae::step`: forward through the encoder, the
//! reparameterisation, forward through the decoder, the loss and ∂logits, backward through the
//! decoder (Adam fused in) down to ∂z, through the reparameterisation and the KL to ∂μ and
//! ∂log σ², backward through the encoder (Adam fused in). The same model in a few lines of
//! dfdx is [`reference`](mod@reference); a test checks that both give the same loss and gradient.

use crate::data::{check_rows, load_digits, Batches, Digits, Images, Scale};
use crate::error::{ensure, Error, Result};
use crate::mlp::AdamSettings;
use crate::mlp::{rowwise, update_nets_with, Activation, Mlp, MlpState, Team, Update};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use std::path::Path;

mod inspect;
pub mod reference;

pub use inspect::{
    bernoulli_entropy_floor, share_between, AmortisationGap, DiscreteBound, BINARY_THRESHOLD,
};

/// How p(x | z) scores a pixel.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Likelihood {
    /// Bernoulli with logits: −log p = BCE(logit, x) (pixels in [0, 1] as probabilities).
    ///
    /// On grey pixels (x = level/16) this is not a normalised likelihood of the data: for a
    /// fractional x, Σ over x of λˣ(1−λ)¹⁻ˣ is not 1 (the continuous Bernoulli's missing
    /// normaliser), so −ELBO is a loss in nats, not −log of a probability, and its floor is the
    /// entropy of the grey targets ([`bernoulli_entropy_floor`]).
    Bernoulli,
    /// Bernoulli on binarised digits: when the data are loaded each pixel becomes 1 when its
    /// grey level is at least 8 of 16 (x ≥ [`BINARY_THRESHOLD`]) and 0 otherwise; then
    /// −log p = BCE(logit, x) is −log of a true probability mass over {0, 1}⁶⁴.
    BinarisedBernoulli,
    /// Gaussian with fixed standard deviation σ: −log p = (x − μ)²/(2σ²) + log(σ√2π).
    Gaussian {
        /// The fixed σ of every pixel.
        std: f64,
    },
}

/// Widest hidden layer a VAE may have (a guard against typos; the digits need far less).
pub const MAX_HIDDEN: usize = 4096;
/// Largest latent size.
pub const MAX_LATENT: usize = 512;

/// Largest KL weight β.
pub const MAX_BETA: f64 = 1e6;
/// Most epochs a config may ask for (a guard against typos).
pub const MAX_EPOCHS: usize = 1_000_000;

/// The VAE's hyperparameters. `Default` is workload W1.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct VaeConfig {
    /// Width H of both hidden layers of encoder and decoder (any width from 1 to
    /// [`MAX_HIDDEN`]).
    pub hidden: usize,
    /// Latent size L (1 to [`MAX_LATENT`]).
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
            (1..=MAX_HIDDEN).contains(&self.hidden),
            "hidden",
            self.hidden,
            &format!("use a hidden width between 1 and {MAX_HIDDEN}, e.g. 256"),
        )?;
        ensure(
            (1..=MAX_LATENT).contains(&self.latent),
            "latent",
            self.latent,
            &format!("use a latent size between 1 and {MAX_LATENT}, e.g. 8 (2 to plot it)"),
        )?;
        ensure(
            (0.0..=MAX_BETA).contains(&self.beta),
            "beta",
            self.beta,
            &format!(
                "β weighs the KL term: use a number from 0 to {MAX_BETA:e}, 1 for the plain VAE"
            ),
        )?;
        ensure(
            (1..=1497).contains(&self.batch_size),
            "batch_size",
            self.batch_size,
            "use a batch size between 1 and 1497 (the training images), e.g. 100",
        )?;
        ensure(
            self.epochs <= MAX_EPOCHS,
            "epochs",
            self.epochs,
            &format!("use at most {MAX_EPOCHS} epochs, e.g. 100"),
        )?;
        if let Likelihood::Gaussian { std } = self.likelihood {
            ensure(
                std > 0.0 && std <= 1e6,
                "likelihood.std",
                std,
                "use a σ between 0 (excluded) and 1e6, e.g. 0.1",
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

    /// The encoder's widths: D → H → H → 2L (D = 64 for the digits).
    fn encoder_widths(&self, dim: usize) -> [usize; 4] {
        [dim, self.hidden, self.hidden, 2 * self.latent]
    }

    /// The decoder's widths: L → H → H → D.
    fn decoder_widths(&self, dim: usize) -> [usize; 4] {
        [self.latent, self.hidden, self.hidden, dim]
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

/// One step's (loss, reconstruction, KL), each a mean over the minibatch.
pub type StepParts = (f64, f64, f64);

/// A VAE with its data, optimiser, shuffling and history: train it in one cell, train more in
/// the next, inspect it in any. Introduced in chapter 3 (`03_vae`).
pub struct Vae {
    config: VaeConfig,
    encoder: Mlp,
    decoder: Mlp,
    batches: Batches,
    /// Draws ε for training.
    noise_rng: StdRng,
    /// The next step's minibatch, gathered into `x` with its ε drawn into `eps` ahead (while
    /// the helper thread starts on the previous step's update), and the noise stream after
    /// them: the step that uses them moves `noise_rng` there; anything else drops them, and
    /// `noise_rng` never moved, so the draws are the same as without.
    ahead: Option<(Vec<usize>, StdRng)>,
    data: Digits,
    /// Passes over the training set done (with or without a history record).
    epochs_trained: usize,
    /// Passes begun (each draws a shuffle): more than `epochs_trained` when an epoch stopped
    /// on an error.
    epochs_started: usize,
    /// A time budget and autosaving for [`Vae::train`] (none by default); autosaves happen
    /// between epochs.
    pub limits: crate::train::Limits,
    /// One record per epoch trained with [`Vae::train`].
    pub history: Vec<EpochRecord>,
    /// The loss of every minibatch step.
    pub step_losses: Vec<f64>,
    /// Print progress while training (on by default): the first and last epoch of each
    /// `train` call, and an epoch whenever 2 seconds have passed since the last line.
    pub verbose: bool,
    /// A step's buffers: the minibatch, ε, and each chunk's sums of (reconstruction, KL).
    x: Vec<f32>,
    eps: Vec<f32>,
    chunk_sums: Vec<(f64, f64)>,
}

impl Vae {
    /// A fresh VAE for `config`, with the digits loaded (scaled to [0, 1]).
    pub fn new(config: VaeConfig) -> Result<Self> {
        config.validate()?;
        let mut data = load_digits(Scale::Unit)?;
        if config.likelihood == Likelihood::BinarisedBernoulli {
            inspect::binarise(&mut data);
        }
        Vae::with_data(config, data.train, data.test)
    }

    /// A fresh VAE for `config` on other data: `train` and `test` rows of one width D (the
    /// encoder is D → H → H → 2L, the decoder L → H → H → D), e.g. points in the plane for
    /// chapter 4's ring ([`crate::data::Points::images`]). A Bernoulli likelihood needs values
    /// in [0, 1]; a Gaussian one takes any. [`Vae::new`] is this with the digits.
    pub fn with_data(config: VaeConfig, train: Images, test: Images) -> Result<Self> {
        config.validate()?;
        let data = Digits { train, test };
        let dim = data.train.dim;
        for (name, set) in [("data.train", &data.train), ("data.test", &data.test)] {
            check_rows(name, &set.x, dim)?;
            ensure(
                set.dim == dim && set.x.len() == set.len() * dim,
                name,
                format!(
                    "{} values, {} labels, dim {}",
                    set.x.len(),
                    set.len(),
                    set.dim
                ),
                &format!("one label per row and rows of the training set's width {dim}"),
            )?;
        }
        ensure(
            config.batch_size <= data.train.len(),
            "batch_size",
            config.batch_size,
            &format!(
                "use a batch size between 1 and {} (the training rows)",
                data.train.len()
            ),
        )?;
        if !matches!(config.likelihood, Likelihood::Gaussian { .. }) {
            let outside = data
                .train
                .x
                .iter()
                .chain(&data.test.x)
                .find(|v| !(0.0..=1.0).contains(*v));
            if let Some(v) = outside {
                return Err(Error::param(
                    "likelihood",
                    format!("{:?} with a value {v}", config.likelihood),
                    "a Bernoulli likelihood needs values in [0, 1]: use Likelihood::Gaussian { std } \
                     for other data",
                ));
            }
        }
        let encoder = Mlp::new(
            &config.encoder_widths(dim),
            Activation::Relu,
            config.adam(),
            config.seed,
        )?;
        let decoder = Mlp::new(
            &config.decoder_widths(dim),
            Activation::Relu,
            config.adam(),
            config.seed ^ 0xdec0_de00,
        )?;
        Ok(Vae {
            encoder,
            decoder,
            noise_rng: StdRng::seed_from_u64(config.seed ^ 0x9e37_79b9_7f4a_7c15),
            ahead: None,
            batches: Batches::new(
                data.train.len(),
                config.batch_size,
                true,
                config.seed ^ 0x5eed,
            )?,
            config,
            data,
            epochs_trained: 0,
            epochs_started: 0,
            limits: Default::default(),
            history: vec![],
            step_losses: vec![],
            verbose: true,
            x: vec![],
            eps: vec![],
            chunk_sums: vec![],
        })
    }

    /// The config it was built with.
    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// Values per example D (64 for the digits).
    pub fn dim(&self) -> usize {
        self.data.train.dim
    }

    /// The training and test digits.
    pub fn data(&self) -> &Digits {
        &self.data
    }

    /// Epochs trained so far with [`Vae::train`] (one history record each).
    pub fn epochs_done(&self) -> usize {
        self.history.len()
    }

    /// Changes the learning rate of both networks (each keeps its Adam moments): to go on
    /// with smaller steps after a divergence.
    pub fn set_learning_rate(&mut self, lr: f64) -> Result<()> {
        let config = VaeConfig { lr, ..self.config };
        config.validate()?;
        self.encoder.set_adam(config.adam())?;
        self.decoder.set_adam(config.adam())?;
        self.config = config;
        Ok(())
    }

    /// The encoder network (64 → H → H → 2L).
    pub fn encoder(&self) -> &Mlp {
        &self.encoder
    }

    /// The decoder network (L → H → H → 64).
    pub fn decoder(&self) -> &Mlp {
        &self.decoder
    }

    /// One training step on the minibatch in `self.x` with noise `self.eps`: the VAE's whole
    /// algorithm, one line of the math per call. `update` is what both networks do with their
    /// gradients (Adam when training); during the update the calling thread loads the `next`
    /// minibatch ahead, if given. Returns (loss, reconstruction, KL), means over the batch.
    fn step(
        &mut self,
        team: &Team,
        enc_update: Update<'_>,
        dec_update: Update<'_>,
        next: Option<&[usize]>,
    ) -> Result<StepParts> {
        let (l, dim) = (self.config.latent, self.dim());
        let b = self.x.len() / dim;
        let scale = 1.0 / b as f32;
        let sb = (self.config.beta as f32) * scale;
        let (x, eps, likelihood) = (&self.x, &self.eps, self.config.likelihood);
        // Everything row by row, one chunk of the minibatch per task: forward through both
        // networks, the loss and its gradient, backward down to the encoder's first layer.
        rowwise(
            team,
            [&mut self.encoder, &mut self.decoder],
            [b, b],
            &mut self.chunk_sums,
            &|[enc, dec]| {
                let (i0, i1) = enc.range();
                enc.input_mut().copy_from_slice(&x[i0 * dim..i1 * dim]);
                // q(z|x): [μ, log σ²] = encoder(x)
                let out = enc.forward();
                // z = μ + σ ⊙ ε, and KL(q(z|x) ‖ N(0, I)) = −½ Σ (1 + log σ² − μ² − σ²)
                let eps = &eps[i0 * l..i1 * l];
                let kl = reparameterise(out, eps, dec.input_mut(), l);
                // p(x|z): logits (or means) = decoder(z); −log p(x|z) and its gradient ∂y
                dec.forward();
                let (y, dy) = dec.output_and_grad();
                let rec = reconstruction(y, enc.input(), dy, likelihood, scale, dim);
                // Backward through the decoder down to ∂z
                let dz = dec.backward(true);
                // Through z = μ + σ ε and β·KL to ∂μ, ∂log σ²
                let (out, d_enc) = enc.output_and_grad();
                reparameterise_backward(out, eps, dz, sb, d_enc, l);
                // Backward through the encoder (its input needs no gradient)
                enc.backward(false);
                (rec, kl)
            },
        )?;
        let (rec, kl) =
            (self.chunk_sums.iter()).fold((0.0, 0.0), |(r, k), &(cr, ck)| (r + cr, k + ck));
        let loss = (rec + self.config.beta * kl) / b as f64;
        if !loss.is_finite() {
            // Stop before any update: the networks keep their last finite parameters.
            return Err(Error::Diverged {
                step: self.encoder.steps(),
                loss: loss as f32,
                fix: format!(
                    "Lower the learning rate (now {}), or the KL weight β (now {}).",
                    self.config.lr, self.config.beta
                ),
            });
        }
        // Both networks' weight updates (Adam fused in), in one stretch of tasks; the caller
        // meanwhile loads the next minibatch and draws its ε from a copy of the stream.
        let (data, noise, ahead) = (&self.data, &self.noise_rng, &mut self.ahead);
        let (x, eps) = (&mut self.x, &mut self.eps);
        update_nets_with(
            team,
            [
                (&mut self.encoder, enc_update),
                (&mut self.decoder, dec_update),
            ],
            &mut || {
                if let Some(batch) = next {
                    let mut after = noise.clone();
                    if gather(data, batch, l, x, eps, &mut after).is_ok() {
                        *ahead = Some((batch.to_vec(), after));
                    }
                }
            },
        )?;
        Ok((loss, rec / b as f64, kl / b as f64))
    }

    /// One training step on `batch` that either completes or leaves the VAE as it was before
    /// it (parameters, step counts, the noise stream; Adam's moments where finite): a step
    /// that fails (an error, a panicking thread) or makes a parameter NaN or infinite is
    /// undone, so the next `train` continues exactly as the VAE's checkpoint would.
    fn guarded_step(
        &mut self,
        team: &Team,
        batch: &[usize],
        next: Option<&[usize]>,
    ) -> Result<StepParts> {
        let noise = self.noise_rng.clone();
        let steps = (self.encoder.steps(), self.decoder.steps());
        // Each network's update keeps the parameters it replaces (copied by its own tasks).
        self.encoder.keep_before_update(true);
        self.decoder.keep_before_update(true);
        let result = self.load_batch(batch).and_then(|()| {
            let parts = self.step(team, Update::Adam, Update::Adam, next)?;
            let bad = (self.encoder.first_non_finite())
                .map(|(i, v)| ("encoder", i, v))
                .or_else(|| {
                    self.decoder
                        .first_non_finite()
                        .map(|(i, v)| ("decoder", i, v))
                });
            match bad {
                None => Ok(parts),
                Some((net, i, value)) => Err(Error::Diverged {
                    step: steps.0,
                    loss: value,
                    fix: format!(
                        "The update at step {} made the {net}'s parameter {i} {value}; it was \
                         undone, so the VAE keeps its parameters from before that step. Lower \
                         the learning rate (now {:e}; W1 uses 1e-3).",
                        steps.0, self.config.lr
                    ),
                }),
            }
        });
        if result.is_err() {
            self.noise_rng = noise;
            self.ahead = None;
            self.encoder.undo_update(steps.0)?;
            self.decoder.undo_update(steps.1)?;
        }
        result
    }

    /// Gathers minibatch `batch` into `self.x` and draws its ε (or takes them, loaded ahead).
    fn load_batch(&mut self, batch: &[usize]) -> Result<()> {
        match self.ahead.take() {
            Some((loaded, after)) if loaded == batch => {
                self.noise_rng = after;
                Ok(())
            }
            _ => gather(
                &self.data,
                batch,
                self.config.latent,
                &mut self.x,
                &mut self.eps,
                &mut self.noise_rng,
            ),
        }
    }

    /// One pass over the training set on `team`; returns the means of its steps' parts.
    fn epoch(&mut self, team: &Team) -> Result<StepParts> {
        let batches: Vec<Vec<usize>> = self.batches.epoch().collect();
        self.epochs_started += 1;
        let mut sums = (0.0, 0.0, 0.0);
        for (t, batch) in batches.iter().enumerate() {
            let next = batches.get(t + 1).map(|b| &b[..]);
            let (loss, rec, kl) = self.guarded_step(team, batch, next)?;
            self.step_losses.push(loss);
            sums = (sums.0 + loss, sums.1 + rec, sums.2 + kl);
        }
        self.epochs_trained += 1;
        let n = batches.len().max(1) as f64;
        Ok((sums.0 / n, sums.1 / n, sums.2 / n))
    }

    /// Trains `epochs` more epochs (reshuffled each epoch), recording and printing each.
    pub fn train(&mut self, epochs: usize) -> Result<&[EpochRecord]> {
        let start = self.history.len();
        let mut watch = crate::train::Watch::start(&self.limits)?;
        let team = Team::default_size();
        let mut last_print: Option<std::time::Instant> = None;
        for e in 0..epochs {
            if watch.out_of_time() {
                if self.verbose {
                    println!(
                        "time budget reached after {e} of {epochs} epochs ({:.1} s): call train again to go on",
                        watch.seconds()
                    );
                }
                break;
            }
            let clock = std::time::Instant::now();
            let (loss, rec, kl) = self.epoch(&team)?;
            let test = self.evaluate(&team, 10)?;
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
            watch.autosave(false, |path| self.save(path))?;
        }
        watch.autosave(true, |path| self.save(path))?;
        Ok(&self.history[start..])
    }

    /// One pass over the training set without evaluation or a history record; returns the
    /// epoch's mean loss, reconstruction and KL.
    pub fn train_epoch_only(&mut self) -> Result<(f64, f64, f64)> {
        self.train_epochs_only(1)
    }

    /// `epochs` passes over the training set without evaluation or history records (the
    /// benchmark's timed loop); returns the last epoch's mean loss, reconstruction and KL.
    /// The loss of every step is in `step_losses`.
    pub fn train_epochs_only(&mut self, epochs: usize) -> Result<(f64, f64, f64)> {
        let team = Team::default_size();
        let mut last = (f64::NAN, f64::NAN, f64::NAN);
        for _ in 0..epochs {
            last = self.epoch(&team)?;
        }
        Ok(last)
    }

    /// (μ, log σ²) of q(z | x) for row-major images (`latent` values per image each).
    pub fn encode(&self, x: &[f32]) -> Result<(Vec<f32>, Vec<f32>)> {
        check_rows("encode", x, self.dim())?;
        let out = self.encoder.predict(&team_for(x.len() / self.dim()), x)?;
        Ok(split_heads(&out, self.config.latent))
    }

    /// The decoder's mean image for each latent: sigmoid(logits) for Bernoulli, the means for
    /// Gaussian. `z` holds `latent` values per image.
    pub fn decode(&self, z: &[f32]) -> Result<Vec<f32>> {
        check_rows("decode", z, self.config.latent)?;
        let out = self
            .decoder
            .predict(&team_for(z.len() / self.config.latent), z)?;
        Ok(match self.config.likelihood {
            Likelihood::Bernoulli | Likelihood::BinarisedBernoulli => {
                out.into_iter().map(|l| 1.0 / (1.0 + (-l).exp())).collect()
            }
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
        ensure(n >= 1, "n", n, "ask for at least one sample")?;
        let mut rng = StdRng::seed_from_u64(seed);
        let z: Vec<f32> = (0..n * self.config.latent)
            .map(|_| StandardNormal.sample(&mut rng))
            .collect();
        self.decode(&z)
    }

    /// The negative ELBO of each image (reconstruction + KL, β not applied), averaged over
    /// `draws` draws of ε. The encoder runs once and the KL is exact; only the reconstruction
    /// term is averaged, all draws decoded in one batch. The draws are seeded by the model's
    /// seed and the number of epochs trained, so a reloaded checkpoint gives the same numbers.
    pub fn neg_elbo_per_image(&self, images: &Images, draws: usize) -> Result<Vec<f64>> {
        self.neg_elbo_on(&team_for(images.len() * draws), images, draws)
    }

    fn neg_elbo_on(&self, team: &Team, images: &Images, draws: usize) -> Result<Vec<f64>> {
        ensure(
            draws >= 1,
            "draws",
            draws,
            "average over at least one draw of ε",
        )?;
        let dim = self.dim();
        check_rows("neg_elbo_per_image", &images.x, dim)?;
        let l = self.config.latent;
        let out = self.encoder.predict(team, &images.x)?;
        let (mu, log_var) = split_heads(&out, l);
        let mut rng = StdRng::seed_from_u64(
            self.config.seed ^ 0xe7a1 ^ (self.epochs_trained as u64).wrapping_mul(0x9e37_79b9),
        );
        let mut z = Vec::with_capacity(draws * mu.len());
        for _ in 0..draws {
            z.extend(mu.iter().zip(&log_var).map(|(m, lv)| {
                let e: f32 = StandardNormal.sample(&mut rng);
                m + (0.5 * lv).exp() * e
            }));
        }
        let decoded = self.decoder.predict(team, &z)?;
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
        for (row, o) in decoded.chunks(dim).enumerate() {
            let i = row % n;
            let x = &images.x[i * dim..(i + 1) * dim];
            total[i] += neg_log_likelihood(x, o, self.config.likelihood) / draws as f64;
        }
        Ok(total)
    }

    fn evaluate(&self, team: &Team, draws: usize) -> Result<f64> {
        let v = self.neg_elbo_on(team, &self.data.test, draws)?;
        Ok(v.iter().sum::<f64>() / v.len() as f64)
    }

    /// The negative ELBO on the 300 test images, each averaged over `draws` draws of ε (W1's
    /// metric uses 10).
    pub fn test_neg_elbo(&self, draws: usize) -> Result<f64> {
        self.evaluate(&Team::default_size(), draws)
    }

    /// Importance-weighted estimate of log p(x) for each image with K samples from q(z|x):
    /// log (1/K) Σₖ p(x | zₖ) p(zₖ) / q(zₖ | x). It is ≥ the ELBO in expectation and tightens
    /// toward log p(x) as K grows (chapter 2's IWAE bound, on a real model).
    pub fn log_likelihood_iwae(&self, x: &[f32], k: usize, seed: u64) -> Result<Vec<f64>> {
        let dim = self.dim();
        check_rows("log_likelihood_iwae", x, dim)?;
        ensure(
            k >= 1,
            "k",
            k,
            "use at least one importance sample, e.g. 100",
        )?;
        let l = self.config.latent;
        let (mu, log_var) = self.encode(x)?;
        let n = x.len() / dim;
        let mut rng = StdRng::seed_from_u64(seed);
        let mut z = Vec::with_capacity(n * k * l);
        let mut log_w = Vec::with_capacity(n * k);
        for i in 0..n {
            let (m, lv) = (&mu[i * l..(i + 1) * l], &log_var[i * l..(i + 1) * l]);
            for _ in 0..k {
                // log w = log p(z) − log q(z|x) (+ log p(x|z) below)
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
        }
        let decoded = self.decoder.predict(&team_for(n * k), &z)?;
        for (row, (w, o)) in log_w.iter_mut().zip(decoded.chunks(dim)).enumerate() {
            let xi = &x[(row / k) * dim..(row / k + 1) * dim];
            *w -= neg_log_likelihood(xi, o, self.config.likelihood);
        }
        Ok(log_w
            .chunks(k)
            .map(|w| crate::math::logsumexp(w) - (k as f64).ln())
            .collect())
    }

    /// Every parameter, flattened: the encoder's, then the decoder's (each layer W then b).
    pub fn parameters(&self) -> Result<Vec<f32>> {
        let mut p = self.encoder.parameters().to_vec();
        p.extend_from_slice(self.decoder.parameters());
        Ok(p)
    }

    /// Adam steps taken so far.
    pub fn steps_done(&self) -> usize {
        self.encoder.steps()
    }

    /// Saves a checkpoint (config, both networks with Adam's state, history) as JSON: training
    /// resumed from it with [`Vae::load`] continues exactly as if it had never stopped. The
    /// file is written whole or not at all (a temporary file, then renamed).
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let checkpoint = Checkpoint {
            genlab: crate::VERSION.to_string(),
            config: self.config,
            encoder: self.encoder.state(),
            decoder: self.decoder.state(),
            epochs_trained: self.epochs_trained,
            epochs_started: Some(self.epochs_started),
            history: self.history.clone(),
            step_losses: self.step_losses.clone(),
        };
        crate::train::save_json(path.as_ref(), &checkpoint)
    }

    /// Loads a checkpoint written by [`Vae::save`] (checking that its networks match its
    /// config); train it further with [`Vae::train`].
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let checkpoint: Checkpoint = crate::train::load_json(path, "VAE", "Vae::save")?;
        let bad = |message: String| Error::Data {
            path: path.to_path_buf(),
            message,
        };
        let mut vae =
            Vae::new(checkpoint.config).map_err(|e| bad(format!("its config is invalid ({e})")))?;
        for (name, state, widths) in [
            (
                "encoder",
                &checkpoint.encoder,
                checkpoint.config.encoder_widths(vae.dim()),
            ),
            (
                "decoder",
                &checkpoint.decoder,
                checkpoint.config.decoder_widths(vae.dim()),
            ),
        ] {
            let got = state.widths();
            if got != widths {
                return Err(bad(format!(
                    "its {name} has widths {got:?}, but its config says {widths:?}"
                )));
            }
        }
        vae.encoder = Mlp::from_state(checkpoint.encoder).map_err(|e| bad(e.to_string()))?;
        vae.decoder = Mlp::from_state(checkpoint.decoder).map_err(|e| bad(e.to_string()))?;
        // The counts must agree with each other before they say how far to replay the streams
        // (an edited count would otherwise replay for hours, or resume from the wrong place).
        let per_epoch = vae.batches.per_epoch();
        let steps = vae.encoder.steps();
        let started = checkpoint
            .epochs_started
            .unwrap_or(checkpoint.epochs_trained);
        let consistent = vae.decoder.steps() == steps
            && checkpoint.step_losses.len() == steps
            && checkpoint.history.len() <= checkpoint.epochs_trained
            && (checkpoint.epochs_trained.checked_mul(per_epoch)).is_some_and(|n| n <= steps)
            && started >= checkpoint.epochs_trained
            && started - checkpoint.epochs_trained <= 1000
            && started.checked_mul(per_epoch).is_none_or(|n| n >= steps);
        if !consistent {
            return Err(bad(format!(
                "its counts disagree (encoder steps {steps}, decoder steps {}, step losses {}, \
                 epochs trained {}, begun {started}, history {}, {per_epoch} steps an epoch): \
                 the checkpoint was edited or damaged",
                vae.decoder.steps(),
                checkpoint.step_losses.len(),
                checkpoint.epochs_trained,
                checkpoint.history.len()
            )));
        }
        // Continue the shuffling and the noise where training left them: one shuffle per
        // epoch begun, one batch of ε per step taken.
        for _ in 0..started {
            vae.batches.epoch().for_each(drop);
        }
        let draws = steps * vae.config.batch_size * vae.config.latent;
        for _ in 0..draws {
            let _: f32 = StandardNormal.sample(&mut vae.noise_rng);
        }
        vae.epochs_trained = checkpoint.epochs_trained;
        vae.epochs_started = started;
        vae.history = checkpoint.history;
        vae.step_losses = checkpoint.step_losses;
        Ok(vae)
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Checkpoint {
    genlab: String,
    config: VaeConfig,
    encoder: MlpState,
    decoder: MlpState,
    epochs_trained: usize,
    /// Passes begun (absent in older checkpoints: every pass begun was completed).
    #[serde(default)]
    epochs_started: Option<usize>,
    history: Vec<EpochRecord>,
    step_losses: Vec<f64>,
}

/// Threads the VAE trains on: 2 where the machine has two cores or more, else 1; set
/// `GENLAB_THREADS=1` to force one. The result is the same for any number of threads.
pub fn training_threads() -> usize {
    crate::mlp::threads_wanted()
}

/// One thread for small inference batches (waking a second costs more than it saves), the
/// default team for large ones.
fn team_for(rows: usize) -> Team {
    if rows >= 256 {
        Team::default_size()
    } else {
        Team::new(1)
    }
}

/// Splits rows of [μ, log σ²] (2L values each) into μ rows and log σ² rows.
/// Gathers minibatch `batch` of the training images into `x` and draws its ε (latent `l` per
/// image) into `eps` from `noise`.
fn gather(
    data: &Digits,
    batch: &[usize],
    l: usize,
    x: &mut Vec<f32>,
    eps: &mut Vec<f32>,
    noise: &mut StdRng,
) -> Result<()> {
    let dim = data.train.dim;
    x.resize(batch.len() * dim, 0.0);
    for (dst, &i) in x.chunks_exact_mut(dim).zip(batch) {
        dst.copy_from_slice(data.train.image(i)?);
    }
    eps.resize(batch.len() * l, 0.0);
    for e in eps.iter_mut() {
        *e = StandardNormal.sample(noise);
    }
    Ok(())
}

fn split_heads(out: &[f32], l: usize) -> (Vec<f32>, Vec<f32>) {
    let mut mu = Vec::with_capacity(out.len() / 2);
    let mut log_var = Vec::with_capacity(out.len() / 2);
    for row in out.chunks_exact(2 * l) {
        mu.extend_from_slice(&row[..l]);
        log_var.extend_from_slice(&row[l..]);
    }
    (mu, log_var)
}

/// z = μ + exp(½ log σ²) ⊙ ε for each row of `out` = [μ, log σ²]; returns Σ over the batch of
/// KL(N(μ, σ²) ‖ N(0, I)) = −½ Σ (1 + log σ² − μ² − σ²).
fn reparameterise(out: &[f32], eps: &[f32], z: &mut [f32], l: usize) -> f64 {
    let mut kl = 0.0f64;
    for ((o, e), z) in out
        .chunks_exact(2 * l)
        .zip(eps.chunks_exact(l))
        .zip(z.chunks_exact_mut(l))
    {
        let (mu, lv) = o.split_at(l);
        let mut k = 0.0f32;
        for j in 0..l {
            let sd = (0.5 * lv[j]).exp();
            z[j] = mu[j] + sd * e[j];
            k += -0.5 * (1.0 + lv[j] - mu[j] * mu[j] - sd * sd);
        }
        kl += k as f64;
    }
    kl
}

/// The gradient through z = μ + σ ε and the KL term (weighted sβ = β/B):
/// ∂μ = ∂z + sβ μ,  ∂log σ² = ½ ∂z ⊙ ε ⊙ σ + ½ sβ (σ² − 1).
fn reparameterise_backward(
    out: &[f32],
    eps: &[f32],
    dz: &[f32],
    sb: f32,
    d_out: &mut [f32],
    l: usize,
) {
    for (((o, e), g), d) in out
        .chunks_exact(2 * l)
        .zip(eps.chunks_exact(l))
        .zip(dz.chunks_exact(l))
        .zip(d_out.chunks_exact_mut(2 * l))
    {
        for j in 0..l {
            let (mu, lv) = (o[j], o[l + j]);
            let sd = (0.5 * lv).exp();
            d[j] = g[j] + sb * mu;
            d[l + j] = 0.5 * g[j] * e[j] * sd + 0.5 * sb * (sd * sd - 1.0);
        }
    }
}

/// Σ over the batch of −log p(x | y), and ∂y = scale · ∂(−log p)/∂y.
fn reconstruction(
    y: &[f32],
    x: &[f32],
    dy: &mut [f32],
    likelihood: Likelihood,
    scale: f32,
    dim: usize,
) -> f64 {
    match likelihood {
        Likelihood::Bernoulli | Likelihood::BinarisedBernoulli => {
            crate::loss::bce_with_logits(y, x, dy, scale, dim)
        }
        Likelihood::Gaussian { std } => {
            let inv_var = 1.0 / (std * std) as f32;
            let per_pixel = (std * (2.0 * std::f64::consts::PI).sqrt()).ln();
            let mut r = (y.len()) as f64 * per_pixel;
            for ((&y, &x), dy) in y.iter().zip(x).zip(dy.iter_mut()) {
                let diff = y - x;
                r += (0.5 * diff * diff * inv_var) as f64;
                *dy = diff * inv_var * scale;
            }
            r
        }
    }
}

/// −log p(x | decoder output) summed over the pixels of one image.
fn neg_log_likelihood(x: &[f32], out: &[f32], likelihood: Likelihood) -> f64 {
    match likelihood {
        Likelihood::Bernoulli | Likelihood::BinarisedBernoulli => x
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mlp::reference::DfdxMlp;
    use dfdx::prelude::*;

    /// The engine's loss and gradient against dfdx's autodiff of the same loss (the reference
    /// in `vae/reference.rs`), on the same batch and noise, at the initial weights and after
    /// some training, for several sizes (odd ones included), likelihoods and β.
    #[test]
    fn engine_gradient_equals_dfdx_autodiff() {
        let cases = [
            (VaeConfig::default(), 0),
            (VaeConfig::default(), 3),
            (
                VaeConfig {
                    hidden: 200,
                    latent: 3,
                    batch_size: 37,
                    ..VaeConfig::default()
                },
                1,
            ),
            (
                VaeConfig {
                    hidden: 128,
                    latent: 2,
                    beta: 2.0,
                    batch_size: 7,
                    ..VaeConfig::default()
                },
                1,
            ),
            (
                VaeConfig {
                    latent: 16,
                    likelihood: Likelihood::Gaussian { std: 0.3 },
                    batch_size: 33,
                    ..VaeConfig::default()
                },
                2,
            ),
        ];
        let dev = Cpu::default();
        for (config, epochs) in cases {
            let mut vae = Vae::new(config).unwrap();
            vae.verbose = false;
            vae.train_epochs_only(epochs).unwrap();
            let b = config.batch_size;
            let idx: Vec<usize> = (0..b).map(|i| (i * 37) % vae.data.train.len()).collect();
            vae.load_batch(&idx).unwrap();
            let (x, eps) = (vae.x.clone(), vae.eps.clone());
            let enc_ref = DfdxMlp::of(&vae.encoder, &dev);
            let dec_ref = DfdxMlp::of(&vae.decoder, &dev);
            let mut ge = vec![0.0; vae.encoder.parameters().len()];
            let mut gd = vec![0.0; vae.decoder.parameters().len()];
            let team = Team::new(2);
            let (loss, _, _) = vae
                .step(
                    &team,
                    Update::Gradient(&mut ge),
                    Update::Gradient(&mut gd),
                    None,
                )
                .unwrap();
            let (want_loss, want_e, want_d) =
                reference::loss_and_gradient(&enc_ref, &dec_ref, &x, &eps, &config, &dev);
            assert!(
                (loss - want_loss).abs() < 1e-4 * want_loss.abs(),
                "{config:?}: loss {loss} vs dfdx {want_loss}"
            );
            let e1 = crate::mlp::reference::per_layer_error(&vae.encoder, &ge, &want_e);
            let e2 = crate::mlp::reference::per_layer_error(&vae.decoder, &gd, &want_d);
            eprintln!("{config:?} after {epochs} epochs: loss {loss:.5}, per-layer error enc {e1:e} dec {e2:e}");
            assert!(
                e1 < 1e-4 && e2 < 1e-4,
                "{config:?}: gradient differs (enc {e1}, dec {e2})"
            );
        }
    }

    /// A loss that stops being finite ends training with `Diverged` before that step's
    /// update: the networks keep the parameters of the last finite step.
    #[test]
    fn a_non_finite_loss_is_a_diverged_error() {
        let mut vae = Vae::new(VaeConfig {
            lr: 1e30,
            ..VaeConfig::default()
        })
        .unwrap();
        let err = vae.train_epochs_only(3).unwrap_err();
        let Error::Diverged { step, .. } = err else {
            panic!("expected Diverged, got {err}");
        };
        assert!(err.to_string().contains("learning rate"), "{err}");
        assert!(step > 0, "the first steps are finite");
        assert_eq!(vae.steps_done(), step);
        assert_eq!(vae.step_losses.len(), step);
        assert!(vae.parameters().unwrap().iter().all(|p| p.is_finite()));
    }

    /// A training thread that panics in the middle of a step (after some weight rows were
    /// updated, before they were repacked), in either network: `train` returns an error
    /// instead of hanging or aborting, the step is undone, and the VAE then trains on exactly
    /// as its checkpoint does.
    #[test]
    fn a_panicking_training_thread_is_an_error_and_the_vae_stays_consistent() {
        for encoder in [false, true] {
            let mut vae = Vae::new(VaeConfig {
                hidden: 100,
                latent: 3,
                ..VaeConfig::default()
            })
            .unwrap();
            vae.verbose = false;
            vae.train(1).unwrap();
            let before = (vae.parameters().unwrap(), vae.steps_done());
            let net = if encoder {
                &mut vae.encoder
            } else {
                &mut vae.decoder
            };
            net.fault = Some(0);
            let err = vae.train(1).unwrap_err();
            assert!(err.to_string().contains("training thread"), "{err}");
            assert_eq!((vae.parameters().unwrap(), vae.steps_done()), before);
            assert_eq!(vae.decoder.steps(), vae.encoder.steps());
            let path = std::env::temp_dir().join(format!(
                "genlab-vae-after-panic-{encoder}-{}.json",
                std::process::id()
            ));
            vae.save(&path).unwrap();
            let mut loaded = Vae::load(&path).unwrap();
            loaded.verbose = false;
            vae.train(1).unwrap();
            loaded.train(1).unwrap();
            assert_eq!(vae.step_losses, loaded.step_losses);
            assert_eq!(vae.parameters().unwrap(), loaded.parameters().unwrap());
            let _ = std::fs::remove_file(&path);
        }
    }

    /// Each update loads the next minibatch and its ε ahead: the same draws in the same
    /// order, so an epoch gives the bits of the same steps taken without loading ahead.
    #[test]
    fn loading_the_next_batch_ahead_changes_nothing() {
        use rand::RngCore as _;
        let config = VaeConfig {
            hidden: 64,
            latent: 3,
            batch_size: 37,
            ..VaeConfig::default()
        };
        let team = Team::new(2);
        let mut ahead = Vae::new(config).unwrap();
        ahead.epoch(&team).unwrap();
        assert!(ahead.ahead.is_none(), "nothing loaded ahead after an epoch");
        let mut plain = Vae::new(config).unwrap();
        let batches: Vec<Vec<usize>> = plain.batches.epoch().collect();
        for batch in &batches {
            let (loss, ..) = plain.guarded_step(&team, batch, None).unwrap();
            plain.step_losses.push(loss);
        }
        assert_eq!(ahead.step_losses, plain.step_losses);
        assert_eq!(ahead.parameters().unwrap(), plain.parameters().unwrap());
        let (mut a, mut b) = (ahead.noise_rng.clone(), plain.noise_rng.clone());
        assert_eq!(a.next_u64(), b.next_u64(), "the noise stream's position");
    }

    /// Two threads and one give bit-identical training.
    #[test]
    fn one_or_two_threads_train_identically() {
        let mut runs = vec![];
        for threads in [1, 2] {
            let mut vae = Vae::new(VaeConfig {
                hidden: 200,
                latent: 3,
                batch_size: 37,
                ..VaeConfig::default()
            })
            .unwrap();
            let team = Team::new(threads);
            vae.epoch(&team).unwrap();
            runs.push((vae.step_losses.clone(), vae.parameters().unwrap()));
        }
        assert_eq!(runs[0], runs[1]);
    }
}
