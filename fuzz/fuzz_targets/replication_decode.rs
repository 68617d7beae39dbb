//! Arbitrary bytes as the body of one CopyData frame from a walsender; when it is XLogData, its
//! payload goes on through the pgoutput decoder as well, as it would in pgrelay.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgrelay::protocol::{pgoutput, replication};

fuzz_target!(|data: &[u8]| {
    let body = bytes::Bytes::copy_from_slice(data);
    if let Ok(replication::ServerMessage::XLogData(x)) = replication::decode_server_message(body) {
        let _ = pgoutput::decode(x.data);
    }
});
