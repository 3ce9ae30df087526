//! Numbers chapters 2 and 3 show about the notes' claims: the ELBO's two forms, the no-latent
//! bar and the entropy floor of grey pixels, binarised digits, draws from p(x|z) against its
//! means, and the amortisation gap.

use genlab::elbo::{elbo_exact, elbo_terms, Gaussian, LatentModel, Link};
use genlab::vae::{bernoulli_entropy_floor, Likelihood, Vae, VaeConfig};

/// E_q[log p(x|z)] − KL(q ‖ p(z)) = E_q[log p(x, z) − log q(z)] for good and bad q.
#[test]
fn the_elbos_two_forms_agree() {
    let model = LatentModel::simulate(Link::Cubic, 0.8, 0.9, 5, 0).unwrap();
    for (m, s) in [(0.5, 0.3), (0.0, 1.0), (-2.0, 0.2), (2.5, 3.0)] {
        let q = Gaussian::new(m, s).unwrap();
        let (ll, kl) = elbo_terms(&model, &q);
        let elbo = elbo_exact(&model, &q);
        assert!(kl >= 0.0, "KL {kl}");
        assert!(
            (ll - kl - elbo).abs() < 1e-8 * elbo.abs().max(1.0),
            "{ll} − {kl} vs {elbo}"
        );
    }
}

/// The bar a VAE must pass (~27.1 nats on grey digits), the floor no Bernoulli decoder can pass
/// (the grey targets' entropy), and the binarised data (0/1 pixels, floor 0, its own bar).
#[test]
fn baseline_floor_and_binarised_digits() {
    let grey = Vae::new(VaeConfig::default()).unwrap();
    let bar = grey.no_latent_baseline();
    assert!((bar - 27.1).abs() < 0.2, "grey no-latent bar {bar}");
    let floor = bernoulli_entropy_floor(&grey.data().test);
    assert!(floor > 10.0 && floor < bar - 3.0, "entropy floor {floor}");
    let untrained = grey.test_neg_elbo(10).unwrap();
    assert!(untrained > bar, "untrained {untrained} vs bar {bar}");

    let binary = Vae::new(VaeConfig {
        likelihood: Likelihood::BinarisedBernoulli,
        ..VaeConfig::default()
    })
    .unwrap();
    let d = binary.data();
    assert!(d
        .train
        .x
        .iter()
        .chain(&d.test.x)
        .all(|&v| v == 0.0 || v == 1.0));
    // About a third of the pixels are on; the split is the same as the grey one.
    let on = d.test.x.iter().filter(|&&v| v == 1.0).count() as f64 / d.test.x.len() as f64;
    assert!(on > 0.2 && on < 0.5, "share of 1s {on}");
    assert_eq!(d.test.labels, grey.data().test.labels);
    assert_eq!(bernoulli_entropy_floor(&d.test), 0.0);
    // Its own bar: each pixel's training share of 1s p̄ⱼ (clamped to [1e-4, 1 − 1e-4]), and the
    // test images' mean −Σⱼ [xⱼ log p̄ⱼ + (1 − xⱼ) log(1 − p̄ⱼ)], here in a plain loop.
    let bar_binary = binary.no_latent_baseline();
    let dim = 64;
    let rows = d.train.x.len() / dim;
    let share: Vec<f64> = (0..dim)
        .map(|j| {
            let on = (0..rows).filter(|&i| d.train.x[i * dim + j] == 1.0).count();
            (on as f64 / rows as f64).clamp(1e-4, 1.0 - 1e-4)
        })
        .collect();
    let tests = d.test.x.len() / dim;
    let plain = (0..tests)
        .map(|i| {
            (0..dim)
                .map(|j| match d.test.x[i * dim + j] == 1.0 {
                    true => -share[j].ln(),
                    false => -(1.0 - share[j]).ln(),
                })
                .sum::<f64>()
        })
        .sum::<f64>()
        / tests as f64;
    assert!(
        (bar_binary - plain).abs() < 1e-4 * plain,
        "binary bar {bar_binary} vs {plain} from the pixel shares"
    );
    eprintln!("binarised digits: bar {bar_binary:.2} nats (grey {bar:.2})");
}

/// Training on binarised digits learns (it passes its own bar by a wide margin); draws from
/// p(x|z) are 0/1 pixels whose average is the decoder's mean; the encoder's q is improved on by
/// a per-image q (the amortisation gap is positive) and no q passes the IWAE estimate of
/// log p(x) by more than noise; and a reloaded checkpoint resumes to the same history.
#[test]
fn binarised_training_draws_amortisation_gap_and_resume() {
    let mut vae = Vae::new(VaeConfig {
        likelihood: Likelihood::BinarisedBernoulli,
        epochs: 42,
        ..VaeConfig::default()
    })
    .unwrap();
    vae.verbose = false;
    vae.train(40).unwrap();
    let bar = vae.no_latent_baseline();
    let trained = vae.test_neg_elbo(10).unwrap();
    eprintln!("binarised: bar {bar:.3}, trained 40 epochs {trained:.3}");
    assert!(trained < bar - 3.0, "{trained} vs bar {bar}");

    let z = vec![0.3f32; 8];
    let mean = vae.decode(&z).unwrap();
    let reps = 4000;
    let zs: Vec<f32> = z.iter().copied().cycle().take(8 * reps).collect();
    let draws = vae.decode_draws(&zs, 5).unwrap();
    assert!(draws.iter().all(|&v| v == 0.0 || v == 1.0));
    for (j, &m) in mean.iter().enumerate() {
        let avg = draws.iter().skip(j).step_by(64).sum::<f32>() / reps as f32;
        // Standard error of a Bernoulli mean over 4,000 draws is at most 0.008.
        assert!((avg - m).abs() < 0.04, "pixel {j}: draws {avg} vs mean {m}");
    }

    let x = vae.data().test.x[..64 * 8].to_vec();
    let gap = vae.amortisation_gap(&x, 200, 3).unwrap();
    let gaps = gap.gaps();
    let mean_gap = gaps.iter().sum::<f64>() / gaps.len() as f64;
    let log_px = vae.log_likelihood_iwae(&x, 2000, 4).unwrap();
    eprintln!("amortisation gaps {gaps:.3?}, mean {mean_gap:.3}");
    assert!(mean_gap > 0.05, "mean amortisation gap {mean_gap}");
    for ((o, e), lp) in gap
        .optimised_elbo
        .iter()
        .zip(&gap.encoder_elbo)
        .zip(&log_px)
    {
        assert!(o > &(e - 0.1), "optimised {o} below encoder {e}");
        assert!(o < &(lp + 0.3), "optimised ELBO {o} above log p(x) ≈ {lp}");
    }

    let path = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("notes-vae.json");
    vae.save(&path).unwrap();
    let mut resumed = Vae::load(&path).unwrap();
    resumed.verbose = false;
    resumed.train(2).unwrap();
    vae.train(2).unwrap();
    assert_eq!(resumed.history, vae.history);
    assert_eq!(resumed.parameters().unwrap(), vae.parameters().unwrap());
}
