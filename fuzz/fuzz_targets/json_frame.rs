//! A text frame of `agents.v1.json`, as a client may send any: parsed without a panic, and a
//! frame that parses encodes to a text that parses to the same frame.
#![no_main]

use agents::client::protocol::ClientFrame;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    if let Ok(frame) = ClientFrame::<serde_json::Value>::from_json(text) {
        let again = ClientFrame::<serde_json::Value>::from_json(&frame.to_json());
        assert_eq!(again.as_ref(), Ok(&frame), "{text}");
    }
});
