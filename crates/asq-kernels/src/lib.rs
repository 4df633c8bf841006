//! # asq-kernels: integer and LUT GEMM for low-bit networks
//!
//! The integer engine of asq: quantized layers run without float multiplies in the inner loop.
//! Activations are integer codes with one scale per sample ([`QuantActivations`]; ASQ gives each
//! sample its own step `s · beta`), weights are packed 2..=8-bit codes with a code -> integer table
//! and per-channel scales ([`PackedWeights`]). [`gemm`] computes
//! `out[m, n] = act(acc[m, n] · a_scale[m] · w_scale[n] + bias[n] + residual[m, n])` with `acc`
//! exact in i32 (two accumulators for exact POST). [`conv`] builds convolutions (im2col,
//! depthwise) and pooling on top.
//!
//! Every SIMD variant is chosen at run time ([`Isa::best`]) and reproduces the scalar reference
//! ([`reference::gemm_reference`]) bit for bit: integer sums are exact, and the rescale epilogue
//! is one shared scalar function. The portable path builds and runs on any target.
//!
//! Left out on purpose: float GEMM (use `matrixmultiply`), training, and model graphs (those are
//! `asq-train` and `asq-models`).
//!
//! ```
//! use asq_core::{quant::Steps, BitWidth, LevelSet, QuantRange};
//! use asq_kernels::{gemm, Epilogue, PackedWeights, QuantActivations};
//! // 2 samples x 3 features, ASQ-style per-sample steps; 2 output channels of POST weights.
//! let x = [0.5, 1.0, 0.25, 2.0, 0.0, 1.0];
//! let a = QuantActivations::quantize(&x, 2, 3, QuantRange::unsigned(8)?, Steps::Scaled { step: 0.01, betas: &[1.0, 2.0] })?;
//! let post = LevelSet::post(BitWidth::new(4)?)?;
//! let w = PackedWeights::quantize_levels(&[1.0, -0.5, 0.25, 0.7071, 0.0, -1.0], 2, 3, &post, &[1.0, 1.0])?;
//! let mut out = [0.0f32; 4];
//! gemm(&a, &w, &Epilogue::default(), &mut out)?;
//! assert!((out[0] - (0.5 - 0.5 + 0.0625)).abs() < 1e-3);
//! # Ok::<(), asq_kernels::Error>(())
//! ```

pub mod activations;
pub mod baseline;
pub mod conv;
pub mod dispatch;
pub mod error;
pub mod frame;
mod generic;
pub mod probe;
pub mod reference;
pub mod suite;
pub mod tile;
pub mod weights;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use activations::QuantActivations;
pub use dispatch::{Isa, Path};
pub use error::{Error, Result};
pub use frame::{serial, Epilogue};
pub use weights::{PackedWeights, WeightForm};

/// `out = act(A · Wᵀ · scales + bias)` on the fastest variant of this CPU.
pub fn gemm(
    a: &QuantActivations,
    w: &PackedWeights,
    epi: &Epilogue<'_>,
    out: &mut [f32],
) -> Result<()> {
    gemm_with(Isa::best(), a, w, epi, out)
}

/// [`gemm`] on a chosen variant ([`Error::UnsupportedIsa`] if this CPU lacks it). One-row
/// problems use the GEMV kernel where the variant has one for these weights.
pub fn gemm_with(
    isa: Isa,
    a: &QuantActivations,
    w: &PackedWeights,
    epi: &Epilogue<'_>,
    out: &mut [f32],
) -> Result<()> {
    let plan = frame::check(a, w, epi, out, isa)?;
    run_plan(&plan, a, w, epi, out);
    Ok(())
}

/// Runs a checked plan: GEMV for one row where the plan has one, else the blocked GEMM.
fn run_plan(
    plan: &dispatch::Plan,
    a: &QuantActivations,
    w: &PackedWeights,
    epi: &Epilogue<'_>,
    out: &mut [f32],
) {
    if a.rows() == 1 && plan.has_gemv(w) {
        frame::gemv_planned(plan, a, w, epi, out);
    } else {
        frame::gemm_planned(plan, frame::Rows::Dense(a), 0..a.rows(), w, epi, out);
    }
}

/// [`gemm`] on the VNNI kernels running on the portable model of their instructions (tests of
/// the AVX-512 code on CPUs without it).
#[cfg(all(test, target_arch = "x86_64"))]
pub(crate) fn gemm_emulated_vnni(
    a: &QuantActivations,
    w: &PackedWeights,
    epi: &Epilogue<'_>,
    out: &mut [f32],
) -> Result<()> {
    frame::check(a, w, epi, out, Isa::Scalar)?;
    let plan = dispatch::Plan::emulated_vnni(a.range(), w)?;
    run_plan(&plan, a, w, epi, out);
    Ok(())
}

/// The integer path a variant would take for these operands (for reports and benches), with
/// `"+gemv"` when the one-row kernel applies.
pub fn describe(isa: Isa, a: &QuantActivations, w: &PackedWeights) -> Result<String> {
    let plan = dispatch::Plan::new(isa, a.range(), w)?;
    let gemv = if a.rows() == 1 && plan.has_gemv(w) {
        "+gemv"
    } else {
        ""
    };
    Ok(format!("{}{gemv}", plan.path.name()))
}
