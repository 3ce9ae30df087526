//! `genlab-bench`: the benchmark workloads of `reference/WORKLOADS.md`, each printing one JSON
//! line with the same keys as the PyTorch reference script.
//!
//!     cargo run --release --bin genlab-bench -- vae-digits [--seed N] [--steps-scale X]
//!     cargo run --release --features bench-gemm --bin genlab-bench -- gemm [--rounds N]

use genlab::vae::{Vae, VaeConfig};
use std::process::ExitCode;
use std::time::Instant;

const USAGE: &str =
    "usage: genlab-bench vae-digits [--seed N] [--steps-scale X] | genlab-bench gemm [--rounds N]";

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
