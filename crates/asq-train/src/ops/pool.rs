//! Pooling on `[N, C, H, W]`: max, average (no padding) and global average.

use ndarray::IxDyn;
use rayon::prelude::*;

use crate::buffers;
use crate::ops::norm::plane_value_sums;

use crate::error::{shape, Result};
use crate::graph::{Backward, Graph, Var};
use crate::Tensor;

fn out_size(op: &'static str, s: &[usize], k: usize, stride: usize) -> Result<(usize, usize)> {
    if s.len() != 4 || k == 0 || stride == 0 || s[2] < k || s[3] < k {
        return Err(shape(
            op,
            format!("input {s:?} with window {k} stride {stride}"),
        ));
    }
    Ok(((s[2] - k) / stride + 1, (s[3] - k) / stride + 1))
}

struct MaxPoolOp {
    argmax: Vec<usize>,
}

impl Backward for MaxPoolOp {
    fn backward(&self, inputs: &[&Tensor], _: &Tensor, grad: &Tensor) -> Vec<Option<Tensor>> {
        let mut dx = buffers::take_zeroed(inputs[0].len());
        for (&i, &gv) in self.argmax.iter().zip(grad.iter()) {
            dx[i] += gv;
        }
        vec![Some(
            Tensor::from_shape_vec(inputs[0].raw_dim(), dx).expect("shape"),
        )]
    }
}

/// Max pooling with a `k x k` window (first maximum wins ties).
pub fn max_pool2d(g: &mut Graph, x: Var, k: usize, stride: usize) -> Result<Var> {
    max_pool2d_padded(g, x, k, stride, 0)
}

/// Max pooling with a `k x k` window over the input padded by `pad` on every side with `-inf`
/// (PyTorch's `MaxPool2d(k, stride, pad)`: padding never wins; first maximum wins ties). `pad`
/// must be at most `k / 2`, so that every window holds an input element.
pub fn max_pool2d_padded(
    g: &mut Graph,
    x: Var,
    k: usize,
    stride: usize,
    pad: usize,
) -> Result<Var> {
    let s = g.shape(x).to_vec();
    if s.len() != 4 || 2 * pad > k {
        return Err(shape(
            "max_pool2d",
            format!("input {s:?} with window {k} and padding {pad} (at most half the window)"),
        ));
    }
    let padded = [s[0], s[1], s[2] + 2 * pad, s[3] + 2 * pad];
    let (oh, ow) = out_size("max_pool2d", &padded, k, stride)?;
    let xv = g.value(x).as_standard_layout();
    let xs = xv.as_slice().expect("std");
    let mut y = Vec::with_capacity(s[0] * s[1] * oh * ow);
    let mut argmax = Vec::with_capacity(y.capacity());
    for plane in 0..s[0] * s[1] {
        let base = plane * s[2] * s[3];
        for oy in 0..oh {
            for ox in 0..ow {
                let (mut best, mut at) = (f32::NEG_INFINITY, usize::MAX);
                for ky in 0..k {
                    let Some(iy) = (oy * stride + ky).checked_sub(pad).filter(|&v| v < s[2]) else {
                        continue;
                    };
                    for kx in 0..k {
                        let Some(ix) = (ox * stride + kx).checked_sub(pad).filter(|&v| v < s[3])
                        else {
                            continue;
                        };
                        let i = base + iy * s[3] + ix;
                        if at == usize::MAX || xs[i] > best {
                            best = xs[i];
                            at = i;
                        }
                    }
                }
                y.push(best);
                argmax.push(at);
            }
        }
    }
    drop(xv);
    let y = Tensor::from_shape_vec(IxDyn(&[s[0], s[1], oh, ow]), y).expect("shape");
    Ok(g.record(y, &[x], MaxPoolOp { argmax }))
}

struct AvgPoolOp {
    k: usize,
    stride: usize,
}

impl Backward for AvgPoolOp {
    fn backward(&self, inputs: &[&Tensor], out: &Tensor, grad: &Tensor) -> Vec<Option<Tensor>> {
        let s = inputs[0].shape();
        let (oh, ow) = (out.shape()[2], out.shape()[3]);
        let gs = grad.as_standard_layout();
        let gy = gs.as_slice().expect("std");
        let mut dx = buffers::take_zeroed(inputs[0].len());
        let inv = 1.0 / (self.k * self.k) as f32;
        for plane in 0..s[0] * s[1] {
            for oy in 0..oh {
                for ox in 0..ow {
                    let gv = gy[(plane * oh + oy) * ow + ox] * inv;
                    for ky in 0..self.k {
                        for kx in 0..self.k {
                            dx[plane * s[2] * s[3]
                                + (oy * self.stride + ky) * s[3]
                                + ox * self.stride
                                + kx] += gv;
                        }
                    }
                }
            }
        }
        vec![Some(
            Tensor::from_shape_vec(inputs[0].raw_dim(), dx).expect("shape"),
        )]
    }
}

/// Average pooling with a `k x k` window.
pub fn avg_pool2d(g: &mut Graph, x: Var, k: usize, stride: usize) -> Result<Var> {
    let s = g.shape(x).to_vec();
    let (oh, ow) = out_size("avg_pool2d", &s, k, stride)?;
    let xv = g.value(x).as_standard_layout();
    let xs = xv.as_slice().expect("std");
    let inv = 1.0 / (k * k) as f32;
    let mut y = Vec::with_capacity(s[0] * s[1] * oh * ow);
    for plane in 0..s[0] * s[1] {
        let base = plane * s[2] * s[3];
        for oy in 0..oh {
            for ox in 0..ow {
                let mut acc = 0.0f32;
                for ky in 0..k {
                    for kx in 0..k {
                        acc += xs[base + (oy * stride + ky) * s[3] + ox * stride + kx];
                    }
                }
                y.push(acc * inv);
            }
        }
    }
    drop(xv);
    let y = Tensor::from_shape_vec(IxDyn(&[s[0], s[1], oh, ow]), y).expect("shape");
    Ok(g.record(y, &[x], AvgPoolOp { k, stride }))
}

struct GapOp;

impl Backward for GapOp {
    fn backward(&self, inputs: &[&Tensor], _: &Tensor, grad: &Tensor) -> Vec<Option<Tensor>> {
        let s = inputs[0].shape();
        let hw = s[2] * s[3];
        let inv = 1.0 / hw as f32;
        let gs = grad.as_standard_layout();
        let gy = gs.as_slice().expect("std");
        let mut dx = buffers::take(inputs[0].len());
        dx.par_chunks_mut(hw)
            .zip(gy.par_iter())
            .for_each(|(plane, &g)| plane.fill(g * inv));
        vec![Some(
            Tensor::from_shape_vec(inputs[0].raw_dim(), dx).expect("shape"),
        )]
    }

    /// `acc[n][c][·] += g[n][c] / hw`: the plane-constant gradient added in one pass (the ASQ
    /// adapters pool the activation the quantizer also reads, whose gradient is there first).
    fn backward_adding(
        &self,
        inputs: &[&Tensor],
        _: &Tensor,
        grad: &Tensor,
        _: &[bool],
        _: usize,
        acc: &mut Tensor,
    ) -> Option<Vec<Option<Tensor>>> {
        let s = inputs[0].shape();
        let hw = s[2] * s[3];
        let inv = 1.0 / hw as f32;
        let (gs, Some(acc)) = (grad.as_standard_layout(), acc.as_slice_mut()) else {
            return None;
        };
        let gy = gs.as_slice().expect("std");
        acc.par_chunks_mut(hw)
            .zip(gy.par_iter())
            .for_each(|(plane, &g)| {
                let d = g * inv;
                plane.iter_mut().for_each(|v| *v += d);
            });
        Some(vec![None])
    }
}

/// Global average pooling `[N, C, H, W] -> [N, C]`.
pub fn global_avg_pool(g: &mut Graph, x: Var) -> Result<Var> {
    let s = g.shape(x).to_vec();
    if s.len() != 4 || s[2] * s[3] == 0 {
        return Err(shape("global_avg_pool", format!("input {s:?}")));
    }
    let hw = s[2] * s[3];
    // The plane sums: from the op that wrote `x` if it attached them (batch norm, summing its
    // output while in cache: the same function on the same values), else one pass here.
    let y: Vec<f32> = match g.plane_sums(x) {
        Some(ps) if ps.len() == s[0] * s[1] => {
            ps.iter().map(|p| (p.0 / hw as f64) as f32).collect()
        }
        _ => {
            let xv = g.value(x).as_standard_layout();
            let mut sums = vec![(0.0f64, 0.0f64); s[0] * s[1]];
            sums.par_chunks_mut(s[1])
                .zip(xv.as_slice().expect("std").par_chunks(s[1] * hw))
                .for_each(|(ps, xs)| plane_value_sums(xs, hw, ps));
            sums.iter().map(|p| (p.0 / hw as f64) as f32).collect()
        }
    };
    let y = Tensor::from_shape_vec(IxDyn(&[s[0], s[1]]), y).expect("shape");
    Ok(g.record(y, &[x], GapOp))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{check, random};

    #[test]
    fn gradients_match_finite_differences() {
        // Distinct values spaced well apart, so a small step never changes the argmax.
        let mut x = random(&[2, 2, 5, 4], 1);
        for (i, v) in x.iter_mut().enumerate() {
            *v = (i as f32 * 0.37).sin() + i as f32 * 0.01;
        }
        check(&[x.clone()], 1e-3, 1e-2, 40, |g, v| {
            max_pool2d_padded(g, v[0], 3, 2, 1).unwrap()
        });
        check(&[x.clone()], 1e-3, 1e-2, 40, |g, v| {
            max_pool2d(g, v[0], 2, 2).unwrap()
        });
        check(&[x.clone()], 1e-2, 1e-2, 40, |g, v| {
            avg_pool2d(g, v[0], 3, 1).unwrap()
        });
        check(&[x], 1e-2, 1e-2, 40, |g, v| {
            global_avg_pool(g, v[0]).unwrap()
        });
    }

    #[test]
    fn global_average_is_the_mean_of_each_plane() {
        for hw in [1, 7, 8, 9, 49, 784] {
            let x = random(&[2, 3, hw, 1], hw as u64);
            let mut g = Graph::new(false);
            let xv = g.input(x.clone());
            let y = global_avg_pool(&mut g, xv).unwrap();
            for (p, &m) in x.as_slice().unwrap().chunks(hw).zip(g.value(y).iter()) {
                let want = p.iter().map(|&v| v as f64).sum::<f64>() / hw as f64;
                assert!(
                    (m as f64 - want).abs() <= 1e-6 * (1.0 + want.abs()),
                    "{hw}: {m} vs {want}"
                );
            }
        }
    }

    #[test]
    fn padding_never_wins_a_window() {
        // All-negative input: zero padding would win every border window, -inf padding never.
        let mut g = Graph::new(false);
        let vals: Vec<f32> = (0..9).map(|i| -1.0 - i as f32).collect();
        let x = g.input(Tensor::from_shape_vec(IxDyn(&[1, 1, 3, 3]), vals).unwrap());
        let y = max_pool2d_padded(&mut g, x, 3, 2, 1).unwrap();
        // Windows centred on (0,0), (0,2), (2,0), (2,2): the best of each 2x2 corner.
        assert_eq!(
            g.value(y).iter().copied().collect::<Vec<_>>(),
            [-1.0, -2.0, -4.0, -5.0]
        );
        assert_eq!(g.shape(y), &[1, 1, 2, 2]);
        assert!(max_pool2d_padded(&mut g, x, 3, 2, 2).is_err());
    }

    #[test]
    fn windows_larger_than_input_are_errors() {
        let mut g = Graph::new(true);
        let x = g.input(random(&[1, 1, 2, 2], 1));
        assert!(max_pool2d(&mut g, x, 3, 1).is_err());
        assert!(avg_pool2d(&mut g, x, 2, 0).is_err());
    }

    /// `x` used by global average pooling and by another op: its gradient is the same bits
    /// whichever runs first in the reverse pass (pooling adding its part in place into the
    /// other op's gradient, or returning it for the graph to add).
    #[test]
    fn pooling_adds_its_gradient_in_place_exactly() {
        let x = random(&[3, 4, 5, 3], 7);
        let (r, r2) = (random(&[3, 4, 5, 3], 8), random(&[3, 4], 9));
        let run = |pool_first: bool| {
            let mut g = Graph::new(true);
            let xv = g.input_with_grad(x.clone());
            let (rv, r2v) = (g.input(r.clone()), g.input(r2.clone()));
            let (p, m) = if pool_first {
                let p = global_avg_pool(&mut g, xv).unwrap();
                (p, crate::ops::basic::mul(&mut g, xv, rv).unwrap())
            } else {
                let m = crate::ops::basic::mul(&mut g, xv, rv).unwrap();
                (global_avg_pool(&mut g, xv).unwrap(), m)
            };
            let pw = crate::ops::basic::mul(&mut g, p, r2v).unwrap();
            let (a, b) = (
                crate::ops::basic::sum(&mut g, m),
                crate::ops::basic::sum(&mut g, pw),
            );
            let l = crate::ops::basic::add(&mut g, a, b).unwrap();
            g.gradients(l).unwrap()[xv.index()].clone().unwrap()
        };
        let inv = 1.0 / 15.0f32;
        let want: Vec<f32> = r
            .iter()
            .enumerate()
            .map(|(k, &rv)| rv + r2.as_slice().unwrap()[k / 15] * inv)
            .collect();
        for pool_first in [true, false] {
            assert_eq!(
                run(pool_first).as_slice().unwrap(),
                &want[..],
                "{pool_first}"
            );
        }
    }

    #[test]
    fn in_place_pooling_gradient_equals_the_returned_one() {
        let x = random(&[2, 3, 7, 7], 3);
        let grad = random(&[2, 3], 4);
        let base = random(&[2, 3, 7, 7], 5);
        let returned = GapOp.backward(&[&x], &grad, &grad)[0].clone().unwrap();
        let mut want = base.clone();
        want.zip_mut_with(&returned, |a, &b| *a += b);
        let mut acc = base.clone();
        let rest = GapOp.backward_adding(&[&x], &grad, &grad, &[true], 0, &mut acc);
        assert_eq!(rest, Some(vec![None]));
        assert_eq!(acc, want);
    }

    /// Pooling after batch norm takes the plane sums batch norm attached: the same bits as its
    /// own pass over the same values.
    #[test]
    fn pooling_after_batch_norm_equals_its_own_pass_bit_for_bit() {
        use crate::ops::norm::{batch_norm2d_train_act, BnAct};
        for shape in [[3, 4, 7, 7], [2, 5, 3, 11]] {
            let x = random(&shape, 1);
            let (gamma, beta) = (random(&[shape[1]], 2), random(&[shape[1]], 3));
            let mut g = Graph::new(true);
            let (xv, gv, bv) = (g.input(x), g.input(gamma), g.input(beta));
            let (y, _, _) =
                batch_norm2d_train_act(&mut g, xv, gv, bv, 1e-5, None, BnAct::Relu).unwrap();
            assert!(g.plane_sums(y).is_some());
            let p = global_avg_pool(&mut g, y).unwrap();
            let mut g2 = Graph::new(true);
            let y2 = g2.input(g.value(y).clone());
            let p2 = global_avg_pool(&mut g2, y2).unwrap();
            assert_eq!(g.value(p), g2.value(p2), "{shape:?}");
        }
    }
}
