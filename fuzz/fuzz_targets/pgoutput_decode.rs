//! Arbitrary bytes as the `data` of one XLogData: the pgoutput decoder must return, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = pgrelay::protocol::pgoutput::decode(bytes::Bytes::copy_from_slice(data));
});
