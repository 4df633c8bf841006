//! # asq-core: quantizer math for low-bit networks
//!
//! The foundation of asq: the quantizers of the ASQ/POST method and its baselines, on plain
//! slices, with no ML framework inside. A framework author can depend on this crate alone.
//!
//! - [`BitWidth`], [`QuantRange`]: widths 2..=8 and integer code ranges, checked.
//! - [`quant`]: one engine (fake-quant, encode, decode, backward with STE gradients) over a
//!   row layout, and the methods: [`quant::lsq`], [`quant::asq`] (per-sample `beta`),
//!   [`quant::uniform`] (min-max), [`quant::weights`] (per-channel `alpha` over POT, APoT, POST).
//! - [`LevelSet`]: non-uniform level sets as values, with fast nearest-level projection and a
//!   documented code layout ([`levels`]).
//! - [`pack`]: bit packing of 2..=8-bit codes; [`lut`]: code -> integer tables for kernels.
//!
//! One rounding rule everywhere: [`round_half_even`]. NaN and infinity handling is documented in
//! [`quant`]. What this crate leaves out: tensors, autograd, kernels and file formats (those
//! live in `asq-train`, `asq-kernels` and `asq-models`).
//!
//! ```
//! use asq_core::{quant::weights::LevelQuantizer, BitWidth, LevelSet};
//! let post = LevelQuantizer::new(LevelSet::post(BitWidth::new(4)?)?);
//! let w = [0.9, -0.1, 0.3, 0.02, -0.7, 0.45];      // two channels of three weights
//! let alphas = post.init_alphas(&w, 2)?;
//! let mut codes = [0u8; 6];
//! post.encode(&w, &alphas, &mut codes)?;
//! let mut w_hat = [0.0; 6];
//! post.decode(&codes, &alphas, &mut w_hat)?;
//! let mut fq = [0.0; 6];
//! post.fake_quant(&w, &alphas, &mut fq)?;
//! assert_eq!(w_hat, fq);
//! # Ok::<(), asq_core::Error>(())
//! ```

pub mod bits;
pub mod error;
pub mod levels;
pub mod lut;
pub mod pack;
pub mod quant;
pub mod round;

pub use bits::{BitWidth, QuantRange, Signedness};
pub use error::{Error, Result};
pub use levels::{LevelKind, LevelSet};
pub use round::round_half_even;
