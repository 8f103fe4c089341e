//! The body of `POST /agents/{class}/{name}/call/{method}`: JSON that must be an array of the
//! callable's arguments, decoded into their types. Any body: an error, never a panic.
#![no_main]

use agents::Payload;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    let Ok(args @ serde_json::Value::Array(_)) = serde_json::from_slice(body) else {
        return;
    };
    let args = Payload::Json(args);
    let _ = args.decode::<()>();
    let _ = args.decode::<(i64,)>();
    let _ = args.decode::<(String, u32, Option<Vec<u8>>)>();
    let _ = args.decode::<(f64, bool, std::collections::HashMap<String, i16>)>();
});
