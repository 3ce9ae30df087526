//! `genlab-bench`: the benchmark workloads of `reference/WORKLOADS.md`, each printing one JSON
//! line with the same keys as the PyTorch reference script.
//!
//!     cargo run --release --bin genlab-bench -- vae-digits [--seed N] [--steps-scale X]
//!     cargo run --release --bin genlab-bench -- ddpm-digits [--seed N] [--steps-scale X]
//!     cargo run --release --bin genlab-bench -- gan-ring [--seed N] [--steps-scale X]
//!     cargo run --release --bin genlab-bench -- mlp [--steps-scale X]
//!     cargo run --release --features bench-gemm --bin genlab-bench -- gemm [--rounds N]
//!
//! `mlp` measures the engine itself on W3's denoiser (128 → 512 → 512 → 512 → 64): GFLOP/s of
//! a training step (forward, backward, Adam) at batch 128 and of inference at batch 1,000, next
//! to the machine's peak for one large multiply by the same kernels. `gemm` times the matrix
//! multiply kernels on the engine's shapes against the `gemm` crate.

use genlab::vae::{Vae, VaeConfig};
use std::process::ExitCode;
use std::time::Instant;

const USAGE: &str = "usage: genlab-bench vae-digits|gan-ring|ddpm-digits|mlp [--seed N] [--steps-scale X] | genlab-bench gemm [--rounds N]";

fn main() -> ExitCode {
    match run() {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}\n{USAGE}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<String, String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let workload = args.first().ok_or("name a workload")?.clone();
    if workload == "gemm" {
        return gemm_table(&args[1..]);
    }
    let (mut seed, mut scale) = (0u64, 1.0f64);
    let mut it = args.iter().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--seed" => {
                seed = value
                    .parse()
                    .map_err(|_| format!("--seed {value}: not an integer"))?
            }
            "--steps-scale" => {
                scale = value
                    .parse()
                    .ok()
                    .filter(|s: &f64| *s > 0.0)
                    .ok_or(format!("--steps-scale {value}: not a positive number"))?
            }
            _ => return Err(format!("unknown option {flag}")),
        }
    }
    match workload.as_str() {
        "vae-digits" => vae_digits(seed, scale),
        "ddpm-digits" => ddpm_digits(seed, scale),
        "gan-ring" => gan_ring(seed, scale),
        "mlp" => mlp(seed, scale),
        other => Err(format!("unknown workload `{other}`")),
    }
}

/// The matrix-multiply kernels against the `gemm` crate, as a Markdown table.
fn gemm_table(args: &[String]) -> Result<String, String> {
    let rounds = match args {
        [] => 5,
        [flag, value] if flag == "--rounds" => value
            .parse()
            .ok()
            .filter(|&r: &usize| r > 0)
            .ok_or(format!("--rounds {value}: not a positive integer"))?,
        _ => return Err(format!("unknown options {args:?}")),
    };
    Ok(genlab::perf::gemm_table(rounds))
}

/// W1: the VAE of WORKLOADS.md (H = 256, L = 8, Adam 1e-3, batch 100, 100 epochs).
fn vae_digits(seed: u64, scale: f64) -> Result<String, String> {
    let epochs = ((100.0 * scale).round() as usize).max(1);
    let config = VaeConfig {
        seed,
        epochs,
        ..VaeConfig::default()
    };
    let mut vae = Vae::new(config).map_err(|e| e.to_string())?;
    vae.verbose = false;
    // Data is in memory; time the training loop only (no evaluation inside it, as in the
    // reference script).
    let start = Instant::now();
    vae.train_epochs_only(epochs).map_err(|e| e.to_string())?;
    let train_seconds = start.elapsed().as_secs_f64();
    let test = vae.test_neg_elbo(10).map_err(|e| e.to_string())?;
    let losses = &vae.step_losses;
    let per_epoch = 1497 / config.batch_size;
    let last_epoch: f64 = losses[losses.len() - per_epoch..].iter().sum::<f64>() / per_epoch as f64;
    let threads = genlab::vae::training_threads();
    Ok(format!(
        "{{\"workload\": \"vae-digits\", \"framework\": \"genlab {}\", \"threads\": {threads}, \"seed\": {seed}, \
         \"steps\": {}, \"train_seconds\": {train_seconds}, \"steps_per_second\": {}, \"test_neg_elbo\": {test}, \
         \"final_train_loss\": {}, \"last_epoch_mean_train_loss\": {last_epoch}}}",
        genlab::VERSION,
        losses.len(),
        losses.len() as f64 / train_seconds,
        losses[losses.len() - 1],
    ))
}

/// W3: the DDPM of WORKLOADS.md (T = 200, linear β, denoiser 128 → 512 → 512 → 512 → 64,
/// batch 128, Adam 1e-3, 4,000 steps; 1,000 samples by ancestral sampling, clipped to [−1, 1]).
/// Training and sampling are timed apart.
fn ddpm_digits(seed: u64, scale: f64) -> Result<String, String> {
    use genlab::diffusion::{nn_ratio, Ddpm, DdpmConfig};
    let steps = ((4000.0 * scale).round() as usize).max(1);
    let config = DdpmConfig {
        seed,
        iters: steps,
        ..DdpmConfig::default()
    };
    let digits =
        genlab::data::load_digits(genlab::data::Scale::Symmetric).map_err(|e| e.to_string())?;
    let mut ddpm = Ddpm::new(config, &digits.train.x, 64).map_err(|e| e.to_string())?;
    ddpm.verbose = false;
    let start = Instant::now();
    ddpm.train_steps_only(steps).map_err(|e| e.to_string())?;
    let train_seconds = start.elapsed().as_secs_f64();
    let start = Instant::now();
    let samples = ddpm
        .sample(1000, seed ^ 0x5a_3d1e)
        .map_err(|e| e.to_string())?;
    let sample_seconds = start.elapsed().as_secs_f64();
    let ratio = nn_ratio(&samples, &digits).map_err(|e| e.to_string())?;
    let losses = &ddpm.step_losses;
    let last = &losses[losses.len().saturating_sub(100)..];
    let final_loss = last.iter().sum::<f64>() / last.len() as f64;
    Ok(format!(
        "{{\"workload\": \"ddpm-digits\", \"framework\": \"genlab {}\", \"threads\": {}, \"seed\": {seed}, \
         \"steps\": {steps}, \"train_seconds\": {train_seconds}, \"steps_per_second\": {}, \
         \"sample_seconds\": {sample_seconds}, \"final_train_loss\": {final_loss}, \"nn_ratio\": {ratio}}}",
        genlab::VERSION,
        genlab::mlp::threads_wanted(),
        steps as f64 / train_seconds,
    ))
}

/// W2: the GAN on the 8-Gaussian ring (both networks 2 → 128 → 128 → 2 or 1, Adam 2e-4 with
/// betas (0.5, 0.999), batch 256 real + 256 fake, 5,000 iterations of one D step and one G
/// step, the non-saturating loss); metrics from 2,500 samples drawn after training.
fn gan_ring(seed: u64, scale: f64) -> Result<String, String> {
    use genlab::gan::{Gan, GanConfig, GanData};
    let iterations = ((5000.0 * scale).round() as usize).max(1);
    let config = GanConfig {
        seed,
        iterations,
        ..GanConfig::default()
    };
    let mut gan = Gan::new(config, GanData::ring()).map_err(|e| e.to_string())?;
    gan.verbose = false;
    gan.metrics_every = 0;
    let start = Instant::now();
    gan.train(iterations).map_err(|e| e.to_string())?;
    let train_seconds = start.elapsed().as_secs_f64();
    let metrics = gan
        .ring_metrics(2500, seed ^ 0x5a4d)
        .map_err(|e| e.to_string())?;
    let last = gan.history.last().ok_or("no iteration ran")?;
    Ok(format!(
        "{{\"workload\": \"gan-ring\", \"framework\": \"genlab {}\", \"threads\": {}, \"seed\": {seed}, \
         \"steps\": {iterations}, \"train_seconds\": {train_seconds}, \"steps_per_second\": {}, \
         \"high_quality\": {}, \"modes\": {}, \"final_d_loss\": {}, \"final_g_loss\": {}}}",
        genlab::VERSION,
        genlab::mlp::threads_wanted(),
        iterations as f64 / train_seconds,
        metrics.high_quality,
        metrics.modes,
        last.d_loss,
        last.g_loss,
    ))
}

/// The engine on W3's denoiser shapes: a training step at batch 128 and inference at batch
/// 1,000, in GFLOP/s (2 flops per multiply-add of the matrix products; the elementwise work is
/// not counted), each the median of 5 timed runs.
fn mlp(seed: u64, scale: f64) -> Result<String, String> {
    use genlab::mlp::{Activation, Mlp, Team, Update};
    use rand::{rngs::StdRng, SeedableRng};
    use rand_distr::{Distribution, StandardNormal};
    let widths = [128, 512, 512, 512, 64];
    let adam = genlab::mlp::AdamSettings::default();
    let mut net = Mlp::new(&widths, Activation::Relu, adam, seed).map_err(|e| e.to_string())?;
    let team = Team::default_size();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut normal = |n: usize, s: f32| -> Vec<f32> {
        (0..n)
            .map(|_| s * <StandardNormal as Distribution<f32>>::sample(&StandardNormal, &mut rng))
            .collect()
    };
    let macs: usize = widths.windows(2).map(|w| w[0] * w[1]).sum();
    let (train_rows, infer_rows) = (128, 1000);
    let x = normal(train_rows * widths[0], 1.0);
    let dout = normal(train_rows * widths[4], 1e-3);
    // Forward 1, ∂W 1, ∂h 1 (none below the first layer).
    let train_flops = 2.0 * train_rows as f64 * (3 * macs - widths[0] * widths[1]) as f64;
    let steps = ((200.0 * scale).round() as usize).max(5);
    let mut step = || -> Result<(), String> {
        net.forward(&team, &x).map_err(|e| e.to_string())?;
        net.backward(&team, &dout, Update::Adam)
            .map_err(|e| e.to_string())
    };
    for _ in 0..20 {
        step()?;
    }
    let mut train = vec![];
    for _ in 0..5 {
        let start = Instant::now();
        for _ in 0..steps {
            step()?;
        }
        train.push(steps as f64 * train_flops / start.elapsed().as_secs_f64() / 1e9);
    }
    let xi = normal(infer_rows * widths[0], 1.0);
    let infer_flops = 2.0 * infer_rows as f64 * macs as f64;
    let calls = ((40.0 * scale).round() as usize).max(3);
    net.infer(&team, &xi).map_err(|e| e.to_string())?;
    let mut infer = vec![];
    for _ in 0..5 {
        let start = Instant::now();
        for _ in 0..calls {
            net.infer(&team, &xi).map_err(|e| e.to_string())?;
        }
        infer.push(calls as f64 * infer_flops / start.elapsed().as_secs_f64() / 1e9);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (t, i) = (median(&mut train), median(&mut infer));
    let peak = genlab::perf::sgemm_peak_gflops(team.threads());
    Ok(format!(
        "{{\"workload\": \"mlp\", \"framework\": \"genlab {}\", \"threads\": {}, \"widths\": {widths:?}, \
         \"train_batch\": {train_rows}, \"train_step_ms\": {:.3}, \"train_gflops\": {t:.1}, \
         \"infer_batch\": {infer_rows}, \"infer_ms\": {:.3}, \"infer_gflops\": {i:.1}, \
         \"sgemm_peak_gflops\": {peak:.1}, \"train_share_of_peak\": {:.3}, \"infer_share_of_peak\": {:.3}}}",
        genlab::VERSION,
        team.threads(),
        train_flops / t / 1e6,
        infer_flops / i / 1e6,
        t / peak,
        i / peak,
    ))
}
