//! The f32 baseline every integer kernel is measured against: `matrixmultiply::sgemm` behind a
//! safe, shape-checked interface, optionally split over the rayon pool by column blocks.

use rayon::prelude::*;

use crate::error::{Error, Result};

/// `c = a · b` for row-major `a` `[m, k]`, `b` `[k, n]`, `c` `[m, n]`, one thread.
pub fn sgemm(m: usize, k: usize, n: usize, a: &[f32], b: &[f32], c: &mut [f32]) -> Result<()> {
    check(m, k, n, a, b, c)?;
    // SAFETY: the lengths were checked above: a holds m·k, b holds k·n and c holds m·n values,
    // and the strides describe exactly those row-major layouts.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.as_ptr(),
            k as isize,
            1,
            b.as_ptr(),
            n as isize,
            1,
            0.0,
            c.as_mut_ptr(),
            n as isize,
            1,
        )
    }
    Ok(())
}

/// [`sgemm`] with the columns of `c` split into one block per thread of the current rayon pool.
pub fn sgemm_parallel(
    m: usize,
    k: usize,
    n: usize,
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
) -> Result<()> {
    check(m, k, n, a, b, c)?;
    let threads = rayon::current_num_threads().clamp(1, n.div_ceil(16).max(1));
    let chunk = n.div_ceil(threads);
    let cp = c.as_mut_ptr() as usize;
    (0..threads).into_par_iter().for_each(|t| {
        let (n0, n1) = (t * chunk, ((t + 1) * chunk).min(n));
        if n0 >= n1 {
            return;
        }
        // SAFETY: a is m x k and b is k x n (checked); block t reads columns n0..n1 of b and
        // writes columns n0..n1 of c (m x n, checked), which no other block touches.
        unsafe {
            matrixmultiply::sgemm(
                m,
                k,
                n1 - n0,
                1.0,
                a.as_ptr(),
                k as isize,
                1,
                b.as_ptr().add(n0),
                n as isize,
                1,
                0.0,
                (cp as *mut f32).add(n0),
                n as isize,
                1,
            )
        }
    });
    Ok(())
}

fn check(m: usize, k: usize, n: usize, a: &[f32], b: &[f32], c: &[f32]) -> Result<()> {
    if a.len() != m * k || b.len() != k * n || c.len() != m * n {
        return Err(Error::Shape(format!(
            "sgemm [{m}, {k}] x [{k}, {n}] with buffers of {}, {} and {} values",
            a.len(),
            b.len(),
            c.len()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_a_naive_product_and_checks_shapes() {
        let (m, k, n) = (5, 7, 37);
        let a: Vec<f32> = (0..m * k).map(|i| (i % 5) as f32 - 2.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i % 3) as f32 - 1.0).collect();
        let mut c = vec![0.0; m * n];
        let mut d = vec![0.0; m * n];
        sgemm(m, k, n, &a, &b, &mut c).unwrap();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        pool.install(|| sgemm_parallel(m, k, n, &a, &b, &mut d))
            .unwrap();
        for i in 0..m {
            for j in 0..n {
                let e: f32 = (0..k).map(|t| a[i * k + t] * b[t * n + j]).sum();
                assert_eq!(c[i * n + j], e);
                assert_eq!(d[i * n + j], e);
            }
        }
        assert!(sgemm(m, k, n, &a, &b, &mut c[1..]).is_err());
    }
}
