//! The VAE's loss in a few lines of dfdx: the readable reference. The engine's training step
//! ([`super::Vae`]) computes the same loss and, by hand, its gradient; a test compares the two
//! on the same minibatch and the same ε (dfdx differentiates this code by autodiff).

use super::{Likelihood, VaeConfig};
use crate::data::PIXELS;
use crate::mlp::reference::DfdxMlp;
use dfdx::prelude::*;

/// The negative ELBO of a minibatch `x` (B × 64) with noise `eps` (B × L), averaged over the
/// batch, and its gradient with respect to the encoder's and the decoder's parameters
/// (flattened like [`crate::mlp::Mlp::parameters`]).
pub fn loss_and_gradient(
    encoder: &DfdxMlp,
    decoder: &DfdxMlp,
    x: &[f32],
    eps: &[f32],
    config: &VaeConfig,
    dev: &Cpu,
) -> (f64, Vec<f32>, Vec<f32>) {
    let (b, l) = (x.len() / PIXELS, config.latent);
    let x = dev.tensor_from_vec(x.to_vec(), (b, PIXELS));
    let eps = dev.tensor_from_vec(eps.to_vec(), (b, l));
    // q(z|x): [μ, log σ²] = encoder(x)
    let out = encoder.forward(x.clone().trace(Gradients::leaky()));
    let mu = out
        .with_empty_tape()
        .slice((.., ..l))
        .realize::<(usize, usize)>();
    let log_var = out.slice((.., l..)).realize::<(usize, usize)>();
    // z = μ + σ ⊙ ε
    let z = mu.with_empty_tape() + (log_var.with_empty_tape() * 0.5).exp() * eps;
    // −log p(x|z), summed over pixels, averaged over the batch
    let y = decoder.forward(z);
    let reconstruction = match config.likelihood {
        Likelihood::Bernoulli | Likelihood::BinarisedBernoulli => {
            y.bce_with_logits(x).sum::<(usize,), Axis<1>>().mean()
        }
        Likelihood::Gaussian { std } => {
            let c = (PIXELS as f64 * (std * (2.0 * std::f64::consts::PI).sqrt()).ln()) as f32;
            ((y - x).square() * (0.5 / (std * std)) as f32)
                .sum::<(usize,), Axis<1>>()
                .mean()
                + c
        }
    };
    // KL(N(μ, σ²) ‖ N(0, I)) = −½ Σ (1 + log σ² − μ² − σ²)
    let kl = ((log_var.with_empty_tape() + 1.0 - mu.square() - log_var.exp()) * -0.5)
        .sum::<(usize,), Axis<1>>()
        .mean();
    let loss = reconstruction + kl * config.beta as f32;
    let value = loss.array() as f64;
    let grads = loss.backward();
    (value, encoder.gradient(&grads), decoder.gradient(&grads))
}
