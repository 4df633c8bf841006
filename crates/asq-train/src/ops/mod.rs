//! Differentiable ops. Each family keeps its forward and backward side by side, with its
//! finite-difference check in the same file's tests.

pub mod act;
pub mod basic;
pub mod conv;
mod direct;
pub mod dropout;
pub mod loss;
pub mod matmul;
pub mod norm;
pub mod pool;
pub mod quant;

/// Per-thread scratch buffers reused across calls (im2col columns and GEMM staging), so that a
/// training step does not allocate, fault in and free hundreds of megabytes of temporaries.
pub(crate) mod scratch {
    use std::cell::RefCell;

    thread_local! {
        static SLOTS: RefCell<[Vec<f32>; 3]> =
            const { RefCell::new([Vec::new(), Vec::new(), Vec::new()]) };
    }

    /// Takes slot `i` resized to `len` (contents unspecified: callers overwrite what they read).
    pub(crate) fn take(i: usize, len: usize) -> Vec<f32> {
        let mut v = SLOTS.with(|s| std::mem::take(&mut s.borrow_mut()[i]));
        v.resize(len, 0.0);
        v
    }

    /// Returns a buffer to slot `i` for the next call on this thread.
    pub(crate) fn give(i: usize, v: Vec<f32>) {
        SLOTS.with(|s| s.borrow_mut()[i] = v);
    }
}

#[cfg(test)]
pub(crate) mod gradcheck {
    //! Central finite differences against the tape's analytic gradients.

    use crate::graph::{Graph, Var};
    use crate::rng::Rng;
    use crate::Tensor;

    /// Checks `d/d inputs` of `sum(r * f(inputs))` for a fixed random `r`, on up to `samples`
    /// coordinates per input, with step `eps` and relative tolerance `tol`.
    pub(crate) fn check(
        inputs: &[Tensor],
        eps: f32,
        tol: f64,
        samples: usize,
        f: impl Fn(&mut Graph, &[Var]) -> Var,
    ) {
        let run = |vals: &[Tensor]| -> (f64, Vec<Option<Tensor>>) {
            let mut g = Graph::new(true);
            let vars: Vec<Var> = vals.iter().map(|t| g.input_with_grad(t.clone())).collect();
            let y = f(&mut g, &vars);
            let mut rng = Rng::new(99);
            let r: Vec<f32> = (0..g.value(y).len())
                .map(|_| rng.uniform() * 2.0 - 1.0)
                .collect();
            let loss: f64 = g
                .value(y)
                .iter()
                .zip(&r)
                .map(|(a, b)| *a as f64 * *b as f64)
                .sum();
            let rt = Tensor::from_shape_vec(g.value(y).raw_dim(), r).unwrap();
            let w = g.input(rt);
            let prod = crate::ops::basic::mul(&mut g, y, w).unwrap();
            let l = crate::ops::basic::sum(&mut g, prod);
            let grads = g.gradients(l).unwrap();
            (loss, vars.iter().map(|v| grads[v.0].clone()).collect())
        };
        let (_, analytic) = run(inputs);
        let mut rng = Rng::new(5);
        for (i, t) in inputs.iter().enumerate() {
            let ga = analytic[i]
                .clone()
                .unwrap_or_else(|| Tensor::zeros(t.raw_dim()));
            let n = t.len();
            let picks: Vec<usize> = if n <= samples {
                (0..n).collect()
            } else {
                (0..samples).map(|_| rng.below(n)).collect()
            };
            for j in picks {
                let mut plus = inputs.to_vec();
                let mut minus = inputs.to_vec();
                plus[i].as_slice_mut().unwrap()[j] += eps;
                minus[i].as_slice_mut().unwrap()[j] -= eps;
                let num = (run(&plus).0 - run(&minus).0) / (2.0 * eps as f64);
                let ana = ga.as_slice().unwrap()[j] as f64;
                let scale = 1.0f64.max(num.abs()).max(ana.abs());
                assert!(
                    (num - ana).abs() <= tol * scale,
                    "input {i} coordinate {j}: numeric {num} vs analytic {ana}"
                );
            }
        }
    }

    /// A tensor of the given shape with values uniform in [-1, 1).
    pub(crate) fn random(shape: &[usize], seed: u64) -> Tensor {
        let mut rng = Rng::new(seed);
        let n = shape.iter().product();
        Tensor::from_shape_vec(shape, (0..n).map(|_| rng.uniform() * 2.0 - 1.0).collect()).unwrap()
    }
}
