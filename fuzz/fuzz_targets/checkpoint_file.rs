//! Arbitrary bytes as a checkpoint: loading must return an error or a checkpoint whose
//! serialization loads back and re-serializes to the same bytes (bincode also accepts
//! non-canonical integer encodings, so the input bytes themselves need not come back). With the first byte even, the rest is taken as the payload
//! and given a valid header and checksum, so mutations reach the bounded bincode decoder.
#![no_main]

use std::path::Path;

use asq_train::checkpoint::{Checkpoint, FORMAT};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let bytes = if mode & 1 == 0 { FORMAT.seal(rest) } else { rest.to_vec() };
    let Ok(ckpt) = Checkpoint::from_bytes(&bytes, Path::new("fuzz")) else { return };
    let canonical = ckpt.to_bytes().unwrap();
    let again = Checkpoint::from_bytes(&canonical, Path::new("fuzz")).expect("own output loads");
    assert_eq!(again.to_bytes().unwrap(), canonical);
});
