//! Batch normalisation over `[N, C, H, W]` (per channel over N, H, W).

use ndarray::IxDyn;
use rayon::prelude::*;

use crate::buffers;

use crate::error::{shape, Result};
use crate::graph::{Backward, Graph, Var};
use crate::Tensor;

fn dims(t: &Tensor) -> (usize, usize, usize) {
    let s = t.shape();
    (s[0], s[1], s[2] * s[3])
}

/// f32 lanes of a plane's partial sums: fixed, so that the order (and result) is the same on
/// every instruction set; each plane's lanes are combined in f64, and the planes of a channel
/// are added in f64 in sample order (the same on any thread count).
const LANES: usize = 16;

#[inline(always)]
fn combine(l: [f32; LANES]) -> f64 {
    l.iter().map(|&v| v as f64).sum()
}

/// `(Σ x, Σ x²)` of one plane: 16 f32 lanes (element `k` to lane `k % 16`, a multiply then
/// an add, no fused multiply-add), combined in f64, the tail added in f64: the same bits on
/// every instruction set. Written with explicit vectors (the 16 fixed lanes as plain arrays
/// compiled to scalar code).
#[inline(always)]
fn value_sums<S: pulp::Simd>(simd: S, x: &[f32]) -> (f64, f64) {
    let lanes = S::F32_LANES;
    let per = LANES / lanes;
    debug_assert_eq!(per * lanes, LANES);
    let zero = simd.splat_f32s(0.0);
    let (mut s, mut s2) = ([zero; LANES], [zero; LANES]);
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    for ch in chunks {
        for v in 0..per {
            let xv: S::f32s =
                bytemuck::pod_read_unaligned(bytemuck::cast_slice(&ch[v * lanes..][..lanes]));
            s[v] = simd.add_f32s(s[v], xv);
            s2[v] = simd.add_f32s(s2[v], simd.mul_f32s(xv, xv));
        }
    }
    let unpack = |acc: &[S::f32s; LANES]| -> [f32; LANES] {
        let mut out = [0.0f32; LANES];
        out.copy_from_slice(bytemuck::cast_slice(&acc[..per]));
        out
    };
    let (mut a, mut a2) = (combine(unpack(&s)), combine(unpack(&s2)));
    for &v in tail {
        a += v as f64;
        a2 += v as f64 * v as f64;
    }
    (a, a2)
}

/// [`value_sums`] of each plane of `hw` values in `x` into `sums`, on the CPU's widest vectors:
/// the plane sums of [`Graph::set_plane_sums`] (batch norm's statistics, pooling's means).
pub(crate) fn plane_value_sums(x: &[f32], hw: usize, sums: &mut [(f64, f64)]) {
    struct Sums<'a>(&'a [f32], usize, &'a mut [(f64, f64)]);
    impl pulp::WithSimd for Sums<'_> {
        type Output = ();
        #[inline(always)]
        fn with_simd<S: pulp::Simd>(self, simd: S) {
            for (p, s) in self.0.chunks_exact(self.1).zip(self.2) {
                *s = value_sums(simd, p);
            }
        }
    }
    pulp::Arch::new().dispatch(Sums(x, hw, sums))
}

/// `(Σ gm, Σ gm·(x - mu))` of one plane, `gm = g` or, with `RELU`, `g` where the forward's
/// `(x - mu)·k + b > 0` (where its ReLU passed a positive value: recomputed from the input with
/// the forward's arithmetic, so the output need not be read) and zero elsewhere (ReLU's
/// gradient, not written out). 16 f32 lanes combined in f64 as [`value_sums`], in explicit
/// vectors (the select inside fixed lanes, and the fixed lanes alone, compiled to scalar code):
/// the same bits on every instruction set.
#[inline(always)]
fn grad_sums<S: pulp::Simd, const RELU: bool>(
    simd: S,
    g: &[f32],
    x: &[f32],
    mu: f32,
    (k, shift): (f32, f32),
) -> (f64, f64) {
    let lanes = S::F32_LANES;
    let per = LANES / lanes;
    debug_assert_eq!(per * lanes, LANES);
    let load =
        |v: &[f32]| -> S::f32s { bytemuck::pod_read_unaligned(bytemuck::cast_slice(&v[..lanes])) };
    let (zero, muv) = (simd.splat_f32s(0.0), simd.splat_f32s(mu));
    let (kv, bv) = (simd.splat_f32s(k), simd.splat_f32s(shift));
    let (mut s, mut sx) = ([zero; LANES], [zero; LANES]);
    let (gc, xc) = (g.chunks_exact(LANES), x.chunks_exact(LANES));
    let (gt, xt) = (gc.remainder(), xc.remainder());
    for (gch, xch) in gc.zip(xc) {
        for v in 0..per {
            let at = v * lanes;
            let (gv, xv) = (load(&gch[at..]), load(&xch[at..]));
            let d = simd.sub_f32s(xv, muv);
            let gm = if RELU {
                let t = simd.add_f32s(simd.mul_f32s(d, kv), bv);
                simd.select_f32s(simd.greater_than_f32s(t, zero), gv, zero)
            } else {
                gv
            };
            s[v] = simd.add_f32s(s[v], gm);
            sx[v] = simd.add_f32s(sx[v], simd.mul_f32s(gm, d));
        }
    }
    let unpack = |acc: &[S::f32s; LANES]| -> [f32; LANES] {
        let mut out = [0.0f32; LANES];
        let flat: &[f32] = bytemuck::cast_slice(&acc[..per]);
        out.copy_from_slice(flat);
        out
    };
    let (mut a, mut b) = (combine(unpack(&s)), combine(unpack(&sx)));
    for (&gv, &xv) in gt.iter().zip(xt) {
        let gm = if !RELU || (xv - mu) * k + shift > 0.0 {
            gv
        } else {
            0.0
        };
        a += gm as f64;
        b += gm as f64 * (xv - mu) as f64;
    }
    (a, b)
}

/// The activation fused into training-mode batch norm ([`batch_norm2d_train_act`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BnAct {
    /// None: plain batch norm.
    Identity,
    /// `max(·, 0)`, the gradient passed where the output is positive (PyTorch's rule).
    Relu,
}

/// The passes of training-mode batch norm over one sample (`C` planes of `hw` values), compiled
/// for the CPU's widest vectors by pulp's dispatch (`with_simd` is instantiated per instruction
/// set; the arithmetic is identical on each, and so are the results).
enum Pass<'a> {
    /// `sums[ch] = (Σ x, Σ x²)` of plane `ch`.
    ValueSums {
        x: &'a [f32],
        hw: usize,
        sums: &'a mut [(f64, f64)],
    },
    /// `out = act((x - mu)·k + b [+ res])` with `coef[ch] = (mu, k, b)`, and each output
    /// plane's [`plane_value_sums`] into `sums`.
    Normalise {
        out: &'a mut [f32],
        x: &'a [f32],
        res: Option<&'a [f32]>,
        hw: usize,
        coef: &'a [(f32, f32, f32)],
        act: BnAct,
        sums: &'a mut [(f64, f64)],
    },
    /// The gradient through the activation `gm = g·act'(·)` and `sums[ch] = (Σ gm,
    /// Σ gm·(x - mean[ch]))`; `gm` is written to `masked` when given (a residual needs it:
    /// ReLU's mask from the output `y`), else only summed (the mask recomputed from `x` with
    /// the forward's `coef`, see [`grad_sums`]).
    GradSums {
        g: &'a [f32],
        y: &'a [f32],
        x: &'a [f32],
        act: BnAct,
        masked: Option<&'a mut [f32]>,
        hw: usize,
        mean: &'a [f32],
        coef: &'a [(f32, f32, f32)],
        sums: &'a mut [(f64, f64)],
    },
    /// `dx = a·gm + (b·(x - mu) + c)` with `coef[ch] = (a, b, c, mu)`, where `gm = g`, or
    /// `g` where the forward's ReLU passed a positive value when `relu` holds its coefficients
    /// `(mu, k, b)` (recomputed: `(x - mu)·k + b > 0`).
    InputGrad {
        dx: &'a mut [f32],
        g: &'a [f32],
        relu: Option<&'a [(f32, f32, f32)]>,
        x: &'a [f32],
        hw: usize,
        coef: &'a [(f32, f32, f32, f32)],
    },
}

impl pulp::WithSimd for Pass<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, simd: S) {
        match self {
            Pass::ValueSums { x, hw, sums } => {
                for (xp, s) in x.chunks_exact(hw).zip(sums) {
                    *s = value_sums(simd, xp);
                }
            }
            Pass::Normalise {
                out,
                x,
                res,
                hw,
                coef,
                act,
                sums,
            } => {
                let planes = out.chunks_exact_mut(hw).zip(x.chunks_exact(hw)).zip(sums);
                for (ch, ((op, xp), sum)) in planes.enumerate() {
                    let (mu, k, b) = coef[ch];
                    match (res, act) {
                        (None, BnAct::Identity) => {
                            for (o, &v) in op.iter_mut().zip(xp) {
                                *o = (v - mu) * k + b;
                            }
                        }
                        (None, BnAct::Relu) => {
                            for (o, &v) in op.iter_mut().zip(xp) {
                                *o = ((v - mu) * k + b).max(0.0);
                            }
                        }
                        (Some(r), BnAct::Identity) => {
                            let rp = &r[ch * hw..][..hw];
                            for ((o, &v), &r) in op.iter_mut().zip(xp).zip(rp) {
                                *o = ((v - mu) * k + b) + r;
                            }
                        }
                        (Some(r), BnAct::Relu) => {
                            let rp = &r[ch * hw..][..hw];
                            for ((o, &v), &r) in op.iter_mut().zip(xp).zip(rp) {
                                *o = (((v - mu) * k + b) + r).max(0.0);
                            }
                        }
                    }
                    // While the plane is in cache (a pooling after it needs no pass).
                    *sum = value_sums(simd, op);
                }
            }
            Pass::GradSums {
                g,
                y,
                x,
                act,
                mut masked,
                hw,
                mean,
                coef,
                sums,
            } => {
                for (ch, s) in sums.iter_mut().enumerate() {
                    let at = ch * hw;
                    let (gp, yp, xp) = (&g[at..at + hw], &y[at..at + hw], &x[at..at + hw]);
                    *s = match (act, masked.as_deref_mut()) {
                        (BnAct::Relu, Some(m)) => {
                            let mp = &mut m[at..at + hw];
                            for ((m, &gv), &yv) in mp.iter_mut().zip(gp).zip(yp) {
                                *m = if yv > 0.0 { gv } else { 0.0 };
                            }
                            grad_sums::<S, false>(simd, mp, xp, mean[ch], (0.0, 0.0))
                        }
                        (BnAct::Relu, None) => {
                            let (_, k, b) = coef[ch];
                            grad_sums::<S, true>(simd, gp, xp, mean[ch], (k, b))
                        }
                        (BnAct::Identity, _) => {
                            grad_sums::<S, false>(simd, gp, xp, mean[ch], (0.0, 0.0))
                        }
                    };
                }
            }
            Pass::InputGrad {
                dx,
                g,
                relu,
                x,
                hw,
                coef,
            } => {
                let planes = dx
                    .chunks_exact_mut(hw)
                    .zip(g.chunks_exact(hw))
                    .zip(x.chunks_exact(hw));
                for (ch, ((d, gp), xp)) in planes.enumerate() {
                    let (a, b, c, mu) = coef[ch];
                    match relu {
                        None => {
                            for ((o, &gv), &xv) in d.iter_mut().zip(gp).zip(xp) {
                                *o = a * gv + (b * (xv - mu) + c);
                            }
                        }
                        Some(fwd) => {
                            let (fmu, fk, fb) = fwd[ch];
                            for ((o, &gv), &xv) in d.iter_mut().zip(gp).zip(xp) {
                                let gm = if (xv - fmu) * fk + fb > 0.0 { gv } else { 0.0 };
                                *o = a * gm + (b * (xv - mu) + c);
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Per-channel totals of per-sample partial sums `[N][C]`, added in sample order.
fn add_in_order(partial: &[(f64, f64)], c: usize) -> Vec<(f64, f64)> {
    let mut total = vec![(0.0f64, 0.0f64); c];
    for p in partial.chunks_exact(c) {
        for (t, q) in total.iter_mut().zip(p) {
            t.0 += q.0;
            t.1 += q.1;
        }
    }
    total
}

pub(crate) struct BnTrainOp {
    pub(crate) mean: Vec<f32>,
    pub(crate) inv_std: Vec<f32>,
    pub(crate) act: BnAct,
    /// Whether a residual was added (the op's fourth input).
    pub(crate) residual: bool,
}

/// The per-sample sums `(Σ gm, Σ gm·(x - mean))` per channel of a batch norm + ReLU's backward
/// (`gm`: `g` where the forward's `(x - mu)·k + b > 0`, `coef[ch] = (mu, k, b)`), of one sample
/// `x` with gradient `g` (`C` planes of `hw`) into `sums` (`C` values): what
/// [`BnTrainOp::backward_from`] takes, computed by the caller while the sample is in cache.
pub(crate) fn relu_grad_sums(
    g: &[f32],
    x: &[f32],
    hw: usize,
    mean: &[f32],
    coef: &[Coef],
    sums: &mut [(f64, f64)],
) {
    pulp::Arch::new().dispatch(Pass::GradSums {
        g,
        y: x,
        x,
        act: BnAct::Relu,
        masked: None,
        hw,
        mean,
        coef,
        sums,
    })
}

impl BnTrainOp {
    /// [`Backward::backward`] with the gradient's per-sample sums `[N][C]` already taken
    /// ([`relu_grad_sums`]; batch norm + ReLU without a residual only), else its own pass.
    pub(crate) fn backward_from(
        &self,
        inputs: &[&Tensor],
        out: &Tensor,
        grad: &Tensor,
        sums: Option<Vec<(f64, f64)>>,
    ) -> Vec<Option<Tensor>> {
        let (n, c, hw) = dims(inputs[0]);
        let xs = inputs[0].as_standard_layout();
        let (gs, ys) = (grad.as_standard_layout(), out.as_standard_layout());
        let (x, gy, y, gamma) = (
            xs.as_slice().expect("std"),
            gs.as_slice().expect("std"),
            ys.as_slice().expect("std"),
            inputs[1],
        );
        let len = c * hw;
        let m = (n * hw) as f64;
        let arch = pulp::Arch::new();
        // The gradient through the activation and its per-channel sums, in parallel over
        // samples; written out only when the residual needs it (else the input gradient's pass
        // masks again).
        let mut masked = match (self.act, self.residual) {
            (BnAct::Relu, true) => buffers::take(x.len()),
            _ => Vec::new(),
        };
        let fwd_coef = normalise_coef(&self.mean, &self.inv_std, gamma, inputs[2]);
        let given = sums.is_some();
        assert!(
            !given || (self.act == BnAct::Relu && !self.residual),
            "sums given for batch norm + ReLU only"
        );
        let mut partial = sums.unwrap_or_else(|| vec![(0.0f64, 0.0f64); n * c]);
        assert_eq!(partial.len(), n * c, "sums per sample and channel");
        let pass = |s: usize, masked: Option<&mut [f32]>, sums: &mut [(f64, f64)]| {
            arch.dispatch(Pass::GradSums {
                g: &gy[s * len..][..len],
                y: &y[s * len..][..len],
                x: &x[s * len..][..len],
                act: self.act,
                masked,
                hw,
                mean: &self.mean,
                coef: &fwd_coef,
                sums,
            })
        };
        // (Taken by the caller when given.)
        if !given && masked.is_empty() {
            partial
                .par_chunks_mut(c)
                .enumerate()
                .for_each(|(s, p)| pass(s, None, p));
        } else if !given {
            partial
                .par_chunks_mut(c)
                .zip(masked.par_chunks_mut(len))
                .enumerate()
                .for_each(|(s, (p, mk))| pass(s, Some(mk), p));
        }
        let sums = add_in_order(&partial, c);
        // Σ gm·x̂ per channel.
        let sgx: Vec<f64> = sums
            .iter()
            .zip(&self.inv_std)
            .map(|(s, &is)| s.1 * is as f64)
            .collect();
        let dbeta: Vec<f32> = sums.iter().map(|s| s.0 as f32).collect();
        let dgamma: Vec<f32> = sgx.iter().map(|&v| v as f32).collect();
        // dx = gamma·is/m · (m·gm - Σgm - x̂·Σgm·x̂) = A·gm + B·(x - mu) + C per channel.
        let coef: Vec<(f32, f32, f32, f32)> = (0..c)
            .map(|ch| {
                let is = self.inv_std[ch] as f64;
                let a = gamma[ch] as f64 * is;
                (
                    a as f32,
                    (-a * is * sgx[ch] / m) as f32,
                    (-a * sums[ch].0 / m) as f32,
                    self.mean[ch],
                )
            })
            .collect();
        // The input gradient from the masked gradient, or from `gy` masked on the fly.
        let (gm, relu): (&[f32], Option<&[Coef]>) = match (self.act, masked.is_empty()) {
            (_, false) => (&masked, None),
            (BnAct::Relu, true) => (gy, Some(&fwd_coef)),
            (BnAct::Identity, true) => (gy, None),
        };
        let mut dx = buffers::take(x.len());
        dx.par_chunks_mut(len).enumerate().for_each(|(s, d)| {
            arch.dispatch(Pass::InputGrad {
                dx: d,
                g: &gm[s * len..][..len],
                relu,
                x: &x[s * len..][..len],
                hw,
                coef: &coef,
            })
        });
        let mut grads = vec![
            Some(Tensor::from_shape_vec(inputs[0].raw_dim(), dx).expect("shape")),
            Some(Tensor::from_shape_vec(IxDyn(&[c]), dgamma).expect("shape")),
            Some(Tensor::from_shape_vec(IxDyn(&[c]), dbeta).expect("shape")),
        ];
        if self.residual {
            // The residual's gradient is the gradient through the activation.
            let gr = if masked.is_empty() {
                let mut v = buffers::take(gy.len());
                v.copy_from_slice(gy);
                v
            } else {
                masked
            };
            grads.push(Some(
                Tensor::from_shape_vec(inputs[0].raw_dim(), gr).expect("shape"),
            ));
        } else {
            buffers::give(masked);
        }
        grads
    }
}

impl Backward for BnTrainOp {
    fn backward(&self, inputs: &[&Tensor], out: &Tensor, grad: &Tensor) -> Vec<Option<Tensor>> {
        self.backward_from(inputs, out, grad, None)
    }

    fn name(&self) -> &'static str {
        match (self.act, self.residual) {
            (BnAct::Identity, false) => "BnTrainOp",
            (BnAct::Relu, false) => "BnTrainOp+relu",
            (BnAct::Identity, true) => "BnTrainOp+add",
            (BnAct::Relu, true) => "BnTrainOp+add+relu",
        }
    }
}

/// One channel's `(mu, k, b)` of the forward, `y = act((x - mu)·k + b [+ res])`.
pub(crate) type Coef = (f32, f32, f32);

/// The forward's `(mu, k, b)` per channel, `y = act((x - mu)·k + b [+ res])`: one function for
/// the forward and for the backward's ReLU mask (recomputed from the input, the same bits).
pub(crate) fn normalise_coef(
    mean: &[f32],
    inv_std: &[f32],
    gamma: &Tensor,
    beta: &Tensor,
) -> Vec<(f32, f32, f32)> {
    (0..mean.len())
        .map(|ch| (mean[ch], inv_std[ch] * gamma[ch], beta[ch]))
        .collect()
}

fn check(g: &Graph, x: Var, gamma: Var, beta: Var) -> Result<usize> {
    let s = g.shape(x);
    if s.len() != 4 || g.shape(gamma) != [s[1]] || g.shape(beta) != [s[1]] {
        return Err(shape(
            "batch_norm2d",
            format!(
                "input {s:?}, gamma {:?}, beta {:?}",
                g.shape(gamma),
                g.shape(beta)
            ),
        ));
    }
    Ok(s[1])
}

/// The batch statistics of `x` `[N, C, H, W]` per channel: `(mean, biased variance, 1 /
/// sqrt(variance + eps))`, from the plane sums the op that wrote `x` attached (a convolution,
/// summing its output while in cache: the same function on the same values), else from one
/// pass here; per-sample sums added in sample order.
pub(crate) fn batch_stats(g: &Graph, x: Var, eps: f32) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (n, c, hw) = dims(g.value(x));
    let len = c * hw;
    let m = (n * hw) as f64;
    let sums = match g.plane_sums(x) {
        Some(p) if p.len() == n * c => add_in_order(p, c),
        _ => {
            let xv = g.value(x).as_standard_layout();
            let xs = xv.as_slice().expect("std");
            let arch = pulp::Arch::new();
            let mut partial = vec![(0.0f64, 0.0f64); n * c];
            partial.par_chunks_mut(c).enumerate().for_each(|(s, sums)| {
                arch.dispatch(Pass::ValueSums {
                    x: &xs[s * len..][..len],
                    hw,
                    sums,
                })
            });
            add_in_order(&partial, c)
        }
    };
    let mean: Vec<f32> = sums.iter().map(|&(s, _)| (s / m) as f32).collect();
    let var: Vec<f32> = sums
        .iter()
        .map(|&(s, s2)| {
            let mu = s / m;
            (s2 / m - mu * mu).max(0.0) as f32
        })
        .collect();
    let inv_std: Vec<f32> = var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect();
    (mean, var, inv_std)
}

/// Training-mode batch norm: normalises with the batch statistics and returns them
/// `(output, mean, biased variance)` so that the layer can update its running statistics.
pub fn batch_norm2d_train(
    g: &mut Graph,
    x: Var,
    gamma: Var,
    beta: Var,
    eps: f32,
) -> Result<(Var, Vec<f32>, Vec<f32>)> {
    batch_norm2d_train_act(g, x, gamma, beta, eps, None, BnAct::Identity)
}

/// Training-mode batch norm with the residual add and the activation that follow it fused into
/// its passes: `act(bn(x) + residual)` (a ResNet block's `relu(bn2(h) + shortcut)`), statistics
/// as in [`batch_norm2d_train`]. The same values and gradients, bit for bit, as the separate
/// ops, with two to five fewer passes over the activation each way.
pub fn batch_norm2d_train_act(
    g: &mut Graph,
    x: Var,
    gamma: Var,
    beta: Var,
    eps: f32,
    residual: Option<Var>,
    act: BnAct,
) -> Result<(Var, Vec<f32>, Vec<f32>)> {
    let c = check(g, x, gamma, beta)?;
    if let Some(r) = residual {
        if g.shape(r) != g.shape(x) {
            return Err(shape(
                "batch_norm2d",
                format!("residual {:?} for input {:?}", g.shape(r), g.shape(x)),
            ));
        }
    }
    let xv = g.value(x).as_standard_layout();
    let rv = residual.map(|r| g.value(r).as_standard_layout());
    let (n, _, hw) = dims(g.value(x));
    let len = c * hw;
    let xs = xv.as_slice().expect("std");
    let rs = rv.as_ref().map(|r| r.as_slice().expect("std"));
    let arch = pulp::Arch::new();
    let (mean, var, inv_std) = batch_stats(g, x, eps);
    let coef = normalise_coef(&mean, &inv_std, g.value(gamma), g.value(beta));
    let mut y = buffers::take(xs.len());
    let mut out_sums = vec![(0.0f64, 0.0f64); n * c];
    y.par_chunks_mut(len)
        .zip(out_sums.par_chunks_mut(c))
        .enumerate()
        .for_each(|(s, (ys, sums))| {
            arch.dispatch(Pass::Normalise {
                out: ys,
                x: &xs[s * len..][..len],
                res: rs.map(|r| &r[s * len..][..len]),
                hw,
                coef: &coef,
                act,
                sums,
            })
        });
    let y = Tensor::from_shape_vec(g.value(x).raw_dim(), y).expect("shape");
    drop((xv, rv));
    let inputs: Vec<Var> = [x, gamma, beta].into_iter().chain(residual).collect();
    let out = g.record(
        y,
        &inputs,
        BnTrainOp {
            mean: mean.clone(),
            inv_std,
            act,
            residual: residual.is_some(),
        },
    );
    g.set_plane_sums(out, out_sums);
    Ok((out, mean, var))
}

struct BnEvalOp {
    inv_std: Vec<f32>,
    mean: Vec<f32>,
}

impl Backward for BnEvalOp {
    fn backward(&self, inputs: &[&Tensor], _: &Tensor, grad: &Tensor) -> Vec<Option<Tensor>> {
        let (n, c, hw) = dims(inputs[0]);
        let xs = inputs[0].as_standard_layout();
        let gs = grad.as_standard_layout();
        let (x, gy) = (xs.as_slice().expect("std"), gs.as_slice().expect("std"));
        let mut dx = vec![0.0f32; x.len()];
        let (mut dg, mut db) = (vec![0.0f32; c], vec![0.0f32; c]);
        for b in 0..n {
            for ch in 0..c {
                let o = (b * c + ch) * hw;
                for i in o..o + hw {
                    dx[i] = gy[i] * inputs[1][ch] * self.inv_std[ch];
                    dg[ch] += gy[i] * (x[i] - self.mean[ch]) * self.inv_std[ch];
                    db[ch] += gy[i];
                }
            }
        }
        vec![
            Some(Tensor::from_shape_vec(inputs[0].raw_dim(), dx).expect("shape")),
            Some(Tensor::from_shape_vec(IxDyn(&[c]), dg).expect("shape")),
            Some(Tensor::from_shape_vec(IxDyn(&[c]), db).expect("shape")),
        ]
    }
}

/// Evaluation-mode batch norm with running statistics.
pub fn batch_norm2d_eval(
    g: &mut Graph,
    x: Var,
    gamma: Var,
    beta: Var,
    mean: &[f32],
    var: &[f32],
    eps: f32,
) -> Result<Var> {
    let c = check(g, x, gamma, beta)?;
    if mean.len() != c || var.len() != c {
        return Err(shape(
            "batch_norm2d",
            format!(
                "running statistics for {} channels, input has {c}",
                mean.len()
            ),
        ));
    }
    let inv_std: Vec<f32> = var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect();
    let (_, _, hw) = dims(g.value(x));
    let dim = g.value(x).raw_dim();
    // Plane by plane in parallel into a pooled buffer (it was one thread over a fresh buffer
    // and a copy of the input: a fifth of a float ResNet-20's inference), each value with the
    // same expression.
    let y = {
        let xv = g.value(x).as_standard_layout();
        let (gm, bt) = (g.value(gamma), g.value(beta));
        let xs = xv.as_slice().expect("std");
        let mut y = buffers::take(xs.len());
        y.par_chunks_mut(hw.max(1))
            .zip(xs.par_chunks(hw.max(1)))
            .enumerate()
            .for_each(|(plane, (yp, xp))| {
                let ch = plane % c;
                let (mu, is, gv, bv) = (mean[ch], inv_std[ch], gm[ch], bt[ch]);
                for (o, &v) in yp.iter_mut().zip(xp) {
                    *o = (v - mu) * is * gv + bv;
                }
            });
        Tensor::from_shape_vec(dim, y).expect("shape")
    };
    Ok(g.record(
        y,
        &[x, gamma, beta],
        BnEvalOp {
            inv_std,
            mean: mean.to_vec(),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{check, random};

    #[test]
    fn gradients_match_finite_differences() {
        let (x, gm, bt) = (random(&[3, 4, 2, 3], 1), random(&[4], 2), random(&[4], 3));
        check(
            &[x.clone(), gm.clone(), bt.clone()],
            1e-2,
            2e-2,
            30,
            |g, v| batch_norm2d_train(g, v[0], v[1], v[2], 1e-5).unwrap().0,
        );
        let (m, var) = ([0.1, -0.2, 0.3, 0.0], [1.0, 0.5, 2.0, 0.3]);
        check(&[x, gm, bt], 1e-2, 1e-2, 30, |g, v| {
            batch_norm2d_eval(g, v[0], v[1], v[2], &m, &var, 1e-5).unwrap()
        });
    }

    /// Output and every input gradient of `sum(w · f(x, gamma, beta, residual))` for a fixed
    /// random `w`.
    fn value_and_grads(
        inputs: &[Tensor],
        f: impl Fn(&mut Graph, &[Var]) -> Var,
    ) -> (Tensor, Vec<Option<Tensor>>) {
        let mut g = Graph::new(true);
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| g.input_with_grad(t.clone()))
            .collect();
        let y = f(&mut g, &vars);
        let w = g.input(random(g.shape(y), 77));
        let prod = crate::ops::basic::mul(&mut g, y, w).unwrap();
        let loss = crate::ops::basic::sum(&mut g, prod);
        let grads = g.gradients(loss).unwrap();
        let value = g.value(y).clone();
        (
            value,
            vars.iter().map(|v| grads[v.index()].clone()).collect(),
        )
    }

    fn fused(residual: bool, act: BnAct) -> impl Fn(&mut Graph, &[Var]) -> Var {
        move |g, v| {
            let r = residual.then_some(v[3]);
            batch_norm2d_train_act(g, v[0], v[1], v[2], 1e-5, r, act)
                .unwrap()
                .0
        }
    }

    fn inputs(shape: [usize; 4], seed: u64) -> Vec<Tensor> {
        let c = shape[1];
        vec![
            random(&shape, seed).mapv(|v| v * 3.0 + 1.0),
            random(&[c], seed + 1),
            random(&[c], seed + 2),
            random(&shape, seed + 3),
        ]
    }

    #[test]
    fn fused_residual_and_relu_match_the_separate_ops_bit_for_bit() {
        for (i, shape) in [[4, 3, 5, 5], [2, 5, 7, 3], [3, 2, 1, 17], [5, 4, 4, 4]]
            .into_iter()
            .enumerate()
        {
            let inp = inputs(shape, 10 * i as u64);
            for residual in [false, true] {
                for act in [BnAct::Identity, BnAct::Relu] {
                    let separate = value_and_grads(&inp, |g, v| {
                        let mut y = batch_norm2d_train(g, v[0], v[1], v[2], 1e-5).unwrap().0;
                        if residual {
                            y = crate::ops::basic::add(g, y, v[3]).unwrap();
                        }
                        match act {
                            BnAct::Identity => y,
                            BnAct::Relu => crate::ops::act::relu(g, y),
                        }
                    });
                    let one = value_and_grads(&inp, fused(residual, act));
                    assert_eq!(one.0, separate.0, "{shape:?} {residual} {act:?}: values");
                    assert_eq!(one.1, separate.1, "{shape:?} {residual} {act:?}: gradients");
                    // Some outputs clipped, some not: the mask matters.
                    if act == BnAct::Relu {
                        assert!(one.0.iter().any(|&v| v == 0.0) && one.0.iter().any(|&v| v > 0.0));
                    }
                }
            }
        }
    }

    #[test]
    fn fused_gradients_match_finite_differences() {
        // Inputs where no output lies within 0.05 of the ReLU's kink (a finite-difference step
        // then never crosses it).
        let inp = (0..50)
            .map(|seed| inputs([3, 2, 3, 3], 100 + seed))
            .find(|inp| {
                let (y, _) = value_and_grads(inp, fused(true, BnAct::Identity));
                y.iter().all(|v| v.abs() > 0.05)
            })
            .expect("a seed without outputs near 0");
        for residual in [false, true] {
            let f = fused(residual, BnAct::Relu);
            check(&inp, 1e-3, 2e-2, 20, f);
        }
    }

    #[test]
    fn fused_batch_norm_is_independent_of_the_thread_count() {
        let inp = inputs([9, 3, 6, 5], 7);
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| value_and_grads(&inp, fused(true, BnAct::Relu)))
        };
        let one = run(1);
        for threads in [2, 3] {
            assert_eq!(run(threads), one, "{threads} threads");
        }
    }

    /// Plain loops: `(Σ g, Σ g·(x - mu))` over 16 f32 lanes combined in f64, the tail in f64.
    fn reference_grad_sums(g: &[f32], x: &[f32], mu: f32) -> (f64, f64) {
        let (mut s, mut sx) = ([0.0f32; LANES], [0.0f32; LANES]);
        let full = g.len() / LANES * LANES;
        for k in 0..full {
            s[k % LANES] += g[k];
            sx[k % LANES] += g[k] * (x[k] - mu);
        }
        let (mut a, mut b) = (combine(s), combine(sx));
        for k in full..g.len() {
            a += g[k] as f64;
            b += g[k] as f64 * (x[k] - mu) as f64;
        }
        (a, b)
    }

    #[test]
    fn gradient_sums_match_plain_loops_on_every_instruction_set() {
        // grad_sums (explicit vectors), plain and through ReLU's mask (not written), against
        // plain loops on the (written) masked gradient, bit for bit, on the scalar path and
        // every vector path this CPU has.
        let mut ran = vec!["scalar"];
        for len in [0, 1, 15, 16, 17, 49, 196, 784, 1000] {
            let (g, x) = (random(&[len.max(1)], 1), random(&[len.max(1)], 3));
            let (g, x) = (&g.as_slice().unwrap()[..len], &x.as_slice().unwrap()[..len]);
            // The forward's ReLU output, then its mask as the separate ops take it.
            let (k, shift) = (1.7f32, -0.2f32);
            let y: Vec<f32> = x
                .iter()
                .map(|&v| ((v - 0.3) * k + shift).max(0.0))
                .collect();
            let masked: Vec<f32> = g
                .iter()
                .zip(&y)
                .map(|(&gv, &yv)| if yv > 0.0 { gv } else { 0.0 })
                .collect();
            assert!(len < 16 || masked.iter().zip(g).any(|(m, g)| m != g));
            let want = (
                reference_grad_sums(g, x, 0.3),
                reference_grad_sums(&masked, x, 0.3),
            );
            let scalar = pulp::Simd::vectorize(pulp::Scalar, Sums(g, x, (k, shift)));
            assert_eq!(scalar, want, "scalar {len}");
            #[cfg(target_arch = "x86_64")]
            {
                if let Some(simd) = pulp::x86::V3::try_new() {
                    let got = pulp::Simd::vectorize(simd, Sums(g, x, (k, shift)));
                    assert_eq!(got, want, "AVX2 {len}");
                    ran.push("avx2");
                }
                if let Some(simd) = pulp::x86::V4::try_new() {
                    let got = pulp::Simd::vectorize(simd, Sums(g, x, (k, shift)));
                    assert_eq!(got, want, "AVX-512 {len}");
                    ran.push("avx512");
                }
            }
        }
        ran.sort_unstable();
        ran.dedup();
        eprintln!("batch-norm gradient sums: checked {ran:?}");
    }

    /// `grad_sums` plain and through the mask, compiled for an instruction set (the dispatch's
    /// way).
    struct Sums<'a>(&'a [f32], &'a [f32], (f32, f32));

    impl pulp::WithSimd for Sums<'_> {
        type Output = ((f64, f64), (f64, f64));
        #[inline(always)]
        fn with_simd<S: pulp::Simd>(self, simd: S) -> Self::Output {
            (
                grad_sums::<S, false>(simd, self.0, self.1, 0.3, (0.0, 0.0)),
                grad_sums::<S, true>(simd, self.0, self.1, 0.3, self.2),
            )
        }
    }

    #[test]
    fn residual_of_another_shape_is_an_error() {
        let mut g = Graph::new(true);
        let x = g.input(random(&[2, 3, 4, 4], 1));
        let r = g.input(random(&[2, 3, 4, 5], 2));
        let gm = g.input(Tensor::ones(IxDyn(&[3])));
        let bt = g.input(Tensor::zeros(IxDyn(&[3])));
        let err = batch_norm2d_train_act(&mut g, x, gm, bt, 1e-5, Some(r), BnAct::Relu);
        assert!(err.is_err());
    }

    /// Evaluation mode: `(x - mean)·inv_std·gamma + beta` per value, bit for bit (the planes
    /// run in parallel).
    #[test]
    fn eval_output_is_the_plain_expression_bit_for_bit() {
        let (x, gm, bt) = (
            random(&[3, 5, 4, 7], 21),
            random(&[5], 22),
            random(&[5], 23),
        );
        let mean = [0.1f32, -0.2, 0.3, 0.0, 1.0];
        let var = [1.0f32, 0.5, 2.0, 0.1, 3.0];
        let mut g = Graph::new(false);
        let v = [&x, &gm, &bt].map(|t| g.input(t.clone()));
        let y = batch_norm2d_eval(&mut g, v[0], v[1], v[2], &mean, &var, 1e-5).unwrap();
        for (i, (&got, &xv)) in g.value(y).iter().zip(x.iter()).enumerate() {
            let ch = (i / 28) % 5;
            let is = 1.0 / (var[ch] + 1e-5).sqrt();
            let want = (xv - mean[ch]) * is * gm[ch] + bt[ch];
            assert_eq!(got.to_bits(), want.to_bits(), "value {i}");
        }
    }

    #[test]
    fn training_output_is_normalised() {
        let mut g = Graph::new(true);
        let x = g.input(random(&[8, 2, 3, 3], 4).mapv(|v| v * 5.0 + 2.0));
        let gm = g.input(Tensor::ones(IxDyn(&[2])));
        let bt = g.input(Tensor::zeros(IxDyn(&[2])));
        let (y, mean, _) = batch_norm2d_train(&mut g, x, gm, bt, 1e-5).unwrap();
        let y = g.value(y);
        for ch in 0..2 {
            let vals: Vec<f32> = (0..8)
                .flat_map(|b| (0..9).map(move |i| (b, i)))
                .map(|(b, i)| y[[b, ch, i / 3, i % 3]])
                .collect();
            let mu: f32 = vals.iter().sum::<f32>() / 72.0;
            let var: f32 = vals.iter().map(|v| (v - mu).powi(2)).sum::<f32>() / 72.0;
            assert!(mu.abs() < 1e-5 && (var - 1.0).abs() < 1e-3, "{mu} {var}");
            assert!((mean[ch] - 2.0).abs() < 1.0);
        }
    }

    /// Batch norm after a convolution takes the plane sums the convolution attached (stride 1
    /// and 2 direct paths): the same statistics and output bits as from its own pass.
    #[test]
    fn statistics_from_the_convolution_equal_the_own_pass_bit_for_bit() {
        use crate::ops::conv::{conv2d, ConvSpec};
        for (c, co, h, stride) in [(3, 16, 9, 1), (5, 20, 12, 2), (4, 8, 7, 1)] {
            let x = random(&[3, c, h, h], 1);
            let w = random(&[co, c, 3, 3], 2);
            let (gamma, beta) = (random(&[co], 3), random(&[co], 4));
            let spec = ConvSpec {
                stride,
                pad: 1,
                groups: 1,
            };
            let mut g = Graph::new(true);
            let (xv, wv) = (g.input(x), g.input_with_grad(w));
            let y = conv2d(&mut g, xv, wv, None, spec).unwrap();
            assert!(g.plane_sums(y).is_some(), "{c} {co} {h} s{stride}: no sums");
            let (gv, bv) = (g.input(gamma.clone()), g.input(beta.clone()));
            let (o1, m1, v1) =
                batch_norm2d_train_act(&mut g, y, gv, bv, 1e-5, None, BnAct::Relu).unwrap();
            // The same values as a plain input: the statistics come from the own pass.
            let mut g2 = Graph::new(true);
            let y2 = g2.input(g.value(y).clone());
            assert!(g2.plane_sums(y2).is_none());
            let (gv2, bv2) = (g2.input(gamma), g2.input(beta));
            let (o2, m2, v2) =
                batch_norm2d_train_act(&mut g2, y2, gv2, bv2, 1e-5, None, BnAct::Relu).unwrap();
            assert_eq!((m1, v1), (m2, v2), "{c} {co} {h} s{stride}");
            assert_eq!(g.value(o1), g2.value(o2), "{c} {co} {h} s{stride}");
        }
    }

    struct ValueSums<'a>(&'a [f32]);

    impl pulp::WithSimd for ValueSums<'_> {
        type Output = (f64, f64);
        #[inline(always)]
        fn with_simd<S: pulp::Simd>(self, simd: S) -> (f64, f64) {
            value_sums(simd, self.0)
        }
    }

    #[test]
    fn plane_sums_are_the_same_bits_on_every_instruction_set() {
        // value_sums (explicit vectors) against plain loops over the 16 lanes, bit for bit,
        // on the scalar path and every vector path this CPU has.
        let mut ran = vec!["scalar"];
        for len in [0, 1, 15, 16, 17, 49, 196, 784, 1000] {
            let x = random(&[len.max(1)], 5);
            let x = &x.as_slice().unwrap()[..len];
            let (mut l, mut l2) = ([0.0f32; LANES], [0.0f32; LANES]);
            let full = len / LANES * LANES;
            for (k, &v) in x[..full].iter().enumerate() {
                l[k % LANES] += v;
                l2[k % LANES] += v * v;
            }
            let (mut a, mut a2) = (combine(l), combine(l2));
            for &v in &x[full..] {
                a += v as f64;
                a2 += v as f64 * v as f64;
            }
            let want = (a, a2);
            assert_eq!(value_sums(pulp::Scalar, x), want, "scalar {len}");
            #[cfg(target_arch = "x86_64")]
            {
                if let Some(simd) = pulp::x86::V3::try_new() {
                    assert_eq!(
                        pulp::Simd::vectorize(simd, ValueSums(x)),
                        want,
                        "AVX2 {len}"
                    );
                    ran.push("avx2");
                }
                if let Some(simd) = pulp::x86::V4::try_new() {
                    assert_eq!(
                        pulp::Simd::vectorize(simd, ValueSums(x)),
                        want,
                        "AVX-512 {len}"
                    );
                    ran.push("avx512");
                }
            }
            if len > 0 {
                let mut got = [(0.0, 0.0)];
                plane_value_sums(x, len, &mut got);
                assert_eq!(got[0], want, "dispatched {len}");
            }
        }
        ran.sort_unstable();
        ran.dedup();
        eprintln!("batch-norm value sums: checked {ran:?}");
    }
}
