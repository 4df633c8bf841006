//! Inverted dropout: in training, zero each element with probability `p` and scale the rest by
//! `1 / (1 - p)`; identity in evaluation.

use crate::error::{Error, Result};
use crate::graph::{Backward, Graph, Var};
use crate::rng::Rng;
use crate::Tensor;

struct DropoutOp {
    mask: Tensor,
}

impl Backward for DropoutOp {
    fn backward(&self, _: &[&Tensor], _: &Tensor, grad: &Tensor) -> Vec<Option<Tensor>> {
        vec![Some(grad * &self.mask)]
    }
}

/// Dropout with probability `p` in `[0, 1)`, drawing the mask from `rng`.
pub fn dropout(g: &mut Graph, x: Var, p: f32, rng: &mut Rng) -> Result<Var> {
    if !(0.0..1.0).contains(&p) {
        return Err(Error::Config(format!(
            "dropout probability {p} must be in [0, 1)"
        )));
    }
    if !g.is_training() || p == 0.0 {
        return Ok(x);
    }
    let keep = 1.0 / (1.0 - p);
    let mask = g
        .value(x)
        .mapv(|_| if rng.uniform() < p { 0.0 } else { keep });
    let y = g.value(x) * &mask;
    Ok(g.record(y, &[x], DropoutOp { mask }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::random;

    #[test]
    fn mask_scales_and_gradient_follows_it() {
        let mut g = Graph::new(true);
        let x = g.input_with_grad(random(&[50, 40], 1).mapv(|v| v + 2.0));
        let y = dropout(&mut g, x, 0.25, &mut Rng::new(3)).unwrap();
        let (xv, yv) = (g.value(x).clone(), g.value(y).clone());
        let zeros = yv.iter().filter(|v| **v == 0.0).count() as f32 / yv.len() as f32;
        assert!((zeros - 0.25).abs() < 0.03, "{zeros}");
        let s = crate::ops::basic::sum(&mut g, y);
        let grads = g.gradients(s).unwrap();
        let gx = grads[x.0].as_ref().unwrap();
        for ((a, b), gv) in xv.iter().zip(yv.iter()).zip(gx.iter()) {
            assert!(
                (*b == 0.0 && *gv == 0.0)
                    || ((b / a - 1.0 / 0.75).abs() < 1e-5 && (gv - 1.0 / 0.75).abs() < 1e-6)
            );
        }
        let mut e = Graph::new(false);
        let xe = e.input(xv.clone());
        assert_eq!(dropout(&mut e, xe, 0.5, &mut Rng::new(1)).unwrap(), xe);
        assert!(dropout(&mut e, xe, 1.0, &mut Rng::new(1)).is_err());
    }
}
