//! Log record payloads: any bytes decode to a record or an error, never a panic or an
//! allocation beyond the input's size.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|payload: &[u8]| {
    if let Ok(rec) = quiver_core::record::decode(payload) {
        assert!(rec.values.len() * 3 <= payload.len());
    }
});
