//! Activations: ReLU, ReLU6, clamp from below.

use crate::graph::{Backward, Graph, Var};
use crate::ops::ew;
use crate::Tensor;

/// Gradient passes where `lo < x < hi` (at the kinks: not passed, as PyTorch does for ReLU).
struct ClampOp {
    lo: f32,
    hi: f32,
}

impl Backward for ClampOp {
    fn backward(&self, inputs: &[&Tensor], _: &Tensor, grad: &Tensor) -> Vec<Option<Tensor>> {
        let (lo, hi) = (self.lo, self.hi);
        let gx = ew::map2(
            grad,
            inputs[0],
            |g, x| if x > lo && x < hi { g } else { 0.0 },
        );
        vec![Some(gx)]
    }
}

/// `clamp(x, lo, hi)`.
pub fn clamp(g: &mut Graph, x: Var, lo: f32, hi: f32) -> Var {
    let v = ew::map(g.value(x), |a| a.max(lo).min(hi));
    g.record(v, &[x], ClampOp { lo, hi })
}

/// `max(x, 0)`.
pub fn relu(g: &mut Graph, x: Var) -> Var {
    clamp(g, x, 0.0, f32::INFINITY)
}

/// `min(max(x, 0), 6)` (MobileNetV2).
pub fn relu6(g: &mut Graph, x: Var) -> Var {
    clamp(g, x, 0.0, 6.0)
}

/// `max(x, lo)` (the ASQ adapter's `clamp(beta, min 1e-8)`).
pub fn clamp_min(g: &mut Graph, x: Var, lo: f32) -> Var {
    clamp(g, x, lo, f32::INFINITY)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{check, random};

    #[test]
    fn gradients_match_finite_differences_away_from_kinks() {
        // Keep every value at least 0.02 from the kinks so that a step never crosses one.
        let avoid = |t: Tensor, kinks: &[f32]| {
            t.mapv(|v| {
                if kinks.iter().any(|k| (v - k).abs() < 0.02) {
                    v + 0.05
                } else {
                    v
                }
            })
        };
        let x = random(&[4, 7], 1).mapv(|v| v * 4.0);
        check(&[avoid(x.clone(), &[0.0])], 1e-3, 1e-2, 28, |g, v| {
            relu(g, v[0])
        });
        check(
            &[avoid(x.mapv(|v| v + 3.0), &[0.0, 6.0])],
            1e-3,
            1e-2,
            28,
            |g, v| relu6(g, v[0]),
        );
        check(&[avoid(x.clone(), &[0.5])], 1e-3, 1e-2, 28, |g, v| {
            clamp_min(g, v[0], 0.5)
        });
    }
}
