//! Every config, driven with random field values, valid and invalid, through `new` and a short
//! `train`: each result is `Ok`, an error that names an invalid field, or (for an absurd but
//! valid learning rate) `Diverged`; nothing panics, and no training thread is left running.
//!
//! Each field draws from small valid values (so the trainings stay short) mixed with invalid
//! ones (zero, negative, NaN, infinite, absurdly large, inconsistent). An oracle written here
//! from the documented ranges says which fields are invalid; `validate` must agree with it.

use genlab::diffusion::{Ddpm, DdpmConfig, Schedule};
use genlab::gan::{Gan, GanConfig, GanData, GanLoss, GenOutput};
use genlab::vae::{Likelihood, Vae, VaeConfig};
use genlab::Error;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Mutex;

/// The tests of this file train one at a time, so that the thread check sees only its own.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Cases per config: enough to hit every invalid value of every field several times, few
/// enough to keep the file at a few seconds.
const CASES: u32 = 96;

/// Threads named like the engine's helper that are alive in this process (Linux; elsewhere 0).
fn helper_threads() -> usize {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    tasks
        .filter_map(|t| t.ok())
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm"))
                .is_ok_and(|c| c.trim() == "genlab-helper")
        })
        .count()
}

/// A usize field: mostly valid values in `valid`, else one of the invalid ones (8 to 1).
fn size(valid: std::ops::RangeInclusive<usize>, invalid: &[usize]) -> BoxedStrategy<usize> {
    size_odds(valid, &[], invalid, 8)
}

/// [`size`] with valid values at the edge of the documented range (`edges`, cheap to train
/// with) mixed in, and the odds of a valid draw chosen.
fn size_odds(
    valid: std::ops::RangeInclusive<usize>,
    edges: &[usize],
    invalid: &[usize],
    odds: u32,
) -> BoxedStrategy<usize> {
    let bad = proptest::sample::select(invalid.to_vec());
    if edges.is_empty() {
        prop_oneof![odds => valid, 1 => bad].boxed()
    } else {
        let edge = proptest::sample::select(edges.to_vec());
        prop_oneof![3 * odds => valid, odds => edge, 1 => bad].boxed()
    }
}

/// An f64 field: mostly valid values in `valid` (and the valid `edges`, one time in four of
/// those), else one of the usual invalid ones; `odds` valid draws to one invalid.
fn real_odds(
    valid: std::ops::Range<f64>,
    edges: &[f64],
    extra_bad: &[f64],
    odds: u32,
) -> BoxedStrategy<f64> {
    let mut invalid = vec![f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -1.0];
    invalid.extend_from_slice(extra_bad);
    let bad = proptest::sample::select(invalid);
    if edges.is_empty() {
        prop_oneof![odds => valid, 1 => bad].boxed()
    } else {
        let edge = proptest::sample::select(edges.to_vec());
        prop_oneof![3 * odds => valid, odds => edge, 1 => bad].boxed()
    }
}

/// What a case came to.
#[derive(Default, Debug)]
struct Tally {
    cases: usize,
    bad_cases: usize,
    bad_values: usize,
    ok: usize,
    diverged: usize,
    panics: usize,
}

/// Runs `new` + `train` for one case under `catch_unwind` and checks the outcome against the
/// oracle's list of invalid fields; updates the tally.
fn judge(
    tally: &Mutex<Tally>,
    invalid: &[&str],
    run: impl FnOnce() -> genlab::Result<()>,
) -> Result<(), TestCaseError> {
    let outcome = catch_unwind(AssertUnwindSafe(run));
    let mut t = tally.lock().unwrap_or_else(|p| p.into_inner());
    t.cases += 1;
    t.bad_values += invalid.len();
    t.bad_cases += usize::from(!invalid.is_empty());
    let helpers = helper_threads();
    prop_assert_eq!(helpers, 0, "a training thread is still running");
    match outcome {
        Err(_) => {
            t.panics += 1;
            Err(TestCaseError::fail("panicked"))
        }
        Ok(Ok(())) => {
            t.ok += 1;
            prop_assert!(invalid.is_empty(), "accepted invalid {invalid:?}");
            Ok(())
        }
        Ok(Err(e @ Error::Diverged { .. })) => {
            t.diverged += 1;
            prop_assert!(
                invalid.is_empty(),
                "invalid {invalid:?} reached training: {e}"
            );
            prop_assert!(e.to_string().contains("step") || e.to_string().contains("iteration"));
            Ok(())
        }
        Ok(Err(e)) => {
            let text = e.to_string();
            prop_assert!(!invalid.is_empty(), "a valid config failed: {text}");
            prop_assert!(
                invalid.iter().any(|f| text.contains(&format!("`{f}`"))),
                "the error names none of {invalid:?}: {text}"
            );
            prop_assert!(
                matches!(e, Error::InvalidParameter { .. }),
                "not an InvalidParameter error: {text}"
            );
            Ok(())
        }
    }
}

/// A runner with a fixed seed: every run tries the same cases (and reports the same counts).
fn runner() -> TestRunner {
    TestRunner::new_with_rng(
        Config {
            cases: CASES,
            failure_persistence: None,
            ..Config::default()
        },
        TestRng::deterministic_rng(RngAlgorithm::ChaCha),
    )
}

fn report(what: &str, t: &Tally) {
    eprintln!(
        "{what}: {} cases, {} with invalid fields ({} invalid values), {} trained, {} diverged, {} panics",
        t.cases, t.bad_cases, t.bad_values, t.ok, t.diverged, t.panics
    );
}

fn finite_in(v: f64, lo: f64, hi: f64) -> bool {
    v.is_finite() && (lo..=hi).contains(&v)
}

#[test]
fn vae_configs_are_ok_or_name_the_field() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let tally = Mutex::new(Tally::default());
    let strategy = (
        size(1..=12, &[0, 4097, usize::MAX]),
        size_odds(1..=4, &[512], &[0, 513, usize::MAX], 8),
        real_odds(0.0..4.0, &[1e6], &[1e7, 1e300], 8),
        // A huge learning rate is valid on purpose (chapter 4 shows a divergence with it).
        prop_oneof![8 => 1e-4..1e-2, 1 => proptest::sample::select(vec![0.0, -1.0, f64::NAN, f64::INFINITY, 1e30])],
        size_odds(64..=1497, &[1497], &[0, 1498, usize::MAX], 8),
        size_odds(0..=3, &[1_000_000], &[1_000_001, usize::MAX], 8),
        any::<u64>(),
        prop_oneof![
            Just(Likelihood::Bernoulli),
            Just(Likelihood::BinarisedBernoulli),
            real_odds(0.05..1.0, &[1e6], &[0.0, 1e7], 8)
                .prop_map(|std| Likelihood::Gaussian { std })
        ],
    );
    runner()
        .run(
            &strategy,
            |(hidden, latent, beta, lr, batch_size, epochs, seed, likelihood)| {
                let config = VaeConfig {
                    hidden,
                    latent,
                    beta,
                    lr,
                    batch_size,
                    epochs,
                    seed,
                    likelihood,
                };
                let mut invalid = vec![];
                for (name, ok) in [
                    ("hidden", (1..=4096).contains(&hidden)),
                    ("latent", (1..=512).contains(&latent)),
                    ("beta", finite_in(beta, 0.0, 1e6)),
                    ("lr", lr.is_finite() && lr > 0.0),
                    ("batch_size", (1..=1497).contains(&batch_size)),
                    ("epochs", epochs <= 1_000_000),
                    (
                        "likelihood.std",
                        match likelihood {
                            Likelihood::Gaussian { std } => std > 0.0 && std <= 1e6,
                            Likelihood::Bernoulli | Likelihood::BinarisedBernoulli => true,
                        },
                    ),
                ] {
                    if !ok {
                        invalid.push(name);
                    }
                }
                judge(&tally, &invalid, || {
                    let mut vae = Vae::new(config)?;
                    vae.verbose = false;
                    vae.train(1)?;
                    Ok(())
                })
            },
        )
        .unwrap();
    let t = tally.into_inner().unwrap();
    report("VaeConfig", &t);
    assert_eq!(t.panics, 0);
    assert!(t.bad_cases >= 10 && t.ok >= 5, "{t:?}");
}

#[test]
fn gan_configs_are_ok_or_name_the_field() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let tally = Mutex::new(Tally::default());
    // Sixteen fields: at 8 valid draws to 1 invalid only ~15 % of the cases would be valid
    // throughout; at 30 to 1 about half are, and each invalid value still comes up several
    // times in 96 cases.
    let odds = 30;
    let lr = || prop_oneof![odds => 1e-4..1e-2, 1 => proptest::sample::select(vec![0.0, -1.0, f64::NAN, f64::INFINITY, 1e30])];
    let beta = || prop_oneof![3 * odds => 0.0..0.999, odds => Just(0.999_999), 1 => proptest::sample::select(vec![1.0, -0.1, f64::NAN, f64::INFINITY])];
    let strategy = (
        (
            size_odds(1..=3, &[512], &[0, 513], odds),
            size_odds(1..=16, &[], &[0, 4097], odds),
            size_odds(1..=3, &[8], &[0, 9], odds),
            size_odds(1..=16, &[], &[0, 4097], odds),
            size_odds(1..=3, &[8], &[0, 9], odds),
        ),
        (lr(), beta(), beta(), lr(), beta(), beta()),
        (
            size_odds(1..=3, &[100], &[0, 101], odds),
            size_odds(1..=4, &[16], &[0, 17], odds),
            size_odds(1..=64, &[], &[0, 65_537, usize::MAX], odds),
            size_odds(0..=5000, &[100_000_000], &[100_000_001], odds),
            any::<bool>(),
            any::<bool>(),
            proptest::bool::weighted(0.1),
            prop_oneof![
                3 * odds => Just(0.02f32),
                odds => Just(1e3f32),
                1 => proptest::sample::select(vec![0.0f32, -1.0, f32::NAN, f32::INFINITY, 1e4])
            ],
        ),
    );
    runner()
        .run(&strategy, |(sizes, adam, rest)| {
            let (latent, g_hidden, g_depth, d_hidden, d_depth) = sizes;
            let (g_lr, g_beta1, g_beta2, d_lr, d_beta1, d_beta2) = adam;
            let (d_steps, pack, batch_size, iterations, minimax, sigmoid, misalign, ring_std) =
                rest;
            // A valid batch is a multiple of the pack; `misalign` makes it one more.
            let batch_size = if batch_size <= 64 && (1..=16).contains(&pack) {
                batch_size * pack + usize::from(misalign && pack > 1)
            } else {
                batch_size
            };
            let config = GanConfig {
                latent,
                g_hidden,
                g_depth,
                d_hidden,
                d_depth,
                g_lr,
                g_beta1,
                g_beta2,
                d_lr,
                d_beta1,
                d_beta2,
                d_steps,
                loss: if minimax {
                    GanLoss::Minimax
                } else {
                    GanLoss::NonSaturating
                },
                pack,
                output: if sigmoid {
                    GenOutput::Sigmoid
                } else {
                    GenOutput::Identity
                },
                batch_size,
                iterations,
                seed: iterations as u64,
            };
            let beta_ok = |b: f64| (0.0..1.0).contains(&b);
            let mut invalid = vec![];
            for (name, ok) in [
                ("latent", (1..=512).contains(&latent)),
                ("g_hidden", (1..=4096).contains(&g_hidden)),
                ("d_hidden", (1..=4096).contains(&d_hidden)),
                ("g_depth", (1..=8).contains(&g_depth)),
                ("d_depth", (1..=8).contains(&d_depth)),
                ("g_lr", g_lr.is_finite() && g_lr > 0.0),
                ("g_beta1", beta_ok(g_beta1)),
                ("g_beta2", beta_ok(g_beta2)),
                ("d_lr", d_lr.is_finite() && d_lr > 0.0),
                ("d_beta1", beta_ok(d_beta1)),
                ("d_beta2", beta_ok(d_beta2)),
                ("iterations", iterations <= 100_000_000),
                ("d_steps", (1..=100).contains(&d_steps)),
                ("pack", (1..=16).contains(&pack)),
                (
                    "batch_size",
                    (1..=65_536).contains(&batch_size)
                        && (pack == 0 || batch_size.is_multiple_of(pack)),
                ),
                ("std", ring_std > 0.0 && ring_std <= 1e3),
            ] {
                if !ok {
                    invalid.push(name);
                }
            }
            judge(&tally, &invalid, || {
                let mut gan = Gan::new(config, GanData::Ring8 { std: ring_std })?;
                gan.verbose = false;
                gan.train(2)?;
                gan.sample(3, 0)?;
                Ok(())
            })
        })
        .unwrap();
    let t = tally.into_inner().unwrap();
    report("GanConfig", &t);
    assert_eq!(t.panics, 0);
    assert!(t.bad_cases >= 10 && t.ok + t.diverged >= 30, "{t:?}");
}

#[test]
fn ddpm_configs_are_ok_or_name_the_field() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let tally = Mutex::new(Tally::default());
    let points: Vec<[f32; 2]> = genlab::data::swiss_roll(64, 0.05, 0).xy;
    let strategy = (
        size(2..=20, &[0, 1, 100_001, usize::MAX]),
        any::<bool>(),
        prop_oneof![
            3 => proptest::collection::vec(1..=16usize, 1..=3),
            1 => proptest::sample::select(vec![vec![], vec![0], vec![8, 4097]])
        ],
        prop_oneof![8 => (1..=8usize).prop_map(|h| 2 * h), 1 => proptest::sample::select(vec![0usize, 1, 7, 1026])],
        prop_oneof![8 => 1e-4..1e-2, 1 => proptest::sample::select(vec![0.0, -1.0, f64::NAN, f64::INFINITY, 1e30])],
        size(1..=128, &[0, 65_537, usize::MAX]),
        size(0..=4000, &[100_000_001, usize::MAX]),
        prop_oneof![
            8 => Just(None),
            8 => (0.5f32..3.0).prop_map(Some),
            1 => proptest::sample::select(vec![Some(0.0f32), Some(-1.0), Some(f32::NAN), Some(f32::INFINITY)])
        ],
    );
    runner()
        .run(
            &strategy,
            |(steps, cosine, hidden, embedding, lr, batch_size, iters, clip)| {
                let config = DdpmConfig {
                    steps,
                    schedule: if cosine {
                        Schedule::cosine()
                    } else {
                        Schedule::w3()
                    },
                    hidden: hidden.clone(),
                    embedding,
                    lr,
                    batch_size,
                    iters,
                    clip,
                    seed: iters as u64,
                };
                let mut invalid = vec![];
                for (name, ok) in [
                    ("steps", (2..=100_000).contains(&steps)),
                    (
                        "hidden",
                        !hidden.is_empty() && hidden.iter().all(|h| (1..=4096).contains(h)),
                    ),
                    (
                        "embedding",
                        (2..=1024).contains(&embedding) && embedding % 2 == 0,
                    ),
                    ("lr", lr.is_finite() && lr > 0.0),
                    ("batch_size", (1..=65_536).contains(&batch_size)),
                    ("iters", iters <= 100_000_000),
                    ("clip", clip.is_none_or(|c| c > 0.0 && c.is_finite())),
                ] {
                    if !ok {
                        invalid.push(name);
                    }
                }
                judge(&tally, &invalid, || {
                    let mut ddpm = Ddpm::points(config, &points)?;
                    ddpm.verbose = false;
                    ddpm.train(3)?;
                    ddpm.sample(2, 0)?;
                    Ok(())
                })
            },
        )
        .unwrap();
    let t = tally.into_inner().unwrap();
    report("DdpmConfig", &t);
    assert_eq!(t.panics, 0);
    assert!(t.bad_cases >= 10 && t.ok >= 5, "{t:?}");
}

/// Each documented range is inclusive where the oracle above says so, checked at its ends
/// without training (the random cases above draw only ends that are cheap to train with): the
/// largest valid value passes `validate`, one past it is an error naming its field.
#[test]
fn every_range_ends_where_the_oracle_puts_it() {
    /// A field, a change that puts it at the end of its range, and one that puts it past.
    type Edge<C> = (&'static str, Box<dyn Fn(&mut C)>, Box<dyn Fn(&mut C)>);
    fn check<C: Clone>(
        what: &str,
        base: &C,
        validate: impl Fn(&C) -> genlab::Result<()>,
        edges: Vec<Edge<C>>,
    ) {
        validate(base).unwrap_or_else(|e| panic!("{what}'s default is valid: {e}"));
        for (field, at, past) in edges {
            let mut c = base.clone();
            at(&mut c);
            if let Err(e) = validate(&c) {
                panic!("{what}.{field} at the end of its range: {e}");
            }
            let mut c = base.clone();
            past(&mut c);
            match validate(&c) {
                Ok(()) => panic!("{what}.{field} past the end of its range was accepted"),
                Err(e) => assert!(
                    e.to_string().contains(&format!("`{field}`")),
                    "{what}.{field}: the error names another field: {e}"
                ),
            }
        }
    }
    fn edge<C>(
        field: &'static str,
        at: impl Fn(&mut C) + 'static,
        past: impl Fn(&mut C) + 'static,
    ) -> Edge<C> {
        (field, Box::new(at), Box::new(past))
    }
    check(
        "VaeConfig",
        &VaeConfig::default(),
        VaeConfig::validate,
        vec![
            edge(
                "hidden",
                |c: &mut VaeConfig| c.hidden = 4096,
                |c| c.hidden = 4097,
            ),
            edge("hidden", |c: &mut VaeConfig| c.hidden = 1, |c| c.hidden = 0),
            edge(
                "latent",
                |c: &mut VaeConfig| c.latent = 512,
                |c| c.latent = 513,
            ),
            edge("latent", |c: &mut VaeConfig| c.latent = 1, |c| c.latent = 0),
            edge(
                "beta",
                |c: &mut VaeConfig| c.beta = 1e6,
                |c| c.beta = 1.000_001e6,
            ),
            edge("beta", |c: &mut VaeConfig| c.beta = 0.0, |c| c.beta = -1e-9),
            edge(
                "batch_size",
                |c: &mut VaeConfig| c.batch_size = 1497,
                |c| c.batch_size = 1498,
            ),
            edge(
                "batch_size",
                |c: &mut VaeConfig| c.batch_size = 1,
                |c| c.batch_size = 0,
            ),
            edge(
                "epochs",
                |c: &mut VaeConfig| c.epochs = 1_000_000,
                |c| c.epochs = 1_000_001,
            ),
            edge(
                "likelihood.std",
                |c: &mut VaeConfig| c.likelihood = Likelihood::Gaussian { std: 1e6 },
                |c| c.likelihood = Likelihood::Gaussian { std: 1.000_001e6 },
            ),
        ],
    );
    check(
        "GanConfig",
        &GanConfig::default(),
        GanConfig::validate,
        vec![
            edge(
                "latent",
                |c: &mut GanConfig| c.latent = 512,
                |c| c.latent = 513,
            ),
            edge(
                "g_hidden",
                |c: &mut GanConfig| c.g_hidden = 4096,
                |c| c.g_hidden = 4097,
            ),
            edge(
                "d_hidden",
                |c: &mut GanConfig| c.d_hidden = 4096,
                |c| c.d_hidden = 4097,
            ),
            edge(
                "g_depth",
                |c: &mut GanConfig| c.g_depth = 8,
                |c| c.g_depth = 9,
            ),
            edge(
                "d_depth",
                |c: &mut GanConfig| c.d_depth = 8,
                |c| c.d_depth = 9,
            ),
            edge(
                "g_beta1",
                |c: &mut GanConfig| c.g_beta1 = 0.0,
                |c| c.g_beta1 = 1.0,
            ),
            edge(
                "d_beta2",
                |c: &mut GanConfig| c.d_beta2 = 0.999_999,
                |c| c.d_beta2 = 1.0,
            ),
            edge(
                "iterations",
                |c: &mut GanConfig| c.iterations = 100_000_000,
                |c| c.iterations = 100_000_001,
            ),
            edge(
                "d_steps",
                |c: &mut GanConfig| c.d_steps = 100,
                |c| c.d_steps = 101,
            ),
            edge(
                "pack",
                |c: &mut GanConfig| {
                    c.pack = 16;
                    c.batch_size = 64;
                },
                |c| {
                    c.pack = 17;
                    c.batch_size = 68;
                },
            ),
            edge(
                "batch_size",
                |c: &mut GanConfig| c.batch_size = 65_536,
                |c| c.batch_size = 65_537,
            ),
        ],
    );
    check(
        "GanData::Ring8",
        &GanData::Ring8 { std: 0.02 },
        |d: &GanData| Gan::new(GanConfig::default(), d.clone()).map(|_| ()),
        vec![edge(
            "std",
            |d: &mut GanData| *d = GanData::Ring8 { std: 1e3 },
            |d| *d = GanData::Ring8 { std: 1.001e3 },
        )],
    );
    check(
        "DdpmConfig",
        &DdpmConfig::default(),
        DdpmConfig::validate,
        vec![
            edge(
                "steps",
                |c: &mut DdpmConfig| c.steps = 100_000,
                |c| c.steps = 100_001,
            ),
            edge("steps", |c: &mut DdpmConfig| c.steps = 2, |c| c.steps = 1),
            edge(
                "hidden",
                |c: &mut DdpmConfig| c.hidden = vec![4096, 1],
                |c| c.hidden = vec![4097],
            ),
            edge(
                "embedding",
                |c: &mut DdpmConfig| c.embedding = 1024,
                |c| c.embedding = 1026,
            ),
            edge(
                "embedding",
                |c: &mut DdpmConfig| c.embedding = 2,
                |c| c.embedding = 3,
            ),
            edge(
                "batch_size",
                |c: &mut DdpmConfig| c.batch_size = 65_536,
                |c| c.batch_size = 65_537,
            ),
            edge(
                "iters",
                |c: &mut DdpmConfig| c.iters = 100_000_000,
                |c| c.iters = 100_000_001,
            ),
        ],
    );
}
