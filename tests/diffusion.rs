//! Diffusion: the closed forms against Monte Carlo, the quadrature reverse step against joint
//! samples, training that learns, DDIM against DDPM, checkpoints, and bad settings named.

use genlab::data::{load_digits, swiss_roll, Scale};
use genlab::diffusion::*;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

fn rng(seed: u64) -> rand::rngs::StdRng {
    rand::rngs::StdRng::seed_from_u64(seed)
}

fn mean_var(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let m = xs.iter().sum::<f64>() / n;
    (
        m,
        xs.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / (n - 1.0),
    )
}

/// q(x_t | x_0) = N(√ᾱ_t x_0, 1 − ᾱ_t) against iterating x_t = √α_t x_{t−1} + √β_t ε, for both
/// schedules. Tolerance: 5 standard errors of the Monte Carlo estimate (the mean's SE is
/// √(var/N); the sample variance's is var·√(2/(N−1)) for a Gaussian).
#[test]
fn forward_marginal_matches_the_iterated_process() {
    const N: usize = 20_000;
    for (kind, steps) in [(Schedule::w3(), 200), (Schedule::cosine(), 100)] {
        let s = NoiseSchedule::new(kind, steps).unwrap();
        let x0 = 1.5;
        let mut r = rng(1);
        let mut chains = vec![x0; N];
        for t in 1..=steps {
            let (a, b) = (s.alpha(t).unwrap().sqrt(), s.beta(t).unwrap().sqrt());
            for x in chains.iter_mut() {
                let e: f64 = StandardNormal.sample(&mut r);
                *x = a * *x + b * e;
            }
            if [1, 10, steps / 2, steps].contains(&t) {
                let ab = s.alpha_bar(t).unwrap();
                let (m, v) = mean_var(&chains);
                let (want_m, want_v) = (ab.sqrt() * x0, 1.0 - ab);
                let (se_m, se_v) = ((want_v / N as f64).sqrt(), want_v * (2.0 / N as f64).sqrt());
                assert!(
                    (m - want_m).abs() < 5.0 * se_m,
                    "{kind:?} t={t}: mean {m} vs {want_m}"
                );
                assert!(
                    (v - want_v).abs() < 5.0 * se_v,
                    "{kind:?} t={t}: var {v} vs {want_v}"
                );
            }
        }
        // The closed-form draw agrees with the formula it implements.
        let xt = s.q_sample(&[2.0], steps / 2, &[0.5]).unwrap()[0] as f64;
        let ab = s.alpha_bar(steps / 2).unwrap();
        assert!((xt - (ab.sqrt() * 2.0 + (1.0 - ab).sqrt() * 0.5)).abs() < 1e-6);
    }
}

/// q(x_{t−1} | x_t, x_0) against joint samples of (x_{t−1}, x_t) given x_0: the pair is jointly
/// Gaussian, so E[x_{t−1} | x_t] is exactly linear in x_t and the least-squares line through
/// the samples estimates it; the residual variance estimates β̃_t. Tolerance: 5 standard
/// errors (the fitted line's SE at x_t is √(β̃/N · (1 + (x_t − mean)²/var)): √(β̃/N) at the
/// mean, √(2β̃/N) a standard deviation away; the residual variance's SE is β̃√(2/N)).
#[test]
fn posterior_mean_and_variance_match_monte_carlo() {
    const N: usize = 200_000;
    let s = NoiseSchedule::new(Schedule::w3(), 200).unwrap();
    let x0 = 0.8;
    let mut r = rng(2);
    for t in [2, 20, 100, 200] {
        let (ab_prev, a, b) = (
            s.alpha_bar(t - 1).unwrap(),
            s.alpha(t).unwrap(),
            s.beta(t).unwrap(),
        );
        let mut prev = Vec::with_capacity(N);
        let mut cur = Vec::with_capacity(N);
        for _ in 0..N {
            let (e1, e2): (f64, f64) =
                (StandardNormal.sample(&mut r), StandardNormal.sample(&mut r));
            let xp = ab_prev.sqrt() * x0 + (1.0 - ab_prev).sqrt() * e1;
            prev.push(xp);
            cur.push(a.sqrt() * xp + b.sqrt() * e2);
        }
        let (mp, _) = mean_var(&prev);
        let (mc, vc) = mean_var(&cur);
        let cov = prev
            .iter()
            .zip(&cur)
            .map(|(p, c)| (p - mp) * (c - mc))
            .sum::<f64>()
            / (N as f64 - 1.0);
        let slope = cov / vc;
        let resid: Vec<f64> = prev
            .iter()
            .zip(&cur)
            .map(|(p, c)| p - (mp + slope * (c - mc)))
            .collect();
        let (_, v_resid) = mean_var(&resid);
        let (_, want_var) = s.posterior(t, 0.0, x0).unwrap();
        for x_t in [mc, mc + vc.sqrt()] {
            let (want_mean, _) = s.posterior(t, x_t, x0).unwrap();
            let got = mp + slope * (x_t - mc);
            let se = (want_var / N as f64 * (1.0 + (x_t - mc).powi(2) / vc)).sqrt();
            assert!(
                (got - want_mean).abs() < 5.0 * se,
                "t={t}, x_t={x_t}: mean {got} vs {want_mean}"
            );
        }
        let se_v = want_var * (2.0 / N as f64).sqrt();
        assert!(
            (v_resid - want_var).abs() < 5.0 * se_v,
            "t={t}: var {v_resid} vs {want_var}"
        );
    }
}

/// The reverse conditional by quadrature integrates to 1 (its evidence is computed in closed
/// form, not by normalising the grid) and its mean and variance match joint samples
/// (x_t, x_{t+1}) kept when x_{t+1} falls within ±h of the conditioning value. Tolerance: 5
/// standard errors of the kept samples' moments; the window's own bias (variance inflated by
/// about (h/√α)²/3 ≈ 3e-5, under 1 % of the narrowest variance here) is far below that for
/// h = 0.01.
#[test]
fn reverse_conditional_by_quadrature_matches_joint_samples() {
    let data = Mixture1d::bimodal(1.0, 0.1).unwrap();
    let alpha_bar_t = 0.9;
    let grid: Vec<f64> = genlab::math::linspace(-5.0, 5.0, 8001);
    for (alpha, x_next) in [(0.3, 0.2), (0.995, 0.2), (0.995, 0.9)] {
        let q = reverse_conditional_1d(&data, alpha_bar_t, alpha, x_next, &grid).unwrap();
        let mass = genlab::math::trapezoid(&grid, &q);
        assert!((mass - 1.0).abs() < 1e-6, "α={alpha}: ∫q = {mass}");
        let xq: Vec<f64> = grid.iter().zip(&q).map(|(x, p)| x * p).collect();
        let mean = genlab::math::trapezoid(&grid, &xq);
        let x2q: Vec<f64> = grid
            .iter()
            .zip(&q)
            .map(|(x, p)| (x - mean) * (x - mean) * p)
            .collect();
        let var = genlab::math::trapezoid(&grid, &x2q);

        let h = 0.01;
        let xs = data
            .noised(alpha_bar_t)
            .unwrap()
            .sample(4_000_000, 3)
            .unwrap();
        let mut r = rng(4);
        let kept: Vec<f64> = xs
            .into_iter()
            .filter(|&x| {
                let e: f64 = StandardNormal.sample(&mut r);
                (alpha.sqrt() * x + (1.0 - alpha).sqrt() * e - x_next).abs() < h
            })
            .collect();
        assert!(kept.len() > 2000, "only {} samples kept", kept.len());
        let (m, v) = mean_var(&kept);
        let n = kept.len() as f64;
        // The variance's SE uses the fourth moment of a bimodal law: up to ~2√(1/n)·var.
        assert!(
            (m - mean).abs() < 5.0 * (var / n).sqrt(),
            "α={alpha}: mean {m} vs {mean}"
        );
        assert!(
            (v - var).abs() < 5.0 * 2.0 * var / n.sqrt(),
            "α={alpha}: var {v} vs {var}"
        );
        eprintln!("α={alpha} x'={x_next}: ∫ = {mass:.8}, mean {mean:.4} (MC {m:.4}), var {var:.5} (MC {v:.5}), {n} kept");
    }
}

fn nn_mean(samples: &[[f32; 2]], data: &[[f32; 2]]) -> f64 {
    let a: Vec<f32> = samples.iter().flatten().copied().collect();
    let b: Vec<f32> = data.iter().flatten().copied().collect();
    nearest_distance_mean(&a, &b, 2).unwrap()
}

/// A short training on the swiss roll learns its shape, by two measures against the baseline
/// that knows only the data's mean and covariance (a Gaussian fitted to the roll, which fills
/// the spiral's gaps): precision (samples → nearest data point) and coverage (held-out data →
/// nearest sample). Each bar sits halfway between that Gaussian's score and what fresh
/// swiss-roll points score (a perfect model): the trained DDPM must pass both; the fitted
/// Gaussian, by construction, passes neither.
#[test]
fn a_short_training_on_the_swiss_roll_beats_the_prior() {
    let data = swiss_roll(2000, 0.05, 0).xy;
    let held_out = swiss_roll(1000, 0.05, 1).xy;
    let fresh = swiss_roll(1000, 0.05, 2).xy;
    // N(mean, Σ) of the data, sampled through the Cholesky factor of Σ.
    let gaussian: Vec<[f32; 2]> = {
        let n = data.len() as f64;
        let m = [0, 1].map(|j| data.iter().map(|p| p[j] as f64).sum::<f64>() / n);
        let c = |a: usize, b: usize| {
            data.iter()
                .map(|p| (p[a] as f64 - m[a]) * (p[b] as f64 - m[b]))
                .sum::<f64>()
                / n
        };
        let l00 = c(0, 0).sqrt();
        let l10 = c(1, 0) / l00;
        let l11 = (c(1, 1) - l10 * l10).sqrt();
        let mut r = rng(5);
        (0..1000)
            .map(|_| {
                let (e0, e1): (f64, f64) =
                    (StandardNormal.sample(&mut r), StandardNormal.sample(&mut r));
                [
                    (m[0] + l00 * e0) as f32,
                    (m[1] + l10 * e0 + l11 * e1) as f32,
                ]
            })
            .collect()
    };
    let scores = |samples: &[[f32; 2]]| (nn_mean(samples, &data), nn_mean(&held_out, samples));
    let (g_precision, g_coverage) = scores(&gaussian);
    let (f_precision, f_coverage) = scores(&fresh);
    let bars = (
        0.5 * (g_precision + f_precision),
        0.5 * (g_coverage + f_coverage),
    );
    let mut ddpm = Ddpm::points(DdpmConfig::toy_2d(), &data).unwrap();
    ddpm.verbose = false;
    ddpm.train(1500).unwrap();
    let samples: Vec<[f32; 2]> = ddpm
        .sample(1000, 6)
        .unwrap()
        .chunks(2)
        .map(|c| [c[0], c[1]])
        .collect();
    let (precision, coverage) = scores(&samples);
    eprintln!(
        "precision: Gaussian {g_precision:.4}, fresh data {f_precision:.4}, DDPM {precision:.4}; \
         coverage: Gaussian {g_coverage:.4}, fresh data {f_coverage:.4}, DDPM {coverage:.4}"
    );
    assert!(g_precision > bars.0 && g_coverage > bars.1);
    assert!(
        precision < bars.0,
        "precision {precision} vs bar {}",
        bars.0
    );
    assert!(coverage < bars.1, "coverage {coverage} vs bar {}", bars.1);
}

/// Two schedules against values computed here from their definitions, independently of
/// `NoiseSchedule`: W3 v2's linear β_t = 5e-4 + (0.1 − 5e-4)(t − 1)/199 with ᾱ_t the running
/// product of 1 − β_s, and the cosine schedule's ᾱ_t = f(t)/f(0), f(t) = cos²(π/2 · (t/T + s)/(1 + s)),
/// s = 0.008 (until its β is clipped at 0.999, in the last step).
#[test]
fn schedules_match_their_definitions() {
    let linear = NoiseSchedule::new(Schedule::w3(), 200).unwrap();
    let mut product = 1.0f64;
    for t in 1..=200 {
        let beta = 5e-4 + (0.1 - 5e-4) * (t - 1) as f64 / 199.0;
        product *= 1.0 - beta;
        assert!((linear.beta(t).unwrap() - beta).abs() < 1e-15, "β_{t}");
        assert!(
            (linear.alpha_bar(t).unwrap() - product).abs() < 1e-12 * product.max(1e-300),
            "ᾱ_{t}"
        );
    }
    let cosine = NoiseSchedule::new(Schedule::cosine(), 200).unwrap();
    let f = |t: f64| {
        ((t / 200.0 + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2)
            .cos()
            .powi(2)
    };
    for t in 1..200 {
        let want = f(t as f64) / f(0.0);
        let got = cosine.alpha_bar(t).unwrap();
        assert!(
            (got - want).abs() < 1e-9 * want.max(1e-12),
            "t = {t}: {got} vs {want}"
        );
    }
    assert!((cosine.beta(200).unwrap() - 0.999).abs() < 1e-15);
}

/// W3 (4,000 steps, as the benchmark, W3 v2's schedule: ᾱ_T ≈ 3e-5, so x_T ~ N(0, I) is
/// q(x_T)): deterministic DDIM in 50 steps from N(0, I) lands within 10 % of DDPM's 200
/// ancestral steps on both `nn_ratio` and `coverage_ratio` when both clip x̂_0 at every step
/// (measured at seed 0: 1.45 / 1.39 against 1.38 / 1.39); with only the final x_0 clipped, DDIM
/// is far worse (1.91) while DDPM barely moves (1.37): x̂_0 = (x_τ − √(1 − ᾱ_τ) ε̂)/√ᾱ_τ
/// amplifies ε̂'s error ~180 times at τ = T, and only DDPM's fresh noise corrects the overshoot.
/// Clipped N(0, I) noise scores ~3.7: both samplers are far from it.
#[test]
fn ddim_in_50_steps_is_within_10_percent_of_ddpm() {
    let digits = load_digits(Scale::Symmetric).unwrap();
    let mut ddpm = Ddpm::digits(DdpmConfig::default()).unwrap();
    ddpm.verbose = false;
    ddpm.train(4000).unwrap();
    let n = 500;
    let quality = |x: &[f32]| {
        (
            nn_ratio(x, &digits).unwrap(),
            coverage_ratio(x, &digits).unwrap(),
        )
    };
    let ddpm_each = quality(&ddpm.sample_clipping(n, 7, true).unwrap());
    let ddpm_last = quality(&ddpm.sample(n, 7).unwrap());
    let mut r = rng(8);
    let start: Vec<f32> = (0..n * 64).map(|_| StandardNormal.sample(&mut r)).collect();
    let ddim_each = quality(&ddpm.sample_ddim_clipping(&start, 50, true).unwrap());
    let ddim_last = quality(&ddpm.sample_ddim_clipping(&start, 50, false).unwrap());
    let noise: Vec<f32> = start.iter().map(|v| v.clamp(-1.0, 1.0)).collect();
    let noise_q = quality(&noise);
    eprintln!(
        "(nn_ratio, coverage): DDPM {ddpm_each:.3?} (final clip only {ddpm_last:.3?}), \
         DDIM-50 {ddim_each:.3?} (final clip only {ddim_last:.3?}), clipped noise {noise_q:.3?}"
    );
    assert!(ddpm_each.0 < 0.5 * noise_q.0 && ddpm_each.1 < 0.6 * noise_q.1);
    for (ddim, ddpm) in [(ddim_each.0, ddpm_each.0), (ddim_each.1, ddpm_each.1)] {
        assert!(
            (ddim - ddpm).abs() <= 0.1 * ddpm,
            "DDIM-50 {ddim} vs DDPM {ddpm}"
        );
    }
    assert!(
        ddim_last.0 > 1.15 * ddim_each.0,
        "clipping x̂_0 every step should matter for DDIM"
    );
    assert!(
        (ddpm_last.0 / ddpm_each.0 - 1.0).abs() < 0.05,
        "and barely for DDPM"
    );
}

#[test]
fn same_seed_same_losses_and_checkpoints_resume_exactly() {
    let data = swiss_roll(500, 0.05, 0).xy;
    let config = DdpmConfig {
        iters: 300,
        batch_size: 64,
        ..DdpmConfig::toy_2d()
    };
    let mut a = Ddpm::points(config.clone(), &data).unwrap();
    let mut b = Ddpm::points(config.clone(), &data).unwrap();
    a.verbose = false;
    b.verbose = false;
    a.train(150).unwrap();
    a.train(150).unwrap();
    b.train(300).unwrap();
    assert_eq!(a.step_losses, b.step_losses);
    assert_eq!(a.denoiser().parameters(), b.denoiser().parameters());

    let path = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("ddpm-checkpoint.json");
    a.save(&path).unwrap();
    let mut loaded = Ddpm::load(&path).unwrap();
    loaded.verbose = false;
    assert_eq!(loaded.denoiser().parameters(), a.denoiser().parameters());
    assert_eq!(loaded.history, a.history);
    assert_eq!(loaded.sample(20, 3).unwrap(), a.sample(20, 3).unwrap());
    loaded.train(100).unwrap();
    a.train(100).unwrap();
    assert_eq!(loaded.step_losses, a.step_losses);
    assert_eq!(loaded.denoiser().parameters(), a.denoiser().parameters());
    assert!(Ddpm::load(path.with_extension("missing")).is_err());
}

#[test]
fn a_non_finite_loss_is_a_diverged_error() {
    let data = swiss_roll(500, 0.05, 0).xy;
    let mut ddpm = Ddpm::points(
        DdpmConfig {
            lr: 1e30,
            ..DdpmConfig::toy_2d()
        },
        &data,
    )
    .unwrap();
    ddpm.verbose = false;
    let err = ddpm.train(200).unwrap_err();
    let genlab::Error::Diverged { step, .. } = err else {
        panic!("expected Diverged, got {err}");
    };
    assert!(step > 0, "the first step is finite");
    assert_eq!(ddpm.steps_done(), step);
    assert!(ddpm.denoiser().parameters().iter().all(|p| p.is_finite()));
}

#[test]
fn bad_settings_name_the_field() {
    let d = DdpmConfig::default;
    for (config, field) in [
        (DdpmConfig { steps: 0, ..d() }, "`steps`"),
        (
            DdpmConfig {
                hidden: vec![],
                ..d()
            },
            "`hidden`",
        ),
        (
            DdpmConfig {
                embedding: 63,
                ..d()
            },
            "`embedding`",
        ),
        (
            DdpmConfig {
                batch_size: 0,
                ..d()
            },
            "`batch_size`",
        ),
        (DdpmConfig { lr: -1.0, ..d() }, "`lr`"),
        (
            DdpmConfig {
                clip: Some(0.0),
                ..d()
            },
            "`clip`",
        ),
        (
            DdpmConfig {
                schedule: Schedule::Linear {
                    beta_start: 1e-4,
                    beta_end: 1.5,
                },
                ..d()
            },
            "`beta_end`",
        ),
    ] {
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains(field), "{field}: {err}");
    }
    let s = NoiseSchedule::new(Schedule::w3(), 200).unwrap();
    assert!(s.alpha_bar(201).unwrap_err().to_string().contains("`t`"));
    let mut ddpm = Ddpm::points(DdpmConfig::toy_2d(), &[[0.0, 0.0]]).unwrap();
    assert!(ddpm
        .sample_ddim(4, 0, 0)
        .unwrap_err()
        .to_string()
        .contains("`steps`"));
    assert!(Ddpm::new(DdpmConfig::toy_2d(), &[1.0, 2.0, 3.0], 2).is_err());
}

/// Schedules: ᾱ_t falls monotonically from near 1; W3's linear schedule (v2: 5e-4 to 0.1)
/// ends at ᾱ_T ≈ 3.0e-5, W3 v1's misconfiguration (1e-4 to 0.02 at T = 200) at ≈ 0.13
/// (≈ e^{−Σβ}, Σβ ≈ 2.01), the cosine one at ≈ 0; the time embedding is W3's.
#[test]
fn schedules_and_embedding() {
    let lin = NoiseSchedule::new(Schedule::w3(), 200).unwrap();
    let v1 = NoiseSchedule::new(Schedule::w3_v1(), 200).unwrap();
    let cos = NoiseSchedule::new(Schedule::cosine(), 200).unwrap();
    for s in [&lin, &v1, &cos] {
        assert!(s.alpha_bars.windows(2).all(|w| w[1] < w[0]));
        assert!(s.snr(1).unwrap() > s.snr(200).unwrap());
    }
    assert_eq!(Schedule::w3(), Schedule::linear_scaled(200));
    assert!(
        (lin.beta(1).unwrap() - 5e-4).abs() < 1e-12 && (lin.beta(200).unwrap() - 0.1).abs() < 1e-12
    );
    let ab_t = lin.alpha_bar(200).unwrap();
    assert!((ab_t - 3.03e-5).abs() < 0.05e-5, "{ab_t}");
    let ab_v1 = v1.alpha_bar(200).unwrap();
    assert!((ab_v1 - 0.134).abs() < 0.005, "{ab_v1}");
    assert!(cos.alpha_bar(200).unwrap() < 1e-4);
    let e = time_embedding(3, 64);
    assert_eq!(e.len(), 64);
    assert!((e[0] - 3f32.sin()).abs() < 1e-6 && (e[32] - 3f32.cos()).abs() < 1e-6);
    let f1 = (-(10000f32).ln() / 32.0).exp();
    assert!((e[1] - (3.0 * f1).sin()).abs() < 1e-6);
}

/// The mixture's score against central differences of its log-density, and Tweedie's ε*
/// against E[ε | x_t] computed by quadrature over x_0 (the posterior of x_0 given x_t is
/// prior × N(x_t; √ᾱ x_0, 1 − ᾱ)).
#[test]
fn mixture_score_and_optimal_eps_match_their_definitions() {
    let data = Mixture1d::new(&[0.3, 0.7], &[-1.0, 1.2], &[0.2, 0.4]).unwrap();
    for x in [-2.0, -1.0, -0.3, 0.0, 0.5, 1.2, 2.5] {
        let h = 1e-5;
        let fd = (data.pdf(x + h).ln() - data.pdf(x - h).ln()) / (2.0 * h);
        assert!(
            (data.score(x) - fd).abs() < 1e-5 * (1.0 + fd.abs()),
            "x = {x}"
        );
    }
    let grid: Vec<f64> = (0..=40_000)
        .map(|i| -6.0 + 12.0 * i as f64 / 40_000.0)
        .collect();
    for alpha_bar in [0.9, 0.5, 0.05] {
        let (a, s) = (f64::sqrt(alpha_bar), f64::sqrt(1.0 - alpha_bar));
        for x_t in [-1.5, 0.0, 0.4, 1.1] {
            // E[ε | x_t] = (x_t − √ᾱ E[x_0 | x_t]) / √(1 − ᾱ).
            let weight = |x0: f64| data.pdf(x0) * genlab::math::normal_pdf(x_t, a * x0, s);
            let (num, den) = grid.iter().fold((0.0, 0.0), |(n, d), &x0| {
                (n + x0 * weight(x0), d + weight(x0))
            });
            let by_quadrature = (x_t - a * num / den) / s;
            let tweedie = data.optimal_eps(alpha_bar, x_t).unwrap();
            assert!(
                (tweedie - by_quadrature).abs() < 1e-6,
                "ᾱ = {alpha_bar}, x_t = {x_t}: {tweedie} vs {by_quadrature}"
            );
        }
    }
}

/// One step x_{t+1} = √α x_t + √β ε_step: the true reverse mean E[x_t | x_{t+1}] (by quadrature
/// of the reverse conditional) is the naive inversion (x_{t+1} − √β ε_step)/√α with ε_step
/// replaced by its posterior mean E[ε_step | x_{t+1}] = √β/√(1 − ᾱ_{t+1})·ε*(x_{t+1}), ε* the
/// optimal prediction of the whole noise: (x_{t+1} − β/√(1 − ᾱ_{t+1})·ε*)/√α, the DDPM mean
/// with ε_θ standing for ε*.
#[test]
fn the_reverse_mean_is_the_naive_inversion_with_the_posterior_mean_noise() {
    let data = Mixture1d::bimodal(1.0, 0.1).unwrap();
    let grid: Vec<f64> = (0..=24_000)
        .map(|i| -3.0 + 6.0 * i as f64 / 24_000.0)
        .collect();
    let dx = grid[1] - grid[0];
    for (alpha_bar_t, alpha) in [(0.95, 0.99), (0.6, 0.9), (0.9, 0.3)] {
        let alpha_bar_next = alpha_bar_t * alpha;
        let beta = 1.0 - alpha;
        for x_next in [-1.0, -0.2, 0.3, 0.9] {
            let q = reverse_conditional_1d(&data, alpha_bar_t, alpha, x_next, &grid).unwrap();
            let mass: f64 = q.iter().sum::<f64>() * dx;
            let mean = grid.iter().zip(&q).map(|(x, p)| x * p).sum::<f64>() * dx / mass;
            let eps_star = data.optimal_eps(alpha_bar_next, x_next).unwrap();
            let ddpm_mean =
                (x_next - beta / (1.0 - alpha_bar_next).sqrt() * eps_star) / alpha.sqrt();
            assert!(
                (mean - ddpm_mean).abs() < 1e-6,
                "ᾱ_t = {alpha_bar_t}, α = {alpha}, x = {x_next}: {mean} vs {ddpm_mean}"
            );
        }
    }
}

/// A small DDPM trained on the 1-D two-mode mixture learns the optimal noise prediction
/// ε*(x_t) = −√(1 − ᾱ_t) ∇log q(x_t) (known in closed form) where the noised data lie: its
/// q-weighted mean error is far below that of predicting ε = 0 (the untrained baseline's
/// kind of error).
#[test]
fn a_one_d_ddpm_learns_the_optimal_noise_prediction() {
    let data = Mixture1d::bimodal(1.0, 0.1).unwrap();
    let xs: Vec<f32> = data
        .sample(4000, 3)
        .unwrap()
        .iter()
        .map(|&v| v as f32)
        .collect();
    let config = DdpmConfig {
        steps: 200,
        schedule: Schedule::linear_scaled(200),
        iters: 3000,
        clip: None,
        ..DdpmConfig::toy_2d()
    };
    let mut ddpm = Ddpm::new(config, &xs, 1).unwrap();
    ddpm.verbose = false;
    ddpm.train(3000).unwrap();
    let grid: Vec<f64> = (0..=300).map(|i| -3.0 + 6.0 * i as f64 / 300.0).collect();
    for t in [10usize, 40, 100] {
        let ab = ddpm.schedule().alpha_bar(t).unwrap();
        let q = data.noised(ab).unwrap();
        let x32: Vec<f32> = grid.iter().map(|&x| x as f32).collect();
        let eps = ddpm.predict_eps(&x32, t).unwrap();
        let (mut err, mut base, mut mass) = (0.0, 0.0, 0.0);
        for (i, &x) in grid.iter().enumerate() {
            let (w, star) = (q.pdf(x), data.optimal_eps(ab, x).unwrap());
            err += w * (eps[i] as f64 - star).abs();
            base += w * star.abs();
            mass += w;
        }
        let (err, base) = (err / mass, base / mass);
        eprintln!("t = {t}: q-weighted |ε_θ − ε*| = {err:.3}, |ε*| = {base:.3}");
        assert!(err < 0.25 * base, "t = {t}: {err:.3} vs {base:.3}");
    }
}

/// The DDPM's bound on −log P(x_0) for data on two levels (−1 and 1, each half the time): any
/// model's average −log P is at least the data's entropy ln 2 (Gibbs' inequality), so the bound
/// must be too, trained or not; training brings it down by several nats; and each step's term
/// is w_t·d·E(ε − ε_θ)² + d·gap_t, the same number [`Ddpm::loss_at`] measures with its own
/// draws.
#[test]
fn the_ddpm_bound_is_above_the_entropy_and_training_lowers_it() {
    let xs: Vec<f32> = (0..2000)
        .map(|i| if i % 2 == 0 { -1.0 } else { 1.0 })
        .collect();
    let config = DdpmConfig {
        steps: 200,
        schedule: Schedule::linear_scaled(200),
        iters: 1500,
        clip: None,
        ..DdpmConfig::toy_2d()
    };
    let mut ddpm = Ddpm::new(config, &xs, 1).unwrap();
    ddpm.verbose = false;
    let test = &xs[..400];
    let before = ddpm.neg_elbo(test, 2, 8, 1).unwrap();
    ddpm.train(1500).unwrap();
    let after = ddpm.neg_elbo(test, 2, 8, 1).unwrap();
    let entropy = 2f64.ln();
    eprintln!(
        "bound untrained {:.3}, trained {:.3} (L_T {:.5}, steps {:.3}, L_0 {:.4}); entropy {entropy:.3}",
        before.total(),
        after.total(),
        after.prior,
        after.steps,
        after.decoder
    );
    for b in [&before, &after] {
        assert!(b.total() >= entropy, "{} < ln 2", b.total());
        let parts = b.prior + b.steps + b.decoder;
        assert!((b.total() - parts).abs() < 1e-12);
        assert!((b.by_t.iter().sum::<f64>() - b.steps - b.decoder).abs() < 1e-9);
    }
    assert!(
        after.total() < before.total() - 3.0,
        "{} vs {}",
        after.total(),
        before.total()
    );
    // L_T in closed form: x_0² = 1 for every row.
    let ab = ddpm.schedule().alpha_bar(200).unwrap();
    let l_t = 0.5 * ((1.0 - ab) + ab - 1.0 - (1.0 - ab).ln());
    assert!(
        (after.prior - l_t).abs() < 1e-12,
        "{} vs {l_t}",
        after.prior
    );
    // Step terms against loss_at (other draws: a Monte Carlo tolerance).
    for t in [2usize, 20, 150] {
        let mse = ddpm.loss_at(test, t, 20_000, 7).unwrap();
        let s = ddpm.schedule();
        let expected = s.elbo_weight(t).unwrap() * mse + s.variance_gap(t).unwrap();
        let got = after.by_t[t - 1];
        eprintln!("t = {t}: L_(t−1) {got:.4} vs w·mse + gap {expected:.4}");
        assert!(
            (got - expected).abs() < 0.1 * expected + 1e-3,
            "t = {t}: {got} vs {expected}"
        );
    }
    // Data off the levels is an error that names the value.
    let err = ddpm.neg_elbo(&[0.3f32], 2, 1, 1).unwrap_err().to_string();
    assert!(err.contains("0.3") && err.contains("levels"), "{err}");
}

/// The independent-pixels baseline against its definition on a 2-pixel toy, and the uniform
/// distribution's d·ln(levels) when every level is equally common.
#[test]
fn independent_levels_nll_matches_a_direct_count() {
    // Pixel 0 takes level 0 three times and level 2 once; pixel 1 always level 1 (3 levels).
    let train = [-1.0f32, 0.0, -1.0, 0.0, -1.0, 0.0, 1.0, 0.0];
    let test = [-1.0f32, 0.0, 1.0, 0.0];
    let got = genlab::diffusion::independent_levels_nll(&train, &test, 2, (-1.0, 1.0), 3).unwrap();
    // Half a count per level: pixel 0 (3.5, 0.5, 1.5)/5.5, pixel 1 (0.5, 4.5, 0.5)/5.5.
    let p = |c: f64| -(c / 5.5f64).ln();
    let expected = 0.5 * ((p(3.5) + p(4.5)) + (p(1.5) + p(4.5)));
    assert!((got - expected).abs() < 1e-12, "{got} vs {expected}");
    let flat: Vec<f32> = (0..17 * 50).map(|i| -1.0 + (i % 17) as f32 / 8.0).collect();
    let uniform =
        genlab::diffusion::independent_levels_nll(&flat, &flat, 1, (-1.0, 1.0), 17).unwrap();
    assert!((uniform - 17f64.ln()).abs() < 1e-9, "{uniform}");
}

/// The samplers' oracle: for Gaussian data N(m, Σ) the optimal noise prediction is known in
/// closed form, E[ε | x_t] = K_t (x_t − √ᾱ_t m) with K_t = √(1 − ᾱ_t) C_t⁻¹,
/// C_t = ᾱ_t Σ + (1 − ᾱ_t) I. Each sampler step is then linear in x_t (plus DDPM's fresh
/// noise), so the mean and covariance of its output follow exactly from x_T ~ N(0, I) by a
/// recursion of 2×2 matrices, for any number of steps. DDPM's ancestral sampler and DDIM, run
/// on exactly the chains the network's samplers run (`sample_ddpm_with`, `sample_ddim_with`),
/// must match that recursion within 5 standard errors of 20,000 samples; and at T = 200 steps
/// the recursion itself is within 3 % (DDPM) and 5 % (DDIM) of the data's Σ (DDIM in 50
/// steps shrinks it by ~10 %: a discretisation error of large steps, printed). A sampler that
/// drops DDPM's fresh noise, or moves x_t by a wrong coefficient, misses by far more than 5
/// standard errors.
#[test]
fn samplers_with_the_exact_noise_prediction_reproduce_gaussian_data() {
    type M = [[f64; 2]; 2];
    fn mul(a: &M, b: &M) -> M {
        [0, 1].map(|i| [0, 1].map(|j| a[i][0] * b[0][j] + a[i][1] * b[1][j]))
    }
    fn tr(a: &M) -> M {
        [[a[0][0], a[1][0]], [a[0][1], a[1][1]]]
    }
    fn apply(a: &M, v: [f64; 2]) -> [f64; 2] {
        [
            a[0][0] * v[0] + a[0][1] * v[1],
            a[1][0] * v[0] + a[1][1] * v[1],
        ]
    }
    let m = [0.5f64, -0.3];
    let cov: M = [[0.30, 0.12], [0.12, 0.20]];
    let schedule = NoiseSchedule::new(Schedule::w3(), 200).unwrap();
    // K_t of the closed form.
    let gain = |t: usize| -> M {
        let ab = schedule.alpha_bar(t).unwrap();
        let c = [
            [ab * cov[0][0] + 1.0 - ab, ab * cov[0][1]],
            [ab * cov[1][0], ab * cov[1][1] + 1.0 - ab],
        ];
        let det = c[0][0] * c[1][1] - c[0][1] * c[1][0];
        let k = (1.0 - ab).sqrt() / det;
        [[k * c[1][1], -k * c[0][1]], [-k * c[1][0], k * c[0][0]]]
    };
    let oracle = |x: &[f32], t: usize| -> genlab::Result<Vec<f32>> {
        let (k, root) = (gain(t), schedule.alpha_bar(t)?.sqrt());
        Ok(x.chunks_exact(2)
            .flat_map(|p| {
                let e = apply(&k, [p[0] as f64 - root * m[0], p[1] as f64 - root * m[1]]);
                [e[0] as f32, e[1] as f32]
            })
            .collect())
    };
    // The exact mean and covariance after the linear steps x' = A x + b (+ σ z).
    let propagate = |steps: &[(M, [f64; 2], f64)]| -> ([f64; 2], M) {
        let (mut mu, mut p): ([f64; 2], M) = ([0.0, 0.0], [[1.0, 0.0], [0.0, 1.0]]);
        for (a, b, var) in steps {
            let am = apply(a, mu);
            mu = [am[0] + b[0], am[1] + b[1]];
            p = mul(&mul(a, &p), &tr(a));
            p[0][0] += var;
            p[1][1] += var;
        }
        (mu, p)
    };
    let ddpm_steps: Vec<(M, [f64; 2], f64)> = (1..=200)
        .rev()
        .map(|t| {
            let (beta, alpha, ab) = (
                schedule.beta(t).unwrap(),
                schedule.alpha(t).unwrap(),
                schedule.alpha_bar(t).unwrap(),
            );
            let (cx, ce) = (1.0 / alpha.sqrt(), beta / (1.0 - ab).sqrt() / alpha.sqrt());
            let k = gain(t);
            let a = [0, 1].map(|i| [0, 1].map(|j| cx * f64::from(u8::from(i == j)) - ce * k[i][j]));
            let km = apply(&k, m);
            let b = [ce * ab.sqrt() * km[0], ce * ab.sqrt() * km[1]];
            (a, b, if t > 1 { beta } else { 0.0 })
        })
        .collect();
    let ddim_steps = |steps: usize| -> Vec<(M, [f64; 2], f64)> {
        let taus: Vec<usize> = (1..=steps)
            .map(|i| ((i * 200) as f64 / steps as f64).round() as usize)
            .collect();
        (0..steps)
            .rev()
            .map(|i| {
                let ab = schedule.alpha_bar(taus[i]).unwrap();
                let ab_next = if i == 0 {
                    1.0
                } else {
                    schedule.alpha_bar(taus[i - 1]).unwrap()
                };
                let (s, root, a_next, s_next) = (
                    (1.0 - ab).sqrt(),
                    ab.sqrt(),
                    ab_next.sqrt(),
                    (1.0 - ab_next).sqrt(),
                );
                let k = gain(taus[i]);
                let a = [0, 1].map(|r| {
                    [0, 1].map(|c| {
                        a_next * (f64::from(u8::from(r == c)) - s * k[r][c]) / root
                            + s_next * k[r][c]
                    })
                });
                let km = apply(&k, m);
                let coef = a_next * s - s_next * root;
                (a, [coef * km[0], coef * km[1]], 0.0)
            })
            .collect()
    };
    let n = 20_000;
    let compare = |name: &str, x: &[f32], (want_mean, want): ([f64; 2], M)| {
        let rows: Vec<[f64; 2]> = x
            .chunks_exact(2)
            .map(|p| [p[0] as f64, p[1] as f64])
            .collect();
        let nf = rows.len() as f64;
        let mean = [0, 1].map(|j| rows.iter().map(|r| r[j]).sum::<f64>() / nf);
        let c = |a: usize, b: usize| {
            rows.iter()
                .map(|r| (r[a] - mean[a]) * (r[b] - mean[b]))
                .sum::<f64>()
                / (nf - 1.0)
        };
        let got = [[c(0, 0), c(0, 1)], [c(1, 0), c(1, 1)]];
        eprintln!(
            "{name}: mean {mean:.4?} vs {want_mean:.4?}, cov {got:.4?} vs {want:.4?} (data {cov:?})"
        );
        for j in 0..2 {
            let se = (want[j][j] / nf).sqrt();
            assert!(
                (mean[j] - want_mean[j]).abs() < 5.0 * se,
                "{name}: mean {j}: {} vs {}",
                mean[j],
                want_mean[j]
            );
            for k in 0..2 {
                let se = ((want[j][j] * want[k][k] + want[j][k].powi(2)) / nf).sqrt();
                assert!(
                    (got[j][k] - want[j][k]).abs() < 5.0 * se,
                    "{name}: cov[{j}][{k}]: {} vs {} (5 SE = {})",
                    got[j][k],
                    want[j][k],
                    5.0 * se
                );
            }
        }
    };
    let near_data = |name: &str, (mu, p): ([f64; 2], M), tolerance: f64| {
        for j in 0..2 {
            assert!((mu[j] - m[j]).abs() < 0.01, "{name}: exact mean {mu:?}");
            for k in 0..2 {
                assert!(
                    (p[j][k] - cov[j][k]).abs() < tolerance * cov[j][j],
                    "{name}: exact cov {p:?}"
                );
            }
        }
    };
    let exact_ddpm = propagate(&ddpm_steps);
    near_data("DDPM, 200 steps", exact_ddpm, 0.03);
    compare(
        "DDPM, 200 steps",
        &sample_ddpm_with(&schedule, 2, n, 4, oracle).unwrap(),
        exact_ddpm,
    );
    let x_t: Vec<f32> = standard_normal(2 * n, 5)
        .iter()
        .map(|&v| v as f32)
        .collect();
    for steps in [200usize, 50] {
        let exact = propagate(&ddim_steps(steps));
        if steps == 200 {
            near_data("DDIM, 200 steps", exact, 0.05);
        }
        let ddim = sample_ddim_with(&schedule, 2, &x_t, steps, oracle).unwrap();
        compare(&format!("DDIM, {steps} steps"), &ddim, exact);
    }
}
