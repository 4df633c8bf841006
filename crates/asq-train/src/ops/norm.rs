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
/// every instruction set; each plane's lanes are combined in f64, planes summed in f64.
const LANES: usize = 16;

/// Per-plane kernels of batch norm, compiled for the CPU's widest vectors by pulp's dispatch
/// (`with_simd` is instantiated per instruction set; the arithmetic is identical on each).
enum Plane<'a> {
    /// `(Σ x, Σ x²)`.
    ValueSums(&'a [f32]),
    /// `(Σ g, Σ g·(x - mu))` of `(g, x, mu)`.
    GradSums(&'a [f32], &'a [f32], f32),
    /// `out = (x - mu)·k + b` of `(out, x, mu, k, b)`.
    Normalise(&'a mut [f32], &'a [f32], f32, f32, f32),
    /// `out = a·g + (b·(x - mu) + c)` of `(out, g, x, (a, b, c, mu))`.
    InputGrad(&'a mut [f32], &'a [f32], &'a [f32], (f32, f32, f32, f32)),
}

impl pulp::WithSimd for Plane<'_> {
    type Output = (f64, f64);

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _simd: S) -> (f64, f64) {
        let combine = |l: [f32; LANES]| l.iter().map(|&v| v as f64).sum::<f64>();
        match self {
            Plane::ValueSums(x) => {
                let (mut s, mut s2) = ([0.0f32; LANES], [0.0f32; LANES]);
                let chunks = x.chunks_exact(LANES);
                let tail = chunks.remainder();
                for ch in chunks {
                    for l in 0..LANES {
                        s[l] += ch[l];
                        s2[l] += ch[l] * ch[l];
                    }
                }
                let (mut a, mut a2) = (combine(s), combine(s2));
                for &v in tail {
                    a += v as f64;
                    a2 += v as f64 * v as f64;
                }
                (a, a2)
            }
            Plane::GradSums(g, x, mu) => {
                let (mut s, mut sx) = ([0.0f32; LANES], [0.0f32; LANES]);
                let (gc, xc) = (g.chunks_exact(LANES), x.chunks_exact(LANES));
                let (gt, xt) = (gc.remainder(), xc.remainder());
                for (gch, xch) in gc.zip(xc) {
                    for l in 0..LANES {
                        s[l] += gch[l];
                        sx[l] += gch[l] * (xch[l] - mu);
                    }
                }
                let (mut a, mut b) = (combine(s), combine(sx));
                for (&gv, &xv) in gt.iter().zip(xt) {
                    a += gv as f64;
                    b += gv as f64 * (xv - mu) as f64;
                }
                (a, b)
            }
            Plane::Normalise(out, x, mu, k, b) => {
                for (o, &xv) in out.iter_mut().zip(x) {
                    *o = (xv - mu) * k + b;
                }
                (0.0, 0.0)
            }
            Plane::InputGrad(out, g, x, (a, b, c, mu)) => {
                for ((o, &gv), &xv) in out.iter_mut().zip(g).zip(x) {
                    *o = a * gv + (b * (xv - mu) + c);
                }
                (0.0, 0.0)
            }
        }
    }
}

fn value_sums(x: &[f32]) -> (f64, f64) {
    pulp::Arch::new().dispatch(Plane::ValueSums(x))
}

fn grad_sums(g: &[f32], x: &[f32], mu: f32) -> (f64, f64) {
    pulp::Arch::new().dispatch(Plane::GradSums(g, x, mu))
}

struct BnTrainOp {
    mean: Vec<f32>,
    inv_std: Vec<f32>,
}

impl Backward for BnTrainOp {
    fn backward(&self, inputs: &[&Tensor], _: &Tensor, grad: &Tensor) -> Vec<Option<Tensor>> {
        let (n, c, hw) = dims(inputs[0]);
        let xs = inputs[0].as_standard_layout();
        let gs = grad.as_standard_layout();
        let (x, gy, gamma) = (
            xs.as_slice().expect("std"),
            gs.as_slice().expect("std"),
            inputs[1],
        );
        let m = (n * hw) as f64;
        // Per-channel sums in parallel over channels (each in a fixed order in f64 lanes:
        // deterministic).
        let sums: Vec<(f64, f64)> = (0..c)
            .into_par_iter()
            .map(|ch| {
                let mu = self.mean[ch];
                let (mut sg, mut sgx) = (0.0f64, 0.0f64);
                for s in 0..n {
                    let o = (s * c + ch) * hw;
                    let (a, b) = grad_sums(&gy[o..o + hw], &x[o..o + hw], mu);
                    sg += a;
                    sgx += b;
                }
                (sg, sgx * self.inv_std[ch] as f64)
            })
            .collect();
        let dbeta: Vec<f32> = sums.iter().map(|s| s.0 as f32).collect();
        let dgamma: Vec<f32> = sums.iter().map(|s| s.1 as f32).collect();
        // dx = gamma·is/m · (m·gy - Σgy - x̂·Σgy·x̂) = A·gy + B·(x - mu) + C per channel.
        let coef: Vec<(f32, f32, f32, f32)> = (0..c)
            .map(|ch| {
                let (is, (sg, sgx)) = (self.inv_std[ch] as f64, sums[ch]);
                let a = gamma[ch] as f64 * is;
                (
                    a as f32,
                    (-a * is * sgx / m) as f32,
                    (-a * sg / m) as f32,
                    self.mean[ch],
                )
            })
            .collect();
        let mut dx = buffers::take(x.len());
        let arch = pulp::Arch::new();
        dx.par_chunks_mut(hw).enumerate().for_each(|(plane, d)| {
            let (a, b, cc, mu) = coef[plane % c];
            let o = plane * hw;
            arch.dispatch(Plane::InputGrad(
                d,
                &gy[o..o + hw],
                &x[o..o + hw],
                (a, b, cc, mu),
            ));
        });
        vec![
            Some(Tensor::from_shape_vec(inputs[0].raw_dim(), dx).expect("shape")),
            Some(Tensor::from_shape_vec(IxDyn(&[c]), dgamma).expect("shape")),
            Some(Tensor::from_shape_vec(IxDyn(&[c]), dbeta).expect("shape")),
        ]
    }
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

/// Training-mode batch norm: normalises with the batch statistics and returns them
/// `(output, mean, biased variance)` so that the layer can update its running statistics.
pub fn batch_norm2d_train(
    g: &mut Graph,
    x: Var,
    gamma: Var,
    beta: Var,
    eps: f32,
) -> Result<(Var, Vec<f32>, Vec<f32>)> {
    let c = check(g, x, gamma, beta)?;
    let xv = g.value(x).as_standard_layout();
    let (n, _, hw) = dims(g.value(x));
    let xs = xv.as_slice().expect("std");
    let m = (n * hw) as f64;
    let stats: Vec<(f32, f32)> = (0..c)
        .into_par_iter()
        .map(|ch| {
            let (mut s, mut s2) = (0.0f64, 0.0f64);
            for b in 0..n {
                let (a, a2) = value_sums(&xs[(b * c + ch) * hw..][..hw]);
                s += a;
                s2 += a2;
            }
            let mu = s / m;
            (mu as f32, (s2 / m - mu * mu).max(0.0) as f32)
        })
        .collect();
    let mean: Vec<f32> = stats.iter().map(|s| s.0).collect();
    let var: Vec<f32> = stats.iter().map(|s| s.1).collect();
    let inv_std: Vec<f32> = var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect();
    let (gm, bt) = (g.value(gamma), g.value(beta));
    let mut y = buffers::take(xs.len());
    let arch = pulp::Arch::new();
    y.par_chunks_mut(hw).enumerate().for_each(|(plane, ys)| {
        let ch = plane % c;
        let (mu, k, be) = (mean[ch], inv_std[ch] * gm[ch], bt[ch]);
        arch.dispatch(Plane::Normalise(ys, &xs[plane * hw..][..hw], mu, k, be));
    });
    let y = Tensor::from_shape_vec(g.value(x).raw_dim(), y).expect("shape");
    drop(xv);
    let out = g.record(
        y,
        &[x, gamma, beta],
        BnTrainOp {
            mean: mean.clone(),
            inv_std,
        },
    );
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
    let xv = g.value(x).as_standard_layout().into_owned();
    let (n, _, hw) = dims(&xv);
    let (gm, bt) = (g.value(gamma).clone(), g.value(beta).clone());
    let xs = xv.as_slice().expect("std");
    let mut y = vec![0.0f32; xs.len()];
    for b in 0..n {
        for ch in 0..c {
            let o = (b * c + ch) * hw;
            for i in o..o + hw {
                y[i] = (xs[i] - mean[ch]) * inv_std[ch] * gm[ch] + bt[ch];
            }
        }
    }
    let y = Tensor::from_shape_vec(xv.raw_dim(), y).expect("shape");
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
}
