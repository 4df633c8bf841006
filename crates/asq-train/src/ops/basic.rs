//! Element-wise arithmetic, reductions and reshapes.

use ndarray::IxDyn;

use crate::buffers;

use crate::error::{shape, Result};
use crate::graph::{Backward, Graph, Var};
use crate::ops::ew;
use crate::Tensor;

fn same_shape(op: &'static str, g: &Graph, a: Var, b: Var) -> Result<()> {
    if g.shape(a) != g.shape(b) {
        return Err(shape(op, format!("{:?} vs {:?}", g.shape(a), g.shape(b))));
    }
    Ok(())
}

struct AddOp;
impl Backward for AddOp {
    fn backward(&self, _: &[&Tensor], _: &Tensor, grad: &Tensor) -> Vec<Option<Tensor>> {
        vec![Some(buffers::copy(grad)), Some(buffers::copy(grad))]
    }
}

/// `a + b` (same shape; also the residual connection).
pub fn add(g: &mut Graph, a: Var, b: Var) -> Result<Var> {
    same_shape("add", g, a, b)?;
    let v = ew::map2(g.value(a), g.value(b), |x, y| x + y);
    Ok(g.record(v, &[a, b], AddOp))
}

struct MulOp;
impl Backward for MulOp {
    fn backward(&self, inputs: &[&Tensor], _: &Tensor, grad: &Tensor) -> Vec<Option<Tensor>> {
        vec![Some(grad * inputs[1]), Some(grad * inputs[0])]
    }
}

/// `a * b` element-wise (same shape).
pub fn mul(g: &mut Graph, a: Var, b: Var) -> Result<Var> {
    same_shape("mul", g, a, b)?;
    let v = g.value(a) * g.value(b);
    Ok(g.record(v, &[a, b], MulOp))
}

struct ScaleOp(f32);
impl Backward for ScaleOp {
    fn backward(&self, _: &[&Tensor], _: &Tensor, grad: &Tensor) -> Vec<Option<Tensor>> {
        vec![Some(grad * self.0)]
    }
}

/// `c · a`.
pub fn scale(g: &mut Graph, a: Var, c: f32) -> Var {
    let v = g.value(a) * c;
    g.record(v, &[a], ScaleOp(c))
}

struct SumOp;
impl Backward for SumOp {
    fn backward(&self, inputs: &[&Tensor], _: &Tensor, grad: &Tensor) -> Vec<Option<Tensor>> {
        vec![Some(Tensor::from_elem(
            inputs[0].raw_dim(),
            grad.iter().next().copied().unwrap_or(0.0),
        ))]
    }
}

/// Sum of all elements (a scalar of shape `[]`), accumulated in f64.
pub fn sum(g: &mut Graph, a: Var) -> Var {
    let s: f64 = g.value(a).iter().map(|&x| x as f64).sum();
    g.record(Tensor::from_elem(IxDyn(&[]), s as f32), &[a], SumOp)
}

/// Mean of all elements.
pub fn mean(g: &mut Graph, a: Var) -> Var {
    let n = g.value(a).len().max(1) as f32;
    let s = sum(g, a);
    scale(g, s, 1.0 / n)
}

struct ReshapeOp;
impl Backward for ReshapeOp {
    fn backward(&self, inputs: &[&Tensor], _: &Tensor, grad: &Tensor) -> Vec<Option<Tensor>> {
        let g = grad.as_standard_layout().into_owned();
        vec![Some(
            g.into_shape_with_order(inputs[0].raw_dim())
                .expect("same element count"),
        )]
    }
}

/// Reshape (row-major) to `dims`.
pub fn reshape(g: &mut Graph, a: Var, dims: &[usize]) -> Result<Var> {
    let n: usize = dims.iter().product();
    if n != g.value(a).len() {
        return Err(shape(
            "reshape",
            format!(
                "{:?} has {} elements, {dims:?} needs {n}",
                g.shape(a),
                g.value(a).len()
            ),
        ));
    }
    let v = g
        .value(a)
        .as_standard_layout()
        .into_owned()
        .into_shape_with_order(IxDyn(dims))
        .expect("checked");
    Ok(g.record(v, &[a], ReshapeOp))
}

/// `[N, ...] -> [N, prod(...)]`.
pub fn flatten(g: &mut Graph, a: Var) -> Result<Var> {
    let s = g.shape(a).to_vec();
    let n = s.first().copied().unwrap_or(1);
    reshape(g, a, &[n, s.iter().skip(1).product()])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{check, random};

    #[test]
    fn gradients_match_finite_differences() {
        let (a, b) = (random(&[3, 5], 1), random(&[3, 5], 2));
        check(&[a.clone(), b.clone()], 1e-2, 1e-2, 30, |g, v| {
            add(g, v[0], v[1]).unwrap()
        });
        check(&[a.clone(), b.clone()], 1e-2, 1e-2, 30, |g, v| {
            mul(g, v[0], v[1]).unwrap()
        });
        check(std::slice::from_ref(&a), 1e-2, 1e-2, 30, |g, v| {
            scale(g, v[0], -1.7)
        });
        check(std::slice::from_ref(&a), 1e-2, 1e-2, 30, |g, v| {
            mean(g, v[0])
        });
        check(&[random(&[2, 3, 4], 3)], 1e-2, 1e-2, 30, |g, v| {
            flatten(g, v[0]).unwrap()
        });
    }

    #[test]
    fn shape_errors() {
        let mut g = Graph::new(true);
        let a = g.input(random(&[2, 3], 1));
        let b = g.input(random(&[3, 2], 1));
        assert!(add(&mut g, a, b).is_err());
        assert!(reshape(&mut g, a, &[4]).is_err());
    }
}
