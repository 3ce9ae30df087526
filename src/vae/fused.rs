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
//! A minibatch is cut in two halves whose gradients are computed separately (on two threads
//! when there are two cores) and summed inside Adam; one thread computes the same halves in
//! turn, so the result does not depend on the number of threads.

use super::Likelihood;
use crate::data::PIXELS;
use crate::error::{Error, Result};
use crate::kernels::{
    adam_update, column_sums, gemm, pack_b, pack_weight_rows, panel_cols, AdamStep, Epilogue,
    SpinBarrier, StridedA, NR,
};

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

/// One half-batch's activations, gradients and loss parts.
#[derive(Default)]
struct Scratch {
    x: Vec<f32>,
    eps: Vec<f32>,
    h1: Vec<f32>,
    h2: Vec<f32>,
    o: Vec<f32>,
    z: Vec<f32>,
    g1: Vec<f32>,
    g2: Vec<f32>,
    y: Vec<f32>,
    dy: Vec<f32>,
    dg2: Vec<f32>,
    dg1: Vec<f32>,
    dz: Vec<f32>,
    d_o: Vec<f32>,
    dh2: Vec<f32>,
    dh1: Vec<f32>,
    pack: Vec<f32>,
    grads: Vec<f32>,
    rec: f64,
    kl: f64,
}

impl Scratch {
    fn size(&mut self, rows: usize, hidden: usize, latent: usize, params: usize) {
        let widths: [(&mut Vec<f32>, usize); 16] = [
            (&mut self.x, PIXELS),
            (&mut self.eps, latent),
            (&mut self.h1, hidden),
            (&mut self.h2, hidden),
            (&mut self.o, 2 * latent),
            (&mut self.z, latent),
            (&mut self.g1, hidden),
            (&mut self.g2, hidden),
            (&mut self.y, PIXELS),
            (&mut self.dy, PIXELS),
            (&mut self.dg2, hidden),
            (&mut self.dg1, hidden),
            (&mut self.dz, latent),
            (&mut self.d_o, 2 * latent),
            (&mut self.dh2, hidden),
            (&mut self.dh1, hidden),
        ];
        for (v, w) in widths {
            v.resize(rows * w, 0.0);
        }
        let widest = panel_cols(hidden.max(PIXELS).max(latent));
        self.pack.resize(rows * widest, 0.0);
        self.grads.resize(params, 0.0);
    }
}

/// The parameters, Adam's moments and the packed weights of one VAE.
pub(crate) struct FusedVae {
    plan: Plan,
    theta: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
    /// Adam steps taken.
    pub steps: usize,
    fwd: Vec<Vec<f32>>,
    bwd: Vec<Vec<f32>>,
    scratch: [Scratch; 2],
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
            scratch: Default::default(),
        };
        vae.set_parameters(dfdx_parameters)?;
        Ok(vae)
    }

    /// The position in dfdx's flattening of each parameter in ours. dfdx's model has two
    /// heads, μ (W, b) then log σ² (W, b); here they are one layer of 2L outputs, W then b.
    fn dfdx_index(&self) -> Vec<usize> {
        let head = self.plan.layers[HEAD];
        let (h, l) = (self.plan.hidden, self.plan.latent);
        (0..self.theta.len())
            .map(|i| {
                if i < head.at || i >= head.at + head.len() {
                    return i;
                }
                let k = i - head.at;
                let (w_len, one_head) = (2 * l * h, l * h + l);
                if k < w_len {
                    let (row, col) = (k / h, k % h);
                    head.at + (row / l) * one_head + (row % l) * h + col
                } else {
                    let row = k - w_len;
                    head.at + (row / l) * one_head + l * h + row % l
                }
            })
            .collect()
    }

    /// The parameters flattened in dfdx's order (the order of `Trainer::parameters`).
    pub fn parameters(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.theta.len()];
        for (i, j) in self.dfdx_index().into_iter().enumerate() {
            out[j] = self.theta[i];
        }
        out
    }

    /// Adam's (m, v) flattened in dfdx's order.
    pub fn moments(&self) -> (Vec<f32>, Vec<f32>) {
        let (mut m, mut v) = (vec![0.0; self.m.len()], vec![0.0; self.v.len()]);
        for (i, j) in self.dfdx_index().into_iter().enumerate() {
            m[j] = self.m[i];
            v[j] = self.v[i];
        }
        (m, v)
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
                return Err(Error::shape(what, n.to_string(), got.len().to_string()));
            }
        }
        for (i, j) in self.dfdx_index().into_iter().enumerate() {
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

    /// The loss and its gradient (in dfdx's order) for one batch `x` (B × 64) and noise `eps`
    /// (B × L), parameters unchanged: what a test compares with dfdx's autodiff.
    #[cfg(test)]
    pub fn gradient(&mut self, x: &[f32], eps: &[f32]) -> (f64, Vec<f32>) {
        let (b, l) = (x.len() / PIXELS, self.plan.latent);
        let (n, scale) = (self.theta.len(), 1.0 / b as f32);
        let mut total = vec![0.0f32; n];
        let mut loss = 0.0;
        for (i0, i1) in halves(b) {
            let sc = &mut self.scratch[0];
            sc.size(i1 - i0, self.plan.hidden, l, n);
            sc.x.copy_from_slice(&x[i0 * PIXELS..i1 * PIXELS]);
            sc.eps.copy_from_slice(&eps[i0 * l..i1 * l]);
            let p = Params {
                theta: &self.theta,
                fwd: &self.fwd,
                bwd: &self.bwd,
            };
            forward_backward(&self.plan, &p, sc, i1 - i0, scale);
            loss += (sc.rec + self.plan.beta as f64 * sc.kl) / b as f64;
            for (t, g) in total.iter_mut().zip(&sc.grads) {
                *t += g;
            }
        }
        let mut out = vec![0.0; n];
        for (i, j) in self.dfdx_index().into_iter().enumerate() {
            out[j] = total[i];
        }
        (loss, out)
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
        match self.train_inner(train_x, batches, eps, threads) {
            Ok((records, done)) => (records, done),
            Err(e) => (vec![], Err(e)),
        }
    }

    fn train_inner(
        &mut self,
        train_x: &[f32],
        batches: &[Vec<usize>],
        eps: &[f32],
        threads: usize,
    ) -> Result<(Vec<StepParts>, Result<()>)> {
        let Some(b) = batches.first().map(Vec::len) else {
            return Ok((vec![], Ok(())));
        };
        let (plan, n) = (self.plan, self.theta.len());
        let l = plan.latent;
        if batches.iter().any(|v| v.len() != b) || eps.len() != batches.len() * b * l {
            return Err(Error::shape(
                "FusedVae::train",
                format!("{} batches of {b} and as many ε rows", batches.len()),
                format!("{} ε values", eps.len()),
            ));
        }
        let parts = halves(b);
        for (sc, (i0, i1)) in self.scratch.iter_mut().zip(parts) {
            sc.size(i1 - i0, plan.hidden, l, n);
        }
        let threads = threads.clamp(1, 2);
        let shared = Shared {
            theta: self.theta.as_mut_ptr(),
            m: self.m.as_mut_ptr(),
            v: self.v.as_mut_ptr(),
            fwd: std::array::from_fn(|i| self.fwd[i].as_mut_ptr()),
            bwd: std::array::from_fn(|i| self.bwd[i].as_mut_ptr()),
            fwd_len: std::array::from_fn(|i| self.fwd[i].len()),
            bwd_len: std::array::from_fn(|i| self.bwd[i].len()),
            n,
            scratch: self.scratch.as_mut_ptr(),
        };
        let barrier = SpinBarrier::new(threads);
        let first_step = self.steps;
        let job = Job {
            plan,
            shared: &shared,
            barrier: &barrier,
            threads,
            train_x,
            batches,
            eps,
            parts,
            first_step,
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
            let theirs = helper.map(|h| h.join());
            (mine, theirs)
        });
        let records = match outcome {
            (Ok(records), None | Some(Ok(Ok(_)))) => records,
            (Err(e), _) | (_, Some(Ok(Err(e)))) => return Err(e),
            (_, Some(Err(_))) => {
                return Err(Error::Dfdx(
                    "a training thread stopped unexpectedly; the model is unchanged up to the last finished step".into(),
                ))
            }
        };
        self.steps += records.len();
        if records.len() < batches.len() {
            let diverged = Error::Diverged {
                step: self.steps,
                loss: step_loss_of(&self.scratch, plan.beta, b) as f32,
                fix: format!(
                    "Lower the learning rate (now {}), or the KL weight β (now {}).",
                    plan.adam.lr, plan.beta
                ),
            };
            return Ok((records, Err(diverged)));
        }
        Ok((records, Ok(())))
    }
}

/// The rows of the two halves of a batch of `b`.
fn halves(b: usize) -> [(usize, usize); 2] {
    let h = b.div_ceil(2);
    [(0, h), (h, b)]
}

fn step_loss_of(scratch: &[Scratch; 2], beta: f32, b: usize) -> f64 {
    let rec: f64 = scratch.iter().map(|s| s.rec).sum();
    let kl: f64 = scratch.iter().map(|s| s.kl).sum();
    (rec + beta as f64 * kl) / b as f64
}

/// Raw views of the buffers the training threads share. Phases alternate, separated by the
/// barrier: in the gradient phase everyone reads θ and the packed weights and writes only its
/// own half's scratch; in the Adam phase everyone reads both halves' gradients and writes only
/// its own rows of θ, m, v and the packed weights.
struct Shared {
    theta: *mut f32,
    m: *mut f32,
    v: *mut f32,
    fwd: [*mut f32; 6],
    bwd: [*mut f32; 6],
    fwd_len: [usize; 6],
    bwd_len: [usize; 6],
    n: usize,
    scratch: *mut Scratch,
}

// SAFETY: access follows the phase discipline described on `Shared`, enforced by the barrier.
unsafe impl Sync for Shared {}

/// Read-only parameters for the gradient phase.
struct Params<'a, V: AsRef<[f32]>> {
    theta: &'a [f32],
    fwd: &'a [V],
    bwd: &'a [V],
}

struct Job<'a> {
    plan: Plan,
    shared: &'a Shared,
    barrier: &'a SpinBarrier,
    threads: usize,
    train_x: &'a [f32],
    batches: &'a [Vec<usize>],
    eps: &'a [f32],
    parts: [(usize, usize); 2],
    first_step: usize,
}

impl Job<'_> {
    /// Thread `t`'s share of every step; thread 0 returns the steps' loss parts.
    fn run(&self, t: usize) -> Result<Vec<StepParts>> {
        let (plan, sh) = (self.plan, self.shared);
        let b = self.batches[0].len();
        let l = plan.latent;
        let mine: &[usize] = if self.threads == 1 { &[0, 1] } else { &[t] };
        let poisoned = |_| Error::Dfdx("a training thread stopped unexpectedly".into());
        let mut records = Vec::with_capacity(if t == 0 { self.batches.len() } else { 0 });
        for (s, batch) in self.batches.iter().enumerate() {
            {
                // Gradient phase.
                // SAFETY: shared reads of θ and the packed weights; nobody writes them now.
                let fwd: [&[f32]; 6] = std::array::from_fn(|i| unsafe {
                    std::slice::from_raw_parts(sh.fwd[i], sh.fwd_len[i])
                });
                let bwd: [&[f32]; 6] = std::array::from_fn(|i| unsafe {
                    std::slice::from_raw_parts(sh.bwd[i], sh.bwd_len[i])
                });
                let p = Params {
                    theta: unsafe { std::slice::from_raw_parts(sh.theta, sh.n) },
                    fwd: &fwd,
                    bwd: &bwd,
                };
                for &c in mine {
                    // SAFETY: half c's scratch belongs to this thread in this phase.
                    let sc = unsafe { &mut *sh.scratch.add(c) };
                    let (i0, i1) = self.parts[c];
                    for (dst, &row) in sc.x.chunks_exact_mut(PIXELS).zip(&batch[i0..i1]) {
                        dst.copy_from_slice(&self.train_x[row * PIXELS..(row + 1) * PIXELS]);
                    }
                    let e = &self.eps[s * b * l..(s + 1) * b * l];
                    sc.eps.copy_from_slice(&e[i0 * l..i1 * l]);
                    forward_backward(&plan, &p, sc, i1 - i0, 1.0 / b as f32);
                }
            }
            self.barrier.wait().map_err(poisoned)?;
            // Adam phase.
            // SAFETY: both halves' scratch are only read in this phase.
            let scratch = unsafe { &*(sh.scratch as *const [Scratch; 2]) };
            let loss = step_loss_of(scratch, plan.beta, b);
            if !loss.is_finite() {
                break;
            }
            if t == 0 {
                let rec: f64 = scratch.iter().map(|s| s.rec).sum::<f64>() / b as f64;
                let kl: f64 = scratch.iter().map(|s| s.kl).sum::<f64>() / b as f64;
                records.push((loss, rec, kl));
            }
            let adam = AdamStep {
                t: (self.first_step + s + 1) as i32,
                ..plan.adam
            };
            for (li, d) in plan.layers.iter().enumerate() {
                let (r0, r1) = rows_of(d.out, t, self.threads);
                if r0 == r1 {
                    continue;
                }
                for (start, len) in [
                    (d.at + r0 * d.inp, (r1 - r0) * d.inp),
                    (d.bias() + r0, r1 - r0),
                ] {
                    // SAFETY: rows r0..r1 of this layer are this thread's alone in this phase.
                    let (th, m, v) = unsafe {
                        (
                            std::slice::from_raw_parts_mut(sh.theta.add(start), len),
                            std::slice::from_raw_parts_mut(sh.m.add(start), len),
                            std::slice::from_raw_parts_mut(sh.v.add(start), len),
                        )
                    };
                    let g0 = &scratch[0].grads[start..start + len];
                    let g1 = &scratch[1].grads[start..start + len];
                    adam_update(adam, th, m, v, g0, g1);
                }
                // SAFETY: these rows' packed entries are this thread's alone; sizes from `new`.
                unsafe {
                    let rows = std::slice::from_raw_parts(
                        sh.theta.add(d.at + r0 * d.inp),
                        (r1 - r0) * d.inp,
                    );
                    pack_weight_rows(rows, r0, d.inp, d.out, sh.fwd[li], sh.bwd[li]);
                }
            }
            self.barrier.wait().map_err(poisoned)?;
        }
        Ok(records)
    }
}

/// Thread t's rows of a layer with `out` rows: halves cut at a multiple of 16, so the two
/// threads never write the same packed panel.
fn rows_of(out: usize, t: usize, threads: usize) -> (usize, usize) {
    if threads == 1 {
        return (0, out);
    }
    let cut = (out.div_ceil(2).div_ceil(NR) * NR).min(out);
    if t == 0 {
        (0, cut)
    } else {
        (cut, out)
    }
}

/// out = in·Wᵀ + b (ReLU'd if `relu`) for `rows` rows.
fn dense_forward<V: AsRef<[f32]>>(
    p: &Params<'_, V>,
    plan: &Plan,
    li: usize,
    input: &[f32],
    rows: usize,
    out: &mut [f32],
    relu: bool,
) {
    let d = plan.layers[li];
    let bias = &p.theta[d.bias()..d.bias() + d.out];
    let epi = if relu {
        Epilogue::BiasRelu(bias)
    } else {
        Epilogue::Bias(bias)
    };
    gemm(
        rows,
        d.out,
        d.inp,
        StridedA::rows(input, d.inp),
        p.fwd[li].as_ref(),
        out,
        d.out,
        epi,
    );
}

/// ∂W = ∂outᵀ·in and ∂b = Σ ∂out into `grads`; ∂in = ∂out·W (masked by in > 0 when `in`
/// is a ReLU output) into `d_in` if asked.
#[allow(clippy::too_many_arguments)]
fn dense_backward<V: AsRef<[f32]>>(
    p: &Params<'_, V>,
    plan: &Plan,
    li: usize,
    input: &[f32],
    d_out: &[f32],
    rows: usize,
    grads: &mut [f32],
    pack: &mut [f32],
    d_in: Option<(&mut [f32], bool)>,
) {
    let d = plan.layers[li];
    pack_b(input, d.inp, 1, rows, d.inp, pack);
    let (gw, gb) = grads[d.at..d.at + d.len()].split_at_mut(d.inp * d.out);
    gemm(
        d.out,
        d.inp,
        rows,
        StridedA::transposed(d_out, d.out),
        pack,
        gw,
        d.inp,
        Epilogue::Store,
    );
    column_sums(&d_out[..rows * d.out], d.out, gb);
    if let Some((d_in, relu_input)) = d_in {
        let epi = if relu_input {
            Epilogue::ReluMask(input)
        } else {
            Epilogue::Store
        };
        gemm(
            rows,
            d.inp,
            d.out,
            StridedA::rows(d_out, d.out),
            p.bwd[li].as_ref(),
            d_in,
            d.inp,
            epi,
        );
    }
}

/// Loss parts and the gradient of (1/B)·(this half's summed loss) for `rows` images.
fn forward_backward<V: AsRef<[f32]>>(
    plan: &Plan,
    p: &Params<'_, V>,
    sc: &mut Scratch,
    rows: usize,
    scale: f32,
) {
    let (l, beta) = (plan.latent, plan.beta);
    // Encoder.
    dense_forward(p, plan, ENC1, &sc.x, rows, &mut sc.h1, true);
    dense_forward(p, plan, ENC2, &sc.h1, rows, &mut sc.h2, true);
    dense_forward(p, plan, HEAD, &sc.h2, rows, &mut sc.o, false);
    // Reparameterisation and KL: z = μ + σ ε, KL = −½ Σ (1 + log σ² − μ² − σ²).
    let mut kl = 0.0f64;
    for i in 0..rows {
        let o = &sc.o[i * 2 * l..(i + 1) * 2 * l];
        let (mu, lv) = o.split_at(l);
        let mut k = 0.0f32;
        for j in 0..l {
            let sd = (0.5 * lv[j]).exp();
            sc.z[i * l + j] = mu[j] + sd * sc.eps[i * l + j];
            k += -0.5 * (1.0 + lv[j] - mu[j] * mu[j] - sd * sd);
        }
        kl += k as f64;
    }
    // Decoder.
    dense_forward(p, plan, DEC1, &sc.z, rows, &mut sc.g1, true);
    dense_forward(p, plan, DEC2, &sc.g1, rows, &mut sc.g2, true);
    dense_forward(p, plan, DEC3, &sc.g2, rows, &mut sc.y, false);
    // Reconstruction term and ∂y.
    let n = rows * PIXELS;
    let rec = match plan.likelihood {
        Likelihood::Bernoulli => bernoulli(&sc.y[..n], &sc.x[..n], &mut sc.dy[..n], scale),
        Likelihood::Gaussian { std } => {
            let inv_var = 1.0 / (std * std) as f32;
            let c = rows as f64 * PIXELS as f64 * (std * (2.0 * std::f64::consts::PI).sqrt()).ln();
            let mut r = 0.0f64;
            for ((&y, &x), dy) in sc.y[..n].iter().zip(&sc.x[..n]).zip(&mut sc.dy[..n]) {
                let diff = y - x;
                r += (0.5 * diff * diff * inv_var) as f64;
                *dy = diff * inv_var * scale;
            }
            r + c
        }
    };
    sc.rec = rec;
    sc.kl = kl;
    // Decoder backward.
    let g = &mut sc.grads;
    let pk = &mut sc.pack;
    dense_backward(
        p,
        plan,
        DEC3,
        &sc.g2,
        &sc.dy,
        rows,
        g,
        pk,
        Some((&mut sc.dg2, true)),
    );
    dense_backward(
        p,
        plan,
        DEC2,
        &sc.g1,
        &sc.dg2,
        rows,
        g,
        pk,
        Some((&mut sc.dg1, true)),
    );
    dense_backward(
        p,
        plan,
        DEC1,
        &sc.z,
        &sc.dg1,
        rows,
        g,
        pk,
        Some((&mut sc.dz, false)),
    );
    // Through z = μ + σ ε and β·KL.
    let sb = scale * beta;
    for i in 0..rows {
        for j in 0..l {
            let (mu, lv) = (sc.o[i * 2 * l + j], sc.o[i * 2 * l + l + j]);
            let (dz, e) = (sc.dz[i * l + j], sc.eps[i * l + j]);
            let sd = (0.5 * lv).exp();
            sc.d_o[i * 2 * l + j] = dz + sb * mu;
            sc.d_o[i * 2 * l + l + j] = 0.5 * dz * e * sd + 0.5 * sb * (sd * sd - 1.0);
        }
    }
    // Encoder backward (the input needs no gradient).
    dense_backward(
        p,
        plan,
        HEAD,
        &sc.h2,
        &sc.d_o,
        rows,
        g,
        pk,
        Some((&mut sc.dh2, true)),
    );
    dense_backward(
        p,
        plan,
        ENC2,
        &sc.h1,
        &sc.dh2,
        rows,
        g,
        pk,
        Some((&mut sc.dh1, true)),
    );
    dense_backward(p, plan, ENC1, &sc.x, &sc.dh1, rows, g, pk, None);
}

/// Σ BCE(y, x) = Σ max(y, 0) − y·x + log(1 + e^{−|y|}), and ∂y = s·(sigmoid(y) − x).
fn bernoulli(y: &[f32], x: &[f32], dy: &mut [f32], scale: f32) -> f64 {
    let mut total = 0.0f64;
    for ((y, x), dy) in y
        .chunks(PIXELS)
        .zip(x.chunks(PIXELS))
        .zip(dy.chunks_mut(PIXELS))
    {
        let mut row = 0.0f32;
        for ((&y, &x), dy) in y.iter().zip(x).zip(dy) {
            let e = (-y.abs()).exp();
            row += y.max(0.0) - y * x + e.ln_1p();
            let sigmoid = if y >= 0.0 {
                1.0 / (1.0 + e)
            } else {
                e / (1.0 + e)
            };
            *dy = (sigmoid - x) * scale;
        }
        total += row as f64;
    }
    total
}
