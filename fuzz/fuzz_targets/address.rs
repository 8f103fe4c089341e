//! An agent's address as it comes in a URL: any class and name (split at the first `/`) is
//! accepted as a valid address or refused with an error, never a panic; a valid one keeps its
//! parts and a fixed-size id.
#![no_main]

use agents::AgentKey;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    let (class, name) = text.split_once('/').unwrap_or((text, ""));
    if let Ok(key) = AgentKey::new(class, name) {
        assert_eq!((key.class(), key.name()), (class, name));
        assert_eq!(key.id().len(), 32);
    }
});
