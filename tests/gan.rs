//! The GAN learns the ring, its discriminator approaches the optimal D*, a collapsing setting
//! loses modes that PacGAN packing recovers, and a diverging run is an error, not a panic.

use genlab::gan::{optimal_discriminator, Gan, GanConfig, GanData};
use genlab::Error;

/// Trains W2 with `config` and returns (modes, high quality) on 2,500 samples.
fn ring_modes(config: GanConfig) -> (usize, f64) {
    let mut gan = Gan::new(config, GanData::ring()).unwrap();
    gan.verbose = false;
    gan.metrics_every = 0;
    gan.train(config.iterations).unwrap();
    let m = gan.ring_metrics(2500, 1).unwrap();
    (m.modes, m.high_quality)
}

/// With G held fixed, D trained alone approaches D*(x) = p_data / (p_data + p_g); p_g is
/// computed exactly from the frozen generator (`generator_density_1d`), and checked here
/// against an independent reference: a histogram of 400,000 of G's samples, bin by bin within
/// 5 standard errors (binomial counts) plus 2 % of the density for the z grid.
#[test]
fn trained_discriminator_approaches_the_optimal_one() {
    let data = GanData::Mixture1d {
        weights: vec![0.5, 0.5],
        means: vec![-1.5, 1.5],
        stds: vec![0.5, 0.5],
    };
    let config = GanConfig {
        latent: 1,
        ..GanConfig::default()
    };
    let mut gan = Gan::new(config, data.clone()).unwrap();
    gan.verbose = false;
    // A short W2-style run puts p_g partly over p_data, so D* ranges widely.
    gan.train(300).unwrap();
    let (xs, p_g) = gan.generator_density_1d(-4.0, 4.0, 160).unwrap();
    let n = 400_000;
    let mut counts = [0usize; 160];
    for &x in &gan.sample(n, 7).unwrap() {
        let k = ((x as f64 + 4.0) / 0.05).floor();
        if (0.0..160.0).contains(&k) {
            counts[k as usize] += 1;
        }
    }
    let mut worst: f64 = 0.0;
    for (k, (&c, &p)) in counts.iter().zip(&p_g).enumerate() {
        let mass = c as f64 / n as f64;
        let se = (mass.max(1.0 / n as f64) * (1.0 - mass) / n as f64).sqrt() / 0.05;
        let off = (mass / 0.05 - p).abs();
        worst = worst.max(off / (5.0 * se + 0.02 * p));
        assert!(
            off < 5.0 * se + 0.02 * p,
            "bin {k} at {:.3}: p_g {p:.4} vs histogram {:.4} (SE {se:.4})",
            xs[k],
            mass / 0.05
        );
    }
    eprintln!("p_g against the histogram: worst bin at {worst:.2} of its tolerance");
    let grid: Vec<f32> = xs.iter().map(|&x| x as f32).collect();
    // Mean |D − D*| weighted by ½(p_data + p_g), the mixture D is trained on.
    let error = |d: &[f32]| {
        let (mut w, mut total) = (0.0, 0.0);
        for i in 0..xs.len() {
            let p_data = data.density_1d(xs[i]).unwrap();
            let wi = 0.5 * (p_data + p_g[i]);
            w += wi;
            total += wi * (d[i] as f64 - optimal_discriminator(p_data, p_g[i])).abs();
        }
        total / w
    };
    let spread = error(&vec![0.5; xs.len()]);
    let before = error(&gan.discriminate(&grid).unwrap());
    // D alone, with a larger step than W2's so that a few thousand steps converge, then a
    // smaller one to settle (the minibatch noise in D scales with the step).
    let g_before = gan.generator().parameters().to_vec();
    gan.set_learning_rates(2e-4, 2e-3).unwrap();
    gan.train_discriminator(3000).unwrap();
    gan.set_learning_rates(2e-4, 4e-4).unwrap();
    gan.train_discriminator(1500).unwrap();
    assert_eq!(
        gan.generator().parameters(),
        &g_before[..],
        "G must stay fixed"
    );
    let after = error(&gan.discriminate(&grid).unwrap());
    eprintln!("mean |D − D*|: D = ½ {spread:.4}, D after the GAN run {before:.4}, after D alone {after:.4}");
    assert!(spread > 0.15, "this G should make D* far from ½");
    // The tolerance: D keeps moving with the minibatch noise (at lr 2e-3 alone its error went
    // 0.027, 0.018, 0.024 at 4,000, 6,000, 8,000 steps when this was written; with the smaller
    // final step it is 0.030 here), and a smooth D cannot follow D*'s jumps at the edges of
    // p_g's support (the largest errors sit there). 0.05 is above that floor and under a third
    // of the error of D = ½ (0.19).
    assert!(after < 0.05, "mean |D − D*| = {after}");
    assert!(
        after < before,
        "D-only training should bring D closer to D*"
    );
}

/// `Gan::generate` maps latent points the caller chooses (the chapter draws circles of z through
/// G): a batch gives what each row gives alone (up to the kernels' rounding, which depends on
/// the number of rows), and a wrong width or a non-finite z is an error, not a panic.
#[test]
fn generate_maps_chosen_latent_points_row_by_row() {
    let gan = Gan::new(GanConfig::default(), GanData::ring()).unwrap();
    let z = [0.0f32, 0.0, 1.0, -0.5, -2.0, 1.5];
    let all = gan.generate(&z).unwrap();
    assert_eq!(all.len(), 6);
    for (row, x) in z.chunks_exact(2).zip(all.chunks_exact(2)) {
        let alone = gan.generate(row).unwrap();
        for (a, b) in alone.iter().zip(x) {
            assert!(
                (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                "{alone:?} vs {x:?}"
            );
        }
    }
    assert!(gan.generate(&[0.0, 0.0, 1.0]).is_err());
    assert!(gan.generate(&[f32::NAN, 0.0]).is_err());
}

/// An absurd learning rate: the loss stops being finite, training returns `Diverged` naming the
/// iteration, and both networks keep finite parameters and still sample.
#[test]
fn an_absurd_learning_rate_is_an_error_and_the_models_stay_usable() {
    let config = GanConfig {
        g_lr: 1e30,
        d_lr: 1e30,
        ..GanConfig::default()
    };
    let mut gan = Gan::new(config, GanData::ring()).unwrap();
    gan.verbose = false;
    let err = gan.train(100).unwrap_err();
    let Error::Diverged { step, .. } = err else {
        panic!("expected Diverged, got {err}");
    };
    let text = err.to_string();
    assert!(
        text.contains(&format!("iteration {step}")) && text.contains("learning rate"),
        "{text}"
    );
    assert!(gan.generator().parameters().iter().all(|p| p.is_finite()));
    assert!(gan
        .discriminator()
        .parameters()
        .iter()
        .all(|p| p.is_finite()));
    assert!(gan.sample(10, 0).unwrap().len() == 20);
    assert!(gan.discriminate(&[0.0, 0.0]).is_ok());
    // Smaller steps, and training goes on from where it stopped.
    gan.set_learning_rates(2e-4, 2e-4).unwrap();
    let f32_max = gan.sample(10, 0).unwrap().iter().all(|v| v.is_finite());
    assert!(f32_max);
    // Even an lr that overflows f32 itself (every update would be infinite) is undone.
    let mut gan = Gan::new(
        GanConfig {
            d_lr: 1e300,
            ..GanConfig::default()
        },
        GanData::ring(),
    )
    .unwrap();
    gan.verbose = false;
    let err = gan.train(10).unwrap_err();
    assert!(matches!(err, Error::Diverged { step: 1, .. }), "{err}");
    assert!(err.to_string().contains("d_lr"), "{err}");
    assert!(gan
        .discriminator()
        .parameters()
        .iter()
        .all(|p| p.is_finite()));
}

/// W2 as specified: PyTorch's reference covers 8 of 8 modes at seed 0; so must we, and at least
/// 7 at another seed (an untrained generator covers none: its samples sit near one point).
#[test]
fn the_plain_gan_covers_the_ring_at_w2_settings() {
    let (modes, hq) = ring_modes(GanConfig::default());
    eprintln!("W2 seed 0: {modes} modes, high quality {hq:.3}");
    assert_eq!(modes, 8, "seed 0");
    let (modes, hq) = ring_modes(GanConfig {
        seed: 2,
        ..GanConfig::default()
    });
    eprintln!("W2 seed 2: {modes} modes, high quality {hq:.3}");
    assert!(modes >= 7, "seed 2: {modes} modes");
}

/// A few generator steps through the public `g_step`, with D trained a little first and then
/// frozen, raise D(G(z)) on a fixed set of z for both losses: each pushes the fakes toward
/// "real" (the minimax loss with a small gradient, which Adam rescales). A loss whose sign
/// is flipped lowers it instead.
#[test]
fn generator_steps_raise_d_of_g_for_both_losses() {
    use genlab::gan::GanLoss;
    let z: Vec<f32> = genlab::diffusion::standard_normal(1024 * 2, 5)
        .iter()
        .map(|&v| v as f32)
        .collect();
    for loss in [GanLoss::NonSaturating, GanLoss::Minimax] {
        let config = GanConfig {
            loss,
            seed: 3,
            g_lr: 1e-3,
            ..GanConfig::default()
        };
        let mut gan = Gan::new(config, GanData::ring()).unwrap();
        gan.verbose = false;
        gan.train_discriminator(100).unwrap();
        let mean_d = |gan: &Gan| -> f64 {
            let d = gan.discriminate(&gan.generate(&z).unwrap()).unwrap();
            d.iter().map(|&v| v as f64).sum::<f64>() / d.len() as f64
        };
        let before = mean_d(&gan);
        let team = genlab::mlp::Team::new(1);
        for i in 0..10 {
            gan.g_step(&team, i).unwrap();
        }
        let after = mean_d(&gan);
        eprintln!("{loss:?}: mean D(G(z)) {before:.4} → {after:.4}");
        assert!(after > before + 0.01, "{loss:?}: {before:.4} → {after:.4}");
    }
}

/// Chapter 4's 1-D GAN learns: the Jensen–Shannon divergence between p_g (exact on a grid,
/// from the frozen generator) and the two-mode data falls from the untrained generator's to
/// a small fraction of it after the chapter's 4,000 iterations.
#[test]
fn the_one_d_gan_brings_js_down() {
    let data = GanData::Mixture1d {
        weights: vec![0.5, 0.5],
        means: vec![-1.5, 1.5],
        stds: vec![0.5, 0.5],
    };
    let js = |gan: &Gan| -> f64 {
        let o = gan.optimal_discriminator_1d(-4.0, 4.0, 160).unwrap();
        o.p_data
            .iter()
            .zip(&o.p_g)
            .map(|(&p, &q)| {
                let m = 0.5 * (p + q);
                let a = if p > 0.0 { p * (p / m).ln() } else { 0.0 };
                let b = if q > 0.0 { q * (q / m).ln() } else { 0.0 };
                0.5 * (a + b)
            })
            .sum::<f64>()
            * 0.05
    };
    let mut gan = Gan::new(
        GanConfig {
            latent: 1,
            ..GanConfig::default()
        },
        data,
    )
    .unwrap();
    gan.verbose = false;
    let before = js(&gan);
    gan.train(4000).unwrap();
    let after = js(&gan);
    eprintln!("JS untrained {before:.4}, after 4000 iterations {after:.4}");
    assert!(after < 0.25 * before, "{before:.4} → {after:.4}");
}

/// Chapter 4's digits comparison: GAN samples have fewer grey pixels (0.2 to 0.8) than the
/// VAE's mean images after the same number of steps (the VAE's decoder averages; the GAN's
/// generator is pushed toward what looks real).
#[test]
fn gan_digits_have_fewer_grey_pixels_than_vae_means() {
    use genlab::gan::GenOutput;
    use genlab::vae::{share_between, Vae, VaeConfig};
    let iters = 2000;
    let config = GanConfig {
        latent: 16,
        g_hidden: 256,
        d_hidden: 256,
        output: GenOutput::Sigmoid,
        batch_size: 64,
        g_lr: 1e-3,
        d_lr: 1e-3,
        iterations: iters,
        ..GanConfig::default()
    };
    let mut gan = Gan::new(config, GanData::digits(genlab::data::Scale::Unit).unwrap()).unwrap();
    gan.verbose = false;
    gan.metrics_every = 0;
    gan.train(iters).unwrap();
    let mut vae = Vae::new(VaeConfig {
        epochs: iters.div_ceil(14),
        ..VaeConfig::default()
    })
    .unwrap();
    vae.verbose = false;
    vae.train(iters.div_ceil(14)).unwrap();
    let (g, v) = (
        share_between(&gan.sample(300, 1).unwrap(), 0.2, 0.8),
        share_between(&vae.sample(300, 1).unwrap(), 0.2, 0.8),
    );
    eprintln!("grey share: GAN {g:.3}, VAE {v:.3}");
    assert!(g < v, "GAN {g:.3} vs VAE {v:.3}");
}

/// The minimax loss learns too, at W2's settings: its generator's gradient is small where D
/// is sure (chapter 4, section 4), but Adam rescales it, and after W2's 5,000 iterations its
/// samples cover modes of the ring that an untrained generator (all its samples near one
/// point) does not reach.
#[test]
fn the_minimax_gan_learns_the_ring() {
    use genlab::gan::GanLoss;
    let (modes, hq) = ring_modes(GanConfig {
        loss: GanLoss::Minimax,
        ..GanConfig::default()
    });
    let untrained = Gan::new(GanConfig::default(), GanData::ring())
        .unwrap()
        .ring_metrics(2500, 1)
        .unwrap();
    eprintln!("minimax W2: {modes} modes, high quality {hq:.3}; untrained {untrained:?}");
    assert_eq!(untrained.modes, 0);
    assert!(
        modes >= 6 && hq > 0.3,
        "{modes} modes, high quality {hq:.3}"
    );
}
