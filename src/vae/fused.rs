//! The VAE's training step, written out by hand: the same loss and gradient as the dfdx model
//! in `mod.rs` (a test checks them against dfdx's autodiff), fused so that a step allocates
//! nothing and each layer is one matrix multiply with its bias and ReLU folded in.
//!
//! Forward, per image (W = weights, b = biases, ⊙ = elementwise):
//! h₁ = relu(W₁x + b₁), h₂ = relu(W₂h₁ + b₂), [μ, log σ²] = W₃h₂ + b₃,
//! z = μ + exp(½ log σ²) ⊙ ε, g₁ = relu(V₁z + c₁), g₂ = relu(V₂g₁ + c₂), y = V₃g₂ + c₃.
//! Loss of a batch of B images: (1/B) Σ [ Σⱼ BCE(yⱼ, xⱼ) + β KL ].
//!
//! Backward, the chain rule layer by layer (s = 1/B):
//! ∂y = s (sigmoid(y) − x)  (Gaussian: s (y − x)/σ²);  for a layer out = W·in + b:
//! ∂W = ∂outᵀ·in, ∂b = Σ_rows ∂out, ∂in = ∂out·W, times 1[in > 0] where `in` came out of a ReLU;
//! through the reparameterisation: ∂μ = ∂z + sβμ, ∂log σ² = ½ ∂z ⊙ ε ⊙ σ + ½ sβ (σ² − 1).
//!
//! Two threads share a step (when there are two cores). The minibatch is cut into chunks of
//! rows (four for B = 100) for the forward pass and the input gradients ∂in; ∂W = ∂outᵀ·in is
//! computed over the whole batch in blocks of W's rows, and Adam is applied to each block as it
//! comes out of the matrix multiply (the gradient is never stored). In each of a step's two
//! stretches (the chunks, then the blocks) the threads take tasks from a shared counter, so a
//! thread that the machine slows down simply takes fewer. Each task computes the same sums in
//! the same order whoever runs it: the result does not depend on the number of threads.

use super::Likelihood;
use crate::data::PIXELS;
use crate::error::{Error, Result};
use crate::kernels::{
    adam_update, column_sums, gemm, pack_a_transposed, pack_b_rows, pack_weight_rows, packed_a_len,
    panel_cols, tile_rows, AdamConsts, AdamRows, AdamStep, Epilogue, SpinBarrier, StridedA,
};
use std::sync::atomic::{AtomicUsize, Ordering};

/// A linear layer's place in the flat parameter vector: W (out × inp, row-major), then b.
#[derive(Debug, Clone, Copy)]
struct Dense {
    inp: usize,
    out: usize,
    /// Offset of W; b follows it.
    at: usize,
}

impl Dense {
    fn bias(&self) -> usize {
        self.at + self.inp * self.out
    }
    fn len(&self) -> usize {
        (self.inp + 1) * self.out
    }
}

const ENC1: usize = 0;
const ENC2: usize = 1;
const HEAD: usize = 2;
const DEC1: usize = 3;
const DEC2: usize = 4;
const DEC3: usize = 5;

/// What a step needs besides the parameters: sizes and settings, fixed while training.
#[derive(Debug, Clone, Copy)]
struct Plan {
    layers: [Dense; 6],
    hidden: usize,
    latent: usize,
    beta: f32,
    likelihood: Likelihood,
    adam: AdamStep,
}

// The activations and their gradients, each a matrix of B rows (the whole minibatch).
const X: usize = 0;
const H1: usize = 1;
const H2: usize = 2;
const O: usize = 3;
const Z: usize = 4;
const EPS: usize = 5;
const G1: usize = 6;
const G2: usize = 7;
const Y: usize = 8;
const DY: usize = 9;
const DG2: usize = 10;
const DG1: usize = 11;
const DZ: usize = 12;
const DO: usize = 13;
const DH2: usize = 14;
const DH1: usize = 15;
const BUFFERS: usize = 16;

/// Each layer's input and output, whether a ReLU follows it, the gradient of its output, the
/// gradient of its input (none for the encoder's first layer) and whether its input is a ReLU
/// output (so ∂in is masked).
const INPUT: [usize; 6] = [X, H1, H2, Z, G1, G2];
const OUTPUT: [usize; 6] = [H1, H2, O, G1, G2, Y];
const RELU_AFTER: [bool; 6] = [true, true, false, true, true, false];
const D_OUT: [usize; 6] = [DH1, DH2, DO, DG1, DG2, DY];
const D_IN: [Option<usize>; 6] = [None, Some(DH1), Some(DH2), Some(DZ), Some(DG1), Some(DG2)];
const INPUT_AFTER_RELU: [bool; 6] = [false, true, true, false, true, true];

/// Values per row of each buffer.
#[rustfmt::skip]
fn widths(hidden: usize, latent: usize) -> [usize; BUFFERS] {
    let (h, l) = (hidden, latent);
    //  X       H1 H2 O      Z  EPS G1 G2 Y       DY      DG2 DG1 DZ DO     DH2 DH1
    [PIXELS, h, h, 2 * l, l, l, h, h, PIXELS, PIXELS, h, h, l, 2 * l, h, h]
}

/// The parameters, Adam's moments, the packed weights and the step's buffers of one VAE.
pub(crate) struct FusedVae {
    plan: Plan,
    theta: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
    /// Adam steps taken.
    pub steps: usize,
    fwd: Vec<Vec<f32>>,
    bwd: Vec<Vec<f32>>,
    acts: Vec<Vec<f32>>,
    /// Each layer's input, packed as the B operand of ∂W = ∂outᵀ·in.
    packed: Vec<Vec<f32>>,
    /// (reconstruction, KL) summed over each chunk of the batch.
    parts: Vec<(f64, f64)>,
}

/// One step's (loss, reconstruction, KL), each a mean over the batch.
pub(crate) type StepParts = (f64, f64, f64);

impl FusedVae {
    /// A VAE with hidden width `hidden` and latent size `latent`, parameters in dfdx's order
    /// (see [`FusedVae::set_parameters`]).
    pub fn new(
        hidden: usize,
        latent: usize,
        beta: f64,
        likelihood: Likelihood,
        lr: f64,
        dfdx_parameters: &[f32],
    ) -> Result<Self> {
        let sizes = [
            (PIXELS, hidden),
            (hidden, hidden),
            (hidden, 2 * latent),
            (latent, hidden),
            (hidden, hidden),
            (hidden, PIXELS),
        ];
        let mut at = 0;
        let layers = sizes.map(|(inp, out)| {
            let d = Dense { inp, out, at };
            at += d.len();
            d
        });
        let plan = Plan {
            layers,
            hidden,
            latent,
            beta: beta as f32,
            likelihood,
            adam: AdamStep {
                lr: lr as f32,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                t: 0,
            },
        };
        let mut vae = FusedVae {
            plan,
            theta: vec![0.0; at],
            m: vec![0.0; at],
            v: vec![0.0; at],
            steps: 0,
            fwd: layers
                .iter()
                .map(|d| vec![0.0; d.inp * panel_cols(d.out)])
                .collect(),
            bwd: layers
                .iter()
                .map(|d| vec![0.0; d.out * panel_cols(d.inp)])
                .collect(),
            acts: vec![vec![]; BUFFERS],
            packed: vec![vec![]; 6],
            parts: vec![],
        };
        vae.set_parameters(dfdx_parameters)?;
        Ok(vae)
    }

    /// Where dfdx's flattening differs from ours: (our index, dfdx's index) for each parameter
    /// of the heads. dfdx's model has two heads, μ (W, b) then log σ² (W, b); here they are one
    /// layer of 2L outputs, W then b. Every other parameter has the same index in both.
    fn head_index(&self) -> impl Iterator<Item = (usize, usize)> {
        let head = self.plan.layers[HEAD];
        let (h, l) = (self.plan.hidden, self.plan.latent);
        (head.at..head.at + head.len()).map(move |i| {
            let k = i - head.at;
            let (w_len, one_head) = (2 * l * h, l * h + l);
            if k < w_len {
                let (row, col) = (k / h, k % h);
                (i, head.at + (row / l) * one_head + (row % l) * h + col)
            } else {
                let row = k - w_len;
                (i, head.at + (row / l) * one_head + l * h + row % l)
            }
        })
    }

    /// `ours` reordered into dfdx's flattening.
    fn to_dfdx(&self, ours: &[f32]) -> Vec<f32> {
        let mut out = ours.to_vec();
        for (i, j) in self.head_index() {
            out[j] = ours[i];
        }
        out
    }

    /// The parameters flattened in dfdx's order (the order of `Trainer::parameters`).
    pub fn parameters(&self) -> Vec<f32> {
        self.to_dfdx(&self.theta)
    }

    /// Adam's (m, v) flattened in dfdx's order.
    pub fn moments(&self) -> (Vec<f32>, Vec<f32>) {
        (self.to_dfdx(&self.m), self.to_dfdx(&self.v))
    }

    /// Sets the parameters from dfdx's order; Adam's moments and step count start afresh.
    pub fn set_parameters(&mut self, values: &[f32]) -> Result<()> {
        let n = self.theta.len();
        self.restore(values, &vec![0.0; n], &vec![0.0; n], 0)
    }

    /// Sets parameters, Adam's moments (all in dfdx's order) and the step count.
    pub fn restore(&mut self, theta: &[f32], m: &[f32], v: &[f32], steps: usize) -> Result<()> {
        let n = self.theta.len();
        for (what, got) in [
            ("VAE parameters", theta),
            ("VAE Adam m", m),
            ("VAE Adam v", v),
        ] {
            if got.len() != n {
                return Err(Error::shape(what, n, got.len()));
            }
        }
        self.theta.copy_from_slice(theta);
        self.m.copy_from_slice(m);
        self.v.copy_from_slice(v);
        let head: Vec<(usize, usize)> = self.head_index().collect();
        for (i, j) in head {
            self.theta[i] = theta[j];
            self.m[i] = m[j];
            self.v[i] = v[j];
        }
        self.steps = steps;
        for (li, d) in self.plan.layers.iter().enumerate() {
            let rows = &self.theta[d.at..d.at + d.inp * d.out];
            // SAFETY: fwd/bwd have the sizes `new` gave them for this layer.
            unsafe {
                pack_weight_rows(
                    rows,
                    0,
                    d.inp,
                    d.out,
                    self.fwd[li].as_mut_ptr(),
                    self.bwd[li].as_mut_ptr(),
                )
            };
        }
        Ok(())
    }

    /// Sizes the step's buffers for minibatches of `b`.
    fn size_for(&mut self, b: usize) {
        let w = widths(self.plan.hidden, self.plan.latent);
        for (buf, w) in self.acts.iter_mut().zip(w) {
            buf.resize(b * w, 0.0);
        }
        for (buf, d) in self.packed.iter_mut().zip(&self.plan.layers) {
            buf.resize(b * panel_cols(d.inp), 0.0);
        }
        self.parts.resize(b.div_ceil(chunk_rows(b)), (0.0, 0.0));
    }

    fn shared(&mut self) -> Shared {
        Shared {
            theta: Raw::of(&mut self.theta),
            m: Raw::of(&mut self.m),
            v: Raw::of(&mut self.v),
            fwd: std::array::from_fn(|i| Raw::of(&mut self.fwd[i])),
            bwd: std::array::from_fn(|i| Raw::of(&mut self.bwd[i])),
            acts: std::array::from_fn(|i| Raw::of(&mut self.acts[i])),
            packed: std::array::from_fn(|i| Raw::of(&mut self.packed[i])),
            parts: self.parts.as_mut_ptr(),
            chunks: self.parts.len(),
        }
    }

    /// The loss and its gradient (in dfdx's order) for one batch `x` (B × 64) and noise `eps`
    /// (B × L), parameters unchanged: what a test compares with dfdx's autodiff.
    #[cfg(test)]
    pub fn gradient(&mut self, x: &[f32], eps: &[f32]) -> (f64, Vec<f32>) {
        let b = x.len() / PIXELS;
        let mut grads = vec![0.0f32; self.theta.len()];
        let data = x.to_vec();
        let batch: Vec<usize> = (0..b).collect();
        self.size_for(b);
        let job = Job {
            plan: self.plan,
            shared: &self.shared(),
            barrier: &SpinBarrier::new(1),
            train_x: &data,
            batches: std::slice::from_ref(&batch),
            eps,
            first_step: 0,
            grads: Some(Raw::of(&mut grads)),
            next: AtomicUsize::new(0),
        };
        let (records, _) = job.run(0);
        (
            records.first().map_or(f64::NAN, |r| r.0),
            self.to_dfdx(&grads),
        )
    }

    /// Adam steps on the given minibatches: `batches[s]` indexes rows of `train_x` (64 values
    /// each), `eps` holds B × L standard normal values per step. Returns the parts of each step
    /// taken, and [`Error::Diverged`] if it stopped before a step whose loss was not finite
    /// (the parameters are those after the last finite step).
    pub fn train(
        &mut self,
        train_x: &[f32],
        batches: &[Vec<usize>],
        eps: &[f32],
        threads: usize,
    ) -> (Vec<StepParts>, Result<()>) {
        let Some(b) = batches.first().map(Vec::len) else {
            return (vec![], Ok(()));
        };
        let (plan, l) = (self.plan, self.plan.latent);
        if b == 0 || batches.iter().any(|v| v.len() != b) || eps.len() != batches.len() * b * l {
            let bad = Error::shape(
                "VAE training batches",
                format!("{} batches of {b} images and as many ε rows", batches.len()),
                format!("{} ε values", eps.len()),
            );
            return (vec![], Err(bad));
        }
        self.size_for(b);
        let threads = threads.clamp(1, 2);
        let shared = self.shared();
        let barrier = SpinBarrier::new(threads);
        let job = Job {
            plan,
            shared: &shared,
            barrier: &barrier,
            train_x,
            batches,
            eps,
            first_step: self.steps,
            grads: None,
            next: AtomicUsize::new(0),
        };
        let outcome = std::thread::scope(|scope| {
            let helper = (threads == 2).then(|| {
                scope.spawn(|| {
                    let _guard = barrier.guard();
                    dfdx::flush_denormals_to_zero();
                    job.run(1)
                })
            });
            let mine = {
                let _guard = barrier.guard();
                dfdx::flush_denormals_to_zero();
                job.run(0)
            };
            (mine, helper.map(|h| h.join()))
        });
        let ((records, mine), theirs) = outcome;
        self.steps += records.len();
        let stopped = match theirs {
            Some(Err(_)) => Err(stopped()),
            Some(Ok((_, Err(e)))) => Err(e),
            _ => mine,
        };
        if stopped.is_err() {
            return (records, stopped);
        }
        if records.len() < batches.len() {
            let (rec, kl) = sum_parts(&self.parts);
            let loss = (rec + plan.beta as f64 * kl) / b as f64;
            let diverged = Error::Diverged {
                step: self.steps,
                loss: loss as f32,
                fix: format!(
                    "Lower the learning rate (now {}), or the KL weight β (now {}).",
                    plan.adam.lr, plan.beta
                ),
            };
            return (records, Err(diverged));
        }
        (records, Ok(()))
    }
}

/// Rows per chunk of a minibatch of `b`: about a quarter, a whole number of kernel tiles.
fn chunk_rows(b: usize) -> usize {
    let mr = tile_rows();
    if b < 4 * mr {
        b.max(1)
    } else {
        b.div_ceil(4).div_ceil(mr) * mr
    }
}

/// Rows of W per ∂W + Adam task (a multiple of 16, so no two tasks write one packed panel).
const BLOCK: usize = 64;

/// (reconstruction, KL) summed over the chunks, in order.
fn sum_parts(parts: &[(f64, f64)]) -> (f64, f64) {
    parts
        .iter()
        .fold((0.0, 0.0), |(r, k), p| (r + p.0, k + p.1))
}

fn stopped() -> Error {
    Error::Dfdx(
        "a training thread stopped unexpectedly; train again, or reload the last checkpoint".into(),
    )
}

/// A buffer as a raw pointer and length, shared between the training threads.
#[derive(Clone, Copy)]
struct Raw {
    ptr: *mut f32,
    len: usize,
}

// SAFETY: a Raw is only dereferenced under the discipline described on `Shared`.
unsafe impl Send for Raw {}
unsafe impl Sync for Raw {}

impl Raw {
    fn of(v: &mut [f32]) -> Raw {
        Raw {
            ptr: v.as_mut_ptr(),
            len: v.len(),
        }
    }

    /// # Safety
    /// Nobody writes the buffer while the slice lives.
    unsafe fn all<'a>(self) -> &'a [f32] {
        std::slice::from_raw_parts(self.ptr, self.len)
    }

    /// # Safety
    /// Nobody writes `start..end` while the slice lives.
    unsafe fn part<'a>(self, start: usize, end: usize) -> &'a [f32] {
        debug_assert!(start <= end && end <= self.len);
        std::slice::from_raw_parts(self.ptr.add(start), end - start)
    }

    /// # Safety
    /// Nobody else reads or writes `start..end` while the slice lives.
    #[allow(clippy::mut_from_ref)]
    unsafe fn part_mut<'a>(self, start: usize, end: usize) -> &'a mut [f32] {
        debug_assert!(start <= end && end <= self.len);
        std::slice::from_raw_parts_mut(self.ptr.add(start), end - start)
    }
}

/// Raw views of everything the training threads share. Between two barriers, each thread
/// writes only its own half's rows of the activations and its own rows of each parameter
/// matrix (θ, m, v and their packed copies), and reads only what no thread writes in that
/// stretch; [`Job::run`] says which stretch touches what.
struct Shared {
    theta: Raw,
    m: Raw,
    v: Raw,
    fwd: [Raw; 6],
    bwd: [Raw; 6],
    acts: [Raw; BUFFERS],
    packed: [Raw; 6],
    parts: *mut (f64, f64),
    chunks: usize,
}

// SAFETY: access follows the discipline described on `Shared`, ordered by the barrier.
unsafe impl Sync for Shared {}

struct Job<'a> {
    plan: Plan,
    shared: &'a Shared,
    barrier: &'a SpinBarrier,
    train_x: &'a [f32],
    batches: &'a [Vec<usize>],
    eps: &'a [f32],
    first_step: usize,
    /// Store gradients here instead of taking Adam steps (one thread, for the tests).
    grads: Option<Raw>,
    /// The next task of the current stretch of work.
    next: AtomicUsize,
}

impl Job<'_> {
    /// Thread `t`'s share of every step; thread 0 returns the steps' loss parts.
    ///
    /// A step is two stretches of tasks, each ended by a barrier. First, per chunk of rows: the
    /// forward pass, ∂y and every ∂in down to the encoder (these need only the chunk's own rows
    /// and the old weights). Then, per block of rows of each W: ∂W = ∂outᵀ·in over the whole
    /// batch with Adam applied as it comes out, and the same for b. The next step's forward
    /// pass reads the new weights.
    fn run(&self, t: usize) -> (Vec<StepParts>, Result<()>) {
        let b = self.batches[0].len();
        let l = self.plan.latent;
        let rows = chunk_rows(b);
        let chunks = b.div_ceil(rows);
        let chunk = |q: usize| (q * rows, ((q + 1) * rows).min(b));
        let wait = || {
            self.barrier
                .wait_then_reset(Some(&self.next))
                .map_err(|_| stopped())
        };
        let take = |count: usize, task: &mut dyn FnMut(usize)| loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            if i >= count {
                break;
            }
            task(i);
        };
        // The ∂W + Adam tasks, largest first, so the last ones to be taken are short.
        let mut blocks: Vec<(usize, (usize, usize))> = vec![];
        for (li, d) in self.plan.layers.iter().enumerate() {
            for r0 in (0..d.out).step_by(BLOCK) {
                blocks.push((li, (r0, (r0 + BLOCK).min(d.out))));
            }
        }
        let cost = |&(li, (r0, r1)): &(usize, (usize, usize))| (r1 - r0) * self.plan.layers[li].inp;
        blocks.sort_by_key(|blk| std::cmp::Reverse(cost(blk)));
        let mut records = Vec::with_capacity(if t == 0 { self.batches.len() } else { 0 });
        let mut bias_grad = vec![0.0f32; BLOCK];
        let mut a_pack = vec![0.0f32; packed_a_len(BLOCK, b)];
        for (s, batch) in self.batches.iter().enumerate() {
            let eps = &self.eps[s * b * l..(s + 1) * b * l];
            // SAFETY: a chunk's task writes only that chunk's rows of the activations and
            // reads the weights, which nobody writes in this stretch.
            take(chunks, &mut |q| unsafe {
                self.forward(q, chunk(q), batch, eps, b);
                for li in [DEC3, DEC2, DEC1, HEAD, ENC2] {
                    self.input_gradient(li, chunk(q), b);
                }
            });
            if let Err(e) = wait() {
                return (records, Err(e));
            }
            // SAFETY: every chunk's parts were written before the barrier.
            let parts =
                unsafe { std::slice::from_raw_parts(self.shared.parts, self.shared.chunks) };
            let (rec, kl) = sum_parts(parts);
            let loss = (rec + self.plan.beta as f64 * kl) / b as f64;
            if !loss.is_finite() {
                // Every thread sees the same loss and stops before any update.
                return (records, Ok(()));
            }
            if t == 0 {
                records.push((loss, rec / b as f64, kl / b as f64));
            }
            let adam = AdamConsts::new(AdamStep {
                t: (self.first_step + s + 1) as i32,
                ..self.plan.adam
            });
            // SAFETY: a block's task writes only its rows of θ, m, v and the packed weights,
            // and reads the activations and gradients, which nobody writes in this stretch.
            take(blocks.len(), &mut |i| unsafe {
                let (li, rows) = blocks[i];
                self.update(li, rows, b, adam, &mut bias_grad, &mut a_pack);
            });
            if let Err(e) = wait() {
                // The updates of this step may be partly done: it does not count as taken.
                return (records[..records.len().saturating_sub(1)].to_vec(), Err(e));
            }
        }
        (records, Ok(()))
    }

    /// Forward pass, loss parts and ∂y for the rows `i0..i1` (chunk q) of the batch.
    ///
    /// # Safety
    /// The caller alone writes these rows of the activations and packed inputs.
    unsafe fn forward(
        &self,
        q: usize,
        (i0, i1): (usize, usize),
        batch: &[usize],
        eps: &[f32],
        b: usize,
    ) {
        let (sh, plan) = (self.shared, &self.plan);
        let l = plan.latent;
        let w = widths(plan.hidden, l);
        let rows = |buf: usize| sh.acts[buf].part_mut(i0 * w[buf], i1 * w[buf]);
        for (dst, &row) in rows(X).chunks_exact_mut(PIXELS).zip(&batch[i0..i1]) {
            dst.copy_from_slice(&self.train_x[row * PIXELS..(row + 1) * PIXELS]);
        }
        rows(EPS).copy_from_slice(&eps[i0 * l..i1 * l]);
        for li in [ENC1, ENC2, HEAD] {
            self.dense_forward(li, (i0, i1), b);
        }
        // Reparameterisation and KL: z = μ + σ ε, KL = −½ Σ (1 + log σ² − μ² − σ²).
        let (o, e, z) = (rows(O), rows(EPS), rows(Z));
        let mut kl = 0.0f64;
        for ((o, e), z) in o
            .chunks_exact(2 * l)
            .zip(e.chunks_exact(l))
            .zip(z.chunks_exact_mut(l))
        {
            let (mu, lv) = o.split_at(l);
            let mut k = 0.0f32;
            for j in 0..l {
                let sd = (0.5 * lv[j]).exp();
                z[j] = mu[j] + sd * e[j];
                k += -0.5 * (1.0 + lv[j] - mu[j] * mu[j] - sd * sd);
            }
            kl += k as f64;
        }
        for li in [DEC1, DEC2, DEC3] {
            self.dense_forward(li, (i0, i1), b);
        }
        // Reconstruction term and ∂y.
        let scale = 1.0 / b as f32;
        let (y, x, dy) = (rows(Y), rows(X), rows(DY));
        let rec = match plan.likelihood {
            Likelihood::Bernoulli => bernoulli(y, x, dy, scale),
            Likelihood::Gaussian { std } => {
                let inv_var = 1.0 / (std * std) as f32;
                let per_pixel = (std * (2.0 * std::f64::consts::PI).sqrt()).ln();
                let mut r = (i1 - i0) as f64 * PIXELS as f64 * per_pixel;
                for ((&y, &x), dy) in y.iter().zip(x.iter()).zip(dy.iter_mut()) {
                    let diff = y - x;
                    r += (0.5 * diff * diff * inv_var) as f64;
                    *dy = diff * inv_var * scale;
                }
                r
            }
        };
        *sh.parts.add(q) = (rec, kl);
    }

    /// out = in·Wᵀ + b (ReLU'd where the layer has one) for rows `i0..i1`, after packing those
    /// rows of `in` for the layer's ∂W.
    ///
    /// # Safety
    /// As [`Job::forward`].
    unsafe fn dense_forward(&self, li: usize, (i0, i1): (usize, usize), b: usize) {
        let (sh, d) = (self.shared, self.plan.layers[li]);
        let input = sh.acts[INPUT[li]].part(i0 * d.inp, i1 * d.inp);
        pack_b_rows(input, i0, b, d.inp, sh.packed[li].ptr);
        let out = sh.acts[OUTPUT[li]].part_mut(i0 * d.out, i1 * d.out);
        let bias = sh.theta.part(d.bias(), d.bias() + d.out);
        let epi = if RELU_AFTER[li] {
            Epilogue::BiasRelu(bias)
        } else {
            Epilogue::Bias(bias)
        };
        let a = StridedA::rows(input, d.inp);
        gemm(i1 - i0, d.out, d.inp, a, sh.fwd[li].all(), out, d.out, epi);
    }

    /// ∂in = ∂out·W (masked where `in` is a ReLU output) for rows `i0..i1`; below the decoder's
    /// first layer, also the gradient through z = μ + σ ε and β·KL.
    ///
    /// # Safety
    /// As [`Job::forward`]; layer li's weights are not written meanwhile.
    unsafe fn input_gradient(&self, li: usize, (i0, i1): (usize, usize), b: usize) {
        let (sh, d, plan) = (self.shared, self.plan.layers[li], &self.plan);
        let Some(d_in) = D_IN[li] else { return };
        let d_out = sh.acts[D_OUT[li]].part(i0 * d.out, i1 * d.out);
        let input = sh.acts[INPUT[li]].part(i0 * d.inp, i1 * d.inp);
        let target = sh.acts[d_in].part_mut(i0 * d.inp, i1 * d.inp);
        let epi = if INPUT_AFTER_RELU[li] {
            Epilogue::ReluMask(input)
        } else {
            Epilogue::Store
        };
        let a = StridedA::rows(d_out, d.out);
        gemm(
            i1 - i0,
            d.inp,
            d.out,
            a,
            sh.bwd[li].all(),
            target,
            d.inp,
            epi,
        );
        if li == DEC1 {
            // ∂μ = ∂z + sβμ, ∂log σ² = ½ ∂z ε σ + ½ sβ (σ² − 1).
            let l = plan.latent;
            let sb = plan.beta / b as f32;
            let o = sh.acts[O].part(i0 * 2 * l, i1 * 2 * l);
            let e = sh.acts[EPS].part(i0 * l, i1 * l);
            let dz = sh.acts[DZ].part(i0 * l, i1 * l);
            let d_o = sh.acts[DO].part_mut(i0 * 2 * l, i1 * 2 * l);
            for (k, (o, d_o)) in o
                .chunks_exact(2 * l)
                .zip(d_o.chunks_exact_mut(2 * l))
                .enumerate()
            {
                for j in 0..l {
                    let (mu, lv) = (o[j], o[l + j]);
                    let (g, e) = (dz[k * l + j], e[k * l + j]);
                    let sd = (0.5 * lv).exp();
                    d_o[j] = g + sb * mu;
                    d_o[l + j] = 0.5 * g * e * sd + 0.5 * sb * (sd * sd - 1.0);
                }
            }
        }
    }

    /// ∂W = ∂outᵀ·in over the whole batch and ∂b = Σ ∂out for rows `r0..r1` of layer li, and
    /// Adam on them (or, for the tests, the gradients stored).
    ///
    /// # Safety
    /// ∂out of the layer is complete, and the caller alone touches these rows of θ, m, v and
    /// of the packed weights.
    unsafe fn update(
        &self,
        li: usize,
        (r0, r1): (usize, usize),
        b: usize,
        adam: AdamConsts,
        bias_grad: &mut [f32],
        a_pack: &mut [f32],
    ) {
        if r0 == r1 {
            return;
        }
        let (sh, d) = (self.shared, self.plan.layers[li]);
        let d_out = sh.acts[D_OUT[li]].all();
        pack_a_transposed(d_out, d.out, r0, r1 - r0, b, a_pack);
        let a = StridedA::packed(a_pack, b);
        let packed = sh.packed[li].all();
        let (w0, bias0) = (d.at + r0 * d.inp, d.bias() + r0);
        if let Some(grads) = self.grads {
            let gw = grads.part_mut(w0, d.at + r1 * d.inp);
            gemm(r1 - r0, d.inp, b, a, packed, gw, d.inp, Epilogue::Store);
            column_sums(d_out, d.out, r0, grads.part_mut(bias0, bias0 + r1 - r0));
            return;
        }
        let w1 = d.at + r1 * d.inp;
        let rows = AdamRows {
            theta: sh.theta.part_mut(w0, w1),
            m: sh.m.part_mut(w0, w1),
            v: sh.v.part_mut(w0, w1),
            ld: d.inp,
            step: adam,
        };
        gemm(
            r1 - r0,
            d.inp,
            b,
            a,
            packed,
            &mut [],
            d.inp,
            Epilogue::Adam(rows),
        );
        let db = &mut bias_grad[..r1 - r0];
        column_sums(d_out, d.out, r0, db);
        let end = bias0 + r1 - r0;
        adam_update(
            adam,
            sh.theta.part_mut(bias0, end),
            sh.m.part_mut(bias0, end),
            sh.v.part_mut(bias0, end),
            db,
        );
        let w = sh.theta.part(w0, d.at + r1 * d.inp);
        pack_weight_rows(w, r0, d.inp, d.out, sh.fwd[li].ptr, sh.bwd[li].ptr);
    }
}

/// Σ BCE(y, x) = Σ max(y, 0) − y·x + log(1 + e^{−|y|}), and ∂y = s·(sigmoid(y) − x), with
/// e^{−|y|} and log(1 + e) from [`crate::kernels`]' vectorisable polynomials.
fn bernoulli(y: &[f32], x: &[f32], dy: &mut [f32], scale: f32) -> f64 {
    crate::kernels::vectorised(
        #[inline(always)]
        || {
            let mut total = 0.0f64;
            for ((y, x), dy) in y
                .chunks_exact(PIXELS)
                .zip(x.chunks_exact(PIXELS))
                .zip(dy.chunks_exact_mut(PIXELS))
            {
                let mut terms = [0.0f32; PIXELS];
                for (((&y, &x), dy), t) in y.iter().zip(x).zip(dy.iter_mut()).zip(&mut terms) {
                    let e = exp_nonpositive(-y.abs());
                    *t = y.max(0.0) - y * x + ln_1p_unit(e);
                    let inv = 1.0 / (1.0 + e);
                    let sigmoid = if y >= 0.0 { inv } else { e * inv };
                    *dy = (sigmoid - x) * scale;
                }
                total += sum_f32(&terms) as f64;
            }
            total
        },
    )
}

/// eˣ for x ≤ 0 (below −87 it returns ~1e-38): x = n ln 2 + r, |r| ≤ ½ ln 2, eʳ by its Taylor
/// polynomial to degree 7 (relative error < 2e-7), times 2ⁿ built from the exponent bits.
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    let x = x.max(-87.0);
    let n = (x * std::f32::consts::LOG2_E).round();
    // ln 2 split in two so that n·ln 2 is exact to f32 precision.
    let r = (x - n * 0.693_145_75) - n * 1.428_606_8e-6;
    let p = horner(
        r,
        &[
            1.0 / 5040.0,
            1.0 / 720.0,
            1.0 / 120.0,
            1.0 / 24.0,
            1.0 / 6.0,
            0.5,
            1.0,
            1.0,
        ],
    );
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// log(1 + e) for e in [0, 1]: 2 atanh(s) with s = e / (2 + e) ≤ ⅓, whose odd series
/// 2 (s + s³/3 + … + s¹⁷/17) is exact to f32 precision there.
#[inline(always)]
fn ln_1p_unit(e: f32) -> f32 {
    let s = e / (2.0 + e);
    let s2 = s * s;
    let p = horner(
        s2,
        &[
            1.0 / 17.0,
            1.0 / 15.0,
            1.0 / 13.0,
            1.0 / 11.0,
            1.0 / 9.0,
            1.0 / 7.0,
            1.0 / 5.0,
            1.0 / 3.0,
            1.0,
        ],
    );
    2.0 * s * p
}

/// c₀xⁿ + c₁xⁿ⁻¹ + … + cₙ by Horner's rule.
#[inline(always)]
fn horner(x: f32, coefficients: &[f32]) -> f32 {
    coefficients.iter().fold(0.0, |p, &c| p * x + c)
}

/// A sum in eight lanes (vectorisable, and the same every time).
#[inline(always)]
fn sum_f32(v: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    for chunk in v.chunks_exact(8) {
        for (l, &x) in lanes.iter_mut().zip(chunk) {
            *l += x;
        }
    }
    let tail: f32 = v.chunks_exact(8).remainder().iter().sum();
    lanes.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_polynomials_match_the_library_functions() {
        for i in 0..=20_000 {
            let x = -30.0 * i as f32 / 20_000.0;
            let (got, want) = (exp_nonpositive(x), x.exp());
            assert!(
                (got - want).abs() <= 3e-7 * want,
                "exp({x}): {got} vs {want}"
            );
            let e = i as f32 / 20_000.0;
            let (got, want) = (ln_1p_unit(e), e.ln_1p());
            assert!(
                (got - want).abs() <= 3e-7 * want.max(1e-30),
                "ln_1p({e}): {got} vs {want}"
            );
        }
        assert!(exp_nonpositive(-200.0) < 1e-37);
    }
}
