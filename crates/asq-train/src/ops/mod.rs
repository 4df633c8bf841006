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
mod winograd;

/// Per-thread scratch buffers reused across calls (im2col columns and GEMM staging), so that a
/// training step does not allocate, fault in and free hundreds of megabytes of temporaries.
pub(crate) mod scratch {
    use std::cell::RefCell;

    thread_local! {
        static SLOTS: RefCell<[Vec<f32>; 7]> = const {
            RefCell::new([
                Vec::new(),
                Vec::new(),
                Vec::new(),
                Vec::new(),
                Vec::new(),
                Vec::new(),
                Vec::new(),
            ])
        };
    }

    /// Takes slot `i` resized to `len` (contents unspecified: callers overwrite what they read).
    pub(crate) fn take(i: usize, len: usize) -> Vec<f32> {
        let mut v = take_at_least(i, len);
        v.truncate(len);
        v
    }

    /// Takes slot `i` with at least `len` values (contents unspecified), never shortened: for
    /// callers that slice what they use, so that slots shared by calls of different sizes
    /// are not zero-filled again on every growth.
    pub(crate) fn take_at_least(i: usize, len: usize) -> Vec<f32> {
        let mut v = SLOTS.with(|s| std::mem::take(&mut s.borrow_mut()[i]));
        if v.len() < len {
            v.resize(len, 0.0);
        }
        v
    }

    /// Returns a buffer to slot `i` for the next call on this thread.
    pub(crate) fn give(i: usize, v: Vec<f32>) {
        SLOTS.with(|s| s.borrow_mut()[i] = v);
    }
}

/// Element-wise kernels on tensors as flat slices, split over threads in fixed chunks, writing
/// into pooled buffers ([`crate::buffers`]), each chunk compiled for the CPU's widest vectors.
/// ndarray's `Zip` over dynamic-rank arrays ran these as 4-wide SSE or scalar loops (15 % of a
/// ResNet-20 step).
pub(crate) mod ew {
    use pulp::{Simd, WithSimd};
    use rayon::prelude::*;

    use crate::buffers;
    use crate::Tensor;

    /// Elements per parallel task.
    const CHUNK: usize = 1 << 14;

    /// One chunk of an element-wise loop. pulp's dispatch instantiates `with_simd` once per
    /// instruction set, so the loop (and the small op inlined into it) is compiled for each; a
    /// closure handed to the dispatch directly stays compiled for the baseline. The ops are
    /// single IEEE operations, so every path gives the same result.
    enum Chunk<'a, F, G> {
        Map(&'a mut [f32], &'a [f32], &'a F),
        Map2(&'a mut [f32], &'a [f32], &'a [f32], &'a G),
        AddAssign(&'a mut [f32], &'a [f32]),
    }

    impl<F: Fn(f32) -> f32, G: Fn(f32, f32) -> f32> WithSimd for Chunk<'_, F, G> {
        type Output = ();

        #[inline(always)]
        fn with_simd<S: Simd>(self, _simd: S) {
            match self {
                Chunk::Map(o, a, f) => o.iter_mut().zip(a).for_each(|(o, &a)| *o = f(a)),
                Chunk::Map2(o, a, b, f) => o
                    .iter_mut()
                    .zip(a.iter().zip(b))
                    .for_each(|(o, (&a, &b))| *o = f(a, b)),
                Chunk::AddAssign(o, b) => o.iter_mut().zip(b).for_each(|(o, &b)| *o += b),
            }
        }
    }

    type NoMap = fn(f32) -> f32;
    type NoMap2 = fn(f32, f32) -> f32;

    /// `f(a[i])`, shaped like `a`.
    pub(crate) fn map(a: &Tensor, f: impl Fn(f32) -> f32 + Sync) -> Tensor {
        let a_std = a.as_standard_layout();
        let av = a_std.as_slice().expect("standard layout");
        let mut out = buffers::take(av.len());
        let arch = pulp::Arch::new();
        out.par_chunks_mut(CHUNK)
            .zip(av.par_chunks(CHUNK))
            .for_each(|(o, a)| arch.dispatch(Chunk::<_, NoMap2>::Map(o, a, &f)));
        Tensor::from_shape_vec(a.raw_dim(), out).expect("same element count")
    }

    /// `f(a[i], b[i])`, shaped like `a` (`b` has the same shape).
    pub(crate) fn map2(a: &Tensor, b: &Tensor, f: impl Fn(f32, f32) -> f32 + Sync) -> Tensor {
        debug_assert_eq!(a.shape(), b.shape());
        let (a_std, b_std) = (a.as_standard_layout(), b.as_standard_layout());
        let (av, bv) = (
            a_std.as_slice().expect("standard layout"),
            b_std.as_slice().expect("standard layout"),
        );
        let mut out = buffers::take(av.len());
        let arch = pulp::Arch::new();
        out.par_chunks_mut(CHUNK)
            .zip(av.par_chunks(CHUNK).zip(bv.par_chunks(CHUNK)))
            .for_each(|(o, (a, b))| arch.dispatch(Chunk::<NoMap, _>::Map2(o, a, b, &f)));
        Tensor::from_shape_vec(a.raw_dim(), out).expect("same element count")
    }

    /// `acc[i] += b[i]` (same shapes).
    pub(crate) fn add_assign(acc: &mut Tensor, b: &Tensor) {
        debug_assert_eq!(acc.shape(), b.shape());
        let b_std = b.as_standard_layout();
        match (acc.as_slice_mut(), b_std.as_slice()) {
            (Some(a), Some(bv)) => {
                let arch = pulp::Arch::new();
                a.par_chunks_mut(CHUNK)
                    .zip(bv.par_chunks(CHUNK))
                    .for_each(|(a, b)| arch.dispatch(Chunk::<NoMap, NoMap2>::AddAssign(a, b)))
            }
            _ => acc.zip_mut_with(b, |a, &b| *a += b),
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use ndarray::IxDyn;

        #[test]
        fn element_wise_on_any_layout() {
            let n = 3 * CHUNK + 7;
            let a = Tensor::from_shape_fn(IxDyn(&[n]), |i| i[0] as f32);
            let b = Tensor::from_shape_fn(IxDyn(&[n]), |i| 2.0 * i[0] as f32 - 5.0);
            let m = map(&a, |x| x * 3.0);
            assert!(m.iter().zip(a.iter()).all(|(m, a)| *m == a * 3.0));
            let m2 = map2(&a, &b, |x, y| x - y);
            assert!(m2
                .iter()
                .zip(b.iter())
                .enumerate()
                .all(|(i, (m, b))| *m == i as f32 - b));
            let mut acc = a.clone();
            add_assign(&mut acc, &b);
            assert!(acc
                .iter()
                .zip(b.iter())
                .enumerate()
                .all(|(i, (s, b))| *s == i as f32 + b));
            // Transposed (not standard layout) inputs.
            let t = Tensor::from_shape_fn(IxDyn(&[5, 7]), |i| (i[0] * 7 + i[1]) as f32);
            let tt = t.t().to_owned();
            assert_eq!(map(&tt, |x| x + 1.0), tt.mapv(|x| x + 1.0));
            assert_eq!(map2(&tt, &tt, |x, y| x * y), tt.mapv(|x| x * x));
            let mut acc = tt.clone();
            add_assign(&mut acc, &tt);
            assert_eq!(acc, tt.mapv(|x| 2.0 * x));
        }
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
