//! Arbitrary bytes as a `.npy` file: parsing must return an error or an array whose
//! serialization parses back to the same shape and the same bits. With the first byte even, the
//! rest is given a valid version-1.0 magic and header length prefix, so mutations reach the
//! header parser.
#![no_main]

use std::path::Path;

use asq_train::data::npy::{parse_f32, to_bytes_f32};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let bytes = if mode & 1 == 0 {
        let header_len = rest.iter().position(|&b| b == b'\n').map_or(rest.len(), |i| i + 1);
        let mut f = b"\x93NUMPY\x01\x00".to_vec();
        f.extend_from_slice(&(header_len.min(u16::MAX as usize) as u16).to_le_bytes());
        f.extend_from_slice(rest);
        f
    } else {
        rest.to_vec()
    };
    let Ok((shape, values)) = parse_f32(&bytes, Path::new("fuzz.npy")) else { return };
    let again = to_bytes_f32(&shape, &values).expect("a parsed array serializes");
    let (s2, v2) = parse_f32(&again, Path::new("fuzz.npy")).expect("own output parses");
    assert_eq!(s2, shape);
    assert!(v2.iter().zip(&values).all(|(a, b)| a.to_bits() == b.to_bits()));
});
