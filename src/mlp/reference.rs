//! The same network in a few lines of dfdx: the readable reference that the engine's tests
//! compare against (outputs, parameter gradients and input gradients, by dfdx's autodiff).
//! Sizes are run-time values (`(usize, usize)` tensors), so any widths work.

use super::{Activation, Mlp};
use dfdx::prelude::*;

/// A matrix of run-time size, on dfdx's CPU device, with tape `T`.
pub type Matrix<T = NoneTape> = Tensor<(usize, usize), f32, Cpu, T>;
/// A vector of run-time size.
pub type Vector = Tensor<(usize,), f32, Cpu>;

/// An [`Mlp`]'s parameters as dfdx tensors: per layer (W, b, activation).
pub struct DfdxMlp {
    /// W (out × in), b (out) and the activation of each layer.
    pub layers: Vec<(Matrix, Vector, Activation)>,
}

impl DfdxMlp {
    /// The parameters of `net`, copied into dfdx tensors.
    pub fn of(net: &Mlp, dev: &Cpu) -> DfdxMlp {
        let mut at = 0;
        let layers = net
            .layers()
            .iter()
            .map(|l| {
                let w = net.parameters()[at..at + l.inp * l.out].to_vec();
                let b = net.parameters()[at + l.inp * l.out..at + (l.inp + 1) * l.out].to_vec();
                at += (l.inp + 1) * l.out;
                (
                    dev.tensor_from_vec(w, (l.out, l.inp)),
                    dev.tensor_from_vec(b, (l.out,)),
                    l.activation,
                )
            })
            .collect();
        DfdxMlp { layers }
    }

    /// hₗ₊₁ = act(hₗ · Wₗᵀ + bₗ), layer after layer.
    pub fn forward<T: Tape<f32, Cpu>>(&self, x: Matrix<T>) -> Matrix<T> {
        let mut h = x;
        for (w, b, act) in &self.layers {
            let a = h.matmul(w.clone().permute());
            let shape = *a.shape();
            let a = a + b.clone().broadcast_like::<_, Axis<0>>(&shape);
            h = match act {
                Activation::Identity => a,
                Activation::Relu => a.relu(),
                Activation::LeakyRelu(alpha) => a.prelu(*alpha),
            };
        }
        h
    }

    /// Every parameter's gradient from `grads`, flattened like [`Mlp::parameters`].
    pub fn gradient(&self, grads: &Gradients<f32, Cpu>) -> Vec<f32> {
        let mut out = vec![];
        for (w, b, _) in &self.layers {
            out.extend(grads.get(w).as_vec());
            out.extend(grads.get(b).as_vec());
        }
        out
    }
}

/// Largest |a − b| of each layer's weights and biases, relative to that part's largest |b|.
#[cfg(test)]
pub(crate) fn per_layer_error(net: &Mlp, got: &[f32], want: &[f32]) -> f32 {
    let mut at = 0;
    let mut worst = 0.0f32;
    for l in net.layers() {
        for len in [l.inp * l.out, l.out] {
            let (g, w) = (&got[at..at + len], &want[at..at + len]);
            let scale = w.iter().fold(0.0f32, |m, x| m.max(x.abs()));
            let err = g
                .iter()
                .zip(w)
                .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
            if scale > 0.0 {
                worst = worst.max(err / scale);
            }
            at += len;
        }
    }
    worst
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mlp::AdamSettings;
    use crate::mlp::{Team, Update};
    use rand::rngs::StdRng;
    use rand::SeedableRng;
    use rand_distr::{Distribution, StandardNormal};

    fn normal(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..n).map(|_| StandardNormal.sample(&mut rng)).collect()
    }

    #[test]
    fn engine_equals_dfdx_autodiff_for_odd_shapes() {
        let dev = Cpu::default();
        let cases: &[(&[usize], Activation, usize)] = &[
            (&[64, 256, 256, 16], Activation::Relu, 100),
            (&[3, 200, 64], Activation::Relu, 37),
            (&[2, 128, 128, 1], Activation::LeakyRelu(0.2), 513),
            (&[128, 512, 64], Activation::Relu, 128),
            (&[5, 17, 33, 1], Activation::LeakyRelu(0.1), 1),
        ];
        for (ci, &(widths, act, rows)) in cases.iter().enumerate() {
            for threads in [1, 2] {
                let mut net = Mlp::new(widths, act, AdamSettings::default(), ci as u64).unwrap();
                let team = Team::new(threads);
                let x = normal(rows * widths[0], 1);
                let dout = normal(rows * widths[widths.len() - 1], 2);
                let y = net.forward(&team, &x).unwrap().to_vec();
                let mut grad = vec![0.0; net.parameters().len()];
                let dx = net
                    .backward_with_input(&team, &dout, Update::Gradient(&mut grad))
                    .unwrap()
                    .to_vec();

                let reference = DfdxMlp::of(&net, &dev);
                let xt = dev.tensor_from_vec(x.clone(), (rows, widths[0]));
                let out = reference.forward(xt.trace(Gradients::leaky()));
                let want_y = out.as_vec();
                let dt = dev.tensor_from_vec(dout.clone(), *out.shape());
                let grads = (out * dt).sum().backward();
                let want = reference.gradient(&grads);
                let want_dx = grads.get(&xt).as_vec();

                let close = |a: &[f32], b: &[f32]| {
                    let scale = b.iter().fold(0.0f32, |m, x| m.max(x.abs()));
                    a.iter()
                        .zip(b)
                        .fold(0.0f32, |m, (p, q)| m.max((p - q).abs()))
                        / scale.max(1e-30)
                };
                assert!(close(&y, &want_y) < 1e-5, "case {ci}: outputs differ");
                assert!(close(&dx, &want_dx) < 1e-4, "case {ci}: ∂input differs");
                let err = per_layer_error(&net, &grad, &want);
                assert!(
                    err < 1e-4,
                    "case {ci}, {threads} threads: ∂θ per-layer error {err}"
                );
            }
        }
    }
}
