//! Encoded values: arguments, results and error data, in one of the two codecs.

use serde::{de::DeserializeOwned, Serialize};

/// How values are encoded on a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Codec {
    /// Compact binary (`agents.v1.postcard`): Rust clients and in-process calls.
    Postcard,
    /// JSON (`agents.v1.json` and HTTP): browsers and other languages.
    Json,
}

/// Why a value could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CodecError(pub String);

/// An encoded value. Arguments are encoded as a tuple: a postcard tuple, or a JSON array.
#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    /// postcard bytes.
    Postcard(Vec<u8>),
    /// A JSON value.
    Json(serde_json::Value),
}

impl Codec {
    /// Encodes `value`.
    pub fn encode<T: Serialize + ?Sized>(self, value: &T) -> Result<Payload, CodecError> {
        match self {
            Codec::Postcard => postcard::to_stdvec(value)
                .map(Payload::Postcard)
                .map_err(postcard_error),
            Codec::Json => serde_json::to_value(value)
                .map(Payload::Json)
                .map_err(|e| CodecError(e.to_string())),
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
        }
    }

    /// Decodes the whole payload as `T`; trailing bytes are an error.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, CodecError> {
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
        }
    }

    /// Checks that an argument list is empty (`[]`/`null` in JSON, no bytes in postcard).
    pub fn expect_empty(&self) -> Result<(), CodecError> {
        match self {
            Payload::Postcard(bytes) if bytes.is_empty() => Ok(()),
            Payload::Json(serde_json::Value::Null) => Ok(()),
            Payload::Json(serde_json::Value::Array(a)) if a.is_empty() => Ok(()),
            Payload::Postcard(bytes) => Err(CodecError(format!(
                "expected no arguments, got {} bytes",
                bytes.len()
            ))),
            Payload::Json(v) => Err(CodecError(format!("expected no arguments (`[]`), got {v}"))),
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
