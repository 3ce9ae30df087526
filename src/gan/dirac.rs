//! The Dirac-GAN (Mescheder, Geiger and Nowozin 2018, "Which training methods for GANs
//! actually converge?"): the smallest GAN, in which non-convergence can be seen and computed.
//!
//! The data are a point mass at 0; the generator is a point mass at θ; the discriminator is
//! linear, D(x) = σ(ψx). The GAN objective is L(θ, ψ) = f(ψθ) + f(0) with
//! f(t) = −ln(1 + e^{−t}): D maximises it over ψ, G minimises it over θ. The only equilibrium
//! is θ = ψ = 0 (G on the data, D undecided), and the gradient field around it is a pure
//! rotation: ∂L/∂θ = f′(ψθ)ψ, ∂L/∂ψ = f′(ψθ)θ, f′(0) = ½. Gradient steps on such a field
//! circle the equilibrium instead of approaching it: taken at the same time by both players,
//! each step moves along the tangent and so away from the centre (the distance grows by
//! √(1 + h²f′²) a step near it); taken in turn, the iterates cycle on a closed curve. A
//! gradient penalty on D (R1: −(γ/2)‖∇ₓ logit‖² on the data, here −(γ/2)ψ²) damps the
//! rotation, and they converge.

use crate::error::{ensure, Result};

/// How the two players take their gradient steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DiracUpdate {
    /// Both from the same (θ, ψ), at once.
    Simultaneous,
    /// G first, then D from the new θ (how the chapter's GANs train: one D step, one G step).
    Alternating,
    /// Alternating, with D's objective penalised by (γ/2)ψ² (the R1 gradient penalty).
    AlternatingR1 {
        /// The penalty weight γ.
        gamma: f64,
    },
}

/// f′(t) for f(t) = −ln(1 + e^{−t}): σ(−t) = 1/(1 + e^t).
fn f_prime(t: f64) -> f64 {
    1.0 / (1.0 + t.exp())
}

/// `steps` gradient steps of size `lr` from (θ, ψ) = `start`: the path, `start` first
/// (`steps + 1` points). G descends L(θ, ψ) = f(ψθ) + f(0) in θ; D ascends it in ψ.
pub fn dirac_gan(
    start: [f64; 2],
    lr: f64,
    steps: usize,
    update: DiracUpdate,
) -> Result<Vec<[f64; 2]>> {
    ensure(
        lr.is_finite() && lr > 0.0 && lr <= 10.0,
        "lr",
        lr,
        "a step size in (0, 10], e.g. 0.1",
    )?;
    ensure(
        start.iter().all(|v| v.is_finite()),
        "start",
        format!("{start:?}"),
        "a finite starting point (θ, ψ), e.g. [1.0, 1.0]",
    )?;
    ensure(
        steps <= 10_000_000,
        "steps",
        steps,
        "at most ten million steps",
    )?;
    if let DiracUpdate::AlternatingR1 { gamma } = update {
        ensure(
            gamma.is_finite() && gamma >= 0.0,
            "gamma",
            gamma,
            "a penalty weight ≥ 0, e.g. 1.0",
        )?;
    }
    let mut path = Vec::with_capacity(steps + 1);
    let [mut theta, mut psi] = start;
    path.push(start);
    for _ in 0..steps {
        match update {
            DiracUpdate::Simultaneous => {
                let g = f_prime(psi * theta);
                (theta, psi) = (theta - lr * g * psi, psi + lr * g * theta);
            }
            DiracUpdate::Alternating => {
                theta -= lr * f_prime(psi * theta) * psi;
                psi += lr * f_prime(psi * theta) * theta;
            }
            DiracUpdate::AlternatingR1 { gamma } => {
                theta -= lr * f_prime(psi * theta) * psi;
                psi += lr * (f_prime(psi * theta) * theta - gamma * psi);
            }
        }
        path.push([theta, psi]);
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn radius(p: [f64; 2]) -> f64 {
        p[0].hypot(p[1])
    }

    #[test]
    fn simultaneous_steps_spiral_out_alternating_cycle_and_r1_converges() {
        let start = [1.0, 1.0];
        let r0 = radius(start);
        let sim = dirac_gan(start, 0.1, 2000, DiracUpdate::Simultaneous).unwrap();
        // Every step moves away from the equilibrium.
        assert!(sim.windows(2).all(|w| radius(w[1]) > radius(w[0])));
        assert!(radius(sim[2000]) > 2.0 * r0, "{:?}", sim[2000]);
        let alt = dirac_gan(start, 0.1, 2000, DiracUpdate::Alternating).unwrap();
        // Neither away nor in: the distance stays within a band around the start's.
        let (lo, hi) = alt.iter().fold((f64::MAX, 0.0f64), |(lo, hi), &p| {
            (lo.min(radius(p)), hi.max(radius(p)))
        });
        assert!(
            lo > 0.5 * r0 && hi < 2.0 * r0,
            "alternating radius in [{lo}, {hi}]"
        );
        let r1 = dirac_gan(start, 0.1, 2000, DiracUpdate::AlternatingR1 { gamma: 1.0 }).unwrap();
        assert!(radius(r1[2000]) < 1e-3 * r0, "{:?}", r1[2000]);
    }

    #[test]
    fn near_the_equilibrium_a_simultaneous_step_grows_the_distance_as_predicted() {
        // f′(0) = ½: the step is a rotation by h/2 plus a stretch of √(1 + h²/4).
        let path = dirac_gan([1e-4, 0.0], 0.2, 1, DiracUpdate::Simultaneous).unwrap();
        let ratio = radius(path[1]) / radius(path[0]);
        assert!((ratio - (1.0f64 + 0.01).sqrt()).abs() < 1e-6, "{ratio}");
    }

    #[test]
    fn bad_arguments_are_errors() {
        assert!(dirac_gan([1.0, 1.0], 0.0, 10, DiracUpdate::Alternating).is_err());
        assert!(dirac_gan([f64::NAN, 1.0], 0.1, 10, DiracUpdate::Alternating).is_err());
        let bad_gamma = DiracUpdate::AlternatingR1 { gamma: -1.0 };
        assert!(dirac_gan([1.0, 1.0], 0.1, 10, bad_gamma).is_err());
    }
}
