//! A binary frame of `agents.v1.postcard`, as a client may send any: decoded without a panic,
//! and a frame that decodes encodes to bytes that decode to the same frame.
#![no_main]

use agents::client::protocol::{to_postcard, ClientFrame};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    if let Ok(frame) = postcard::from_bytes::<ClientFrame<Vec<u8>>>(bytes) {
        let again = postcard::from_bytes::<ClientFrame<Vec<u8>>>(&to_postcard(&frame));
        assert_eq!(again.ok().as_ref(), Some(&frame));
    }
});
