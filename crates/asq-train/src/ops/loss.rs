//! Softmax cross-entropy with label smoothing (stable log-sum-exp), mean over the batch.

use ndarray::IxDyn;

use crate::error::{shape, Error, Result};
use crate::graph::{Backward, Graph, Var};
use crate::Tensor;

struct CeOp {
    /// Softmax probabilities minus the smoothed targets, divided by N.
    dlogits: Tensor,
}

impl Backward for CeOp {
    fn backward(&self, _: &[&Tensor], _: &Tensor, grad: &Tensor) -> Vec<Option<Tensor>> {
        let gv = grad.iter().next().copied().unwrap_or(0.0);
        vec![Some(&self.dlogits * gv)]
    }
}

/// `mean_n [ -sum_k q_nk log softmax(z_n)_k ]` with `q = (1 - eps) onehot(y) + eps / K`.
pub fn softmax_cross_entropy(
    g: &mut Graph,
    logits: Var,
    labels: &[usize],
    smoothing: f32,
) -> Result<Var> {
    let s = g.shape(logits).to_vec();
    if s.len() != 2 || s[0] != labels.len() || s[0] == 0 {
        return Err(shape(
            "softmax_cross_entropy",
            format!("logits {s:?} with {} labels", labels.len()),
        ));
    }
    if !(0.0..1.0).contains(&smoothing) {
        return Err(Error::Config(format!(
            "label smoothing {smoothing} must be in [0, 1)"
        )));
    }
    let (n, k) = (s[0], s[1]);
    if let Some(&bad) = labels.iter().find(|&&y| y >= k) {
        return Err(shape(
            "softmax_cross_entropy",
            format!("label {bad} for {k} classes"),
        ));
    }
    let z = g.value(logits).as_standard_layout().into_owned();
    let zs = z.as_slice().expect("std");
    if let Some(i) = zs.iter().position(|v| !v.is_finite()) {
        return Err(Error::NonFinite(format!("logits at index {i}")));
    }
    let mut loss = 0.0f64;
    let mut d = vec![0.0f32; n * k];
    let (off, on) = (
        smoothing as f64 / k as f64,
        1.0 - smoothing as f64 + smoothing as f64 / k as f64,
    );
    for (r, &y) in labels.iter().enumerate() {
        let row = &zs[r * k..(r + 1) * k];
        let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = max
            + row
                .iter()
                .map(|&v| (v as f64 - max).exp())
                .sum::<f64>()
                .ln();
        for (j, &v) in row.iter().enumerate() {
            let q = if j == y { on } else { off };
            let logp = v as f64 - lse;
            loss -= q * logp;
            d[r * k + j] = ((logp.exp() - q) / n as f64) as f32;
        }
    }
    let dlogits = Tensor::from_shape_vec(IxDyn(&[n, k]), d).expect("shape");
    Ok(g.record(
        Tensor::from_elem(IxDyn(&[]), (loss / n as f64) as f32),
        &[logits],
        CeOp { dlogits },
    ))
}

/// Number of rows whose arg-max equals the label.
pub fn correct(logits: &Tensor, labels: &[usize]) -> usize {
    let k = logits.shape()[1];
    let z = logits.as_standard_layout();
    z.as_slice()
        .expect("std")
        .chunks(k)
        .zip(labels)
        .filter(|(row, &y)| {
            let best = row
                .iter()
                .enumerate()
                .fold(
                    (0, f32::NEG_INFINITY),
                    |b, (i, &v)| if v > b.1 { (i, v) } else { b },
                );
            best.0 == y
        })
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{check, random};

    #[test]
    fn gradients_match_finite_differences() {
        let z = random(&[4, 5], 1).mapv(|v| v * 3.0);
        check(std::slice::from_ref(&z), 1e-2, 1e-2, 20, |g, v| {
            softmax_cross_entropy(g, v[0], &[0, 4, 2, 2], 0.0).unwrap()
        });
        check(&[z], 1e-2, 1e-2, 20, |g, v| {
            softmax_cross_entropy(g, v[0], &[1, 3, 0, 2], 0.1).unwrap()
        });
    }

    #[test]
    fn value_is_stable_and_hand_checked() {
        let mut g = Graph::new(false);
        // Huge logits: log-sum-exp must not overflow.
        let z = g.input(Tensor::from_shape_vec(IxDyn(&[1, 2]), vec![1000.0, 1000.0]).unwrap());
        let l = softmax_cross_entropy(&mut g, z, &[0], 0.0).unwrap();
        assert!((g.value(l).iter().next().unwrap() - std::f32::consts::LN_2).abs() < 1e-6);
        let bad = g.input(Tensor::from_shape_vec(IxDyn(&[1, 2]), vec![f32::NAN, 0.0]).unwrap());
        assert!(softmax_cross_entropy(&mut g, bad, &[0], 0.0).is_err());
        assert!(softmax_cross_entropy(&mut g, z, &[2], 0.0).is_err());
        assert_eq!(correct(g.value(z), &[0]), 1);
    }
}
