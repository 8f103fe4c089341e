//! Values as calls carry them: arguments, results and error data, encoded in one of the two
//! codecs, or passed as they are between a caller and an agent of the same process.

use std::{
    any::{type_name, Any},
    fmt,
    sync::{Arc, Mutex},
};

use serde::{de::DeserializeOwned, Serialize};

use crate::lock::lock;

/// How values travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Codec {
    /// Compact binary (`agents.v1.postcard`): Rust clients over the network.
    Postcard,
    /// JSON (`agents.v1.json` and HTTP): browsers, other languages, and Rust clients told to.
    Json,
    /// Not encoded at all: in-process calls pass the values themselves ([`Passed`]), so every
    /// type works as it is and nothing is serialized.
    Value,
}

/// Why a value could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CodecError(pub String);

/// A value as a call carries it. Arguments are a tuple: a postcard tuple, a JSON array, or
/// the tuple itself.
#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    /// postcard bytes.
    Postcard(Vec<u8>),
    /// A JSON value.
    Json(serde_json::Value),
    /// A value passed in-process, not encoded.
    Value(Passed),
}

/// A Rust value handed from a caller to an agent (or back) in the same process, without being
/// encoded. Whoever decodes it takes it: it decodes once, as the type it was made from.
///
/// (One allocation: the slot is a `Mutex<Option<T>>` behind a type-erased `Arc`.)
#[derive(Clone)]
pub struct Passed(Arc<dyn Any + Send + Sync>);

impl Passed {
    /// Wraps `value`.
    pub fn new<T: Send + 'static>(value: T) -> Self {
        Passed(Arc::new(Mutex::new(Some(value))))
    }

    /// The slot, if it holds a `T` (taken or not).
    fn slot<T: 'static>(&self) -> Option<&Mutex<Option<T>>> {
        self.0.downcast_ref()
    }

    /// Whether it holds a `T` (not taken yet).
    pub fn is<T: 'static>(&self) -> bool {
        self.slot::<T>().is_some_and(|slot| lock(slot).is_some())
    }

    /// Takes the value out as a `T`.
    pub fn take<T: 'static>(&self) -> Result<T, CodecError> {
        let Some(slot) = self.slot::<T>() else {
            return Err(CodecError(format!(
                "the value passed in-process is not a `{}` (are the caller and the agent built from the same definitions?)",
                type_name::<T>()
            )));
        };
        let taken = lock(slot).take();
        taken.ok_or_else(|| CodecError("the value passed in-process was taken already".into()))
    }
}

impl fmt::Debug for Passed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Passed(..)")
    }
}

impl PartialEq for Passed {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Codec {
    /// Encodes `value` (by reference: the `Value` codec, which passes values, refuses; use
    /// [`pass`](Codec::pass)).
    pub fn encode<T: Serialize + ?Sized>(self, value: &T) -> Result<Payload, CodecError> {
        match self {
            Codec::Postcard => Self::postcard_bytes(value).map(Payload::Postcard),
            Codec::Json => serde_json::to_value(value)
                .map(Payload::Json)
                .map_err(|e| CodecError(e.to_string())),
            Codec::Value => Err(CodecError(format!(
                "a `{}` by reference cannot be passed in-process",
                type_name::<T>()
            ))),
        }
    }

    /// `value` in postcard; a type postcard cannot carry is refused with what to do instead.
    pub fn postcard_bytes<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, CodecError> {
        postcard::to_stdvec(value).map_err(postcard_error)
    }

    /// Encodes `value`, or passes it as it is under the `Value` codec.
    pub fn pass<T: Serialize + Send + 'static>(self, value: T) -> Result<Payload, CodecError> {
        match self {
            Codec::Value => Ok(Payload::Value(Passed::new(value))),
            codec => codec.encode(&value),
        }
    }
}

/// Postcard's refusal, with what to do about it when the type has no postcard form.
fn postcard_error(e: postcard::Error) -> CodecError {
    match e {
        postcard::Error::WontImplement => CodecError(format!(
            "{e}: postcard cannot carry self-describing types (`serde_json::Value`, \
             `#[serde(tag = ..)]`, `untagged` or `flatten`); use the JSON codec for this \
             agent (`ConnectOptions::codec(Codec::Json)` on a network client), or a type \
             postcard can carry"
        )),
        e => CodecError(e.to_string()),
    }
}

impl Payload {
    /// The codec this payload is in.
    pub fn codec(&self) -> Codec {
        match self {
            Payload::Postcard(_) => Codec::Postcard,
            Payload::Json(_) => Codec::Json,
            Payload::Value(_) => Codec::Value,
        }
    }

    /// Decodes the whole payload as `T`; trailing bytes are an error. A passed value is taken.
    pub fn decode<T: DeserializeOwned + 'static>(&self) -> Result<T, CodecError> {
        match self {
            Payload::Postcard(bytes) => {
                let (value, rest) = postcard::take_from_bytes(bytes).map_err(postcard_error)?;
                if rest.is_empty() {
                    Ok(value)
                } else {
                    Err(CodecError(format!(
                        "{} unexpected trailing bytes",
                        rest.len()
                    )))
                }
            }
            Payload::Json(value) => T::deserialize(value).map_err(|e| CodecError(e.to_string())),
            Payload::Value(passed) => passed.take(),
        }
    }

    /// Checks that an argument list is empty (`[]`/`null` in JSON, no bytes in postcard).
    pub fn expect_empty(&self) -> Result<(), CodecError> {
        match self {
            Payload::Postcard(bytes) if bytes.is_empty() => Ok(()),
            Payload::Json(serde_json::Value::Null) => Ok(()),
            Payload::Json(serde_json::Value::Array(a)) if a.is_empty() => Ok(()),
            Payload::Value(passed) if passed.is::<()>() => Ok(()),
            Payload::Postcard(bytes) => Err(CodecError(format!(
                "expected no arguments, got {} bytes",
                bytes.len()
            ))),
            Payload::Json(v) => Err(CodecError(format!("expected no arguments (`[]`), got {v}"))),
            Payload::Value(_) => Err(CodecError("expected no arguments".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tuples_round_trip_in_both_codecs() {
        for codec in [Codec::Postcard, Codec::Json] {
            let p = codec.encode(&(5i64, "x".to_string())).unwrap();
            assert_eq!(p.decode::<(i64, String)>().unwrap(), (5, "x".to_string()));
            assert!(p.decode::<(String,)>().is_err());
        }
        assert_eq!(
            Codec::Json.encode(&(5i64,)).unwrap(),
            Payload::Json(serde_json::json!([5]))
        );
    }

    #[test]
    fn passed_values_are_taken_once_as_their_own_type() {
        let p = Codec::Value
            .pass((serde_json::json!({"any": "json"}), 5u8))
            .unwrap();
        assert!(p.decode::<(String, u8)>().is_err(), "another type");
        let (v, n) = p.decode::<(serde_json::Value, u8)>().unwrap();
        assert_eq!((v["any"].as_str(), n), (Some("json"), 5));
        assert!(p.decode::<(serde_json::Value, u8)>().is_err(), "taken");
        assert!(Codec::Value.pass(()).unwrap().expect_empty().is_ok());
        assert!(Codec::Value.encode(&1).is_err());
    }

    #[test]
    fn trailing_bytes_and_empty_args_are_checked() {
        let mut bytes = postcard::to_stdvec(&(1u8,)).unwrap();
        bytes.push(9);
        assert!(Payload::Postcard(bytes).decode::<(u8,)>().is_err());
        assert!(Payload::Postcard(vec![]).expect_empty().is_ok());
        assert!(Payload::Json(serde_json::json!([])).expect_empty().is_ok());
        assert!(Payload::Json(serde_json::json!([1]))
            .expect_empty()
            .is_err());
    }
}
