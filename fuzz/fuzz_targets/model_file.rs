//! Arbitrary bytes as an exported model (`.asqm`): loading must return an error or a model whose
//! serialization loads back to the same description, and that runs inference without
//! panicking. With the first byte
//! even, the rest is taken as the payload and given a valid header and checksum, so mutations
//! reach the decoder and the graph validation instead of stopping at the checksum.
#![no_main]

use std::path::Path;

use asq_models::engine::FORMAT;
use asq_models::IntModel;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let bytes = if mode & 1 == 0 {
        FORMAT.seal(rest)
    } else {
        rest.to_vec()
    };
    let Ok(model) = IntModel::from_bytes(&bytes, Path::new("fuzz")) else { return };
    let again = IntModel::from_bytes(&model.to_bytes().unwrap(), Path::new("fuzz"))
        .expect("own output loads");
    assert_eq!(again.spec(), model.spec());
    let inp = &model.spec().input;
    let pixels = inp.channels * inp.height * inp.width;
    if pixels > 1 << 14 || model.spec().nodes.len() > 64 {
        return;
    }
    let images: Vec<u8> = (0..2 * pixels).map(|i| (i * 31 % 256) as u8).collect();
    // Validated models compute or return an error (e.g. i32 overflow bounds), never panic.
    let _ = model.forward_u8(&images, 2);
});
