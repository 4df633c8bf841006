//! The naive reference: a triple loop over codes and tables, no packing layout, no SIMD.
//! Every kernel variant must reproduce it bit for bit.

use crate::activations::QuantActivations;
use crate::error::Result;
use crate::frame::{check, finish, post_acc, Epilogue};
use crate::weights::{PackedWeights, WeightForm};
use crate::Isa;

/// `out[m, n]` by the definition in [`crate::frame`], element by element.
pub fn gemm_reference(
    a: &QuantActivations,
    w: &PackedWeights,
    epi: &Epilogue<'_>,
    out: &mut [f32],
) -> Result<()> {
    check(a, w, epi, out, Isa::Scalar)?;
    let (m, n, k) = (a.rows(), w.rows(), w.cols());
    for r in 0..m {
        for c in 0..n {
            let (mut s1, mut s2) = (0i32, 0i32);
            for kk in 0..k {
                let code = w.code(c, kk) as usize;
                let av = a.code(r, kk);
                match w.form() {
                    WeightForm::Int8 { table } => s1 += av * table[code] as i32,
                    WeightForm::PostExact { even, odd } => {
                        s1 += av * even[code] as i32;
                        s2 += av * odd[code] as i32;
                    }
                }
            }
            let acc = match w.form() {
                WeightForm::Int8 { .. } => s1 as f32,
                WeightForm::PostExact { .. } => post_acc(s1, s2),
            };
            let (bias, res) = epi.extra(r, c, n);
            out[r * n + c] = finish(acc, a.scales()[r], w.scales()[c], bias, res, epi.relu);
        }
    }
    Ok(())
}
