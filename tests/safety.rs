//! The learner's safety net: bad arrays, bad files and bad checkpoints are errors that name
//! the shape or the file; an interrupted save leaves the previous checkpoint; a diverging
//! training keeps its last finite parameters and goes on at a normal learning rate; a time
//! budget and autosaves resume exactly (the VAE, the DDPM and the GAN); training leaves the
//! caller's floating-point mode alone.

use genlab::data::{load_digits_from, swiss_roll, Scale};
use genlab::diffusion::{nearest_distance_mean, Ddpm, DdpmConfig};
use genlab::gan::{ring_metrics, Gan, GanConfig, GanData};
use genlab::plot::Figure;
use genlab::train::Limits;
use genlab::vae::{Vae, VaeConfig};
use genlab::{Error, Result};
use std::path::{Path, PathBuf};

fn tmp(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("safety");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn small_vae(seed: u64) -> Vae {
    let mut vae = Vae::new(VaeConfig {
        hidden: 32,
        latent: 2,
        batch_size: 100,
        seed,
        ..VaeConfig::default()
    })
    .unwrap();
    vae.verbose = false;
    vae
}

fn small_ddpm(lr: f64) -> Ddpm {
    let data = swiss_roll(300, 0.05, 0).xy;
    let mut ddpm = Ddpm::points(
        DdpmConfig {
            hidden: vec![32, 32],
            embedding: 8,
            batch_size: 32,
            lr,
            ..DdpmConfig::toy_2d()
        },
        &data,
    )
    .unwrap();
    ddpm.verbose = false;
    ddpm
}

fn small_gan(seed: u64) -> Gan {
    let mut gan = Gan::new(
        GanConfig {
            g_hidden: 16,
            d_hidden: 16,
            batch_size: 32,
            seed,
            ..GanConfig::default()
        },
        GanData::ring(),
    )
    .unwrap();
    gan.verbose = false;
    gan.metrics_every = 5;
    gan
}

/// Both networks' parameters and Adam step counts, for comparing two GANs exactly.
fn gan_state(gan: &Gan) -> (Vec<f32>, Vec<f32>, usize, usize) {
    (
        gan.generator().parameters().to_vec(),
        gan.discriminator().parameters().to_vec(),
        gan.generator().steps(),
        gan.discriminator().steps(),
    )
}

/// Every case must be an error whose message contains each of `needles`; returns how many.
fn all_errors<T: std::fmt::Debug>(cases: Vec<(&str, Result<T>, Vec<String>)>) -> usize {
    let n = cases.len();
    for (what, result, needles) in cases {
        let err = match result {
            Ok(v) => panic!("{what}: accepted ({v:?})"),
            Err(e) => e.to_string(),
        };
        for needle in &needles {
            assert!(
                err.contains(needle.as_str()),
                "{what}: `{needle}` not in: {err}"
            );
        }
    }
    n
}

fn s(v: &str) -> Vec<String> {
    vec![v.to_string()]
}

#[test]
fn arrays_from_the_learner_are_checked() {
    let vae = small_vae(0);
    let img = vae.data().test.x[..64].to_vec();
    let mut nan = img.clone();
    nan[5] = f32::NAN;
    let mut inf = img.clone();
    inf[63] = f32::INFINITY;
    let rows64 = || s("rows of 64 values");
    let rows2 = || s("rows of 2 values");
    let mut tried = 0;
    tried += all_errors(vec![
        ("encode empty", vae.encode(&[]).map(|_| ()), rows64()),
        ("encode 63", vae.encode(&img[..63]).map(|_| ()), rows64()),
        ("encode NaN", vae.encode(&nan).map(|_| ()), rows64()),
        ("encode inf", vae.encode(&inf).map(|_| ()), rows64()),
        ("decode empty", vae.decode(&[]).map(|_| ()), rows2()),
        ("decode 3", vae.decode(&[0.0; 3]).map(|_| ()), rows2()),
        (
            "decode NaN",
            vae.decode(&[f32::NAN, 0.0]).map(|_| ()),
            rows2(),
        ),
        (
            "reconstruct empty",
            vae.reconstruct(&[]).map(|_| ()),
            rows64(),
        ),
        (
            "reconstruct 65",
            vae.reconstruct(&[0.5; 65]).map(|_| ()),
            rows64(),
        ),
        (
            "reconstruct NaN",
            vae.reconstruct(&nan).map(|_| ()),
            rows64(),
        ),
        (
            "iwae NaN",
            vae.log_likelihood_iwae(&nan, 5, 0).map(|_| ()),
            rows64(),
        ),
        (
            "iwae 10",
            vae.log_likelihood_iwae(&img[..10], 5, 0).map(|_| ()),
            rows64(),
        ),
    ]);
    let gan = Gan::new(
        GanConfig {
            g_hidden: 8,
            d_hidden: 8,
            ..GanConfig::default()
        },
        GanData::ring(),
    )
    .unwrap();
    tried += all_errors(vec![
        (
            "discriminate empty",
            gan.discriminate(&[]).map(|_| ()),
            rows2(),
        ),
        (
            "discriminate 3",
            gan.discriminate(&[0.0; 3]).map(|_| ()),
            rows2(),
        ),
        (
            "discriminate NaN",
            gan.discriminate(&[0.0, f32::NAN]).map(|_| ()),
            rows2(),
        ),
        ("ring_metrics empty", ring_metrics(&[]).map(|_| ()), rows2()),
        (
            "ring_metrics 5",
            ring_metrics(&[0.0; 5]).map(|_| ()),
            rows2(),
        ),
        (
            "ring_metrics inf",
            ring_metrics(&[f32::INFINITY, 0.0]).map(|_| ()),
            rows2(),
        ),
    ]);
    let mut ddpm = small_ddpm(1e-3);
    let ok = [0.1f32, 0.2, 0.3, 0.4];
    tried += all_errors(vec![
        (
            "loss_at empty",
            ddpm.loss_at(&[], 1, 4, 0).map(|_| ()),
            rows2(),
        ),
        (
            "loss_at 3",
            ddpm.loss_at(&ok[..3], 1, 4, 0).map(|_| ()),
            rows2(),
        ),
        (
            "loss_at NaN",
            ddpm.loss_at(&[0.0, f32::NAN], 1, 4, 0).map(|_| ()),
            rows2(),
        ),
        (
            "ddim empty",
            ddpm.sample_ddim_from(&[], 5).map(|_| ()),
            rows2(),
        ),
        (
            "ddim 3",
            ddpm.sample_ddim_from(&ok[..3], 5).map(|_| ()),
            rows2(),
        ),
        (
            "ddim NaN",
            ddpm.sample_ddim_from(&[f32::NAN, 0.0], 5).map(|_| ()),
            rows2(),
        ),
        (
            "nearest empty",
            nearest_distance_mean(&[], &ok, 2).map(|_| ()),
            rows2(),
        ),
        (
            "nearest NaN",
            nearest_distance_mean(&ok, &[0.0, f32::NAN], 2).map(|_| ()),
            rows2(),
        ),
        (
            "q_sample NaN",
            ddpm.schedule().q_sample(&[f32::NAN], 1, &[0.0]).map(|_| ()),
            s("finite"),
        ),
    ]);
    let pixels = &vae.data().test.x[..128];
    let mut nan_pixels = pixels.to_vec();
    nan_pixels[70] = f32::NAN;
    tried += all_errors(vec![
        (
            "image_grid empty",
            Figure::image_grid("t", &[], 8, 2).to_png().map(|_| ()),
            s("8×8 images"),
        ),
        (
            "image_grid 127",
            Figure::image_grid("t", &pixels[..127], 8, 2)
                .to_png()
                .map(|_| ()),
            s("8×8 images"),
        ),
        (
            "image_grid NaN",
            Figure::image_grid("t", &nan_pixels, 8, 2)
                .to_png()
                .map(|_| ()),
            s("8×8 images"),
        ),
        (
            "scatter empty",
            Figure::new("t")
                .scatter("p", &[] as &[f64], &[] as &[f64])
                .to_png()
                .map(|_| ()),
            s("at least one point"),
        ),
        (
            "scatter NaN",
            Figure::new("t")
                .scatter("p", &[0.0, f64::NAN], &[1.0, 2.0])
                .to_png()
                .map(|_| ()),
            s("finite"),
        ),
        (
            "scatter 2 vs 1",
            Figure::new("t")
                .scatter("p", &[0.0, 1.0], &[1.0])
                .to_png()
                .map(|_| ()),
            s("as many y values as x values"),
        ),
    ]);
    eprintln!("bad arrays tried: {tried}, all errors naming the shape, 0 panics");
}

fn write_gz(path: &Path, text: &str) {
    use std::io::Write;
    let f = std::fs::File::create(path).unwrap();
    let mut gz = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
    gz.write_all(text.as_bytes()).unwrap();
    gz.finish().unwrap();
}

/// The real digits file as text (its 1,797 lines).
fn digits_text() -> String {
    use std::io::Read;
    let mut text = String::new();
    flate2::read::GzDecoder::new(std::fs::File::open(genlab::data::digits_path()).unwrap())
        .read_to_string(&mut text)
        .unwrap();
    text
}

#[test]
fn bad_data_files_name_the_file_and_the_line() {
    let text = digits_text();
    let lines: Vec<&str> = text.lines().collect();
    let with_line = |i: usize, replacement: &str| {
        let mut l = lines.clone();
        l[i] = replacement;
        l.join("\n")
    };
    let row = |pixels: usize, value: &str| {
        let mut v = vec!["0"; pixels];
        v.push(value);
        v.join(",")
    };
    let bytes = std::fs::read(genlab::data::digits_path()).unwrap();
    let mut cases: Vec<(PathBuf, Option<String>, &str)> = vec![];
    let mut add = |name: &str, text: Option<String>, needle: &'static str| {
        let path = tmp(name);
        match &text {
            Some(t) => write_gz(&path, t),
            None => {
                let _ = std::fs::remove_file(&path);
            }
        }
        cases.push((path, text, needle));
    };
    add("missing.csv.gz", None, "No such file");
    add(
        "few-rows.csv.gz",
        Some(lines[..100].join("\n")),
        "expected 1797 rows",
    );
    add("empty.csv.gz", Some(String::new()), "expected 1797 rows");
    add(
        "short-line.csv.gz",
        Some(with_line(2, &row(63, "3"))),
        "line 3: expected 65",
    );
    add(
        "long-line.csv.gz",
        Some(with_line(9, &row(65, "3"))),
        "line 10: expected 65",
    );
    add(
        "word.csv.gz",
        Some(with_line(1, &row(64, "three"))),
        "line 2, column 65: `three` is not a number",
    );
    add(
        "nan.csv.gz",
        Some(with_line(4, &row(64, "NaN"))),
        "line 5, column 65",
    );
    add(
        "range.csv.gz",
        Some(with_line(0, &row(64, "12"))),
        "line 1, column 65: 12 is outside",
    );
    let mut tried = cases.len();
    for (path, _, needle) in &cases {
        let err = load_digits_from(path, Scale::Unit).unwrap_err().to_string();
        let name = path.file_name().unwrap().to_str().unwrap();
        assert!(err.contains(name) && err.contains(needle), "{err}");
    }
    // Not gzip at all, and a gzip file cut in half.
    let plain = tmp("plain.csv.gz");
    std::fs::write(&plain, &text[..1000]).unwrap();
    let cut = tmp("cut.csv.gz");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    for path in [plain, cut] {
        let err = load_digits_from(&path, Scale::Unit)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(path.to_str().unwrap()) && err.contains("gzip"),
            "{err}"
        );
        tried += 1;
    }
    eprintln!("bad data files tried: {tried}, all errors naming the file, 0 panics");
}

/// Loads a JSON checkpoint, edits it with `edit`, writes it to `name`.
fn edited(good: &Path, name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(good).unwrap()).unwrap();
    edit(&mut v);
    let path = tmp(name);
    std::fs::write(&path, serde_json::to_string(&v).unwrap()).unwrap();
    path
}

fn raw(good: &Path, name: &str, change: impl FnOnce(String) -> String) -> PathBuf {
    let path = tmp(name);
    std::fs::write(&path, change(std::fs::read_to_string(good).unwrap())).unwrap();
    path
}

/// Every path must fail to load with an error naming the file (and `needle`).
fn bad_checkpoints<T>(load: impl Fn(&Path) -> Result<T>, cases: &[(PathBuf, &str)]) -> usize {
    for (path, needle) in cases {
        let err = match load(path) {
            Ok(_) => panic!("{} loaded", path.display()),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains(path.to_str().unwrap()) && err.contains(needle),
            "{}: `{needle}` not in: {err}",
            path.display()
        );
    }
    cases.len()
}

/// Edits of a checkpoint that a learner (or a damaged disk) could make, for a network at `net`
/// (a JSON pointer).
fn network_edits(good: &Path, kind: &str, net: &str) -> Vec<(PathBuf, &'static str)> {
    let p = |field: &str| format!("{net}/{field}");
    let set = |v: &mut serde_json::Value, at: &str, x: serde_json::Value| {
        *v.pointer_mut(at).unwrap() = x;
    };
    vec![
        (
            edited(good, &format!("{kind}-steps-huge.json"), |v| {
                set(v, &p("steps"), 1_000_000_000_000u64.into())
            }),
            "steps",
        ),
        (
            edited(good, &format!("{kind}-v-negative.json"), |v| {
                set(v, &p("v/0"), (-1.0).into())
            }),
            "negative second moment",
        ),
        (
            edited(good, &format!("{kind}-param-null.json"), |v| {
                set(v, &p("parameters/3"), serde_json::Value::Null)
            }),
            "checkpoint",
        ),
        (
            edited(good, &format!("{kind}-param-overflow.json"), |v| {
                set(v, &p("parameters/3"), 1e39.into())
            }),
            "number out of range",
        ),
        (
            edited(good, &format!("{kind}-m-overflow.json"), |v| {
                set(v, &p("m/1"), (-1e39).into())
            }),
            "number out of range",
        ),
        (
            edited(good, &format!("{kind}-param-short.json"), |v| {
                v.pointer_mut(&p("parameters"))
                    .unwrap()
                    .as_array_mut()
                    .unwrap()
                    .pop();
            }),
            "expected",
        ),
        (
            edited(good, &format!("{kind}-beta1.json"), |v| {
                set(v, &p("adam/beta1"), 2.0.into())
            }),
            "beta1",
        ),
        (
            edited(good, &format!("{kind}-layer.json"), |v| {
                set(v, &p("layers/0/out"), 7.into())
            }),
            "widths",
        ),
    ]
}

#[test]
fn bad_checkpoints_name_the_file_and_the_problem() {
    let mut vae = small_vae(0);
    vae.train(1).unwrap();
    let good = tmp("vae-good.json");
    vae.save(&good).unwrap();
    let mut ddpm = small_ddpm(1e-3);
    ddpm.train(5).unwrap();
    let good_ddpm = tmp("ddpm-good.json");
    ddpm.save(&good_ddpm).unwrap();
    assert!(Vae::load(&good).is_ok() && Ddpm::load(&good_ddpm).is_ok());

    let mut vae_cases = vec![
        (tmp("vae-missing.json"), "No such file"),
        (
            raw(&good, "vae-truncated.json", |t| t[..t.len() / 2].into()),
            "not a genlab",
        ),
        (
            raw(&good, "vae-empty.json", |_| String::new()),
            "not a genlab",
        ),
        (
            raw(&good, "vae-text.json", |_| "hello".into()),
            "not a genlab",
        ),
        (good_ddpm.clone(), "not a genlab"),
        (
            edited(&good, "vae-other-config.json", |v| {
                v["config"]["hidden"] = 64.into()
            }),
            "widths",
        ),
        (
            edited(&good, "vae-bad-config.json", |v| {
                v["config"]["lr"] = (-1.0).into()
            }),
            "`lr`",
        ),
        (
            edited(&good, "vae-steps-off.json", |v| {
                v["encoder"]["steps"] = 5.into()
            }),
            "counts disagree",
        ),
        (
            edited(&good, "vae-epochs-huge.json", |v| {
                v["epochs_trained"] = 1_000_000_000_000u64.into()
            }),
            "counts disagree",
        ),
        (
            edited(&good, "vae-started-huge.json", |v| {
                v["epochs_started"] = 1_000_000_000_000u64.into()
            }),
            "counts disagree",
        ),
    ];
    let _ = std::fs::remove_file(&vae_cases[0].0);
    vae_cases.extend(network_edits(&good, "vae-enc", "/encoder"));
    vae_cases.extend(network_edits(&good, "vae-dec", "/decoder"));
    let vae_tried = bad_checkpoints(|p: &Path| Vae::load(p), &vae_cases);

    let mut ddpm_cases = vec![
        (tmp("ddpm-missing.json"), "No such file"),
        (
            raw(&good_ddpm, "ddpm-truncated.json", |t| {
                t[..t.len() - 10].into()
            }),
            "not a genlab",
        ),
        (good.clone(), "not a genlab"),
        (
            edited(&good_ddpm, "ddpm-other-config.json", |v| {
                v["config"]["hidden"] = serde_json::json!([32, 16])
            }),
            "widths",
        ),
        (
            edited(&good_ddpm, "ddpm-dim.json", |v| v["dim"] = 3.into()),
            "widths",
        ),
        (
            edited(&good_ddpm, "ddpm-dim-7.json", |v| v["dim"] = 7.into()),
            "rows of 7 values",
        ),
        (
            edited(&good_ddpm, "ddpm-data-inf.json", |v| {
                v["data"][7] = 1e39.into()
            }),
            "number out of range",
        ),
        (
            edited(&good_ddpm, "ddpm-losses-short.json", |v| {
                v["step_losses"].as_array_mut().unwrap().pop();
            }),
            "counts disagree",
        ),
    ];
    let _ = std::fs::remove_file(&ddpm_cases[0].0);
    ddpm_cases.extend(network_edits(&good_ddpm, "ddpm", "/denoiser"));
    let ddpm_tried = bad_checkpoints(|p: &Path| Ddpm::load(p), &ddpm_cases);

    let mut gan = small_gan(0);
    gan.train(3).unwrap();
    let good_gan = tmp("gan-good.json");
    gan.save(&good_gan).unwrap();
    // A GAN on a fixed set of 5 points in ℝ³.
    let mut set_gan = Gan::new(
        GanConfig {
            g_hidden: 8,
            d_hidden: 8,
            batch_size: 8,
            ..GanConfig::default()
        },
        GanData::Set {
            dim: 3,
            rows: (0..15).map(|i| i as f32 / 15.0).collect(),
        },
    )
    .unwrap();
    set_gan.verbose = false;
    set_gan.train(2).unwrap();
    let good_set = tmp("gan-set-good.json");
    set_gan.save(&good_set).unwrap();
    assert!(Gan::load(&good_gan).is_ok() && Gan::load(&good_set).is_ok());
    let mut gan_cases = vec![
        (tmp("gan-missing.json"), "No such file"),
        (
            raw(&good_gan, "gan-truncated.json", |t| t[..t.len() / 2].into()),
            "not a genlab",
        ),
        (good_ddpm.clone(), "not a genlab"),
        (
            edited(&good_gan, "gan-other-config.json", |v| {
                v["config"]["g_hidden"] = 32.into()
            }),
            "widths",
        ),
        (
            edited(&good_gan, "gan-other-pack.json", |v| {
                v["config"]["pack"] = 2.into()
            }),
            "widths",
        ),
        (
            edited(&good_gan, "gan-bad-config.json", |v| {
                v["config"]["d_lr"] = (-1.0).into()
            }),
            "`d_lr`",
        ),
        (
            edited(&good_gan, "gan-other-lr.json", |v| {
                v["config"]["g_lr"] = 1e-3.into()
            }),
            "Adam settings",
        ),
        (
            edited(&good_gan, "gan-activation.json", |v| {
                v["discriminator"]["layers"][0]["activation"] = "Relu".into()
            }),
            "activations",
        ),
        (
            edited(&good_gan, "gan-history-gap.json", |v| {
                v["history"][1]["iteration"] = 7.into()
            }),
            "counts disagree",
        ),
        (
            edited(&good_gan, "gan-g-steps-off.json", |v| {
                v["generator"]["steps"] = 1.into()
            }),
            "counts disagree",
        ),
        (
            edited(&good_gan, "gan-seed.json", |v| {
                v["rng"]["seed"][0] = 1.into()
            }),
            "random stream",
        ),
        (
            edited(&good_gan, "gan-stream.json", |v| {
                v["rng"]["stream"] = 3.into()
            }),
            "random stream",
        ),
        (
            edited(&good_set, "gan-set-dim-4.json", |v| {
                v["data"]["Set"]["dim"] = 4.into()
            }),
            "rows of 4 values",
        ),
        (
            edited(&good_set, "gan-set-dim-5.json", |v| {
                v["data"]["Set"]["dim"] = 5.into()
            }),
            "widths",
        ),
        (
            edited(&good_set, "gan-set-short.json", |v| {
                v["data"]["Set"]["rows"].as_array_mut().unwrap().pop();
            }),
            "rows of 3 values",
        ),
    ];
    let _ = std::fs::remove_file(&gan_cases[0].0);
    gan_cases.extend(network_edits(&good_gan, "gan-g", "/generator"));
    gan_cases.extend(network_edits(&good_gan, "gan-d", "/discriminator"));
    let gan_tried = bad_checkpoints(|p: &Path| Gan::load(p), &gan_cases);
    eprintln!(
        "bad checkpoints tried: VAE {vae_tried}, DDPM {ddpm_tried}, GAN {gan_tried}, all errors \
         naming the file, 0 panics"
    );
}

/// Run as a child process by `an_interrupted_save_leaves_the_previous_checkpoint`: saves a
/// large VAE checkpoint once, then waits to be killed.
#[test]
#[ignore = "a helper process of an_interrupted_save_leaves_the_previous_checkpoint"]
fn checkpoint_writer_child() {
    let Some(path) = std::env::var_os("GENLAB_SAFETY_WRITER") else {
        return;
    };
    let vae = Vae::new(VaeConfig {
        hidden: 512,
        seed: 7,
        ..VaeConfig::default()
    })
    .unwrap();
    vae.save(PathBuf::from(path)).unwrap();
    std::thread::sleep(std::time::Duration::from_secs(60));
}

/// A process killed while it writes a checkpoint leaves the previous one whole: the file
/// loads, with the previous parameters.
#[test]
fn an_interrupted_save_leaves_the_previous_checkpoint() {
    let path = tmp("interrupted.json");
    let before = Vae::new(VaeConfig {
        hidden: 512,
        ..VaeConfig::default()
    })
    .unwrap();
    before.save(&path).unwrap();
    let want = before.parameters().unwrap();
    let mut caught = 0;
    for _attempt in 0..10 {
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "checkpoint_writer_child",
                "--ignored",
                "--test-threads=1",
            ])
            .env("GENLAB_SAFETY_WRITER", &path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let tmp_file = path.with_file_name(format!("interrupted.json.tmp-{}", child.id()));
        let clock = std::time::Instant::now();
        // Kill it as soon as its temporary file has some bytes: mid-write.
        while clock.elapsed().as_secs() < 30 {
            if std::fs::metadata(&tmp_file).is_ok_and(|m| m.len() > 0) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
        child.kill().unwrap();
        child.wait().unwrap();
        let loaded = Vae::load(&path).unwrap();
        if tmp_file.exists() {
            // Killed before its rename: the checkpoint is the previous one, whole.
            caught += 1;
            assert_eq!(loaded.parameters().unwrap(), want);
            std::fs::remove_file(&tmp_file).unwrap();
            break;
        }
        // The save finished first: that one is now the previous checkpoint.
        assert_ne!(loaded.parameters().unwrap(), want);
        before.save(&path).unwrap();
    }
    assert_eq!(caught, 1, "no attempt was killed mid-save");
}

#[test]
fn a_diverging_vae_keeps_its_parameters_and_goes_on() {
    // An lr that overflows f32: the first update makes every parameter non-finite, and is undone.
    let mut vae = Vae::new(VaeConfig {
        hidden: 32,
        latent: 2,
        batch_size: 100,
        lr: 1e300,
        ..VaeConfig::default()
    })
    .unwrap();
    vae.verbose = false;
    let initial = vae.parameters().unwrap();
    let err = vae.train(2).unwrap_err();
    assert!(matches!(err, Error::Diverged { step: 0, .. }), "{err}");
    assert!(err.to_string().contains("step 0") && err.to_string().contains("learning rate"));
    assert_eq!(vae.parameters().unwrap(), initial);
    assert_eq!(vae.steps_done(), 0);
    // A normal lr goes on from the kept parameters, exactly as their checkpoint does, and
    // learns.
    let path = tmp("diverged-vae.json");
    vae.save(&path).unwrap();
    let mut loaded = Vae::load(&path).unwrap();
    loaded.verbose = false;
    let untrained = vae.test_neg_elbo(5).unwrap();
    for v in [&mut vae, &mut loaded] {
        v.set_learning_rate(1e-3).unwrap();
        v.train(3).unwrap();
    }
    assert_eq!(vae.step_losses, loaded.step_losses);
    assert_eq!(vae.parameters().unwrap(), loaded.parameters().unwrap());
    let trained = vae.test_neg_elbo(5).unwrap();
    assert!(trained < untrained - 3.0, "{untrained} -> {trained}");
    assert!(vae.set_learning_rate(f64::NAN).is_err());

    // An absurd but representable lr: the loss stops being finite after a few steps.
    let mut vae = Vae::new(VaeConfig {
        lr: 1e30,
        ..*small_vae(0).config()
    })
    .unwrap();
    vae.verbose = false;
    let err = vae.train(3).unwrap_err();
    let Error::Diverged { step, .. } = err else {
        panic!("{err}")
    };
    assert!(step > 0 && vae.steps_done() == step);
    assert!(vae.parameters().unwrap().iter().all(|p| p.is_finite()));
    // The kept parameters are those of step `step` (lr 1e30 made them huge): the same run
    // stopped one step earlier has them.
    let mut earlier = Vae::new(*vae.config()).unwrap();
    earlier.verbose = false;
    let _ = earlier.train(3);
    assert_eq!(earlier.parameters().unwrap(), vae.parameters().unwrap());
}

#[test]
fn a_diverging_ddpm_keeps_its_parameters_and_goes_on() {
    let mut ddpm = small_ddpm(1e300);
    let initial = ddpm.denoiser().parameters().to_vec();
    let err = ddpm.train(5).unwrap_err();
    assert!(matches!(err, Error::Diverged { step: 0, .. }), "{err}");
    assert_eq!(ddpm.denoiser().parameters(), &initial[..]);
    // A normal lr goes on from there exactly as the checkpoint does, and learns.
    let path = tmp("diverged-ddpm.json");
    ddpm.save(&path).unwrap();
    let mut loaded = Ddpm::load(&path).unwrap();
    loaded.verbose = false;
    for d in [&mut ddpm, &mut loaded] {
        d.set_learning_rate(1e-3).unwrap();
        d.train(200).unwrap();
    }
    assert_eq!(ddpm.step_losses, loaded.step_losses);
    assert_eq!(ddpm.denoiser().parameters(), loaded.denoiser().parameters());
    let mean = |l: &[f64]| l.iter().sum::<f64>() / l.len() as f64;
    let (first, last) = (
        mean(&ddpm.step_losses[..20]),
        mean(&ddpm.step_losses[180..]),
    );
    assert!(last < 0.9 * first, "{first} -> {last}");

    let mut ddpm = small_ddpm(1e30);
    let err = ddpm.train(500).unwrap_err();
    let Error::Diverged { step, .. } = err else {
        panic!("{err}")
    };
    assert!(err.to_string().contains(&format!("step {step}")), "{err}");
    assert_eq!(ddpm.steps_done(), step);
    assert!(ddpm.denoiser().parameters().iter().all(|p| p.is_finite()));
    let mut earlier = small_ddpm(1e30);
    earlier.train_steps_only(step).unwrap();
    assert_eq!(
        earlier.denoiser().parameters(),
        ddpm.denoiser().parameters()
    );
}

#[test]
fn a_gan_update_that_overflows_is_undone() {
    let mut gan = Gan::new(
        GanConfig {
            g_lr: 1e300,
            g_hidden: 16,
            d_hidden: 16,
            batch_size: 32,
            ..GanConfig::default()
        },
        GanData::ring(),
    )
    .unwrap();
    gan.verbose = false;
    let g0 = gan.generator().parameters().to_vec();
    let err = gan.train(3).unwrap_err();
    assert!(err.to_string().contains("g_lr"), "{err}");
    assert_eq!(gan.generator().parameters(), &g0[..]);
    assert_eq!(gan.generator().steps(), 0);
    gan.set_learning_rates(2e-4, 2e-4).unwrap();
    gan.train(3).unwrap();
}

/// Autosaves and a time budget: a run stopped by its budget (as an interrupt would stop it)
/// resumes from its last autosave with exactly the losses of a run that never stopped.
#[test]
fn the_vae_resumes_from_its_autosave_exactly() {
    let path = tmp("autosave-vae.json");
    let _ = std::fs::remove_file(&path);
    let mut stopped = small_vae(3);
    stopped.limits = Limits::autosave(&path, 0.0)
        .unwrap()
        .with_time_budget(0.2)
        .unwrap();
    let done = stopped.train(10_000).unwrap().len();
    assert!((1..10_000).contains(&done), "{done} epochs in the budget");
    let mut resumed = Vae::load(&path).unwrap();
    resumed.verbose = false;
    assert_eq!(resumed.epochs_done(), done);
    resumed.train(2).unwrap();
    let mut straight = small_vae(3);
    straight.train(done + 2).unwrap();
    assert_eq!(resumed.step_losses, straight.step_losses);
    assert_eq!(resumed.history, straight.history);
    assert_eq!(
        resumed.parameters().unwrap(),
        straight.parameters().unwrap()
    );
    // A budget of 0 trains nothing; a bad budget is an error naming it.
    let mut none = small_vae(3);
    none.limits = Limits::default().with_time_budget(0.0).unwrap();
    assert!(none.train(5).unwrap().is_empty());
    assert!(Limits::default().with_time_budget(f64::NAN).is_err());
    assert!(Limits::autosave(&path, -1.0).is_err());
    assert!(Limits::autosave("", 1.0).is_err());
}

#[test]
fn the_ddpm_resumes_from_its_autosave_exactly() {
    let path = tmp("autosave-ddpm.json");
    let _ = std::fs::remove_file(&path);
    let mut stopped = small_ddpm(1e-3);
    stopped.limits = Limits::autosave(&path, 0.0)
        .unwrap()
        .with_time_budget(0.1)
        .unwrap();
    stopped.train(10_000_000).unwrap();
    let done = stopped.steps_done();
    assert!(
        (1..10_000_000).contains(&done),
        "{done} steps in the budget"
    );
    let mut resumed = Ddpm::load(&path).unwrap();
    resumed.verbose = false;
    assert_eq!(resumed.steps_done(), done);
    resumed.train(30).unwrap();
    let mut straight = small_ddpm(1e-3);
    straight.train_steps_only(done + 30).unwrap();
    assert_eq!(resumed.step_losses, straight.step_losses);
    assert_eq!(
        resumed.denoiser().parameters(),
        straight.denoiser().parameters()
    );
}

/// A GAN trained k iterations, saved, loaded and trained m more is, bit for bit, the GAN
/// trained k + m iterations in one go: losses, ring records, both networks with their Adam
/// state, and the random stream (the next iteration draws the same batches).
#[test]
fn the_gan_resumes_from_its_checkpoint_exactly() {
    let path = tmp("gan-resume.json");
    let mut first = small_gan(4);
    first.train(7).unwrap();
    // A few D steps alone move the stream and D without a record; a checkpoint keeps them.
    first.train_discriminator(2).unwrap();
    first.save(&path).unwrap();
    let mut resumed = Gan::load(&path).unwrap();
    resumed.verbose = false;
    assert_eq!(resumed.iterations_done(), 7);
    assert_eq!(gan_state(&resumed), gan_state(&first));
    resumed.train(13).unwrap();
    let mut straight = small_gan(4);
    straight.train(7).unwrap();
    straight.train_discriminator(2).unwrap();
    straight.train(13).unwrap();
    assert_eq!(resumed.history, straight.history);
    assert_eq!(resumed.ring_history, straight.ring_history);
    assert_eq!(resumed.ring_history.len(), 4);
    assert_eq!(gan_state(&resumed), gan_state(&straight));
    assert_eq!(
        resumed.sample(50, 1).unwrap(),
        straight.sample(50, 1).unwrap()
    );
}

/// The GAN's autosave: a run stopped by its time budget resumes from its last autosave with
/// exactly the losses and parameters of a run that never stopped.
#[test]
fn the_gan_resumes_from_its_autosave_exactly() {
    let path = tmp("autosave-gan.json");
    let _ = std::fs::remove_file(&path);
    let mut stopped = small_gan(5);
    stopped.limits = Limits::autosave(&path, 0.0)
        .unwrap()
        .with_time_budget(0.1)
        .unwrap();
    stopped.train(10_000_000).unwrap();
    let done = stopped.iterations_done();
    assert!(
        (1..10_000_000).contains(&done),
        "{done} iterations in the budget"
    );
    let mut resumed = Gan::load(&path).unwrap();
    resumed.verbose = false;
    assert_eq!(resumed.iterations_done(), done);
    resumed.train(20).unwrap();
    let mut straight = small_gan(5);
    straight.train(done + 20).unwrap();
    assert_eq!(resumed.history, straight.history);
    assert_eq!(resumed.ring_history, straight.ring_history);
    assert_eq!(gan_state(&resumed), gan_state(&straight));
    eprintln!("GAN autosave: stopped after {done} iterations, resumed for 20, equal bit for bit");
    // A budget of 0 trains nothing.
    let mut gan = small_gan(5);
    gan.limits = Limits::default().with_time_budget(0.0).unwrap();
    assert!(gan.train(5).unwrap().is_empty());
}

/// Training never changes a thread's floating-point mode: the caller's MXCSR is the same after
/// (the engine flushes Adam's denormal moments in software instead).
#[cfg(target_arch = "x86_64")]
#[test]
fn training_leaves_the_callers_floating_point_mode_alone() {
    fn mxcsr() -> u32 {
        let mut value: u32 = 0;
        // SAFETY: stmxcsr stores the 4-byte register to the address given, a live local.
        unsafe {
            std::arch::asm!("stmxcsr [{}]", in(reg) &mut value, options(nostack, preserves_flags))
        };
        value
    }
    // The control bits (rounding, exception masks, FTZ bit 15, DAZ bit 6), not the sticky
    // exception flags (bits 0 to 5) that any arithmetic on this thread may set.
    let control = || mxcsr() & !0x3f;
    let before = control();
    assert_eq!(before & 0x8040, 0, "the test thread starts without FTZ/DAZ");
    let mut vae = small_vae(1);
    vae.train(1).unwrap();
    vae.sample(3, 0).unwrap();
    let mut ddpm = small_ddpm(1e-3);
    ddpm.train(3).unwrap();
    ddpm.sample(3, 0).unwrap();
    ddpm.sample_ddim(3, 5, 0).unwrap();
    let mut gan = Gan::new(
        GanConfig {
            g_hidden: 8,
            d_hidden: 8,
            ..GanConfig::default()
        },
        GanData::ring(),
    )
    .unwrap();
    gan.verbose = false;
    gan.train(2).unwrap();
    gan.train_discriminator(2).unwrap();
    // A training that stops on an error restores it too.
    let mut wild = small_ddpm(1e300);
    assert!(wild.train(3).is_err());
    assert_eq!(control(), before);
}
