//! Adam's settings, one set per network (each [`super::Mlp`] keeps its own, with its moments).
//!
//! With gradient g at step t: m ← β₁ m + (1 − β₁) g,  v ← β₂ v + (1 − β₂) g²,
//! θ ← θ − lr · m̂ / (√v̂ + ε),  m̂ = m / (1 − β₁ᵗ),  v̂ = v / (1 − β₂ᵗ).

use crate::error::Result;

/// Adam's settings (learning rate, β₁, β₂, ε), with PyTorch's defaults.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamSettings {
    /// Learning rate (step size), 1e-3 by default.
    pub lr: f64,
    /// Decay of the first moment, 0.9 by default.
    pub beta1: f64,
    /// Decay of the second moment, 0.999 by default.
    pub beta2: f64,
    /// Added to √v̂ to avoid division by zero, 1e-8 by default.
    pub eps: f64,
}

impl Default for AdamSettings {
    fn default() -> Self {
        AdamSettings {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        }
    }
}

impl AdamSettings {
    /// The settings, or an error naming the first one outside its range.
    pub fn validate(&self) -> Result<()> {
        crate::error::ensure(
            self.lr > 0.0 && self.lr.is_finite(),
            "lr",
            self.lr,
            "the learning rate must be a positive finite number; 1e-3 is a good start for Adam \
             (a huge one is allowed, to see training diverge: that stops with an error)",
        )?;
        for (name, beta) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            crate::error::ensure(
                (0.0..1.0).contains(&beta),
                name,
                beta,
                "Adam's betas lie in [0, 1), e.g. 0.9 and 0.999",
            )?;
        }
        crate::error::ensure(
            self.eps > 0.0 && self.eps <= 1.0,
            "eps",
            self.eps,
            "use a small positive ε (at most 1), e.g. 1e-8",
        )
    }
}
