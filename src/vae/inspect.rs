//! What a trained VAE's numbers mean (chapter 3, `03_vae`): the bar of a model that ignores z,
//! the entropy floor of grey pixels, draws from q(z|x) and from p(x|z) beside the decoder's
//! means, and the amortisation gap between the encoder's q(z|x) and the best q for one image.

use super::Likelihood;
use super::{neg_log_likelihood, reconstruction, split_heads, team_for, Vae};
use crate::data::{check_rows, Digits, Images};
use crate::error::{ensure, Result};
use crate::mlp::{Mlp, Update};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};

/// Where [`Likelihood::BinarisedBernoulli`] cuts a pixel: 1 when x = level/16 ≥ 0.5 (grey level
/// 8 of 16 or more), else 0.
pub const BINARY_THRESHOLD: f32 = 0.5;

/// Sets every pixel of both splits to 0 or 1 at [`BINARY_THRESHOLD`].
pub(super) fn binarise(data: &mut Digits) {
    for v in data.train.x.iter_mut().chain(data.test.x.iter_mut()) {
        *v = if *v >= BINARY_THRESHOLD { 1.0 } else { 0.0 };
    }
}

/// The entropy floor of the Bernoulli reconstruction term: the mean over images of
/// Σⱼ H(xⱼ), H(x) = −x ln x − (1−x) ln(1−x) nats.
///
/// BCE(logit, x) ≥ H(x), with equality when sigmoid(logit) = x, so no decoder can bring the
/// reconstruction term of grey pixels below this; it is 0 for binary pixels. It is why a VAE on
/// grey digits cannot go below ~13.7 nats per image (the test set's floor) however good it is.
pub fn bernoulli_entropy_floor(images: &Images) -> f64 {
    let h = |x: f64| {
        let t = |p: f64| if p > 0.0 { -p * p.ln() } else { 0.0 };
        t(x) + t(1.0 - x)
    };
    let total: f64 = images.x.iter().map(|&x| h(x as f64)).sum();
    total / images.len().max(1) as f64
}

/// The share of values strictly between `lo` and `hi` (e.g. grey pixels: between 0.2 and 0.8).
pub fn share_between(values: &[f32], lo: f32, hi: f32) -> f64 {
    let n = values.iter().filter(|&&v| v > lo && v < hi).count();
    n as f64 / values.len().max(1) as f64
}

/// The encoder's q(z|x) against the best q for each image on its own (see
/// [`Vae::amortisation_gap`]); ELBOs in nats per image, β = 1.
#[derive(Debug, Clone, PartialEq)]
pub struct AmortisationGap {
    /// ELBO(x; q = encoder's N(μ(x), σ²(x))).
    pub encoder_elbo: Vec<f64>,
    /// ELBO(x; q = N(m, s²) optimised for this x alone, the decoder fixed).
    pub optimised_elbo: Vec<f64>,
    /// The optimised means m, `latent` per image.
    pub optimised_mu: Vec<f32>,
    /// The optimised log s², `latent` per image.
    pub optimised_log_var: Vec<f32>,
}

impl AmortisationGap {
    /// The amortisation gap of each image: optimised ELBO − encoder ELBO (≥ 0 up to noise).
    pub fn gaps(&self) -> Vec<f64> {
        self.optimised_elbo
            .iter()
            .zip(&self.encoder_elbo)
            .map(|(o, e)| o - e)
            .collect()
    }
}

/// A VAE's bound on −log P(x) for images on discrete grey levels, with its decoder made a
/// probability over those levels: p(x | z) = Π_j P(level_j | N(mean_j(z), σ_j²)), the
/// Gaussian's mass on the level's bin ([`crate::math::discretised_normal_log_prob`]) around
/// the decoder's mean image ([`Vae::decode`]), with one σ_j per pixel (a border pixel that is
/// always 0 gets a small one). Any σ's give a bound (−ELBO ≥ −log P(x) for that decoder);
/// [`Vae::discrete_bound`] fits them on training images. In nats per image on the same space
/// as every other model of the same images (chapter 5 compares it with the DDPM's
/// [`crate::diffusion::NegElbo`]).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DiscreteBound {
    /// σ_j of each pixel's discretised Gaussian, fitted on (up to) 300 training images.
    pub stds: Vec<f64>,
    /// E_q[−log P(x | z)] per image, averaged over the images.
    pub reconstruction: f64,
    /// KL(q(z | x) ‖ N(0, I)) per image, exact, averaged over the images.
    pub kl: f64,
}

impl DiscreteBound {
    /// reconstruction + KL: the bound on −log P(x), nats per image.
    pub fn total(&self) -> f64 {
        self.reconstruction + self.kl
    }
}

impl Vae {
    /// The VAE's [`DiscreteBound`] on `images` (values on `levels` levels from 0 to 1; the
    /// digits: 17), with `draws` draws of z ~ q(z | x) per image (seeded by `seed`). Each
    /// pixel's σ_j is chosen first among 61 values from 0.001 to 1 (evenly spaced in log σ) to
    /// minimise that pixel's share of the same bound on the first 300 training images (one draw
    /// each), so the test images never choose it.
    pub fn discrete_bound(
        &self,
        images: &Images,
        levels: usize,
        draws: usize,
        seed: u64,
    ) -> Result<DiscreteBound> {
        ensure(
            draws >= 1,
            "draws",
            draws,
            "use at least one draw of z per image, e.g. 10",
        )?;
        let (dim, l) = (self.dim(), self.config.latent);
        check_rows("discrete_bound (images)", &images.x, dim)?;
        let fit_rows = self.data.train.len().min(300);
        let fit_x = &self.data.train.x[..fit_rows * dim];
        // −log P(level k | N(m, σ²)) of one pixel.
        let nll = |k: usize, m: f32, sigma: f64| {
            -crate::math::discretised_normal_log_prob(k, levels, (0.0, 1.0), m as f64, sigma)
        };
        let fit_levels = crate::data::level_indices(fit_x, (0.0, 1.0), levels)?;
        let fit_means = self.decode(&self.sample_latents(fit_x, 1, seed ^ 0xf17)?)?;
        let candidates: Vec<f64> = (0..=60)
            .map(|i| 10f64.powf(-3.0 + 3.0 * i as f64 / 60.0))
            .collect();
        let stds: Vec<f64> = (0..dim)
            .map(|j| {
                let cost = |s: f64| -> f64 {
                    (0..fit_rows)
                        .map(|r| nll(fit_levels[r * dim + j], fit_means[r * dim + j], s))
                        .sum()
                };
                candidates
                    .iter()
                    .map(|&s| (s, cost(s)))
                    .fold(
                        (1.0, f64::INFINITY),
                        |best, c| if c.1 < best.1 { c } else { best },
                    )
                    .0
            })
            .collect();
        let test_levels = crate::data::level_indices(&images.x, (0.0, 1.0), levels)?;
        let means = self.decode(&self.sample_latents(&images.x, draws, seed)?)?;
        let reconstruction: f64 = means
            .chunks_exact(dim)
            .enumerate()
            .map(|(r, m)| {
                let x = &test_levels[(r / draws) * dim..(r / draws + 1) * dim];
                (0..dim).map(|j| nll(x[j], m[j], stds[j])).sum::<f64>()
            })
            .sum::<f64>()
            / (means.len() / dim) as f64;
        let (mu, log_var) = self.encode(&images.x)?;
        let kl: f64 = mu
            .iter()
            .zip(&log_var)
            .map(|(&m, &lv)| {
                let (m, lv) = (m as f64, lv as f64);
                -0.5 * (1.0 + lv - m * m - lv.exp())
            })
            .sum::<f64>()
            / (mu.len() / l) as f64;
        Ok(DiscreteBound {
            stds,
            reconstruction,
            kl,
        })
    }

    /// The bar of a model that ignores z: its decoder outputs each pixel's training mean p̄ⱼ
    /// whatever z is (Bernoulli: clamped to [1e-4, 1 − 1e-4]; Gaussian: the mean itself) and its
    /// q(z|x) is the prior (KL = 0). Returns its −ELBO = −Σⱼ log p(xⱼ | p̄ⱼ), averaged over the
    /// test images, in the model's own likelihood and data (about 27.1 nats on the grey digits
    /// with the Bernoulli likelihood). A VAE below it is using its latent code.
    pub fn no_latent_baseline(&self) -> f64 {
        let train = &self.data.train;
        let n = train.len().max(1) as f64;
        let dim = self.dim();
        let mut mean = vec![0.0f64; dim];
        for row in train.x.chunks_exact(dim) {
            for (m, &v) in mean.iter_mut().zip(row) {
                *m += v as f64 / n;
            }
        }
        let out: Vec<f32> = mean
            .iter()
            .map(|&p| match self.config.likelihood {
                Likelihood::Bernoulli | Likelihood::BinarisedBernoulli => {
                    let p = p.clamp(1e-4, 1.0 - 1e-4);
                    (p / (1.0 - p)).ln() as f32
                }
                Likelihood::Gaussian { .. } => p as f32,
            })
            .collect();
        let test = &self.data.test;
        let total: f64 = test
            .x
            .chunks_exact(dim)
            .map(|x| neg_log_likelihood(x, &out, self.config.likelihood))
            .sum();
        total / test.len().max(1) as f64
    }

    /// `n` draws z ~ q(z|x) = N(μ(x), diag σ²(x)) for each image of `x`: the rows for image 0
    /// first (n rows of `latent` values), then image 1's, and so on. Decode them with
    /// [`Vae::decode`] to see what the encoder's uncertainty means in pixels.
    pub fn sample_latents(&self, x: &[f32], n: usize, seed: u64) -> Result<Vec<f32>> {
        ensure(n >= 1, "n", n, "draw at least one z per image")?;
        let (mu, log_var) = self.encode(x)?;
        let l = self.config.latent;
        let mut rng = StdRng::seed_from_u64(seed);
        let mut z = Vec::with_capacity(mu.len() * n);
        for (m, lv) in mu.chunks(l).zip(log_var.chunks(l)) {
            for _ in 0..n {
                z.extend(m.iter().zip(lv).map(|(&m, &lv)| {
                    let e: f32 = StandardNormal.sample(&mut rng);
                    m + (0.5 * lv).exp() * e
                }));
            }
        }
        Ok(z)
    }

    /// Draws x ~ p(x|z) for each latent, not the mean that [`Vae::decode`] returns: each pixel
    /// is 1 with probability sigmoid(logitⱼ) and 0 otherwise (Bernoulli), or μⱼ + σ εⱼ
    /// (Gaussian). A sample of the model is such a draw; the familiar smooth VAE "samples"
    /// are the means.
    pub fn decode_draws(&self, z: &[f32], seed: u64) -> Result<Vec<f32>> {
        let means = self.decode(z)?;
        let mut rng = StdRng::seed_from_u64(seed);
        Ok(match self.config.likelihood {
            Likelihood::Bernoulli | Likelihood::BinarisedBernoulli => means
                .iter()
                .map(|&p| if rng.gen::<f32>() < p { 1.0 } else { 0.0 })
                .collect(),
            Likelihood::Gaussian { std } => means
                .iter()
                .map(|&m| {
                    let e: f64 = StandardNormal.sample(&mut rng);
                    (m as f64 + std * e) as f32
                })
                .collect(),
        })
    }

    /// The ELBO (β = 1) of each image under q = N(mu, diag exp(log_var)) (`latent` values per
    /// image each): ELBO = (1/D) Σ_d log p(x | z_d) − KL(q ‖ N(0, I)) with z_d = μ + σ ε_d and
    /// the D = `draws` draws of ε taken from `seed` (the same ε for the same seed, so two q's
    /// are compared on common noise).
    fn elbo_of(
        &self,
        x: &[f32],
        mu: &[f32],
        log_var: &[f32],
        draws: usize,
        seed: u64,
    ) -> Result<Vec<f64>> {
        let (l, dim) = (self.config.latent, self.dim());
        let n = x.len() / dim;
        let mut rng = StdRng::seed_from_u64(seed);
        let mut z = Vec::with_capacity(n * draws * l);
        for (m, lv) in mu.chunks(l).zip(log_var.chunks(l)) {
            for _ in 0..draws {
                z.extend(m.iter().zip(lv).map(|(&m, &lv)| {
                    let e: f32 = StandardNormal.sample(&mut rng);
                    m + (0.5 * lv).exp() * e
                }));
            }
        }
        let out = self.decoder.predict(&team_for(n * draws), &z)?;
        Ok((0..n)
            .map(|i| {
                let xi = &x[i * dim..(i + 1) * dim];
                let rec: f64 = out[i * draws * dim..(i + 1) * draws * dim]
                    .chunks_exact(dim)
                    .map(|o| neg_log_likelihood(xi, o, self.config.likelihood))
                    .sum::<f64>()
                    / draws as f64;
                let kl: f64 = mu[i * l..(i + 1) * l]
                    .iter()
                    .zip(&log_var[i * l..(i + 1) * l])
                    .map(|(&m, &lv)| {
                        let (m, lv) = (m as f64, lv as f64);
                        -0.5 * (1.0 + lv - m * m - lv.exp())
                    })
                    .sum();
                -rec - kl
            })
            .collect())
    }

    /// The amortisation gap on the images `x`: the encoder gives every image its q(z|x) in one
    /// forward pass (amortised inference); chapter 2 instead optimised one q per x. Here each
    /// image gets its own q = N(m, diag s²), started at the encoder's and moved by `steps` Adam
    /// steps (learning rate 0.02, 16 draws of ε a step) on its ELBO with the decoder fixed:
    /// ∂(−ELBO)/∂m = E[∂z] + m, ∂(−ELBO)/∂log s² = E[½ ∂z ⊙ ε ⊙ s] + ½ (s² − 1), where ∂z is the
    /// decoder's input gradient of −log p(x|z). Both q's ELBOs are then estimated with the
    /// same 2,000 draws of ε per image. optimised − encoder ≥ 0 is the price of amortisation;
    /// log p(x) − optimised is what the Gaussian family itself costs.
    pub fn amortisation_gap(&self, x: &[f32], steps: usize, seed: u64) -> Result<AmortisationGap> {
        let dim = self.dim();
        check_rows("amortisation_gap", x, dim)?;
        const DRAWS: usize = 16;
        const EVAL_DRAWS: usize = 2000;
        let (lr, b1, b2, eps_adam) = (0.02f32, 0.9f32, 0.999f32, 1e-8f32);
        let l = self.config.latent;
        let n = x.len() / dim;
        let out = self.encoder.predict(&team_for(n), x)?;
        let (enc_mu, enc_lv) = split_heads(&out, l);
        // Parameters [m; log s²] of every image, and Adam's moments.
        let mut theta: Vec<f32> = enc_mu.iter().chain(&enc_lv).copied().collect();
        let (mut m1, mut m2) = (vec![0.0f32; theta.len()], vec![0.0f32; theta.len()]);
        let mut decoder = Mlp::from_state(self.decoder.state())?;
        let team = team_for(n * DRAWS);
        let mut rng = StdRng::seed_from_u64(seed);
        let x_rep: Vec<f32> = x
            .chunks_exact(dim)
            .flat_map(|xi| std::iter::repeat_n(xi, DRAWS).flatten().copied())
            .collect();
        let (mut eps, mut z) = (vec![0.0f32; n * DRAWS * l], vec![0.0f32; n * DRAWS * l]);
        let mut dy = vec![0.0f32; n * DRAWS * dim];
        let half = n * l;
        for t in 1..=steps {
            for (k, (e, z)) in eps.iter_mut().zip(z.iter_mut()).enumerate() {
                let (i, j) = (k / (DRAWS * l), k % l);
                *e = StandardNormal.sample(&mut rng);
                *z = theta[i * l + j] + (0.5 * theta[half + i * l + j]).exp() * *e;
            }
            let y = decoder.forward(&team, &z)?;
            reconstruction(
                y,
                &x_rep,
                &mut dy,
                self.config.likelihood,
                1.0 / DRAWS as f32,
                dim,
            );
            let dz = decoder.backward_with_input(&team, &dy, Update::None)?;
            let mut grad = vec![0.0f32; theta.len()];
            for (k, (&g, &e)) in dz.iter().zip(&eps).enumerate() {
                let (i, j) = (k / (DRAWS * l), k % l);
                let sd = (0.5 * theta[half + i * l + j]).exp();
                grad[i * l + j] += g;
                grad[half + i * l + j] += 0.5 * g * e * sd;
            }
            for p in 0..half {
                // The KL term's gradient, exact: ∂/∂m = m, ∂/∂log s² = ½ (s² − 1).
                grad[p] += theta[p];
                grad[half + p] += 0.5 * (theta[half + p].exp() - 1.0);
            }
            let (c1, c2) = (1.0 - b1.powi(t as i32), 1.0 - b2.powi(t as i32));
            for (((th, g), a), v) in theta.iter_mut().zip(&grad).zip(&mut m1).zip(&mut m2) {
                *a = b1 * *a + (1.0 - b1) * g;
                *v = b2 * *v + (1.0 - b2) * g * g;
                *th -= lr * (*a / c1) / ((*v / c2).sqrt() + eps_adam);
            }
        }
        let (opt_mu, opt_lv) = theta.split_at(half);
        let eval_seed = seed ^ 0x0a11_0c8e;
        Ok(AmortisationGap {
            encoder_elbo: self.elbo_of(x, &enc_mu, &enc_lv, EVAL_DRAWS, eval_seed)?,
            optimised_elbo: self.elbo_of(x, opt_mu, opt_lv, EVAL_DRAWS, eval_seed)?,
            optimised_mu: opt_mu.to_vec(),
            optimised_log_var: opt_lv.to_vec(),
        })
    }
}
