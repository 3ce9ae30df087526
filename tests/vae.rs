//! The VAE learns, is reproducible, checkpoints exactly, and names bad settings.

use genlab::data::{load_digits, Scale};
use genlab::vae::{Likelihood, Vae, VaeConfig};

fn quick(epochs: usize) -> VaeConfig {
    VaeConfig {
        epochs,
        ..VaeConfig::default()
    }
}

/// The bar: the best model that ignores z. A decoder that outputs each pixel's training mean
/// pⱼ (and a posterior equal to the prior, KL = 0) has −ELBO = Σⱼ BCE(pⱼ, xⱼ) on average over
/// the test images. A VAE below it uses its latent code; an untrained one (logits near 0,
/// ~64 ln 2 ≈ 44 nats) is far above it.
fn no_latent_baseline() -> f64 {
    let d = load_digits(Scale::Unit).unwrap();
    let n = d.train.len() as f64;
    let mean: Vec<f64> = (0..64)
        .map(|j| {
            d.train
                .x
                .iter()
                .skip(j)
                .step_by(64)
                .map(|&v| v as f64)
                .sum::<f64>()
                / n
        })
        .map(|p| p.clamp(1e-4, 1.0 - 1e-4))
        .collect();
    let per_image: f64 = d
        .test
        .x
        .chunks(64)
        .map(|x| {
            x.iter()
                .zip(&mean)
                .map(|(&x, &p)| -(x as f64 * p.ln() + (1.0 - x as f64) * (1.0 - p).ln()))
                .sum::<f64>()
        })
        .sum();
    per_image / d.test.len() as f64
}

#[test]
fn a_short_training_beats_the_no_latent_bar() {
    let bar = no_latent_baseline();
    let mut vae = Vae::new(quick(30)).unwrap();
    vae.verbose = false;
    let untrained = vae.test_neg_elbo(10).unwrap();
    vae.train(30).unwrap();
    let trained = vae.test_neg_elbo(10).unwrap();
    eprintln!("bar {bar:.3}, untrained {untrained:.3}, trained 30 epochs {trained:.3}");
    assert!(
        untrained > bar,
        "untrained {untrained} should be above the bar {bar}"
    );
    // Fractional pixels make most of the loss irreducible entropy: the full 100-epoch run
    // reaches ~24.0 against a bar of ~27.1, so 1.5 nats below the bar after 30 epochs is a
    // clear margin (the estimate's own noise is ~0.05 nats).
    assert!(
        trained < bar - 1.5,
        "trained {trained} should be well below the bar {bar}"
    );
}

#[test]
fn same_seed_same_losses_and_split_training_equals_one_run() {
    let mut a = Vae::new(quick(4)).unwrap();
    let mut b = Vae::new(quick(4)).unwrap();
    a.verbose = false;
    b.verbose = false;
    a.train(2).unwrap();
    a.train(2).unwrap();
    b.train(4).unwrap();
    assert_eq!(a.step_losses, b.step_losses);
    assert_eq!(a.history, b.history);
    assert_eq!(a.parameters().unwrap(), b.parameters().unwrap());
    let mut c = Vae::new(VaeConfig {
        seed: 1,
        ..quick(1)
    })
    .unwrap();
    c.verbose = false;
    c.train(1).unwrap();
    assert_ne!(c.step_losses[..14], a.step_losses[..14]);
}

#[test]
fn checkpoint_round_trip_gives_identical_outputs() {
    let mut vae = Vae::new(VaeConfig {
        latent: 2,
        hidden: 128,
        ..quick(2)
    })
    .unwrap();
    vae.verbose = false;
    vae.train(2).unwrap();
    let path = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("vae-checkpoint.json");
    vae.save(&path).unwrap();
    let mut loaded = Vae::load(&path).unwrap();
    loaded.verbose = false;
    assert_eq!(loaded.parameters().unwrap(), vae.parameters().unwrap());
    assert_eq!(loaded.history, vae.history);
    let x = &vae.data().test.x[..64 * 5];
    assert_eq!(loaded.reconstruct(x).unwrap(), vae.reconstruct(x).unwrap());
    assert_eq!(loaded.sample(4, 9).unwrap(), vae.sample(4, 9).unwrap());
    // Resuming continues exactly as if training had never stopped (Adam's moments, the
    // shuffling and the noise are restored).
    loaded.train(1).unwrap();
    assert_eq!(loaded.epochs_done(), 3);
    vae.train(1).unwrap();
    assert_eq!(loaded.step_losses, vae.step_losses);
    assert_eq!(loaded.parameters().unwrap(), vae.parameters().unwrap());
    // The resumed epoch's record (its test −ELBO draws its noise from the epoch count) too.
    assert_eq!(loaded.history.len(), 3);
    assert_eq!(loaded.history, vae.history);
    assert!(Vae::load(path.with_extension("missing")).is_err());
}

#[test]
fn bad_configs_name_the_field() {
    for (config, field) in [
        (
            VaeConfig {
                latent: 0,
                ..quick(1)
            },
            "`latent`",
        ),
        (
            VaeConfig {
                hidden: 100_000,
                ..quick(1)
            },
            "`hidden`",
        ),
        (
            VaeConfig {
                beta: -1.0,
                ..quick(1)
            },
            "`beta`",
        ),
        (
            VaeConfig {
                batch_size: 0,
                ..quick(1)
            },
            "`batch_size`",
        ),
        (
            VaeConfig {
                lr: 0.0,
                ..quick(1)
            },
            "`lr`",
        ),
        (
            VaeConfig {
                likelihood: Likelihood::Gaussian { std: 0.0 },
                ..quick(1)
            },
            "`likelihood.std`",
        ),
    ] {
        let err = Vae::new(config).err().unwrap().to_string();
        assert!(err.contains(field), "{err}");
    }
    let vae = Vae::new(quick(1)).unwrap();
    assert!(vae.decode(&[0.0; 5]).is_err());
    assert!(vae.encode(&[]).is_err());
}

/// log (1/K) Σₖ wₖ against the ELBO on 20 test images: at K = 1 it is the ELBO (one draw
/// of it: equal in expectation), and it rises with K, by a few nats at most.
#[test]
fn importance_weighted_bound_is_above_the_elbo() {
    use genlab::elbo::mean_and_standard_error;
    let mut vae = Vae::new(quick(5)).unwrap();
    vae.verbose = false;
    vae.train(5).unwrap();
    let test = vae.data().test.clone();
    let n = 20;
    let x = &test.x[..64 * n];
    let sub = genlab::data::Images {
        x: x.to_vec(),
        labels: test.labels[..n].to_vec(),
        dim: 64,
    };
    // The ELBO of each image, averaged over 2000 draws of ε (its KL term is exact).
    let elbo: Vec<f64> = vae
        .neg_elbo_per_image(&sub, 2000)
        .unwrap()
        .iter()
        .map(|l| -l)
        .collect();
    let elbo_mean = elbo.iter().sum::<f64>() / n as f64;
    // IWAE(K) − ELBO averaged over the images, each image over `seeds` seeds, with its
    // standard error from the spread between seeds (the images are fixed, not sampled).
    let gap = |k: usize, seeds: u64| -> (f64, f64) {
        let runs: Vec<Vec<f64>> = (0..seeds)
            .map(|s| vae.log_likelihood_iwae(x, k, 1000 + s).unwrap())
            .collect();
        let (mut mean, mut var) = (0.0, 0.0);
        for (i, e) in elbo.iter().enumerate() {
            let d: Vec<f64> = runs.iter().map(|r| r[i] - e).collect();
            let (m, se) = mean_and_standard_error(&d);
            mean += m / n as f64;
            var += se * se / (n * n) as f64;
        }
        (mean, var.sqrt())
    };
    let (gap1, se1) = gap(1, 400);
    let (gap2, se2) = gap(2, 200);
    let (gap10, se10) = gap(10, 100);
    let (gap200, se200) = gap(200, 20);
    eprintln!(
        "ELBO {elbo_mean:.3}; IWAE − ELBO: K=1 {gap1:.4} ± {se1:.4}, K=2 {gap2:.4} ± {se2:.4}, \
         K=10 {gap10:.4} ± {se10:.4}, K=200 {gap200:.4} ± {se200:.4}"
    );
    // K = 1: the same estimator as the ELBO (4.5 standard errors: the ELBO's own 2000-draw
    // average adds a little noise of its own).
    assert!(
        gap1.abs() < 4.5 * se1,
        "K = 1 should equal the ELBO: differs by {gap1} ± {se1}"
    );
    // Rises with K: measured 0.00, 0.05, 0.10 and 0.10 nats at K = 1, 2, 10, 200 (by K = 10
    // this q is nearly exhausted, so 200 need only not fall).
    let apart = |a: (f64, f64), b: (f64, f64)| b.0 - a.0 > 4.0 * (a.1 * a.1 + b.1 * b.1).sqrt();
    assert!(
        apart((gap1, se1), (gap2, se2))
            && apart((gap2, se2), (gap10, se10))
            && gap200 > gap10 - 4.0 * (se10 * se10 + se200 * se200).sqrt(),
        "the bound should rise with K: {gap1} ± {se1}, {gap2} ± {se2}, {gap10} ± {se10}, \
         {gap200} ± {se200}"
    );
    // Above the ELBO, but by well under a nat (measured 0.10; a bound that forgot the 1/K
    // would be ln 200 ≈ 5.3 nats higher).
    assert!(
        gap200 > 4.0 * se200 && gap200 < 1.0,
        "IWAE(200) − ELBO = {gap200} ± {se200} should lie in (0, 1) nats"
    );
}

/// A VAE on the 8-Gaussian ring (`Vae::with_data`, Gaussian likelihood at the modes' own
/// σ = 0.02): its samples cover every mode (an untrained one's sit near the origin and cover
/// none), but many fall between modes (chapter 4's comparison with the GAN).
#[test]
fn a_vae_on_the_ring_covers_every_mode_but_not_sharply() {
    let train = genlab::data::ring8(5000, 0.02, 100);
    let test = genlab::data::ring8(500, 0.02, 200);
    let config = VaeConfig {
        latent: 2,
        hidden: 128,
        batch_size: 100,
        lr: 1e-3,
        epochs: 120,
        likelihood: Likelihood::Gaussian { std: 0.02 },
        ..VaeConfig::default()
    };
    let mut vae = Vae::with_data(config, train.images(), test.images()).unwrap();
    vae.verbose = false;
    let z: Vec<f32> = genlab::diffusion::standard_normal(2500 * 2, 9)
        .iter()
        .map(|&v| v as f32)
        .collect();
    let untrained = genlab::gan::ring_metrics(&vae.decode_draws(&z, 3).unwrap()).unwrap();
    vae.train(120).unwrap();
    let m = genlab::gan::ring_metrics(&vae.decode_draws(&z, 3).unwrap()).unwrap();
    eprintln!("untrained {untrained:?}\ntrained {m:?}");
    assert_eq!(untrained.modes, 0);
    assert!(m.modes >= 7, "{m:?}");
    assert!(m.high_quality < 0.6, "{m:?}");
    // The ring is not on grey levels: the discrete bound says so instead of computing nonsense.
    let err = vae
        .discrete_bound(&test.images(), 17, 1, 1)
        .unwrap_err()
        .to_string();
    assert!(err.contains("levels"), "{err}");
    // Points and a Bernoulli likelihood do not mix.
    let bad = Vae::with_data(VaeConfig::default(), train.images(), test.images());
    assert!(bad.is_err_and(|e| e.to_string().contains("Gaussian")));
}

/// The discrete bound of a VAE on the 17 grey levels: trained below untrained by a wide margin,
/// and at least 0 (a bound on −log of a probability); its σ's come from the allowed grid.
#[test]
fn the_discrete_bound_falls_with_training() {
    let d = load_digits(Scale::Unit).unwrap();
    let mut vae = Vae::new(quick(5)).unwrap();
    vae.verbose = false;
    let before = vae.discrete_bound(&d.test, 17, 2, 1).unwrap();
    vae.train(5).unwrap();
    let after = vae.discrete_bound(&d.test, 17, 2, 1).unwrap();
    eprintln!(
        "untrained {:.2}, trained {:.2} (rec {:.2}, KL {:.2})",
        before.total(),
        after.total(),
        after.reconstruction,
        after.kl
    );
    assert!(after.total() >= 0.0 && after.total() < before.total() - 10.0);
    assert_eq!(after.stds.len(), 64);
    assert!(after.stds.iter().all(|&s| (1e-3..=1.0 + 1e-9).contains(&s)));
}

/// The evaluation path (`neg_elbo_per_image`, `log_likelihood_iwae`, `no_latent_baseline`)
/// against plain loops over the public `encode` and `decode`, for each likelihood, on models
/// trained long enough that their KL is a couple of nats (a KL or a likelihood computed wrong
/// by a factor shows): the KL in closed form from (μ, log σ²), the reconstruction averaged
/// over 200 draws of z per image; IWAE with K = 1 is an unbiased estimate of the same ELBO
/// (averaged over 20 seeds) and with K = 50 lies above it; the no-latent bar from each
/// pixel's training mean.
#[test]
fn evaluation_matches_plain_loops_for_every_likelihood() {
    use rand::SeedableRng;
    use rand_distr::{Distribution, StandardNormal};
    let n = 100;
    for likelihood in [
        Likelihood::Bernoulli,
        Likelihood::BinarisedBernoulli,
        Likelihood::Gaussian { std: 0.1 },
    ] {
        let mut vae = Vae::new(VaeConfig {
            likelihood,
            ..quick(30)
        })
        .unwrap();
        vae.verbose = false;
        vae.train(30).unwrap();
        let test = &vae.data().test;
        let images = genlab::data::Images {
            x: test.x[..n * 64].to_vec(),
            labels: test.labels[..n].to_vec(),
            dim: 64,
        };
        // −log p(x | decoder mean) of one pixel, written out for each likelihood.
        let nll = |x: f64, mean: f64| match likelihood {
            Likelihood::Gaussian { std } => {
                0.5 * ((x - mean) / std).powi(2) + (std * (2.0 * std::f64::consts::PI).sqrt()).ln()
            }
            _ => {
                let p = mean.clamp(1e-7, 1.0 - 1e-7);
                -(x * p.ln() + (1.0 - x) * (1.0 - p).ln())
            }
        };
        let engine: f64 = vae
            .neg_elbo_per_image(&images, 50)
            .unwrap()
            .iter()
            .sum::<f64>()
            / n as f64;
        let (mu, log_var) = vae.encode(&images.x).unwrap();
        let l = vae.config().latent;
        let kl: f64 = mu
            .iter()
            .zip(&log_var)
            .map(|(&m, &lv)| {
                let (m, lv) = (m as f64, lv as f64);
                0.5 * (m * m + lv.exp() - 1.0 - lv)
            })
            .sum::<f64>()
            / n as f64;
        let draws = 200;
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let mut z = Vec::with_capacity(n * draws * l);
        for i in 0..n {
            for _ in 0..draws {
                for j in 0..l {
                    let e: f64 = StandardNormal.sample(&mut rng);
                    let k = i * l + j;
                    z.push((mu[k] as f64 + (0.5 * log_var[k] as f64).exp() * e) as f32);
                }
            }
        }
        let means = vae.decode(&z).unwrap();
        let rec: f64 = means
            .chunks_exact(64)
            .enumerate()
            .map(|(r, row)| {
                let x = &images.x[(r / draws) * 64..(r / draws + 1) * 64];
                x.iter()
                    .zip(row)
                    .map(|(&x, &m)| nll(x as f64, m as f64))
                    .sum::<f64>()
            })
            .sum::<f64>()
            / (n * draws) as f64;
        let iwae_1: f64 = (0..20)
            .map(|s| {
                vae.log_likelihood_iwae(&images.x, 1, s)
                    .unwrap()
                    .iter()
                    .sum::<f64>()
                    / n as f64
            })
            .sum::<f64>()
            / 20.0;
        let iwae_50: f64 = vae
            .log_likelihood_iwae(&images.x, 50, 3)
            .unwrap()
            .iter()
            .sum::<f64>()
            / n as f64;
        // The bar: each pixel's training mean as the decoder's output, KL = 0.
        let train = &vae.data().train;
        let pixel_mean: Vec<f64> = (0..64)
            .map(|j| {
                train
                    .x
                    .iter()
                    .skip(j)
                    .step_by(64)
                    .map(|&v| v as f64)
                    .sum::<f64>()
                    / train.len() as f64
            })
            .map(|p| match likelihood {
                Likelihood::Gaussian { .. } => p,
                _ => p.clamp(1e-4, 1.0 - 1e-4),
            })
            .collect();
        let bar: f64 = test
            .x
            .chunks_exact(64)
            .map(|x| {
                x.iter()
                    .zip(&pixel_mean)
                    .map(|(&x, &m)| nll(x as f64, m))
                    .sum::<f64>()
            })
            .sum::<f64>()
            / test.len() as f64;
        eprintln!(
            "{likelihood:?}: engine {engine:.3}; plain loop {rec:.3} + KL {kl:.3} = {:.3}; \
             −IWAE K=1 {:.3}, K=50 {:.3}; bar {:.3} vs {bar:.3}",
            rec + kl,
            -iwae_1,
            -iwae_50,
            vae.no_latent_baseline()
        );
        let tolerance = match likelihood {
            Likelihood::Gaussian { .. } => 1.0,
            _ => 0.3,
        };
        assert!(
            kl > 1.5,
            "{likelihood:?}: the model should use its code: KL {kl:.3}"
        );
        assert!(
            (engine - (rec + kl)).abs() < tolerance,
            "{likelihood:?}: {engine:.3} vs {:.3}",
            rec + kl
        );
        assert!(
            (-iwae_1 - engine).abs() < tolerance,
            "{likelihood:?}: IWAE K=1 {:.3} vs {engine:.3}",
            -iwae_1
        );
        assert!(
            -iwae_50 < engine,
            "{likelihood:?}: IWAE K=50 {:.3} vs {engine:.3}",
            -iwae_50
        );
        assert!(
            (vae.no_latent_baseline() - bar).abs() < 1e-6 * bar.abs().max(1.0),
            "{likelihood:?}: bar"
        );
    }
}

/// Chapter 3's claims about its models, each at a size that trains in seconds: every
/// likelihood's model beats its own no-latent bar, so does a 2-D latent, and β = 32 collapses
/// the posterior (KL near 0, samples alike) where β = 1 does not.
fn trained(config: VaeConfig) -> Vae {
    let mut vae = Vae::new(config).unwrap();
    vae.verbose = false;
    vae.train(config.epochs).unwrap();
    vae
}

#[test]
fn each_likelihood_and_a_two_d_latent_beat_their_bars() {
    for (name, likelihood, latent) in [
        ("grey Bernoulli", Likelihood::Bernoulli, 8),
        ("binarised Bernoulli", Likelihood::BinarisedBernoulli, 8),
        ("Gaussian σ = 0.1", Likelihood::Gaussian { std: 0.1 }, 8),
        ("grey Bernoulli, 2-D latent", Likelihood::Bernoulli, 2),
    ] {
        let vae = trained(VaeConfig {
            likelihood,
            latent,
            ..quick(30)
        });
        let (bar, got) = (vae.no_latent_baseline(), vae.test_neg_elbo(10).unwrap());
        eprintln!(
            "{name}: −ELBO {got:.3}, bar {bar:.3}, gain {:.3}",
            bar - got
        );
        assert!(got < bar - 1.0, "{name}: {got:.3} vs bar {bar:.3}");
    }
}

#[test]
fn beta_32_collapses_the_posterior_and_beta_1_does_not() {
    // Per-pixel standard deviation across 30 samples, averaged over the pixels.
    let spread = |vae: &Vae| -> f64 {
        let s = vae.sample(30, 0).unwrap();
        (0..64)
            .map(|j| {
                let col: Vec<f64> = s.iter().skip(j).step_by(64).map(|&v| v as f64).collect();
                let m = col.iter().sum::<f64>() / 30.0;
                (col.iter().map(|v| (v - m).powi(2)).sum::<f64>() / 30.0).sqrt()
            })
            .sum::<f64>()
            / 64.0
    };
    let one = trained(quick(30));
    let collapsed = trained(VaeConfig {
        beta: 32.0,
        ..quick(30)
    });
    let (kl_1, kl_32) = (
        one.history.last().unwrap().kl,
        collapsed.history.last().unwrap().kl,
    );
    let (s1, s32) = (spread(&one), spread(&collapsed));
    eprintln!("β = 1: KL {kl_1:.3}, spread {s1:.4}; β = 32: KL {kl_32:.4}, spread {s32:.4}");
    assert!(kl_1 > 2.0 && kl_32 < 0.1, "KL {kl_1} vs {kl_32}");
    assert!(s32 < 0.2 * s1, "spread {s32} vs {s1}");
}
