//! Fake-quant ops on top of `asq-core`: forward and STE backward exactly as the core defines
//! them (method.md), including LSQ's gradient scale (passed in by the layer, which knows `N`).
//!
//! - [`lsq`]: one learnt step per tensor (activations) or per output channel (weights);
//! - [`asq`]: activations with per-sample `beta` (the adapter's output) times a learnt step;
//! - [`level_weights`]: POT / APoT / POST (exact or integer-grid) weights with per-channel alpha;
//! - [`uniform`]: min-max observed in the forward pass, straight-through gradient.

use asq_core::quant::asq::Asq;
use asq_core::quant::lsq::Lsq;
use asq_core::quant::uniform::Uniform;
use asq_core::quant::weights::LevelQuantizer;
use asq_core::{LevelSet, QuantRange};
use ndarray::IxDyn;

use crate::buffers;
use crate::error::{shape, Result};
use crate::graph::{Backward, Graph, Var};
use crate::Tensor;

fn slice(t: &Tensor) -> std::borrow::Cow<'_, [f32]> {
    match t.as_slice() {
        Some(s) => std::borrow::Cow::Borrowed(s),
        None => std::borrow::Cow::Owned(t.iter().copied().collect()),
    }
}

fn tensor(like: &Tensor, v: Vec<f32>) -> Tensor {
    Tensor::from_shape_vec(like.raw_dim(), v).expect("same element count")
}

struct LsqOp {
    lsq: Lsq,
    grad_scale: f32,
}

impl Backward for LsqOp {
    fn backward(&self, inputs: &[&Tensor], _: &Tensor, grad: &Tensor) -> Vec<Option<Tensor>> {
        let (x, s, gy) = (slice(inputs[0]), slice(inputs[1]), slice(grad));
        let mut dx = buffers::take(x.len());
        let mut ds = vec![0.0f32; s.len()];
        self.lsq
            .backward(&x, &s, &gy, self.grad_scale, &mut dx, &mut ds)
            .expect("validated in forward");
        vec![Some(tensor(inputs[0], dx)), Some(tensor(inputs[1], ds))]
    }
}

/// LSQ fake quantization of `x` with steps `s` (`[1]`: per tensor; `[C]`: per row of
/// `x` viewed as `[C, -1]`, i.e. per output channel of a weight).
pub fn lsq(g: &mut Graph, x: Var, s: Var, range: QuantRange, grad_scale: f32) -> Result<Var> {
    let lsq = Lsq::new(range);
    let (xv, sv) = (slice(g.value(x)), slice(g.value(s)));
    if sv.is_empty() || xv.len() % sv.len() != 0 {
        return Err(shape(
            "lsq",
            format!("{} steps for {:?}", sv.len(), g.shape(x)),
        ));
    }
    let mut out = buffers::take(xv.len());
    lsq.fake_quant(&xv, &sv, &mut out)?;
    drop((xv, sv));
    let y = tensor(g.value(x), out);
    Ok(g.record(y, &[x, s], LsqOp { lsq, grad_scale }))
}

struct AsqOp {
    asq: Asq,
    grad_scale: f32,
}

impl Backward for AsqOp {
    fn backward(&self, inputs: &[&Tensor], _: &Tensor, grad: &Tensor) -> Vec<Option<Tensor>> {
        let (x, s, beta, gy) = (
            slice(inputs[0]),
            slice(inputs[1]),
            slice(inputs[2]),
            slice(grad),
        );
        let mut dx = buffers::take(x.len());
        let mut db = vec![0.0f32; beta.len()];
        let ds = self
            .asq
            .backward(&x, s[0], &beta, &gy, self.grad_scale, &mut dx, &mut db)
            .expect("validated in forward");
        vec![
            Some(tensor(inputs[0], dx)),
            Some(tensor(inputs[1], vec![ds])),
            Some(tensor(inputs[2], db)),
        ]
    }
}

/// ASQ fake quantization of `x` `[N, ...]` with step `s` `[1]` and per-sample `beta` `[N]`.
pub fn asq(
    g: &mut Graph,
    x: Var,
    s: Var,
    beta: Var,
    range: QuantRange,
    grad_scale: f32,
) -> Result<Var> {
    let asq = Asq::new(range);
    let n = g.shape(x).first().copied().unwrap_or(0);
    if g.value(s).len() != 1 || g.value(beta).len() != n {
        return Err(shape(
            "asq",
            format!(
                "step {:?} and beta {:?} for input {:?}",
                g.shape(s),
                g.shape(beta),
                g.shape(x)
            ),
        ));
    }
    let (xv, sv, bv) = (
        slice(g.value(x)),
        slice(g.value(s))[0],
        slice(g.value(beta)),
    );
    let mut out = buffers::take(xv.len());
    asq.fake_quant(&xv, sv, &bv, &mut out)?;
    drop((xv, bv));
    let y = tensor(g.value(x), out);
    Ok(g.record(y, &[x, s, beta], AsqOp { asq, grad_scale }))
}

struct LevelOp {
    q: LevelQuantizer,
    grad_scale: f32,
}

impl Backward for LevelOp {
    fn backward(&self, inputs: &[&Tensor], _: &Tensor, grad: &Tensor) -> Vec<Option<Tensor>> {
        let (w, a, gy) = (slice(inputs[0]), slice(inputs[1]), slice(grad));
        let mut dw = buffers::take(w.len());
        let mut da = vec![0.0f32; a.len()];
        self.q
            .backward(&w, &a, &gy, self.grad_scale, &mut dw, &mut da)
            .expect("validated in forward");
        vec![Some(tensor(inputs[0], dw)), Some(tensor(inputs[1], da))]
    }
}

/// Non-uniform weight quantization `alpha_c · P(clamp(w / alpha_c, -1, 1))` with one alpha per
/// output channel (`w` viewed as `[C, -1]`).
pub fn level_weights(
    g: &mut Graph,
    w: Var,
    alpha: Var,
    levels: &LevelSet,
    grad_scale: f32,
) -> Result<Var> {
    let q = LevelQuantizer::new(levels.clone());
    let (wv, av) = (slice(g.value(w)), slice(g.value(alpha)));
    if av.is_empty() || wv.len() % av.len() != 0 {
        return Err(shape(
            "level_weights",
            format!("{} alphas for {:?}", av.len(), g.shape(w)),
        ));
    }
    let mut out = buffers::take(wv.len());
    q.fake_quant(&wv, &av, &mut out)?;
    drop((wv, av));
    let y = tensor(g.value(w), out);
    Ok(g.record(y, &[w, alpha], LevelOp { q, grad_scale }))
}

struct UniformOp {
    u: Uniform,
}

impl Backward for UniformOp {
    fn backward(&self, inputs: &[&Tensor], _: &Tensor, grad: &Tensor) -> Vec<Option<Tensor>> {
        let (x, gy) = (slice(inputs[0]), slice(grad));
        let mut dx = buffers::take(x.len());
        self.u
            .backward(&x, &gy, &mut dx)
            .expect("validated in forward");
        vec![Some(tensor(inputs[0], dx))]
    }
}

/// Uniform affine min-max fake quantization (statistics observed on this tensor).
pub fn uniform(g: &mut Graph, x: Var, bits: u32) -> Result<Var> {
    let xv = slice(g.value(x));
    let u = Uniform::affine(&xv, bits)?;
    let mut out = buffers::take(xv.len());
    u.fake_quant(&xv, &mut out)?;
    drop(xv);
    let y = tensor(g.value(x), out);
    Ok(g.record(y, &[x], UniformOp { u }))
}

/// A `[n]` tensor filled with `v` (for steps and alphas).
pub fn filled(n: usize, v: f32) -> Tensor {
    Tensor::from_elem(IxDyn(&[n]), v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{check, random};
    use asq_core::BitWidth;

    /// Gradients of the ops are exactly asq-core's.
    #[test]
    fn op_gradients_equal_the_core_formulas() {
        let r = QuantRange::unsigned(4).unwrap();
        let x = random(&[3, 10], 1).mapv(|v| v * 2.0);
        let (s, beta) = (
            filled(1, 0.1),
            Tensor::from_shape_vec(IxDyn(&[3]), vec![0.8, 1.0, 1.3]).unwrap(),
        );
        let mut g = Graph::new(true);
        let (xv, sv, bv) = (
            g.input_with_grad(x.clone()),
            g.input_with_grad(s),
            g.input_with_grad(beta.clone()),
        );
        let y = asq(&mut g, xv, sv, bv, r, 0.5).unwrap();
        let l = crate::ops::basic::sum(&mut g, y);
        let grads = g.gradients(l).unwrap();
        let mut dx = vec![0.0; 30];
        let mut db = vec![0.0; 3];
        let ds = Asq::new(r)
            .backward(
                x.as_slice().unwrap(),
                0.1,
                beta.as_slice().unwrap(),
                &[1.0; 30],
                0.5,
                &mut dx,
                &mut db,
            )
            .unwrap();
        assert_eq!(grads[xv.0].as_ref().unwrap().as_slice().unwrap(), &dx[..]);
        assert_eq!(grads[sv.0].as_ref().unwrap().as_slice().unwrap(), &[ds]);
        assert_eq!(grads[bv.0].as_ref().unwrap().as_slice().unwrap(), &db[..]);
    }

    /// Where the quantizers saturate they are smooth in their scales: finite differences apply.
    #[test]
    fn saturated_scale_gradients_match_finite_differences() {
        let r = QuantRange::unsigned(3).unwrap();
        let x = random(&[2, 6], 2).mapv(|v| 5.0 + v.abs()); // x / (s beta) >> p = 7
        let (s, beta) = (
            filled(1, 0.3),
            Tensor::from_shape_vec(IxDyn(&[2]), vec![0.9, 1.1]).unwrap(),
        );
        check(&[x.clone(), s.clone(), beta], 1e-3, 1e-2, 12, |g, v| {
            asq(g, v[0], v[1], v[2], r, 1.0).unwrap()
        });
        check(&[x.clone(), s], 1e-3, 1e-2, 12, |g, v| {
            lsq(g, v[0], v[1], r, 1.0).unwrap()
        });
        let post = LevelSet::post(BitWidth::new(4).unwrap()).unwrap();
        let w = random(&[2, 6], 3).mapv(|v| if v < 0.0 { v - 1.0 } else { v + 1.0 }); // |w| > alpha
        check(&[w, filled(2, 0.5)], 1e-3, 1e-2, 12, |g, v| {
            level_weights(g, v[0], v[1], &post, 1.0).unwrap()
        });
    }

    #[test]
    fn uniform_passes_the_gradient_straight_through() {
        let mut g = Graph::new(true);
        let x = g.input_with_grad(random(&[2, 8], 4));
        let y = uniform(&mut g, x, 4).unwrap();
        let l = crate::ops::basic::sum(&mut g, y);
        let grads = g.gradients(l).unwrap();
        // Every element strictly between the observed extremes passes; the extremes may sit up
        // to half a step outside the grid (the zero point is rounded) and be clipped.
        let xv = g.value(x).clone();
        let (lo, hi) = xv
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| {
                (a.min(v), b.max(v))
            });
        for (&v, &d) in xv.iter().zip(grads[x.0].as_ref().unwrap().iter()) {
            if v > lo && v < hi {
                assert_eq!(d, 1.0, "x = {v}");
            }
        }
        // The forward pass lies on a 4-bit affine grid: at most 16 distinct values.
        let mut vals: Vec<f32> = g.value(y).iter().copied().collect();
        vals.sort_by(f32::total_cmp);
        vals.dedup();
        assert!(vals.len() <= 16);
    }
}
