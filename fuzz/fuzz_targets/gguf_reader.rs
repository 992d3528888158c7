//! Any bytes given to the GGUF reader give Ok or Err, never a panic, and an
//! accepted file's tensors lie within it.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((_, tensors)) = modelpress::formats::gguf::parse_bytes(data) {
        for t in &tensors {
            assert!(t.offset.checked_add(t.bytes).is_some());
            assert!(t.dims.len() <= 4);
        }
    }
});
