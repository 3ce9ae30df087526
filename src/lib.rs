//! # genlab: learn generative models by running them
//!
//! The helper crate of the genlab notebooks (evcxr, the Rust Jupyter kernel). Each module holds
//! one idea and reads top-down like a chapter; a notebook starts with
//! `use genlab::prelude::*;`.
//!
//! | module | chapter | what it holds |
//! | --- | --- | --- |
//! | [`bayes`] | 1, `01_bayes` | prior, likelihood, posterior, evidence, predictive |
//! | [`plot`] | all | the one [`plot::Figure`] type: inline display, PNG and SVG export |
//! | [`data`] | all | the 8×8 digits and their split, seeded toy sets, minibatches |
//! | [`train`] | model chapters | a model + Adam + history that trains correctly across cells |
//! | [`elbo`] | 2, `02_elbo` | variational inference, the ELBO identity, IWAE, gradient estimators |
//! | [`vae`] | 3, `03_vae` | the VAE on the digits: training, samples, latents, checkpoints |
//! | [`gan`] | 4, `04_gan` | the GAN: alternating training, D against D*, the ring's modes, PacGAN |
//! | [`diffusion`] | 5, `05_diffusion` | noise schedules, q(x_t \| x_0), the posterior, DDPM and DDIM |
//! | [`mlp`] | 3 to 5 | the engine: MLPs of any widths, forward/backward with fused Adam, two threads |
//! | [`loss`] | 3 to 5 | losses and their gradients (BCE with logits) in the engine's form |
//! | `kernels` (private) | 3 to 5 | packed matrix multiply (AVX-512, AVX2, portable) with bias/activation/Adam folded in |
//! | [`math`] | all | log-gamma, densities, quadrature |
//!
//! Nothing a learner can influence panics: every fallible call returns [`Result`] with an
//! [`Error`] that names the bad value and the fix, because in evcxr a panic loses the kernel's
//! state.

#![warn(missing_docs)]
#![deny(unsafe_op_in_unsafe_fn)]

pub mod bayes;
pub mod data;
pub mod diffusion;
pub mod elbo;
pub mod error;
pub mod gan;
mod kernels;
pub mod loss;
pub mod math;
pub mod mlp;
#[doc(hidden)]
pub mod perf;
pub mod plot;
pub mod train;
pub mod vae;

pub use dfdx;

/// The seeded random generator every chapter uses (`let mut rng: genlab::Rng = genlab::rng(0);`).
pub type Rng = rand::rngs::StdRng;

/// A random generator from a seed: the same seed gives the same numbers.
pub fn rng(seed: u64) -> Rng {
    <Rng as rand::SeedableRng>::seed_from_u64(seed)
}

/// This crate's version (a notebook's setup cell binds it; see the README on cell timings).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
pub use error::{check, demo, strict, Error, Result, DEMO_NOTE};

/// Everything a notebook needs, in one `use genlab::prelude::*;`.
pub mod prelude {
    pub use crate::bayes::{self, Beta, NormalNormal};
    pub use crate::data::{self, Batches, Digits, Images, Points, Scale};
    pub use crate::diffusion::{Ddpm, DdpmConfig, Mixture1d, NoiseSchedule, Schedule};
    pub use crate::error::{check, demo, strict, Error, Result};
    pub use crate::gan::{Gan, GanConfig, GanData, GanLoss, GenOutput};
    pub use crate::math::{linspace, ln_beta, ln_gamma, logsumexp, normal_pdf, simpson, trapezoid};
    pub use crate::plot::{Corner, Figure, Png};
    pub use crate::train::{self, AdamSettings, Trainer};
    pub use crate::vae::{Likelihood, Vae, VaeConfig};
}
