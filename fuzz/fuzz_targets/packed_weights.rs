//! Arbitrary bytes as a serialized weight matrix: parsing must return an error or a value that
//! re-serializes to the same bytes and multiplies without panicking.
#![no_main]

use asq_core::quant::Steps;
use asq_core::QuantRange;
use asq_kernels::{gemm, Epilogue, PackedWeights, QuantActivations};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(w) = PackedWeights::from_bytes(data) else { return };
    assert_eq!(w.to_bytes(), data);
    if w.rows() * w.cols() > 1 << 16 {
        return;
    }
    let x = vec![0.5f32; w.cols()];
    let a = QuantActivations::quantize(&x, 1, w.cols(), QuantRange::unsigned(8).unwrap(), Steps::PerRow(&[0.01]))
        .expect("valid activations");
    let mut out = vec![0.0; w.rows()];
    // Overflow-prone shapes are an error, never a panic.
    let _ = gemm(&a, &w, &Epilogue::default(), &mut out);
});
