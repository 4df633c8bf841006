//! Unpacking arbitrary bytes at every width: an error or codes that pack back to the input.
#![no_main]

use asq_core::pack::{pack_codes, packed_len, unpack_codes};
use asq_core::BitWidth;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&head, packed)) = data.split_first() else { return };
    let Ok(bits) = BitWidth::new(2 + (head as u32 % 7)) else { return };
    let count = (packed.len() * 8) / bits.get() as usize;
    let mut codes = vec![0u8; count];
    if unpack_codes(packed, bits, &mut codes).is_ok() {
        let mut again = vec![0u8; packed_len(count, bits)];
        pack_codes(&codes, bits, &mut again).expect("unpacked codes fit their width");
        assert_eq!(again, packed);
    }
});
