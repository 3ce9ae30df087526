//! The engine every model trains on: a multilayer perceptron (MLP) of any widths, with its
//! forward pass, its backward pass and Adam fused into a few matrix multiplies, run on two
//! threads with no buffer allocated inside a step (only a few short task lists: ~26 small
//! allocations a W1 step, ~0.1 % of its time).
//!
//! # The network
//! Layer l maps hₗ (B rows, one per example) to
//!
//! hₗ₊₁ = act_l(hₗ · Wₗᵀ + bₗ),   act ∈ {identity, ReLU, LeakyReLU(α)},
//!
//! with Wₗ of shape outₗ × inₗ (row-major, PyTorch's and dfdx's layout) followed by bₗ in one
//! flat parameter vector. The last layer has the identity activation when built by
//! [`Mlp::new`] (logits, means, noise predictions).
//!
//! # The backward pass, the chain rule layer by layer
//! Given ∂L/∂h_L (what [`Mlp::backward`] takes), with aₗ the pre-activation of layer l:
//!
//! ∂aₗ = ∂hₗ₊₁ ⊙ act_l′(hₗ₊₁),  ∂Wₗ = ∂aₗᵀ · hₗ,  ∂bₗ = Σ_rows ∂aₗ,  ∂hₗ = ∂aₗ · Wₗ.
//!
//! act′ is read off the layer's output: ReLU′ = 1\[h > 0\], LeakyReLU′ = 1 or α by the sign of
//! h (α > 0 keeps the sign). Each ∂Wₗ goes straight into Adam as it leaves the matrix multiply
//! ([`Update::Adam`]), or is handed back ([`Update::Gradient`]), or is not computed at all
//! ([`Update::None`]: a frozen network that only passes ∂input back, as a GAN's discriminator
//! during the generator's step).
//!
//! # How it runs (one floor down, in `kernels`)
//! Every product is the packed matrix multiply of `kernels`, with the bias and activation (or,
//! backwards, the activation's derivative) applied to each tile as it leaves the registers,
//! and Adam applied to each weight-gradient tile. The weights are kept packed both ways (Wᵀ for
//! the forward pass, W for ∂h): Adam's epilogue writes W's panels as it computes the new
//! values, and Wᵀ's panels from each finished tile while its new values are in L1
//! (`kernels::Transposed`; the kernels that cannot, and blocks of partial tiles, repack the block's
//! rows after it). (Writing W's panels in a second pass over θ cost W1 ~5 % in a fast phase of
//! the host and ~15 % in a slow one, where every line written that the other core had read
//! costs a cross-core round trip; so did Wᵀ's, 2-9 % in the slow one.)
//!
//! Work comes in stretches of tasks shared by a [`Team`] of threads, and the team waits at the
//! end of each: the forward pass and the ∂h pass split the batch into chunks of rows (rows are
//! independent, so a chunk goes through every layer on one thread); the weight update splits
//! the weight matrices into blocks of 64 rows (each block sums over the whole batch). A model's
//! training step takes two stretches in all: [`rowwise`] runs one chunk of rows through
//! everything that is row by row (every network's forward pass, the loss and its gradient, the
//! glue between networks, every backward pass down to ∂input) as one task, and
//! [`update_nets`] then updates every network's weight blocks in one stretch, largest first.
//! (Before, a VAE step was six stretches with the glue on one thread between them: W1 trains
//! ~4 % faster this way, W2 ~2 %.) [`Mlp::forward`] and [`Mlp::backward`] are the same
//! stretches for one network on its own. Every task computes the same sums in the same order
//! whoever runs it: one thread and two give bit-identical results.

mod adam;
mod floats;
#[cfg(not(miri))]
pub mod reference;
mod team;

pub use adam::AdamSettings;

pub use team::{threads_wanted, Team};

use floats::Floats;

use crate::error::{ensure, Error, Result};
use crate::kernels::{
    adam_block, adam_update, chunk_granule, column_sums, gemm, pack_b_rows, pack_weight_rows,
    panel_cols, tile_rows, AdamConsts, AdamRows, AdamStep, Epilogue, PackedRows, PanelsB, StridedA,
    Transposed, NR,
};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, Uniform};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};

/// The nonlinearity after a layer.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Activation {
    /// act(a) = a (the output layer: logits, means).
    Identity,
    /// act(a) = max(a, 0).
    Relu,
    /// act(a) = a for a > 0, α·a otherwise (0 < α < 1; GAN discriminators use α = 0.2).
    LeakyRelu(f32),
}

impl Activation {
    /// act(a).
    pub fn apply(self, a: f32) -> f32 {
        match self {
            Activation::Identity => a,
            Activation::Relu => a.max(0.0),
            Activation::LeakyRelu(alpha) => a.max(alpha * a),
        }
    }

    /// act′ times g, read off the output h = act(a).
    pub fn backward(self, h: f32, g: f32) -> f32 {
        match self {
            Activation::Identity => g,
            Activation::Relu => {
                if h > 0.0 {
                    g
                } else {
                    0.0
                }
            }
            Activation::LeakyRelu(alpha) => {
                if h > 0.0 {
                    g
                } else {
                    alpha * g
                }
            }
        }
    }

    fn forward_epilogue(self, bias: &[f32]) -> Epilogue<'_> {
        match self {
            Activation::Identity => Epilogue::Bias(bias),
            Activation::Relu => Epilogue::BiasRelu(bias),
            Activation::LeakyRelu(alpha) => Epilogue::BiasLeaky(bias, alpha),
        }
    }

    fn mask_epilogue(self, h: &[f32]) -> Epilogue<'_> {
        match self {
            Activation::Identity => Epilogue::Store,
            Activation::Relu => Epilogue::ReluMask(h),
            Activation::LeakyRelu(alpha) => Epilogue::LeakyMask(h, alpha),
        }
    }
}

/// One layer: `out` outputs from `inp` inputs, then `activation`.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Layer {
    /// Inputs (columns of W).
    pub inp: usize,
    /// Outputs (rows of W).
    pub out: usize,
    /// The nonlinearity after the affine map.
    pub activation: Activation,
}

/// What [`Mlp::backward`] does with the weight gradients.
pub enum Update<'a> {
    /// One Adam step with the network's own settings, fused into the gradient's computation
    /// (the gradient itself is never stored).
    Adam,
    /// Nothing: the network is left untouched (only ∂input is wanted).
    None,
    /// Store the gradient here, in the flat layout of [`Mlp::parameters`]; parameters unchanged.
    Gradient(&'a mut [f32]),
}

/// Widest layer the engine accepts (a guard against typos such as `hidden = 2560000`).
pub const MAX_WIDTH: usize = 1 << 16;
/// Most parameters a network may have (about 1 GB with Adam's moments).
pub const MAX_PARAMETERS: usize = 1 << 26;
/// Largest batch a call accepts.
pub const MAX_ROWS: usize = 1 << 20;

/// A layer's place in the flat parameter vector: W (out × inp) at `at`, then b.
#[derive(Debug, Clone, Copy)]
struct Dense {
    inp: usize,
    out: usize,
    act: Activation,
    at: usize,
}

impl Dense {
    fn bias(&self) -> usize {
        self.at + self.inp * self.out
    }

    /// Whether the forward pass packs this layer's input for ∂W. An input of whole 16-wide
    /// panels is read in place by ∂W's multiply instead (no copy every step; W2's packing was
    /// ~5 % of its time); a narrower or ragged one (the GAN's 2-wide, the VAE decoder's
    /// latent) is packed, so the multiply never reads past the buffer.
    fn packs_input(&self) -> bool {
        !self.inp.is_multiple_of(NR)
    }
}

/// Rows of W per weight-update task (a multiple of the 16-column panels the packed weights
/// use, so no two tasks write one panel).
const BLOCK: usize = 64;
/// Layers with at most this many inputs compute ∂W transposed (see `update_block`).
const NARROW: usize = 8;

/// The row stride of a hidden layer's buffers (its h and ∂a; the network's input and output
/// rows stay dense, as callers see them): the width, plus one 16-float cache line when the
/// width is a multiple of 64. ∂W = ∂aᵀ·h walks both down the batch, 16 or 32 columns of
/// each row per step: with rows a multiple of 256 bytes apart, those lines fall into a
/// quarter or fewer of L1's 64 sets and evict each other every step (a 256-wide layer: every
/// row of 1,024 bytes lands in 4 of them); one line more puts consecutive rows into
/// different sets. Measured (`∂W + Adam`, 64 × 100 × 256, one thread): 184 → 211 GFLOP/s.
fn row_stride(width: usize) -> usize {
    if width.is_multiple_of(64) {
        width + NR
    } else {
        width
    }
}

/// A multilayer perceptron with its Adam state and the buffers of a step. Introduced in
/// chapter 3 (the VAE's encoder and decoder); chapters 4 and 5 build the GAN's two networks and
/// the diffusion denoiser from it.
pub struct Mlp {
    layers: Vec<Dense>,
    theta: Floats,
    m: Floats,
    v: Floats,
    adam: AdamSettings,
    steps: usize,
    /// Per layer: Wᵀ packed (the forward pass's B operand) and W packed (for ∂h).
    fwd: Vec<Floats>,
    bwd: Vec<Floats>,
    /// Weight-update tasks: (layer, first row, end row), largest first.
    blocks: Vec<(usize, usize, usize)>,
    /// The batch the buffers hold: rows, its chunks, and whether the last forward pass kept
    /// what backward needs.
    rows: usize,
    chunks: Vec<(usize, usize)>,
    ready: bool,
    /// Row strides of h₀ … h_L (∂aₗ has hₗ₊₁'s): the widths, padded for hidden layers
    /// ([`row_stride`]).
    ld: Vec<usize>,
    /// h₀ … h_L, B rows each.
    h: Vec<Floats>,
    /// ∂a₀ … ∂a_{L−1}.
    da: Vec<Floats>,
    /// ∂h₀ (the input gradient).
    dinput: Floats,
    /// hₗ packed as the B operand of ∂Wₗ = ∂aₗᵀ · hₗ.
    packed_in: Vec<Floats>,
    /// With [`Mlp::keep_before_update`]: the parameters as they were before the last Adam
    /// update (copied by its tasks), and the step count they belong to (None: not valid).
    keep: bool,
    kept: Floats,
    kept_steps: Option<usize>,
    /// Every parameter is known to be finite (checked where θ was set, and by the update's
    /// tasks on the rows they changed): then [`Mlp::first_non_finite`] need not look.
    finite: bool,
    /// Tests only: the weight-update task (an index into `blocks`) that panics at the next
    /// update, after updating its rows (and their packed copies) and before its bias check.
    #[cfg(test)]
    pub(crate) fault: Option<usize>,
}

/// What a checkpoint stores of a network: its layers, parameters and Adam's state.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MlpState {
    /// The layers, input to output.
    pub layers: Vec<Layer>,
    /// Every parameter, layer by layer, W then b.
    pub parameters: Vec<f32>,
    /// Adam's settings.
    pub adam: AdamSettings,
    /// Adam's first moments, in the layout of `parameters`.
    pub m: Vec<f32>,
    /// Adam's second moments.
    pub v: Vec<f32>,
    /// Adam steps taken.
    pub steps: usize,
}

impl MlpState {
    /// The widths input to output (`[64, 256, 256, 16]` for three layers).
    pub fn widths(&self) -> Vec<usize> {
        std::iter::once(self.layers.first().map_or(0, |l| l.inp))
            .chain(self.layers.iter().map(|l| l.out))
            .collect()
    }
}

impl Mlp {
    /// A network through the given widths (`[64, 256, 256, 16]` is three layers), with
    /// `hidden` after every layer but the last (which has none), initialised like PyTorch's
    /// and dfdx's `Linear` (W and b uniform in ±1/√in) from `seed`.
    pub fn new(widths: &[usize], hidden: Activation, adam: AdamSettings, seed: u64) -> Result<Mlp> {
        if widths.len() < 2 {
            return Err(Error::param(
                "widths",
                format!("{widths:?}"),
                "give at least an input and an output width, e.g. [64, 256, 10]",
            ));
        }
        let layers: Vec<Layer> = widths
            .windows(2)
            .enumerate()
            .map(|(i, w)| Layer {
                inp: w[0],
                out: w[1],
                activation: if i + 2 == widths.len() {
                    Activation::Identity
                } else {
                    hidden
                },
            })
            .collect();
        Mlp::with_layers(&layers, adam, seed)
    }

    /// A network of the given layers (each one's `inp` must be the previous one's `out`).
    pub fn with_layers(layers: &[Layer], adam: AdamSettings, seed: u64) -> Result<Mlp> {
        validate_layers(layers)?;
        adam.validate()?;
        let mut rng = StdRng::seed_from_u64(seed);
        let mut theta = Vec::new();
        for l in layers {
            let bound = 1.0 / (l.inp as f32).sqrt();
            let u = Uniform::new_inclusive(-bound, bound);
            theta.extend((0..(l.inp + 1) * l.out).map(|_| u.sample(&mut rng)));
        }
        let n = theta.len();
        let mut net = Mlp::empty(layers, adam);
        net.restore_parts(&theta, Floats::zeros(n), Floats::zeros(n), 0);
        Ok(net)
    }

    fn empty(layers: &[Layer], adam: AdamSettings) -> Mlp {
        let mut at = 0;
        let dense: Vec<Dense> = layers
            .iter()
            .map(|l| {
                let d = Dense {
                    inp: l.inp,
                    out: l.out,
                    act: l.activation,
                    at,
                };
                at += (l.inp + 1) * l.out;
                d
            })
            .collect();
        let mut blocks = vec![];
        for (li, d) in dense.iter().enumerate() {
            for r0 in (0..d.out).step_by(BLOCK) {
                blocks.push((li, r0, (r0 + BLOCK).min(d.out)));
            }
        }
        // Largest first, so the last tasks taken are short and the threads finish together.
        blocks.sort_by_key(|&(li, r0, r1)| std::cmp::Reverse((r1 - r0) * dense[li].inp));
        let top = dense.len();
        let ld = std::iter::once(dense[0].inp)
            .chain(dense.iter().map(|d| d.out))
            .enumerate()
            .map(|(i, w)| if i == 0 || i == top { w } else { row_stride(w) })
            .collect();
        Mlp {
            ld,
            fwd: dense
                .iter()
                .map(|d| Floats::zeros(d.inp * panel_cols(d.out)))
                .collect(),
            bwd: dense
                .iter()
                .map(|d| Floats::zeros(d.out * panel_cols(d.inp)))
                .collect(),
            h: vec![Floats::default(); dense.len() + 1],
            da: vec![Floats::default(); dense.len()],
            packed_in: vec![Floats::default(); dense.len()],
            layers: dense,
            theta: Floats::default(),
            m: Floats::default(),
            v: Floats::default(),
            adam,
            steps: 0,
            blocks,
            rows: 0,
            chunks: vec![],
            ready: false,
            dinput: Floats::default(),
            keep: false,
            kept: Floats::default(),
            kept_steps: None,
            finite: false,
            #[cfg(test)]
            fault: None,
        }
    }

    /// The layers, input to output.
    pub fn layers(&self) -> Vec<Layer> {
        self.layers
            .iter()
            .map(|d| Layer {
                inp: d.inp,
                out: d.out,
                activation: d.act,
            })
            .collect()
    }

    /// Input width.
    pub fn input_width(&self) -> usize {
        self.layers[0].inp
    }

    /// Output width.
    pub fn output_width(&self) -> usize {
        self.layers[self.layers.len() - 1].out
    }

    /// The output rows of the last [`Mlp::forward`] (empty before the first).
    pub fn last_output(&self) -> &[f32] {
        if self.ready {
            &self.h[self.layers.len()]
        } else {
            &[]
        }
    }

    /// Every parameter, layer by layer, W (out × in, row-major) then b.
    pub fn parameters(&self) -> &[f32] {
        &self.theta
    }

    /// Adam's settings.
    pub fn adam(&self) -> AdamSettings {
        self.adam
    }

    /// Changes Adam's settings (the moments and step count are kept).
    pub fn set_adam(&mut self, adam: AdamSettings) -> Result<()> {
        adam.validate()?;
        self.adam = adam;
        Ok(())
    }

    /// Adam steps taken.
    pub fn steps(&self) -> usize {
        self.steps
    }

    /// Replaces every parameter (layout of [`Mlp::parameters`]); Adam's state is kept.
    pub fn set_parameters(&mut self, values: &[f32]) -> Result<()> {
        check_len("Mlp::set_parameters", self.theta.len(), values.len())?;
        check_finite("parameters", values)?;
        let (m, v) = (std::mem::take(&mut self.m), std::mem::take(&mut self.v));
        self.restore_parts(values, m, v, self.steps);
        Ok(())
    }

    /// The network's state, for a checkpoint.
    pub fn state(&self) -> MlpState {
        MlpState {
            layers: self.layers(),
            parameters: self.theta.to_vec(),
            adam: self.adam,
            m: self.m.to_vec(),
            v: self.v.to_vec(),
            steps: self.steps,
        }
    }

    /// A network from a checkpoint's state, checked: sizes against the layers, every value
    /// finite, second moments ≥ 0, and a plausible step count.
    pub fn from_state(state: MlpState) -> Result<Mlp> {
        validate_layers(&state.layers)?;
        state.adam.validate()?;
        let n: usize = state.layers.iter().map(|l| (l.inp + 1) * l.out).sum();
        check_len("checkpoint parameters", n, state.parameters.len())?;
        check_len("checkpoint Adam m", n, state.m.len())?;
        check_len("checkpoint Adam v", n, state.v.len())?;
        check_finite("checkpoint parameters", &state.parameters)?;
        check_finite("checkpoint Adam m", &state.m)?;
        check_finite("checkpoint Adam v", &state.v)?;
        if state.v.iter().any(|&v| v < 0.0) {
            return Err(Error::param(
                "checkpoint Adam v",
                "a negative second moment",
                "second moments are averages of squares: this checkpoint was edited or damaged",
            ));
        }
        // Adam's bias correction divides by 1 − β₁ᵗ: t must be a real count of steps.
        ensure(
            state.steps <= i32::MAX as usize,
            "checkpoint Adam steps",
            state.steps,
            "a step count this large was not written by training: the checkpoint is damaged",
        )?;
        let mut net = Mlp::empty(&state.layers, state.adam);
        let (m, v) = (Floats::from_slice(&state.m), Floats::from_slice(&state.v));
        net.restore_parts(&state.parameters, m, v, state.steps);
        Ok(net)
    }

    /// Undoes updates: puts back the parameters `kept` (as [`Mlp::parameters`] gave them
    /// before) and the step count `steps`. Adam's moments are kept where finite and reset to 0
    /// where an update made them NaN or infinite. For a trainer whose step failed or went
    /// non-finite: the network is then exactly what a checkpoint of it would load as.
    pub fn rewind(&mut self, kept: &[f32], steps: usize) -> Result<()> {
        check_len("Mlp::rewind", self.theta.len(), kept.len())?;
        check_finite("kept parameters", kept)?;
        ensure(
            steps <= self.steps,
            "steps",
            steps,
            &format!(
                "rewind to a step count at most the current one ({})",
                self.steps
            ),
        )?;
        let (mut m, mut v) = (std::mem::take(&mut self.m), std::mem::take(&mut self.v));
        for (m, v) in m.iter_mut().zip(v.iter_mut()) {
            if !m.is_finite() || !v.is_finite() {
                (*m, *v) = (0.0, 0.0);
            }
        }
        self.restore_parts(kept, m, v, steps);
        Ok(())
    }

    /// Has every Adam update keep the parameters it replaces, so that [`Mlp::undo_update`] can
    /// put them back: what a trainer that undoes a failed or non-finite step needs. Nothing is
    /// copied: the parameters live in two buffers, and an update reads the current one and
    /// writes the stepped values into the other, which then becomes θ (each update task its
    /// own rows); the one it read is the undo copy. (A copy by the update tasks cost W1 ~2-5 %.)
    /// With this on, an update that fails part-way leaves θ incomplete until
    /// [`Mlp::undo_update`], which the trainers call on every failed step. Off by default.
    pub fn keep_before_update(&mut self, on: bool) {
        self.keep = on;
        if !on {
            self.kept = Floats::default();
            self.kept_steps = None;
        }
    }

    /// Undoes what changed the network since its step count was `steps`: nothing if no
    /// update ran since, else the one Adam update since, from the copy that
    /// [`Mlp::keep_before_update`] has it keep (parameters and step count back). In both cases
    /// Adam's moments are kept where finite and reset to 0 where they are NaN or infinite, as
    /// [`Mlp::rewind`] does: the network is then exactly what a checkpoint of it would load as.
    /// An error if more than one update ran, or the copy was not kept.
    pub fn undo_update(&mut self, steps: usize) -> Result<()> {
        if self.steps != steps {
            ensure(
                self.steps == steps + 1 && self.kept_steps == Some(steps),
                "steps",
                steps,
                &format!(
                    "undo_update undoes one update kept by keep_before_update(true) (now at \
                     step {}): use rewind with parameters you kept",
                    self.steps
                ),
            )?;
            std::mem::swap(&mut self.theta, &mut self.kept);
            self.kept_steps = None;
            self.finite = false;
            self.steps = steps;
            self.repack();
        }
        for (m, v) in self.m.iter_mut().zip(self.v.iter_mut()) {
            if !m.is_finite() || !v.is_finite() {
                (*m, *v) = (0.0, 0.0);
            }
        }
        Ok(())
    }

    /// The index and value of the first parameter that is NaN or infinite, if any.
    pub fn first_non_finite(&self) -> Option<(usize, f32)> {
        // Checked every step by the trainers: usually known already (the update's tasks
        // checked the rows they changed), else one vectorised pass, the position only when
        // there is one.
        if self.finite || all_finite(&self.theta) {
            return None;
        }
        self.theta
            .iter()
            .position(|p| !p.is_finite())
            .map(|i| (i, self.theta[i]))
    }

    fn restore_parts(&mut self, theta: &[f32], m: Floats, v: Floats, steps: usize) {
        self.finite = all_finite(theta);
        self.theta = Floats::from_slice(theta);
        self.m = m;
        self.v = v;
        self.steps = steps;
        self.kept_steps = None;
        self.repack();
    }

    /// Packs every layer's W from θ into both packed copies.
    fn repack(&mut self) {
        self.ready = false;
        for (li, d) in self.layers.iter().enumerate() {
            let w = &self.theta[d.at..d.bias()];
            let (fwd, bwd) = (&mut self.fwd[li], &mut self.bwd[li]);
            // SAFETY: fwd and bwd were sized for this layer in `empty` (inp · panel_cols(out)
            // and out · panel_cols(inp)), and `w` holds all `out` rows of W.
            unsafe { pack_weight_rows(w, 0, d.inp, d.out, fwd.as_mut_ptr(), bwd.as_mut_ptr()) };
        }
    }

    /// Sizes the buffers for `rows` rows (allocates only when the batch grows).
    fn size_for(&mut self, rows: usize, training: bool) {
        if self.rows != rows || self.chunks.is_empty() {
            self.rows = rows;
            self.chunks = row_chunks(rows, tile_rows(), chunk_granule());
        }
        for (h, &ld) in self.h.iter_mut().zip(&self.ld) {
            h.resize_zeroed(rows * ld);
        }
        if training {
            for (li, d) in self.layers.iter().enumerate() {
                self.da[li].resize_zeroed(rows * self.ld[li + 1]);
                let packed = if d.packs_input() {
                    rows * panel_cols(d.inp)
                } else {
                    0
                };
                self.packed_in[li].resize_zeroed(packed);
            }
            self.dinput.resize_zeroed(rows * self.layers[0].inp);
        }
    }

    fn check_input(&self, what: &str, x: &[f32], width: usize) -> Result<usize> {
        if x.is_empty() || !x.len().is_multiple_of(width) {
            return Err(Error::shape(
                what,
                format!("a whole number of rows of {width} values"),
                format!("{} values", x.len()),
            ));
        }
        let rows = x.len() / width;
        ensure(
            rows <= MAX_ROWS,
            "rows",
            rows,
            &format!("pass at most {MAX_ROWS} rows at a time"),
        )?;
        Ok(rows)
    }

    /// The forward pass on a batch `x` (rows of [`Mlp::input_width`] values), keeping what
    /// [`Mlp::backward`] needs; returns the output rows.
    pub fn forward(&mut self, team: &Team, x: &[f32]) -> Result<&[f32]> {
        self.forward_in_place("Mlp::forward", team, x, true)
    }

    /// The forward pass only, for inference on any number of rows (nothing kept for a
    /// backward pass), in the network's own buffers; the output stays valid until the next
    /// call.
    pub fn infer(&mut self, team: &Team, x: &[f32]) -> Result<&[f32]> {
        self.forward_in_place("Mlp::infer", team, x, false)
    }

    fn forward_in_place(
        &mut self,
        what: &str,
        team: &Team,
        x: &[f32],
        training: bool,
    ) -> Result<&[f32]> {
        let rows = self.check_input(what, x, self.input_width())?;
        self.size_for(rows, training);
        self.ready = false;
        let packed_in = training.then_some(&mut self.packed_in[..]);
        run_forward(
            &self.layers,
            &self.ld,
            &self.theta,
            &self.fwd,
            &self.chunks,
            &mut self.h,
            packed_in,
            x,
            team,
        )?;
        self.ready = training;
        Ok(&self.h[self.layers.len()])
    }

    /// The forward pass only, into new buffers (the network is only read).
    pub fn predict(&self, team: &Team, x: &[f32]) -> Result<Vec<f32>> {
        let rows = self.check_input("Mlp::predict", x, self.input_width())?;
        let chunks = row_chunks(rows, tile_rows(), chunk_granule());
        let mut h: Vec<Floats> = self.ld.iter().map(|&ld| Floats::zeros(rows * ld)).collect();
        run_forward(
            &self.layers,
            &self.ld,
            &self.theta,
            &self.fwd,
            &chunks,
            &mut h,
            None,
            x,
            team,
        )?;
        Ok(h.pop().map(|out| out.to_vec()).unwrap_or_default())
    }

    /// The backward pass from ∂L/∂output (`dout`, one row per row of the last
    /// [`Mlp::forward`]), doing `update` with the weight gradients.
    pub fn backward(&mut self, team: &Team, dout: &[f32], update: Update<'_>) -> Result<()> {
        self.backward_impl(team, dout, update, false)
    }

    /// [`Mlp::backward`], also returning ∂L/∂input (one row per input row).
    pub fn backward_with_input(
        &mut self,
        team: &Team,
        dout: &[f32],
        update: Update<'_>,
    ) -> Result<&[f32]> {
        self.backward_impl(team, dout, update, true)?;
        Ok(&self.dinput)
    }

    fn backward_impl(
        &mut self,
        team: &Team,
        dout: &[f32],
        update: Update<'_>,
        want_input: bool,
    ) -> Result<()> {
        if !self.ready {
            return Err(Error::param(
                "Mlp::backward",
                "no forward pass to go back through",
                "call forward (not infer) on the batch first",
            ));
        }
        let rows = self.rows;
        let top = self.layers.len() - 1;
        check_len(
            "Mlp::backward (∂output)",
            rows * self.output_width(),
            dout.len(),
        )?;
        if let Update::Gradient(g) = &update {
            check_len("Mlp::backward (gradient buffer)", self.theta.len(), g.len())?;
        }
        // Stretch 1, by chunks of rows: ∂a of every layer, top down, and ∂input.
        {
            let top_out = self.output_width();
            let (rows_of, chunks) = RowViews::of(self);
            team.run(chunks.len(), &|q| {
                let (i0, i1) = chunks[q];
                // SAFETY: task q alone touches rows i0..i1 of ∂a and ∂input (the chunks are
                // disjoint); the packed weights and h are only read during this stretch.
                unsafe {
                    rows_of.da[top]
                        .part_mut(i0 * top_out, i1 * top_out)
                        .copy_from_slice(&dout[i0 * top_out..i1 * top_out]);
                    rows_of.backward_chunk((i0, i1), want_input);
                }
            })?;
        }
        // Stretch 2, by blocks of weight rows: ∂W = ∂aᵀ·h over the whole batch, ∂b.
        update_nets(team, [(self, update)])
    }

    /// Whether this network can do `update` now: a forward pass to go back through, and a
    /// gradient buffer of its size. [`update_nets`] checks every network before it changes any.
    fn check_update(&self, update: &Update<'_>) -> Result<()> {
        if !self.ready {
            return Err(Error::param(
                "Mlp::backward",
                "no forward pass to go back through",
                "call forward (not infer) on the batch first",
            ));
        }
        if let Update::Gradient(g) = update {
            check_len("Mlp::backward (gradient buffer)", self.theta.len(), g.len())?;
        }
        Ok(())
    }

    /// What an update of this network needs from it before its tasks run: Adam's constants
    /// for step t = steps + 1, where the gradient goes, where the undo copy goes. Call
    /// [`Mlp::check_update`] first: this already changes the network (the undo copy).
    fn plan_update(&mut self, update: &mut Update<'_>) -> Plan {
        let adam = match update {
            Update::Adam => Some(AdamConsts::new(AdamStep {
                lr: self.adam.lr as f32,
                beta1: self.adam.beta1 as f32,
                beta2: self.adam.beta2 as f32,
                eps: self.adam.eps as f32,
                t: i32::try_from(self.steps + 1).unwrap_or(i32::MAX),
            })),
            Update::None | Update::Gradient(_) => None,
        };
        let grads = match update {
            Update::Gradient(g) => Some(Raw::of(g)),
            _ => None,
        };
        let kept = if adam.is_some() && self.keep {
            if self.kept.len() != self.theta.len() {
                self.kept = Floats::zeros(self.theta.len());
            }
            // The parameters before the step stay where they are and become the undo copy; the
            // step writes every parameter anew into the other buffer (each block its rows).
            std::mem::swap(&mut self.theta, &mut self.kept);
            // Valid once the update's tasks have run (all of them run, even when one fails).
            self.kept_steps = Some(self.steps);
            Some(Raw::of(&mut self.kept))
        } else {
            None
        };
        let active = adam.is_some() || grads.is_some();
        Plan {
            adam,
            grads,
            kept,
            active,
        }
    }

    /// After an update's tasks: the step count (every task that ran used step t for its
    /// moments, so the step counts even when a task failed), whether θ is known finite, and
    /// packed copies that match θ again if a task failed part-way.
    fn finish_update(&mut self, plan: &Plan, done: bool, non_finite: bool) {
        if plan.adam.is_some() {
            self.steps += 1;
            self.finite = self.finite && done && !non_finite;
        }
        if !done && plan.active {
            self.repack();
        }
    }
}

/// Tasks sorted largest first, rearranged for a [`Team`] whose caller takes from the front and
/// helper from the back: ranks 0, 2, 4, … from the front, ranks 1, 3, 5, … from the back.
fn from_both_ends<T>(sorted: Vec<T>) -> Vec<T> {
    let mut front = Vec::with_capacity(sorted.len());
    let mut back = Vec::with_capacity(sorted.len() / 2);
    for (rank, t) in sorted.into_iter().enumerate() {
        if rank % 2 == 0 {
            front.push(t);
        } else {
            back.push(t);
        }
    }
    front.extend(back.into_iter().rev());
    front
}

/// A network's layers, weight-update blocks, batch rows and row strides, as an update's tasks
/// read them.
type NetBlocks<'a> = (&'a [Dense], &'a [(usize, usize, usize)], usize, &'a [usize]);

/// What [`update_nets`] does to one network: Adam with these constants, or the gradient
/// stored here, and the undo copy.
struct Plan {
    adam: Option<AdamConsts>,
    grads: Option<Raw>,
    kept: Option<Raw>,
    /// Anything to compute at all (not [`Update::None`]).
    active: bool,
}

/// The weight updates of several networks in one stretch of tasks: every network's blocks of
/// weight rows, largest first, shared by the team (so the threads finish together), each block
/// computing ∂W = ∂aᵀ·h and ∂b over the whole batch and doing what its network's [`Update`]
/// says. The second half of a training step, after [`rowwise`] (or a backward pass).
pub fn update_nets<const N: usize>(team: &Team, nets: [(&mut Mlp, Update<'_>); N]) -> Result<()> {
    update_nets_with(team, nets, &mut || {})
}

/// [`update_nets`], with `first` run on the calling thread while the helper starts on the
/// blocks ([`Team::run_with`]): a trainer's serial work for its next step that the update
/// does not read (its next batch, its next noise).
pub fn update_nets_with<const N: usize>(
    team: &Team,
    nets: [(&mut Mlp, Update<'_>); N],
    first: &mut dyn FnMut(),
) -> Result<()> {
    let mut nets = nets;
    // Every network is checked before any is changed: a plan keeps its undo copy by swapping
    // buffers, so a later network's error must not leave an earlier one half-planned.
    for (net, update) in nets.iter() {
        net.check_update(update)?;
    }
    let plans: Vec<Plan> = nets
        .iter_mut()
        .map(|(net, update)| net.plan_update(update))
        .collect();
    let shared: Vec<Shared> = nets.iter_mut().map(|(net, _)| Shared::of(net)).collect();
    #[cfg(test)]
    let shared: Vec<Shared> = shared
        .into_iter()
        .zip(nets.iter_mut())
        .map(|(sh, (net, _))| {
            let fault = net.fault.take();
            Shared {
                fault: fault.and_then(|i| net.blocks.get(i)).map(|b| (b.0, b.1)),
                ..sh
            }
        })
        .collect();
    // (network, block), largest first across the networks.
    let mut tasks: Vec<(usize, usize)> = vec![];
    for (k, (net, _)) in nets.iter().enumerate() {
        if plans[k].active {
            tasks.extend((0..net.blocks.len()).map(|b| (k, b)));
        }
    }
    let size = |&(k, b): &(usize, usize)| {
        let (li, r0, r1) = nets[k].0.blocks[b];
        (r1 - r0) * nets[k].0.layers[li].inp
    };
    tasks.sort_by_key(|t| std::cmp::Reverse(size(t)));
    // The caller takes tasks from the front and the helper from the back: every other block,
    // largest first from both ends, so each thread starts big and they meet on small blocks.
    let tasks = from_both_ends(tasks);
    let done = {
        let views: Vec<NetBlocks<'_>> = nets
            .iter()
            .map(|(net, _)| (&net.layers[..], &net.blocks[..], net.rows, &net.ld[..]))
            .collect();
        let block = |i: usize| {
            let (k, b) = tasks[i];
            let (layers, blocks, rows, ld) = views[k];
            let (li, r0, r1) = blocks[b];
            let plan = &plans[k];
            // SAFETY: block b alone touches rows r0..r1 of layer li's W, b, m, v, their packed
            // copies, the gradient buffer and the undo copy of network k; ∂a and the packed
            // inputs are complete (the forward and backward passes) and only read.
            unsafe {
                update_block(
                    &shared[k],
                    layers[li],
                    li,
                    (r0, r1),
                    rows,
                    (ld[li], ld[li + 1]),
                    plan.adam,
                    plan.grads,
                    plan.kept,
                )
            };
        };
        team.run_with(tasks.len(), &block, first)
    };
    for (k, (net, _)) in nets.iter_mut().enumerate() {
        let non_finite = shared[k].non_finite.load(Ordering::Relaxed);
        net.finish_update(&plans[k], done.is_ok(), non_finite);
    }
    done
}

/// The first half of a training step for networks that share a batch (a VAE's encoder and
/// decoder, a generator and the discriminator it is judged by): the batch is cut into chunks,
/// and `body` takes one chunk through everything that is row by row (the forward passes, the
/// loss and its gradient, the backward passes down to ∂input), with [`NetRows`] views of each
/// network's rows; one task per chunk, shared by the team, so the glue between the networks
/// runs on both threads too and the team waits once, not once per network and pass.
///
/// Network k sees `rows[k]` rows; each must be a whole multiple of the smallest, u (a
/// PacGAN discriminator sees u rows of m samples side by side, its generator m·u rows): chunk q
/// holds units u₀..u₁ of u, i.e. rows `u₀·rows[k]/u .. u₁·rows[k]/u` of network k.
/// `results[q]` gets chunk q's return value (its share of the loss). Then [`update_nets`] does
/// the weight updates. Chunks are fixed by the rows, so one thread and two give the same
/// results.
pub fn rowwise<T: Send + Default, const N: usize>(
    team: &Team,
    nets: [&mut Mlp; N],
    rows: [usize; N],
    results: &mut Vec<T>,
    body: &(dyn Fn(&mut [NetRows<'_>; N]) -> T + Sync),
) -> Result<()> {
    let Some(&units) = rows.iter().min() else {
        return Ok(());
    };
    for &r in &rows {
        if !(1..=MAX_ROWS).contains(&r) {
            // (The message is formatted only here: this runs every training step.)
            ensure(
                false,
                "rows",
                r,
                &format!("a batch has between 1 and {MAX_ROWS} rows"),
            )?;
        }
        if !r.is_multiple_of(units) {
            return Err(Error::shape(
                "rowwise (rows of each network)",
                format!("whole multiples of {units}"),
                format!("{rows:?}"),
            ));
        }
    }
    let mut nets = nets;
    for (net, &r) in nets.iter_mut().zip(&rows) {
        net.size_for(r, true);
        net.ready = false;
    }
    let chunks = row_chunks(units, tile_rows(), chunk_granule());
    results.clear();
    results.resize_with(chunks.len(), T::default);
    let out = SendPtr(results.as_mut_ptr());
    let done = {
        let views = nets.each_mut().map(|net| RowViews::of(net).0);
        team.run(chunks.len(), &|q| {
            let (u0, u1) = chunks[q];
            let mut rows_of: [NetRows<'_>; N] = std::array::from_fn(|k| {
                let per = rows[k] / units;
                NetRows {
                    views: &views[k],
                    range: (u0 * per, u1 * per),
                }
            });
            let value = body(&mut rows_of);
            // SAFETY: `results` has one slot per chunk and task q alone writes slot q.
            unsafe { *out.slot(q) = value };
        })
    };
    if done.is_ok() {
        for net in nets.iter_mut() {
            net.ready = true;
        }
    }
    done
}

/// A pointer to per-task result slots, shared by the tasks of one call.
struct SendPtr<T>(*mut T);
// SAFETY: each task writes only its own slot (see `rowwise`), and T is Send.
unsafe impl<T: Send> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    /// Slot q (in bounds: the caller's task index).
    fn slot(&self, q: usize) -> *mut T {
        self.0.wrapping_add(q)
    }
}

/// A network's row buffers and (read-only) weights during a stretch of row tasks.
struct RowViews<'a> {
    layers: &'a [Dense],
    ld: &'a [usize],
    theta: &'a [f32],
    fwd: &'a [Floats],
    bwd: &'a [Floats],
    rows: usize,
    h: Vec<Raw>,
    da: Vec<Raw>,
    packed_in: Vec<Raw>,
    dinput: Raw,
}

impl<'a> RowViews<'a> {
    /// The views, and the chunks of rows the batch is cut into.
    fn of(net: &'a mut Mlp) -> (RowViews<'a>, &'a [(usize, usize)]) {
        let raws = |v: &mut Vec<Floats>| v.iter_mut().map(|b| Raw::of(b)).collect();
        let Mlp {
            layers,
            ld,
            theta,
            fwd,
            bwd,
            rows,
            h,
            da,
            packed_in,
            dinput,
            chunks,
            ..
        } = net;
        let views = RowViews {
            layers,
            ld,
            theta,
            fwd,
            bwd,
            rows: *rows,
            h: raws(h),
            da: raws(da),
            packed_in: raws(packed_in),
            dinput: Raw::of(dinput),
        };
        (views, chunks)
    }

    /// hₗ₊₁ = act(hₗ·Wₗᵀ + bₗ) for rows i0..i1 (h₀'s rows already in place), each hₗ also
    /// packed as the B operand of ∂Wₗ when training (no packed buffers: inference).
    ///
    /// # Safety
    /// The caller alone touches rows i0..i1 of every row buffer during the stretch.
    unsafe fn forward_chunk(&self, (i0, i1): (usize, usize)) {
        for (li, d) in self.layers.iter().enumerate() {
            let (ld_in, ld_out) = (self.ld[li], self.ld[li + 1]);
            // SAFETY: rows i0..i1 are this task's (the function's contract).
            let input = unsafe { self.h[li].part(i0 * ld_in, i1 * ld_in) };
            if let Some(packed) = self.packed_in.get(li).filter(|_| d.packs_input()) {
                // Only whole panels are padded: a packed input's rows are dense.
                debug_assert_eq!(ld_in, d.inp);
                // SAFETY: packed_in[li] holds rows · panel_cols(inp) floats (size_for) and
                // this task alone writes its rows i0..i1.
                unsafe { pack_b_rows(input, i0, self.rows, d.inp, packed.ptr) };
            }
            // SAFETY: as above.
            let out = unsafe { self.h[li + 1].part_mut(i0 * ld_out, i1 * ld_out) };
            let bias = &self.theta[d.bias()..d.bias() + d.out];
            gemm(
                i1 - i0,
                d.out,
                d.inp,
                StridedA::rows(input, ld_in),
                &self.fwd[li][..],
                out,
                ld_out,
                d.act.forward_epilogue(bias),
            );
        }
    }

    /// From ∂L/∂output in rows i0..i1 of the top ∂a buffer: ∂a of every layer, top down
    /// (∂aₗ = ∂hₗ₊₁ ⊙ act′), and ∂input when `want_input`.
    ///
    /// # Safety
    /// As for [`RowViews::forward_chunk`].
    unsafe fn backward_chunk(&self, (i0, i1): (usize, usize), want_input: bool) {
        let top = self.layers.len() - 1;
        let d = self.layers[top];
        if d.act != Activation::Identity {
            // The output's rows are dense (ld = out).
            // SAFETY: rows i0..i1 are this task's.
            let (da, h) = unsafe {
                (
                    self.da[top].part_mut(i0 * d.out, i1 * d.out),
                    self.h[top + 1].part(i0 * d.out, i1 * d.out),
                )
            };
            for (a, &h) in da.iter_mut().zip(h) {
                *a = d.act.backward(h, *a);
            }
        }
        for li in (0..=top).rev() {
            let d = self.layers[li];
            let (ld_in, ld_out) = (self.ld[li], self.ld[li + 1]);
            // SAFETY: rows i0..i1 are this task's.
            let (target, ldc, epi) = unsafe {
                if li > 0 {
                    let below = self.layers[li - 1];
                    let h = self.h[li].part(i0 * ld_in, i1 * ld_in);
                    (
                        self.da[li - 1].part_mut(i0 * ld_in, i1 * ld_in),
                        ld_in,
                        below.act.mask_epilogue(h),
                    )
                } else if want_input {
                    (
                        self.dinput.part_mut(i0 * d.inp, i1 * d.inp),
                        d.inp,
                        Epilogue::Store,
                    )
                } else {
                    break;
                }
            };
            // SAFETY: as above.
            let a = unsafe { self.da[li].part(i0 * ld_out, i1 * ld_out) };
            gemm(
                i1 - i0,
                d.inp,
                d.out,
                StridedA::rows(a, ld_out),
                &self.bwd[li][..],
                target,
                ldc,
                epi,
            );
        }
    }
}

/// One network's rows i0..i1 inside a task of [`rowwise`]: its input, forward pass, output,
/// ∂output and backward pass for just these rows.
pub struct NetRows<'a> {
    views: &'a RowViews<'a>,
    range: (usize, usize),
}

impl NetRows<'_> {
    /// The rows of the batch this task holds (i0..i1).
    pub fn range(&self) -> (usize, usize) {
        self.range
    }

    /// Where these rows lie in a buffer of `width` values a row.
    fn span(&self, width: usize) -> (usize, usize) {
        (self.range.0 * width, self.range.1 * width)
    }

    /// The input rows, to fill before [`NetRows::forward`].
    pub fn input_mut(&mut self) -> &mut [f32] {
        let (a, b) = self.span(self.views.layers[0].inp);
        // SAFETY: this task alone holds rows i0..i1 (`rowwise` gives each chunk to one task)
        // and `&mut self` makes this the only live view of them.
        unsafe { self.views.h[0].part_mut(a, b) }
    }

    /// The input rows.
    pub fn input(&self) -> &[f32] {
        let (a, b) = self.span(self.views.layers[0].inp);
        // SAFETY: as for `input_mut`; `&self` rules out a live mutable view.
        unsafe { self.views.h[0].part(a, b) }
    }

    /// hₗ₊₁ = act(hₗ·Wₗᵀ + bₗ) through every layer for these rows; returns the output rows.
    pub fn forward(&mut self) -> &[f32] {
        // SAFETY: this task alone holds rows i0..i1 of the network's row buffers.
        unsafe { self.views.forward_chunk(self.range) };
        self.output()
    }

    /// The output rows of [`NetRows::forward`].
    pub fn output(&self) -> &[f32] {
        let top = self.views.layers.len();
        let (a, b) = self.span(self.views.layers[top - 1].out);
        // SAFETY: as for `input`.
        unsafe { self.views.h[top].part(a, b) }
    }

    /// The output rows, and the rows of ∂L/∂output to fill before [`NetRows::backward`].
    pub fn output_and_grad(&mut self) -> (&[f32], &mut [f32]) {
        let top = self.views.layers.len();
        let (a, b) = self.span(self.views.layers[top - 1].out);
        // SAFETY: as for `input_mut`; the two buffers are distinct allocations.
        unsafe {
            (
                self.views.h[top].part(a, b),
                self.views.da[top - 1].part_mut(a, b),
            )
        }
    }

    /// Back from ∂L/∂output (filled through [`NetRows::output_and_grad`]) through every layer:
    /// ∂aₗ for the weight update, and ∂L/∂input (returned; empty unless `want_input`).
    pub fn backward(&mut self, want_input: bool) -> &[f32] {
        // SAFETY: this task alone holds rows i0..i1 of the network's row buffers.
        unsafe { self.views.backward_chunk(self.range, want_input) };
        if !want_input {
            return &[];
        }
        self.input_grad()
    }

    /// ∂L/∂input of the last [`NetRows::backward`] that asked for it.
    pub fn input_grad(&self) -> &[f32] {
        let (a, b) = self.span(self.views.layers[0].inp);
        // SAFETY: as for `input`.
        unsafe { self.views.dinput.part(a, b) }
    }
}

/// hₗ₊₁ = act(hₗ · Wₗᵀ + bₗ) for every layer, by chunks of rows across the team; with
/// `packed_in`, each hₗ is also packed as the B operand of ∂Wₗ.
#[allow(clippy::too_many_arguments)]
fn run_forward(
    layers: &[Dense],
    ld: &[usize],
    theta: &[f32],
    fwd: &[Floats],
    chunks: &[(usize, usize)],
    h: &mut [Floats],
    packed_in: Option<&mut [Floats]>,
    x: &[f32],
    team: &Team,
) -> Result<()> {
    let views = RowViews {
        layers,
        ld,
        theta,
        fwd,
        bwd: &[],
        rows: x.len() / layers[0].inp,
        h: h.iter_mut().map(|b| Raw::of(b)).collect(),
        da: vec![],
        packed_in: packed_in.map_or(vec![], |p| p.iter_mut().map(|b| Raw::of(b)).collect()),
        dinput: Raw::of(&mut []),
    };
    team.run(chunks.len(), &|q| {
        let (i0, i1) = chunks[q];
        let w0 = layers[0].inp;
        // SAFETY: task q alone touches rows i0..i1 of every row buffer (the chunks are
        // disjoint); the weights are only read during this call.
        unsafe {
            views.h[0]
                .part_mut(i0 * w0, i1 * w0)
                .copy_from_slice(&x[i0 * w0..i1 * w0]);
            views.forward_chunk((i0, i1));
        }
    })
}

/// ∂W and ∂b for rows r0..r1 of layer `li`, then Adam on them (or stored into `grads`); with
/// Adam and `kept`, the rows' parameters before the step are read from `kept` (where they
/// stay, as the undo copy) and the stepped ones written to θ.
///
/// # Safety
/// The caller alone touches rows r0..r1 of this layer's parameters, moments, packed weights and
/// gradient and kept rows; ∂a of the layer and its packed input are complete and not written
/// meanwhile.
#[allow(clippy::too_many_arguments)]
unsafe fn update_block(
    sh: &Shared,
    d: Dense,
    li: usize,
    (r0, r1): (usize, usize),
    rows: usize,
    (ld_in, ld_out): (usize, usize),
    adam: Option<AdamConsts>,
    grads: Option<Raw>,
    kept: Option<Raw>,
) {
    let n = r1 - r0;
    let (w0, w1, b0) = (d.at + r0 * d.inp, d.at + r1 * d.inp, d.bias() + r0);
    if let (Some(_), Some(kept)) = (adam, kept) {
        // The biases step in place: first their values before the step.
        // SAFETY: rows r0..r1 of b belong to this task alone, in θ and in the copy.
        unsafe {
            sh.theta
                .part_mut(b0, b0 + n)
                .copy_from_slice(kept.part(b0, b0 + n));
        }
    }
    // SAFETY: as the function's contract says, these ranges are this task's alone or
    // read-only during this stretch.
    let (da, h, packed) = unsafe { (sh.da[li].all(), sh.h[li].all(), sh.packed_in[li].all()) };
    // ∂W = ∂aᵀ·h: A is columns r0..r1 of ∂a and B the layer's input h, both read where
    // they are (h packed by the forward pass where its width is not whole panels).
    let a = StridedA::columns(da, ld_out, r0);
    let packed = if d.packs_input() {
        PanelsB::from(packed)
    } else {
        PanelsB::rows(h, ld_in)
    };
    let mut db = [0.0f32; BLOCK];
    let db = &mut db[..n];
    column_sums(da, ld_out, r0, db);
    // A layer with few inputs (the GAN's 2, the VAE decoder's latent): its gradient rows
    // are shorter than a register, so compute ∂Wᵀ = hᵀ·∂a (16 output features to a
    // register, the same products summed in the same order, so the same bits), then
    // transpose it. On W2 this ∂W took 4x the multiply-adds of the transposed one.
    let narrow = d.inp <= NARROW && r0 + panel_cols(n) <= d.out;
    let mut grad = [0.0f32; BLOCK * NARROW];
    let grad = &mut grad[..if narrow { n * d.inp } else { 0 }];
    if narrow {
        let mut gt = [0.0f32; BLOCK * NARROW];
        let gt = &mut gt[..n * d.inp];
        gemm(
            d.inp,
            n,
            rows,
            StridedA::columns(h, ld_in, 0),
            PanelsB::rows(&da[r0..], ld_out),
            gt,
            n,
            Epilogue::Store,
        );
        for (i, column) in gt.chunks_exact(n).enumerate() {
            for (o, &x) in column.iter().enumerate() {
                grad[o * d.inp + i] = x;
            }
        }
    }
    match (adam, grads) {
        (Some(step), _) => {
            // SAFETY: rows r0..r1 of W (w0..w1) and b (b0..b0 + n), in θ, m and v, belong
            // to this task alone during this stretch.
            let (rows_of, bias) = unsafe {
                (
                    [sh.theta, sh.m, sh.v].map(|buf| buf.part_mut(w0, w1)),
                    [sh.theta, sh.m, sh.v].map(|buf| buf.part_mut(b0, b0 + n)),
                )
            };
            let [theta, m, v] = rows_of;
            // SAFETY: rows r0..r1 of W in the undo copy belong to this task alone, and
            // are only read here.
            let theta_in = kept.map(|kept| unsafe { kept.part(w0, w1) });
            // SAFETY: bwd[li] holds out · panel_cols(inp) floats (`empty`), and its entries
            // of rows r0..r1 are this task's alone during this stretch.
            let bwd = unsafe { PackedRows::new(sh.bwd[li].ptr, sh.bwd[li].len, r0, d.out) };
            // SAFETY: fwd[li] holds inp · panel_cols(out) floats (`empty`), and its entries
            // of rows r0..r1 (lanes r0..r1 of Wᵀ's panels) are this task's alone during this
            // stretch.
            let fwd = unsafe { PackedRows::new(sh.fwd[li].ptr, sh.fwd[li].len, r0, d.out) };
            // Whether every parameter the block wrote is finite: the copies' writers check
            // the values as they pass.
            let finite = Cell::new(true);
            let target = AdamRows {
                theta,
                m,
                v,
                ld: d.inp,
                step,
                // The ∂h pass's copy of these rows, written as Adam computes them, and the
                // forward pass's (Wᵀ), written tile by tile or after the block.
                packed: Some(bwd),
                transposed: Some(Transposed {
                    rows: fwd,
                    finite: &finite,
                }),
                theta_in,
            };
            if narrow {
                adam_block(n, d.inp, grad, target);
            } else {
                gemm(
                    n,
                    d.inp,
                    rows,
                    a,
                    packed,
                    &mut [],
                    d.inp,
                    Epilogue::Adam(target),
                );
            }
            let [tb, mb, vb] = bias;
            adam_update(step, tb, mb, vb, db);
            #[cfg(test)]
            if sh.fault == Some((li, r0)) {
                panic!("injected failure after the update of layer {li}'s rows {r0}..");
            }
            if !finite.get() || !all_finite(tb) {
                sh.non_finite.store(true, Ordering::Relaxed);
            }
        }
        (None, Some(g)) => {
            // SAFETY: rows r0..r1 of the gradient buffer belong to this task alone.
            let (gw, gb) = unsafe { (g.part_mut(w0, w1), g.part_mut(b0, b0 + n)) };
            if narrow {
                gw.copy_from_slice(grad);
            } else {
                gemm(n, d.inp, rows, a, packed, gw, d.inp, Epilogue::Store);
            }
            gb.copy_from_slice(db);
        }
        (None, None) => {}
    }
}

/// Chunks of about half the batch (more for large batches, at most ~128 rows each; no more
/// than the batch's tiles of `mr` rows), each boundary at the multiple of `granule` rows
/// nearest to its share (the kernel's [`chunk_granule`]: a chunk that ends there costs no
/// dropped rows), one chunk for each end of the team (the caller takes chunks from the front,
/// the helper from the back). W1's 100 rows give 50 and 50 on AVX-512 (6¼ tiles each; cut at
/// whole tiles, 48 and 52, the caller waited ~8 % of every row-wise stretch: W1 −1.5 %).
/// Measured on W1 against four chunks balanced in whole tiles (32, 24, 24, 20 rows): ~2.5 %
/// faster (each chunk re-reads every layer's packed weights, and fewer, larger chunks read
/// them fewer times); 6 or 8 chunks were slower still.
fn row_chunks(rows: usize, mr: usize, granule: usize) -> Vec<(usize, usize)> {
    let tiles = rows.div_ceil(mr);
    let count = rows.div_ceil(128).max(CHUNKS_MIN).min(tiles).max(1);
    let g = granule.max(1);
    let mut out = Vec::with_capacity(count);
    let mut start = 0;
    for c in 1..=count {
        // The boundary nearest to rows·c/count, in whole granules (the last one: all rows).
        let end = if c == count {
            rows
        } else {
            ((2 * rows * c + count * g) / (2 * count * g) * g).min(rows)
        };
        if end > start {
            out.push((start, end));
            start = end;
        }
    }
    out
}

/// Fewest chunks a batch is cut into (one per thread).
const CHUNKS_MIN: usize = 2;

fn validate_layers(layers: &[Layer]) -> Result<()> {
    if layers.is_empty() {
        return Err(Error::param(
            "layers",
            "none",
            "a network needs at least one layer",
        ));
    }
    let mut total = 0usize;
    for (i, l) in layers.iter().enumerate() {
        for (name, w) in [("inp", l.inp), ("out", l.out)] {
            ensure(
                (1..=MAX_WIDTH).contains(&w),
                &format!("layer {i} {name}"),
                w,
                &format!("a layer width lies between 1 and {MAX_WIDTH}"),
            )?;
        }
        if i > 0 && layers[i - 1].out != l.inp {
            return Err(Error::shape(
                &format!("layer {i}'s input"),
                format!("{} (layer {}'s output)", layers[i - 1].out, i - 1),
                l.inp,
            ));
        }
        if let Activation::LeakyRelu(alpha) = l.activation {
            ensure(
                alpha > 0.0 && alpha < 1.0,
                &format!("layer {i} LeakyRelu slope"),
                alpha,
                "use a slope between 0 and 1, e.g. 0.2 (0 is Activation::Relu)",
            )?;
        }
        total = total.saturating_add((l.inp + 1).saturating_mul(l.out));
    }
    ensure(
        total <= MAX_PARAMETERS,
        "parameters",
        total,
        &format!("use smaller layers: at most {MAX_PARAMETERS} parameters"),
    )
}

/// No value is NaN or infinite: one vectorised pass (a float is NaN or infinite when its
/// exponent bits are all ones, i.e. |bits| ≥ 0x7f80_0000).
fn all_finite(values: &[f32]) -> bool {
    crate::kernels::vectorised(
        #[inline(always)]
        || {
            values.chunks(1024).all(|c| {
                c.iter()
                    .fold(0u32, |most, x| most.max(x.to_bits() & 0x7fff_ffff))
                    < 0x7f80_0000
            })
        },
    )
}

fn check_len(what: &str, expected: usize, got: usize) -> Result<()> {
    if expected != got {
        return Err(Error::shape(what, expected, got));
    }
    Ok(())
}

fn check_finite(what: &str, values: &[f32]) -> Result<()> {
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(Error::param(
            what,
            format!("value {} at index {i}", values[i]),
            "every value must be a finite number",
        ));
    }
    Ok(())
}

/// A buffer as a raw pointer and length, shared by the tasks of one call.
#[derive(Clone, Copy)]
pub(crate) struct Raw {
    ptr: *mut f32,
    len: usize,
}

// SAFETY: a Raw is only dereferenced under the discipline stated at each use: within one
// stretch of tasks, each task writes only its own rows and reads only what nobody writes.
unsafe impl Send for Raw {}
// SAFETY: as for Send.
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
        // SAFETY: ptr/len come from a live slice (`Raw::of`); the caller rules out writers.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// # Safety
    /// Nobody writes `start..end` while the slice lives.
    unsafe fn part<'a>(self, start: usize, end: usize) -> &'a [f32] {
        assert!(start <= end && end <= self.len);
        // SAFETY: in bounds (asserted); the caller rules out writers.
        unsafe { std::slice::from_raw_parts(self.ptr.add(start), end - start) }
    }

    /// # Safety
    /// Nobody else reads or writes `start..end` while the slice lives.
    #[allow(clippy::mut_from_ref)]
    unsafe fn part_mut<'a>(self, start: usize, end: usize) -> &'a mut [f32] {
        assert!(start <= end && end <= self.len);
        // SAFETY: in bounds (asserted); the caller makes this range exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(start), end - start) }
    }
}

/// Raw views of a network's buffers for the tasks of one call.
struct Shared {
    theta: Raw,
    m: Raw,
    v: Raw,
    fwd: Vec<Raw>,
    bwd: Vec<Raw>,
    da: Vec<Raw>,
    h: Vec<Raw>,
    packed_in: Vec<Raw>,
    /// An update task left a parameter NaN or infinite.
    non_finite: AtomicBool,
    /// Tests only: the block (layer, first row) that panics after its update.
    #[cfg(test)]
    fault: Option<(usize, usize)>,
}

impl Shared {
    fn of(net: &mut Mlp) -> Shared {
        let raws = |v: &mut Vec<Floats>| v.iter_mut().map(|b| Raw::of(b)).collect();
        Shared {
            theta: Raw::of(&mut net.theta),
            m: Raw::of(&mut net.m),
            v: Raw::of(&mut net.v),
            fwd: raws(&mut net.fwd),
            bwd: raws(&mut net.bwd),
            da: raws(&mut net.da),
            h: raws(&mut net.h),
            packed_in: raws(&mut net.packed_in),
            non_finite: AtomicBool::new(false),
            #[cfg(test)]
            fault: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_the_batch_at_tile_boundaries() {
        for (mr, granule) in [(5, 5), (8, 8), (8, 2), (12, 12)] {
            for rows in [1, 4, 7, 37, 100, 128, 1000] {
                let c = row_chunks(rows, mr, granule);
                assert_eq!(c[0].0, 0);
                assert_eq!(c[c.len() - 1].1, rows);
                for w in c.windows(2) {
                    assert_eq!(w[0].1, w[1].0);
                    assert!(w[0].1 % granule == 0);
                }
                assert!(c.iter().all(|&(a, b)| b > a), "{rows} {mr} {c:?}");
            }
        }
        // W1's batch: two chunks of 6¼ AVX-512 tiles each, not 6 and 6½.
        assert_eq!(row_chunks(100, 8, 2), vec![(0, 50), (50, 100)]);
        assert_eq!(row_chunks(100, 8, 8), vec![(0, 48), (48, 100)]);
    }

    /// Two chained networks through `rowwise` + `update_nets` (one row-wise stretch, one
    /// update stretch) give bit-identical outputs and gradients to the same chain through
    /// `forward` / `backward_with_input` / `backward`, on one and two threads, for equal rows
    /// and for a second network that sees pairs of the first one's rows side by side (as a
    /// PacGAN discriminator does). Small enough for Miri, which checks the views' unsafe code.
    #[test]
    fn rowwise_and_update_nets_equal_the_separate_passes() {
        for pack in [1, 2] {
            let a_layers = [3, 5, 4];
            let b_layers = [4 * pack, 6, 2];
            let rows_b = 7;
            let rows_a = rows_b * pack;
            let z: Vec<f32> = (0..rows_a * 3)
                .map(|i| ((i * 7) % 11) as f32 / 5.0 - 1.0)
                .collect();
            let r: Vec<f32> = (0..rows_b * 2)
                .map(|i| ((i * 5) % 7) as f32 / 3.0 - 1.0)
                .collect();
            let adam = AdamSettings::default();
            let fresh = || {
                (
                    Mlp::new(&a_layers, Activation::Relu, adam, 1).unwrap(),
                    Mlp::new(&b_layers, Activation::LeakyRelu(0.2), adam, 2).unwrap(),
                )
            };
            for threads in [1, 2] {
                let team = Team::new(threads);
                // The separate passes.
                let (mut a, mut b) = fresh();
                let (mut ga, mut gb) = (
                    vec![0.0; a.parameters().len()],
                    vec![0.0; b.parameters().len()],
                );
                let y = a.forward(&team, &z).unwrap().to_vec();
                let out = b.forward(&team, &y).unwrap().to_vec();
                let dy = b
                    .backward_with_input(&team, &r, Update::Gradient(&mut gb))
                    .unwrap()
                    .to_vec();
                a.backward(&team, &dy, Update::Gradient(&mut ga)).unwrap();
                // The same through rowwise + update_nets.
                let (mut a2, mut b2) = fresh();
                let (mut ga2, mut gb2) = (vec![0.0; ga.len()], vec![0.0; gb.len()]);
                let mut sums: Vec<f64> = vec![];
                rowwise(
                    &team,
                    [&mut a2, &mut b2],
                    [rows_a, rows_b],
                    &mut sums,
                    &|[a, b]| {
                        let (j0, j1) = a.range();
                        a.input_mut().copy_from_slice(&z[j0 * 3..j1 * 3]);
                        b.input_mut().copy_from_slice(a.forward());
                        b.forward();
                        let (i0, i1) = b.range();
                        let (o, d) = b.output_and_grad();
                        d.copy_from_slice(&r[i0 * 2..i1 * 2]);
                        let sum = o.iter().map(|&v| v as f64).sum();
                        let (_, da) = a.output_and_grad();
                        da.copy_from_slice(b.backward(true));
                        a.backward(false);
                        sum
                    },
                )
                .unwrap();
                assert_eq!(b2.last_output(), &out[..]);
                let total: f64 = sums.iter().sum();
                assert!((total - out.iter().map(|&v| v as f64).sum::<f64>()).abs() < 1e-9);
                update_nets(
                    &team,
                    [
                        (&mut a2, Update::Gradient(&mut ga2)),
                        (&mut b2, Update::Gradient(&mut gb2)),
                    ],
                )
                .unwrap();
                assert_eq!(
                    (ga2, gb2),
                    (ga.clone(), gb.clone()),
                    "pack {pack}, {threads} threads"
                );
                // And one Adam step of both moves them as the separate updates do.
                update_nets(&team, [(&mut a2, Update::Adam), (&mut b2, Update::Adam)]).unwrap();
                a.backward(&team, &dy, Update::Adam).unwrap();
                b.forward(&team, &y).unwrap();
                b.backward(&team, &r, Update::Adam).unwrap();
                // (Bit for bit natively; Miri adds random rounding to sqrt and division.)
                let close = |x: &[f32], y: &[f32]| {
                    x.len() == y.len()
                        && x.iter().zip(y).all(|(p, q)| {
                            p == q || (cfg!(miri) && (p - q).abs() <= 1e-5 * (1.0 + q.abs()))
                        })
                };
                assert!(close(a2.parameters(), a.parameters()));
                assert!(close(b2.parameters(), b.parameters()));
                assert_eq!((a2.steps(), b2.steps()), (1, 1));
            }
        }
        // Rows that are not whole multiples of the smallest are an error, not a panic.
        let adam = AdamSettings::default();
        let mut a = Mlp::new(&[2, 3], Activation::Relu, adam, 1).unwrap();
        let mut b = Mlp::new(&[3, 1], Activation::Relu, adam, 2).unwrap();
        let mut sums: Vec<f64> = vec![];
        let err = rowwise(&Team::new(1), [&mut a, &mut b], [4, 6], &mut sums, &|_| 0.0);
        assert!(err.unwrap_err().to_string().contains("multiples of 4"));
    }

    /// A tiny network on one and two threads: the gradient equals central finite differences
    /// of L = Σ output ⊙ R (small enough to run under Miri, which checks the engine's unsafe).
    #[test]
    fn tiny_network_gradient_matches_finite_differences() {
        let layers = [
            Layer {
                inp: 3,
                out: 5,
                activation: Activation::LeakyRelu(0.3),
            },
            Layer {
                inp: 5,
                out: 18,
                activation: Activation::Identity,
            },
            Layer {
                inp: 18,
                out: 2,
                activation: Activation::Identity,
            },
        ];
        let rows = 7;
        let x: Vec<f32> = (0..rows * 3)
            .map(|i| ((i * 7) % 11) as f32 / 5.0 - 1.0)
            .collect();
        let r: Vec<f32> = (0..rows * 2)
            .map(|i| ((i * 5) % 7) as f32 / 3.0 - 1.0)
            .collect();
        for threads in [1, 2] {
            let team = Team::new(threads);
            let mut net = Mlp::with_layers(&layers, AdamSettings::default(), 3).unwrap();
            let loss = |net: &Mlp| -> f64 {
                let y = net.predict(&Team::new(1), &x).unwrap();
                y.iter().zip(&r).map(|(a, b)| (a * b) as f64).sum()
            };
            net.forward(&team, &x).unwrap();
            let mut g = vec![0.0; net.parameters().len()];
            let dx = net
                .backward_with_input(&team, &r, Update::Gradient(&mut g))
                .unwrap()
                .to_vec();
            assert_eq!(dx.len(), x.len());
            let theta = net.parameters().to_vec();
            let h = 1e-2f32;
            // Under Miri (which checks the unsafe code, slowly) a sample of the parameters.
            let stride = if cfg!(miri) { 23 } else { 1 };
            for i in (0..theta.len()).step_by(stride) {
                let mut p = theta.clone();
                p[i] = theta[i] + h;
                net.set_parameters(&p).unwrap();
                let up = loss(&net);
                p[i] = theta[i] - h;
                net.set_parameters(&p).unwrap();
                let down = loss(&net);
                let fd = (up - down) / (2.0 * h as f64);
                assert!(
                    (fd - g[i] as f64).abs() < 2e-3 * (1.0 + fd.abs()),
                    "parameter {i}: engine {} vs finite difference {fd}",
                    g[i]
                );
            }
            net.set_parameters(&theta).unwrap();
            // One Adam step moves every parameter that has a gradient, and counts.
            net.forward(&team, &x).unwrap();
            net.backward(&team, &r, Update::Adam).unwrap();
            assert_eq!(net.steps(), 1);
            let moved = net
                .parameters()
                .iter()
                .zip(&theta)
                .filter(|(a, b)| a != b)
                .count();
            assert_eq!(moved, g.iter().filter(|v| **v != 0.0).count());
        }
    }

    /// A weight-update task that panics after updating its rows:
    /// `backward` returns an error, the step counts (the other tasks ran with t = steps + 1),
    /// the packed copies match θ again, and the network trains on exactly as one rebuilt from
    /// its checkpoint state.
    #[test]
    fn a_failed_update_leaves_a_consistent_network() {
        let team = Team::new(2);
        let x: Vec<f32> = (0..5 * 3)
            .map(|i| ((i * 7) % 11) as f32 / 5.0 - 1.0)
            .collect();
        let r: Vec<f32> = (0..5 * 2)
            .map(|i| ((i * 5) % 7) as f32 / 3.0 - 1.0)
            .collect();
        // 70 rows in the first layer: two weight-update blocks there.
        let mut net = Mlp::new(&[3, 70, 2], Activation::Relu, AdamSettings::default(), 1).unwrap();
        net.forward(&team, &x).unwrap();
        net.backward(&team, &r, Update::Adam).unwrap();
        let block = net.blocks.iter().position(|b| b.0 == 0).unwrap();
        net.fault = Some(block);
        net.forward(&team, &x).unwrap();
        assert!(net.backward(&team, &r, Update::Adam).is_err());
        assert_eq!(net.steps(), 2);
        let mut fresh = Mlp::from_state(net.state()).unwrap();
        for _ in 0..3 {
            for n in [&mut net, &mut fresh] {
                n.forward(&team, &x).unwrap();
                n.backward(&team, &r, Update::Adam).unwrap();
            }
            let (a, b) = (net.state(), fresh.state());
            assert_eq!(a.steps, b.steps);
            for (a, b) in [(a.parameters, b.parameters), (a.m, b.m), (a.v, b.v)] {
                assert!(same(&a, &b));
            }
        }
        let (a, b) = (net.predict(&team, &x), fresh.predict(&team, &x));
        assert!(same(&a.unwrap(), &b.unwrap()));
    }

    /// An update of several networks whose second plan is refused (a gradient buffer of the
    /// wrong size) changes none of them: the first network, which keeps its parameters for
    /// undo, still has them, and predicts as before. (Before, the first network's plan had
    /// already swapped θ with its undo buffer, zeros on first use, while its packed weights
    /// kept the real values, and `undo_update` did nothing.)
    #[test]
    fn a_refused_plan_changes_no_network() {
        let team = Team::new(2);
        let x: Vec<f32> = (0..4 * 3).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut a = Mlp::new(&[3, 6, 2], Activation::Relu, AdamSettings::default(), 1).unwrap();
        let mut b = Mlp::new(&[3, 5, 2], Activation::Relu, AdamSettings::default(), 2).unwrap();
        a.keep_before_update(true);
        let before = a.parameters().to_vec();
        let predicted = a.predict(&team, &x).unwrap();
        a.forward(&team, &x).unwrap();
        b.forward(&team, &x).unwrap();
        let mut short = vec![0.0; b.parameters().len() - 1];
        let refused = update_nets(
            &team,
            [
                (&mut a, Update::Adam),
                (&mut b, Update::Gradient(&mut short)),
            ],
        );
        assert!(refused.is_err());
        assert_eq!(a.steps(), 0);
        assert!(
            same(a.parameters(), &before),
            "θ of the first network changed"
        );
        assert!(same(&a.predict(&team, &x).unwrap(), &predicted));
        // And it still trains: the same update alone goes through.
        a.forward(&team, &x).unwrap();
        let dout = vec![0.1; 4 * 2];
        a.backward(&team, &dout, Update::Adam).unwrap();
        assert_eq!(a.steps(), 1);
        a.undo_update(0).unwrap();
        assert!(same(a.parameters(), &before));
    }

    /// Equal, or within float noise under Miri (which perturbs sqrt and powi on purpose); a
    /// stale packed weight would be off by a whole Adam step (~1e-3).
    fn same(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len()
            && a.iter().zip(b).all(|(x, y)| {
                if cfg!(miri) {
                    (x - y).abs() <= 1e-5 * (1.0 + x.abs())
                } else {
                    x == y
                }
            })
    }

    /// The vectorised scan finds NaN and both infinities wherever they are (first chunk, last
    /// element, past a chunk boundary) and passes the largest finite values and subnormals.
    #[test]
    fn first_non_finite_finds_nan_and_infinities_only() {
        let mut net =
            Mlp::new(&[40, 50, 30], Activation::Relu, AdamSettings::default(), 4).unwrap();
        let n = net.theta.len();
        assert!(n > 2048);
        assert_eq!(net.first_non_finite(), None);
        for finite in [f32::MAX, f32::MIN, f32::MIN_POSITIVE / 4.0, -0.0] {
            net.theta[n - 1] = finite;
            assert_eq!(net.first_non_finite(), None, "{finite}");
        }
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -f32::NAN] {
            for at in [0, 1023, 1024, n - 1] {
                let kept = net.theta[at];
                net.theta[at] = bad;
                // Written behind the network's back: no longer known finite.
                net.finite = false;
                let found = net.first_non_finite();
                assert_eq!(found.map(|(i, _)| i), Some(at), "{bad} at {at}");
                net.theta[at] = kept;
            }
        }
    }

    /// An update that makes parameters NaN is seen by `first_non_finite` (the update's tasks
    /// report it), and `undo_update` puts back exactly the parameters from before it, on one
    /// thread and two; a finite update is not reported.
    #[test]
    fn a_non_finite_update_is_seen_and_undone() {
        let x: Vec<f32> = (0..6 * 3).map(|i| (i % 5) as f32 / 4.0 - 0.5).collect();
        for threads in [1, 2] {
            let team = Team::new(threads);
            let mut net =
                Mlp::new(&[3, 70, 2], Activation::Relu, AdamSettings::default(), 5).unwrap();
            net.keep_before_update(true);
            net.forward(&team, &x).unwrap();
            net.backward(&team, &[0.25; 12], Update::Adam).unwrap();
            assert_eq!(net.first_non_finite(), None);
            let (before, steps) = (net.state(), net.steps());
            let mut dout = [0.25f32; 12];
            dout[7] = f32::NAN;
            net.forward(&team, &x).unwrap();
            net.backward(&team, &dout, Update::Adam).unwrap();
            assert!(net.first_non_finite().is_some());
            net.undo_update(steps).unwrap();
            let after = net.state();
            assert_eq!(
                (after.steps, &after.parameters),
                (before.steps, &before.parameters)
            );
            assert!(after.m.iter().chain(&after.v).all(|v| v.is_finite()));
            assert_eq!(net.first_non_finite(), None);
            assert!(
                net.undo_update(steps + 1).is_err(),
                "nothing to undo forward"
            );
            let rebuilt = Mlp::from_state(net.state()).unwrap();
            assert!(same(
                &net.predict(&team, &x).unwrap(),
                &rebuilt.predict(&team, &x).unwrap()
            ));
        }
    }

    /// `rewind` puts back parameters and the step count, and zeroes only non-finite moments.
    #[test]
    fn rewind_restores_parameters_and_steps() {
        let team = Team::new(1);
        let x = [0.5f32, -0.25, 1.0];
        let mut net = Mlp::new(&[3, 4, 1], Activation::Relu, AdamSettings::default(), 2).unwrap();
        let kept = net.parameters().to_vec();
        net.forward(&team, &x).unwrap();
        net.backward(&team, &[1.0], Update::Adam).unwrap();
        assert_ne!(net.parameters(), &kept[..]);
        let m_after = net.state().m;
        net.m[0] = f32::NAN;
        net.rewind(&kept, 0).unwrap();
        let s = net.state();
        assert_eq!((s.parameters, s.steps), (kept.clone(), 0));
        assert_eq!((s.m[0], s.v[0]), (0.0, 0.0));
        assert_eq!(s.m[1..], m_after[1..]);
        let rebuilt = Mlp::from_state(net.state()).unwrap();
        assert!(same(
            &net.predict(&team, &x).unwrap(),
            &rebuilt.predict(&team, &x).unwrap()
        ));
        assert!(net.rewind(&kept, 1).is_err(), "cannot rewind forward");
        assert!(net.rewind(&kept[1..], 0).is_err());
    }

    #[test]
    fn bad_shapes_and_sizes_are_errors() {
        let team = Team::new(1);
        let adam = AdamSettings::default();
        assert!(Mlp::new(&[4], Activation::Relu, adam, 0).is_err());
        assert!(Mlp::new(&[4, 0, 2], Activation::Relu, adam, 0).is_err());
        assert!(Mlp::new(&[4, 1 << 20, 2], Activation::Relu, adam, 0).is_err());
        assert!(Mlp::new(&[4, 8, 2], Activation::LeakyRelu(1.5), adam, 0).is_err());
        let mut net = Mlp::new(&[4, 8, 2], Activation::Relu, adam, 0).unwrap();
        assert!(
            net.backward(&team, &[0.0; 2], Update::Adam).is_err(),
            "no forward yet"
        );
        assert!(net.forward(&team, &[0.0; 6]).is_err());
        assert!(net.forward(&team, &[]).is_err());
        net.forward(&team, &[0.0; 8]).unwrap();
        assert!(net.backward(&team, &[0.0; 3], Update::Adam).is_err());
        assert!(net
            .backward(&team, &[0.0; 4], Update::Gradient(&mut [0.0; 3]))
            .is_err());
        let mut state = net.state();
        state.steps = usize::MAX;
        assert!(Mlp::from_state(state.clone()).is_err());
        state.steps = 3;
        state.v[0] = -1.0;
        assert!(Mlp::from_state(state.clone()).is_err());
        state.v[0] = 0.0;
        state.parameters.pop();
        assert!(Mlp::from_state(state).is_err());
        // A row-wise stretch of no rows, or of rows that are not multiples of the smallest.
        let mut other = Mlp::new(&[2, 8, 4], Activation::Relu, adam, 1).unwrap();
        let mut results: Vec<()> = vec![];
        let err = rowwise(&team, [&mut net, &mut other], [0, 4], &mut results, &|_| ())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("rows") && err.contains("between 1 and"),
            "{err}"
        );
        let err = rowwise(&team, [&mut net, &mut other], [2, 3], &mut results, &|_| ())
            .unwrap_err()
            .to_string();
        assert!(err.contains("whole multiples of 2"), "{err}");
    }
}
