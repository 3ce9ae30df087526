//! Training that survives notebook cells: a model, its Adam state and its history, in one
//! [`Trainer`] that a learner can train for N steps in one cell and M more in the next, with
//! the same result as N + M steps in one cell.
//!
//! The update is Adam (Kingma & Ba): with gradient g at step t,
//! m ← β₁ m + (1 − β₁) g,  v ← β₂ v + (1 − β₂) g²,
//! θ ← θ − lr · m̂ / (√v̂ + ε),  m̂ = m / (1 − β₁ᵗ),  v̂ = v / (1 − β₂ᵗ).
//!
//! # Why this module exists: one id counter per cell
//!
//! dfdx gives every tensor an id from a global counter and keys gradients (and Adam's moments)
//! by those ids. evcxr links a fresh copy of dfdx into every cell, so each cell's counter starts
//! again from zero: a model built in one cell and trained in the next meets new tensors whose
//! ids collide with its own parameters' ids, and gradients land on the wrong tensors (a panic
//! in dfdx's backward pass, or, where shapes happen to match, silently wrong training).
//!
//! [`Trainer::step`] therefore first moves this cell's counter past every parameter id of the
//! model ([`Trainer::watermark`]), so the tensors a step creates never collide with the ones
//! that live across cells. Create the tensors a step uses inside the step's closure (from plain
//! `Vec`s or slices): a tensor created earlier in a later cell may carry a colliding id.
//!
//! # Time budgets and autosaves, for every trainer
//!
//! In a notebook an interrupt (or a crash) ends the kernel and every model in it. [`Limits`]
//! is set on a trainer's `limits` field ([`crate::vae::Vae`], [`crate::diffusion::Ddpm`],
//! [`crate::gan::Gan`]) before `train`:
//! `vae.limits = train::Limits::autosave("checkpoints/vae.json", 60.0)?.with_time_budget(600.0)?;`
//! saves a checkpoint at the first epoch (or step) boundary after each 60 s and when the call
//! ends, so an interrupt costs at most about a minute, and stops the call after 10 minutes.
//! Loading the checkpoint and training on gives the same losses as a run that never stopped.

use crate::error::{Error, Result};
use dfdx::nn::tensor_collection::{
    RecursiveWalker, TensorCollection, TensorOptions, TensorVisitor, ViewTensorMut, ViewTensorRef,
};
use dfdx::nn::ZeroGrads;
use dfdx::optim::{Adam, Optimizer, OptimizerUpdateError, UnusedTensors};
use dfdx::prelude::*;
use rand::rngs::StdRng;
use rand::SeedableRng;

/// The device every chapter trains on.
pub type Dev = Cpu;
/// The tape a training step records on.
pub type Tape = OwnedTape<f32, Dev>;
/// A scalar loss recorded on a tape, what a step's closure returns.
pub type Loss = Tensor<Rank0, f32, Dev, Tape>;

pub use crate::mlp::AdamSettings;

/// dfdx's form of the settings.
trait ToDfdx {
    fn to_dfdx(self) -> AdamConfig;
}

impl ToDfdx for AdamSettings {
    fn to_dfdx(self) -> AdamConfig {
        AdamConfig {
            lr: self.lr,
            betas: [self.beta1, self.beta2],
            eps: self.eps,
            weight_decay: None,
        }
    }
}

/// What a step's closure gets besides the model: the device (to make tensors) and the
/// trainer's own random generator (for minibatches and noise), both carried across cells.
pub struct StepContext<'a> {
    /// The device to create tensors on.
    pub dev: &'a Dev,
    /// The trainer's generator: the same seed gives the same sequence, across cells too.
    pub rng: &'a mut StdRng,
    /// The number of steps taken before this one.
    pub step: usize,
}

/// A dfdx model with its Adam state, gradients, generator and loss history.
///
/// The model is any dfdx module built on [`Dev`] (a tuple of `Linear` layers and activations,
/// or a struct deriving the traits). Introduced in chapter 1's test notebook and used by every
/// model chapter.
pub struct Trainer<M: TensorCollection<f32, Dev>> {
    /// The model being trained; use it freely for inference in any cell.
    pub model: M,
    opt: Adam<M, f32, Dev>,
    grads: Option<Gradients<f32, Dev>>,
    dev: Dev,
    rng: StdRng,
    watermark: UniqueId,
    /// The loss after each step, in order (the training curve).
    pub losses: Vec<f32>,
}

impl<M: TensorCollection<f32, Dev>> Trainer<M> {
    /// Builds a model of architecture `Arch` (a dfdx builder type such as
    /// `(Linear<1, 32>, Tanh, Linear<32, 1>)`) with parameters drawn from `seed`, and a trainer
    /// for it: `Trainer::build::<Arch>(AdamSettings::default(), 0)?`.
    pub fn build<Arch>(adam: AdamSettings, seed: u64) -> Result<Self>
    where
        Arch: BuildOnDevice<Dev, f32, Built = M>,
    {
        adam.validate()?;
        let dev = Dev::seed_from_u64(seed);
        let model = dev.try_build_module::<Arch, f32>().map_err(dfdx_err)?;
        Self::with_device(model, dev, adam, seed)
    }

    /// A trainer for a model already built on `dev`.
    pub fn with_device(model: M, dev: Dev, adam: AdamSettings, seed: u64) -> Result<Self> {
        adam.validate()?;
        let watermark = max_param_id(&model)?;
        Ok(Trainer {
            opt: Adam::new(&model, adam.to_dfdx()),
            model,
            grads: None,
            dev,
            rng: StdRng::seed_from_u64(seed ^ 0x9e37_79b9_7f4a_7c15),
            watermark,
            losses: vec![],
        })
    }

    /// Adam's learning rate.
    pub fn lr(&self) -> f64 {
        self.opt.cfg.lr
    }

    /// Changes the learning rate between steps (a schedule, or a learner's second thought).
    pub fn set_lr(&mut self, lr: f64) -> Result<()> {
        AdamSettings {
            lr,
            ..AdamSettings::default()
        }
        .validate()?;
        self.opt.cfg.lr = lr;
        Ok(())
    }

    /// The number of optimiser steps taken so far.
    pub fn steps(&self) -> usize {
        self.losses.len()
    }

    /// The device, for tensors used in inference.
    pub fn dev(&self) -> &Dev {
        &self.dev
    }

    /// The largest parameter id, past which each step moves this cell's id counter.
    pub fn watermark(&self) -> UniqueId {
        self.watermark
    }

    /// One optimiser step: `loss` computes the loss from the model and a traced input, then
    /// the trainer back-propagates, checks the loss is finite and updates the parameters.
    ///
    /// The closure gets the model, the gradients to start a tape with (`x.traced(grads)`), and
    /// a [`StepContext`]. A loss that is NaN or infinite stops training with
    /// [`Error::Diverged`], before the parameters are touched.
    pub fn step<F>(&mut self, loss: F) -> Result<f32>
    where
        M: ZeroGrads<f32, Dev>,
        F: FnOnce(&M, Gradients<f32, Dev>, StepContext<'_>) -> Result<Loss>,
    {
        move_counter_past(&self.dev, self.watermark)?;
        let grads = match self.grads.take() {
            Some(mut g) => {
                self.model.try_zero_grads(&mut g).map_err(dfdx_err)?;
                g
            }
            None => self.model.try_alloc_grads().map_err(dfdx_err)?,
        };
        let ctx = StepContext {
            dev: &self.dev,
            rng: &mut self.rng,
            step: self.losses.len(),
        };
        let loss = loss(&self.model, grads, ctx)?;
        let value = loss.array();
        if !value.is_finite() {
            return Err(Error::Diverged {
                step: self.losses.len(),
                loss: value,
                fix: format!(
                    "Lower the learning rate (now {}), or check the loss for log(0) or a division by zero.",
                    self.opt.cfg.lr
                ),
            });
        }
        let grads = loss.backward();
        self.opt
            .update(&mut self.model, &grads)
            .map_err(|e| match e {
                OptimizerUpdateError::UnusedParams(u) => Error::Dfdx(format!(
                    "{} parameter tensors got no gradient: the loss must use every parameter \
                     of the model being trained (train two networks with two trainers)",
                    u.ids.len()
                )),
                OptimizerUpdateError::DeviceError(e) => dfdx_err(e),
            })?;
        self.grads = Some(grads);
        self.losses.push(value);
        Ok(value)
    }

    /// Every parameter, flattened in the model's order: for comparing two models exactly.
    pub fn parameters(&self) -> Result<Vec<f32>> {
        parameters(&self.model)
    }

    /// Overwrites every parameter from `values` (flattened as [`Trainer::parameters`] gives
    /// them), for loading a checkpoint. Adam's moments start afresh.
    pub fn set_parameters(&mut self, values: &[f32]) -> Result<()> {
        struct Set<'a>(&'a [f32], usize);
        impl TensorVisitor<f32, Dev> for Set<'_> {
            type Viewer = ViewTensorMut;
            type Err = CpuError;
            type E2 = f32;
            type D2 = Dev;
            fn visit<S: Shape>(
                &mut self,
                _: TensorOptions<S, f32, Dev>,
                t: &mut Tensor<S, f32, Dev>,
            ) -> std::result::Result<Option<Tensor<S, f32, Dev>>, CpuError> {
                let n = t.shape().num_elements();
                if let Some(src) = self.0.get(self.1..self.1 + n) {
                    t.copy_from(src);
                }
                self.1 += n;
                Ok(None)
            }
        }
        let expected = self.parameters()?.len();
        if values.len() != expected {
            return Err(Error::shape("set_parameters", expected, values.len()));
        }
        M::iter_tensors(&mut RecursiveWalker {
            m: &mut self.model,
            f: &mut Set(values, 0),
        })
        .map_err(dfdx_err)?;
        self.opt = Adam::new(&self.model, self.opt.cfg);
        self.grads = None;
        Ok(())
    }
}

/// Every parameter of a model, flattened in the model's visiting order.
pub fn parameters<M: TensorCollection<f32, Dev>>(model: &M) -> Result<Vec<f32>> {
    Ok(walk(model)?.0)
}

/// The largest id among a model's parameter tensors.
fn max_param_id<M: TensorCollection<f32, Dev>>(model: &M) -> Result<UniqueId> {
    walk(model)?
        .1
        .ids
        .into_iter()
        .max()
        .ok_or_else(|| Error::Dfdx("the model has no parameters to train".into()))
}

/// Visits every parameter tensor: their values, flattened, and their ids.
fn walk<M: TensorCollection<f32, Dev>>(model: &M) -> Result<(Vec<f32>, UnusedTensors)> {
    struct Walk(Vec<f32>, UnusedTensors);
    impl TensorVisitor<f32, Dev> for Walk {
        type Viewer = ViewTensorRef;
        type Err = CpuError;
        type E2 = f32;
        type D2 = Dev;
        fn visit<S: Shape>(
            &mut self,
            _: TensorOptions<S, f32, Dev>,
            t: &Tensor<S, f32, Dev>,
        ) -> std::result::Result<Option<Tensor<S, f32, Dev>>, CpuError> {
            self.0.extend(t.as_vec());
            // dfdx exposes a tensor's id only through `UnusedTensors`.
            self.1.add(t);
            Ok(None)
        }
    }
    let mut walk = Walk(vec![], UnusedTensors::default());
    M::iter_tensors(&mut RecursiveWalker {
        m: model,
        f: &mut walk,
    })
    .map_err(dfdx_err)?;
    Ok((walk.0, walk.1))
}

/// The id the next tensor created in this cell will have (or one past it).
fn probe_id(dev: &Dev) -> Result<UniqueId> {
    let probe: Tensor<Rank0, f32, Dev> = dev.try_zeros().map_err(dfdx_err)?;
    let mut ids = UnusedTensors::default();
    ids.add(&probe);
    Ok(ids.ids[0])
}

/// Advances this cell's copy of dfdx's tensor-id counter until it is past `watermark`.
///
/// In the cell that built the model this costs one probe; in a later cell it creates one
/// scalar tensor per id skipped (tens of nanoseconds each).
pub fn move_counter_past(dev: &Dev, watermark: UniqueId) -> Result<()> {
    while probe_id(dev)? <= watermark {}
    Ok(())
}

/// Saves `value` as a JSON checkpoint at `path`, whole or not at all ([`write_atomically`]).
pub fn save_json<T: serde::Serialize>(path: &std::path::Path, value: &T) -> Result<()> {
    let json = serde_json::to_string(value).map_err(|e| Error::Dfdx(e.to_string()))?;
    write_atomically(path, json.as_bytes())
}

/// Reads a JSON checkpoint written by [`save_json`]: an error names the file and says it is not
/// a `what` checkpoint of this genlab version (`saved_by` names the function that writes one).
pub fn load_json<T: serde::de::DeserializeOwned>(
    path: &std::path::Path,
    what: &str,
    saved_by: &str,
) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        Error::io(
            path,
            e,
            format!("pass the path a checkpoint was saved to with {saved_by}"),
        )
    })?;
    serde_json::from_str(&text).map_err(|e| Error::Data {
        path: path.to_path_buf(),
        message: format!("not a genlab {} {what} checkpoint ({e})", crate::VERSION),
    })
}

/// Writes `bytes` to `path` whole or not at all: into a temporary file beside it, flushed to
/// disk, then renamed over `path` (a rename within one folder is atomic), so an interrupt during
/// a save leaves the previous file intact. Creates the folder if needed.
pub fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let fix = "choose a folder you can write to";
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e, fix))?;
    }
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp-{}", std::process::id()));
    let tmp = path.with_file_name(name);
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(&tmp, e, fix));
    }
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e, fix))
}

/// Limits on one training call, the same for every trainer ([`crate::vae::Vae`],
/// [`crate::diffusion::Ddpm`], [`crate::gan::Gan`]): a time budget, and a checkpoint saved every
/// so often, so that an interrupt (which in a notebook ends the kernel and every model in it)
/// costs at most that long. Set a trainer's `limits` field before calling its `train`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Limits {
    /// Stop once a `train` call has run this long (checked between epochs, iterations or
    /// steps): the call returns `Ok` with the records done so far, and a later `train`
    /// continues from there. `None`: no limit.
    pub time_budget: Option<std::time::Duration>,
    /// Save a checkpoint every so often during `train`, and when it ends. `None`: never.
    pub autosave: Option<Autosave>,
}

/// Where and how often [`Limits::autosave`] saves.
#[derive(Debug, Clone, PartialEq)]
pub struct Autosave {
    /// The checkpoint file (rewritten whole each time, see [`write_atomically`]); load it with
    /// the trainer's `load` to resume.
    pub path: std::path::PathBuf,
    /// The longest stretch of training an interrupt may cost: a checkpoint is saved at the
    /// first boundary (epoch, iteration, step) after this long since the last one (0: at
    /// every boundary).
    pub every: std::time::Duration,
}

impl Limits {
    /// A checkpoint at `path` every `seconds` seconds (and when each `train` call ends).
    pub fn autosave(path: impl Into<std::path::PathBuf>, seconds: f64) -> Result<Limits> {
        crate::error::ensure(
            seconds.is_finite() && (0.0..=1e7).contains(&seconds),
            "seconds",
            seconds,
            "save every 0 to 1e7 seconds, e.g. 60",
        )?;
        let limits = Limits {
            time_budget: None,
            autosave: Some(Autosave {
                path: path.into(),
                every: std::time::Duration::from_secs_f64(seconds),
            }),
        };
        limits.validate()?;
        Ok(limits)
    }

    /// The same limits with a time budget of `seconds` seconds per `train` call.
    pub fn with_time_budget(self, seconds: f64) -> Result<Limits> {
        crate::error::ensure(
            seconds.is_finite() && (0.0..=1e9).contains(&seconds),
            "seconds",
            seconds,
            "give a time budget of 0 to 1e9 seconds, e.g. 600",
        )?;
        Ok(Limits {
            time_budget: Some(std::time::Duration::from_secs_f64(seconds)),
            ..self
        })
    }

    /// The limits, or an error naming what is wrong (an autosave path that names no file).
    pub fn validate(&self) -> Result<()> {
        if let Some(a) = &self.autosave {
            if a.path.file_name().is_none() {
                return Err(Error::param(
                    "autosave.path",
                    a.path.display(),
                    "give a file to save to, e.g. \"checkpoints/vae.json\"",
                ));
            }
        }
        Ok(())
    }
}

/// The clock of one `train` call: whether its time budget is spent, and when to autosave.
pub struct Watch {
    limits: Limits,
    start: std::time::Instant,
    last_save: std::time::Instant,
}

impl Watch {
    /// Starts the clock of a call with these limits.
    pub fn start(limits: &Limits) -> Result<Watch> {
        limits.validate()?;
        let now = std::time::Instant::now();
        Ok(Watch {
            limits: limits.clone(),
            start: now,
            last_save: now,
        })
    }

    /// The time budget is spent: stop before the next epoch, iteration or step.
    pub fn out_of_time(&self) -> bool {
        self.limits
            .time_budget
            .is_some_and(|b| self.start.elapsed() >= b)
    }

    /// Saves with `save` when an autosave is due (or `now`, at the end of a call); true when it
    /// saved.
    pub fn autosave(
        &mut self,
        now: bool,
        save: impl FnOnce(&std::path::Path) -> Result<()>,
    ) -> Result<bool> {
        let Some(a) = &self.limits.autosave else {
            return Ok(false);
        };
        if !now && self.last_save.elapsed() < a.every {
            return Ok(false);
        }
        save(&a.path)?;
        self.last_save = std::time::Instant::now();
        Ok(true)
    }

    /// Seconds since the call started.
    pub fn seconds(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }
}

fn dfdx_err(e: impl std::fmt::Debug) -> Error {
    Error::Dfdx(format!("{e:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    type Mlp = (Linear<1, 16>, Tanh, Linear<16, 1>);

    fn fit_step(
        m: &<Mlp as BuildOnDevice<Dev, f32>>::Built,
        g: Gradients<f32, Dev>,
        c: StepContext<'_>,
    ) -> Result<Loss> {
        let xs: Vec<f32> = (0..32).map(|i| i as f32 / 16.0 - 1.0).collect();
        let ys: Vec<f32> = xs.iter().map(|x| (3.0 * x).sin()).collect();
        let x = c.dev.tensor_from_vec(xs, (Const::<32>, Const::<1>));
        let y = c.dev.tensor_from_vec(ys, (Const::<32>, Const::<1>));
        Ok(mse_loss(m.forward(x.traced(g)), y))
    }

    fn fast() -> AdamSettings {
        AdamSettings {
            lr: 1e-2,
            ..Default::default()
        }
    }

    /// Determinism only: both runs live in one process, so this cannot see the cross-cell id
    /// collision the module exists for; `tests/notebooks/train_across_cells.ipynb` runs that
    /// in a real kernel.
    #[test]
    fn the_same_seed_gives_the_same_run() {
        let run = |seed: u64| {
            let mut t = Trainer::build::<Mlp>(fast(), seed).unwrap();
            for _ in 0..50 {
                t.step(fit_step).unwrap();
            }
            t
        };
        let (a, b) = (run(3), run(3));
        assert_eq!(a.losses, b.losses);
        assert_eq!(a.parameters().unwrap(), b.parameters().unwrap());
        // The seed is used: another one starts from other parameters.
        let c = run(4);
        assert_ne!(a.losses[0], c.losses[0]);
        assert!(
            a.losses[49] < 0.5 * a.losses[0],
            "it learned: {:?}",
            (a.losses[0], a.losses[49])
        );
    }

    #[test]
    fn a_bad_learning_rate_is_named() {
        let bad = AdamSettings {
            lr: -1.0,
            ..Default::default()
        };
        let err = Trainer::build::<Mlp>(bad, 0).err().unwrap().to_string();
        assert!(err.contains("`lr`"), "{err}");
    }

    #[test]
    fn divergence_is_an_error() {
        let mut t = Trainer::build::<Mlp>(AdamSettings::default(), 0).unwrap();
        let err = t
            .step(|m, g, c| {
                let x = c
                    .dev
                    .tensor_from_vec(vec![f32::NAN; 4], (Const::<4>, Const::<1>));
                Ok(m.forward(x.traced(g)).mean())
            })
            .unwrap_err();
        assert!(matches!(err, Error::Diverged { step: 0, .. }), "{err}");
    }
}
