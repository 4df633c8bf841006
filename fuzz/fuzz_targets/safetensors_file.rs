//! Arbitrary bytes as a PyTorch state dict: reading must return an error or float32 tensors,
//! and importing those into a ResNet-8 must return an error or fill it, never panic. With the
//! first byte even, the rest gets a valid 8-byte header length, so mutations reach the JSON
//! header and the offset checks.
#![no_main]

use std::path::Path;

use asq_models::torch::{import, read_safetensors};
use asq_models::{QuantPolicy, ResNet};
use asq_train::ParamStore;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let bytes = if mode & 1 == 0 {
        let header_len = rest.iter().position(|&b| b == b'}').map_or(rest.len(), |i| i + 1);
        let mut f = (header_len as u64).to_le_bytes().to_vec();
        f.extend_from_slice(rest);
        f
    } else {
        rest.to_vec()
    };
    let path = Path::new("fuzz.safetensors");
    let Ok((tensors, _)) = read_safetensors(&bytes, path) else { return };
    let mut ps = ParamStore::new();
    ResNet::cifar(&mut ps, 8, 1, 10, &QuantPolicy::asq_post(4).unwrap(), 0u64).unwrap();
    let _ = import(&mut ps, &tensors, 1, path);
});
