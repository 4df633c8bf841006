//! Matrix products: `matmul` and the fully connected `linear`, on ndarray's GEMM
//! (`matrixmultiply` sgemm underneath).

use ndarray::linalg::general_mat_mul;
use ndarray::{Array2, ArrayView2, Axis, Ix2};

use crate::error::{shape, Result};
use crate::graph::{Backward, Graph, Var};
use crate::Tensor;

pub(crate) fn view2(t: &Tensor) -> ArrayView2<'_, f32> {
    t.view()
        .into_dimensionality::<Ix2>()
        .expect("2-D operand checked at record time")
}

/// `a · b` for 2-D views.
pub(crate) fn mm(a: ArrayView2<'_, f32>, b: ArrayView2<'_, f32>) -> Array2<f32> {
    let mut c = Array2::zeros((a.nrows(), b.ncols()));
    general_mat_mul(1.0, &a, &b, 0.0, &mut c);
    c
}

struct MatMulOp;
impl Backward for MatMulOp {
    fn backward(&self, inputs: &[&Tensor], _: &Tensor, grad: &Tensor) -> Vec<Option<Tensor>> {
        let (a, b, g) = (view2(inputs[0]), view2(inputs[1]), view2(grad));
        vec![Some(mm(g, b.t()).into_dyn()), Some(mm(a.t(), g).into_dyn())]
    }
}

/// `[M, K] · [K, N]`.
pub fn matmul(g: &mut Graph, a: Var, b: Var) -> Result<Var> {
    let (sa, sb) = (g.shape(a).to_vec(), g.shape(b).to_vec());
    if sa.len() != 2 || sb.len() != 2 || sa[1] != sb[0] {
        return Err(shape("matmul", format!("{sa:?} x {sb:?}")));
    }
    let v = mm(view2(g.value(a)), view2(g.value(b))).into_dyn();
    Ok(g.record(v, &[a, b], MatMulOp))
}

struct LinearOp {
    bias: bool,
}
impl Backward for LinearOp {
    fn backward(&self, inputs: &[&Tensor], _: &Tensor, grad: &Tensor) -> Vec<Option<Tensor>> {
        let (x, w, g) = (view2(inputs[0]), view2(inputs[1]), view2(grad));
        let mut out = vec![Some(mm(g, w).into_dyn()), Some(mm(g.t(), x).into_dyn())];
        if self.bias {
            out.push(Some(g.sum_axis(Axis(0)).into_dyn()));
        }
        out
    }
}

/// `x · wᵀ + b`: `x` is `[N, in]`, `w` is `[out, in]`, `b` is `[out]`.
pub fn linear(g: &mut Graph, x: Var, w: Var, b: Option<Var>) -> Result<Var> {
    let (sx, sw) = (g.shape(x).to_vec(), g.shape(w).to_vec());
    if sx.len() != 2 || sw.len() != 2 || sx[1] != sw[1] {
        return Err(shape("linear", format!("input {sx:?} with weight {sw:?}")));
    }
    if let Some(b) = b {
        if g.shape(b) != [sw[0]] {
            return Err(shape(
                "linear",
                format!("bias {:?} for {} outputs", g.shape(b), sw[0]),
            ));
        }
    }
    let mut y = mm(view2(g.value(x)), view2(g.value(w)).t());
    if let Some(b) = b {
        let bv = g
            .value(b)
            .view()
            .into_dimensionality::<ndarray::Ix1>()
            .expect("checked");
        y += &bv;
    }
    let inputs: Vec<Var> = std::iter::once(x)
        .chain(std::iter::once(w))
        .chain(b)
        .collect();
    Ok(g.record(y.into_dyn(), &inputs, LinearOp { bias: b.is_some() }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{check, random};

    #[test]
    fn gradients_match_finite_differences() {
        check(
            &[random(&[3, 5], 1), random(&[5, 4], 2)],
            1e-2,
            1e-2,
            30,
            |g, v| matmul(g, v[0], v[1]).unwrap(),
        );
        check(
            &[random(&[4, 7], 3), random(&[3, 7], 4), random(&[3], 5)],
            1e-2,
            1e-2,
            30,
            |g, v| linear(g, v[0], v[1], Some(v[2])).unwrap(),
        );
        check(
            &[random(&[1, 3], 3), random(&[2, 3], 4)],
            1e-2,
            1e-2,
            30,
            |g, v| linear(g, v[0], v[1], None).unwrap(),
        );
    }

    #[test]
    fn shape_errors() {
        let mut g = Graph::new(true);
        let a = g.input(random(&[2, 3], 1));
        let b = g.input(random(&[2, 3], 1));
        assert!(matmul(&mut g, a, b).is_err());
        let w = g.input(random(&[4, 2], 1));
        assert!(linear(&mut g, a, w, None).is_err());
    }
}
