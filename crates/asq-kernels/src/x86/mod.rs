//! x86-64 SIMD variants. Each function here is `#[target_feature]` and only called after
//! run-time detection (see [`crate::dispatch`]).

pub(crate) mod avx2;
pub(crate) mod avx512;
#[cfg(test)]
mod emu512;
