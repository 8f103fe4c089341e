//! Agent addresses: `(class, name)`, validated, and the stable id derived from them.

use std::{fmt, sync::Arc};

use sha2::{Digest, Sha256};

use crate::error::Error;

/// The longest agent name accepted, in bytes.
pub const MAX_NAME_LEN: usize = 1024;
/// The longest class name accepted, in bytes.
pub const MAX_CLASS_LEN: usize = 64;

/// The address of one agent: its class (e.g. `chat-room`) and its name (any UTF-8 text, 1 to
/// [`MAX_NAME_LEN`] bytes). Names never become paths: the database file is named by
/// [`AgentKey::id`], a hash.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AgentKey {
    class: Arc<str>,
    name: Arc<str>,
}

impl AgentKey {
    /// Validates and builds an address.
    pub fn new(class: &str, name: &str) -> Result<Self, Error> {
        validate_class(class)?;
        if name.is_empty() {
            return Err(Error::InvalidAddress("the agent name is empty".into()));
        }
        if name.len() > MAX_NAME_LEN {
            return Err(Error::InvalidAddress(format!(
                "the agent name is {} bytes long; the limit is {MAX_NAME_LEN}",
                name.len()
            )));
        }
        Ok(AgentKey {
            class: class.into(),
            name: name.into(),
        })
    }

    /// A key that orders before every valid one (for range bounds).
    pub(crate) fn smallest() -> Self {
        AgentKey {
            class: "".into(),
            name: "".into(),
        }
    }

    /// The class, e.g. `counter`.
    pub fn class(&self) -> &str {
        &self.class
    }

    /// The name, exactly as given.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A stable, path-safe id: 32 hex digits of SHA-256 over the class and name.
    pub fn id(&self) -> String {
        let mut h = Sha256::new();
        h.update(self.class.as_bytes());
        h.update([0u8]);
        h.update(self.name.as_bytes());
        h.finalize()[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

impl fmt::Debug for AgentKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{:?}", self.class, self.name)
    }
}

impl fmt::Display for AgentKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.class, self.name)
    }
}

/// A class is lower-case ASCII letters, digits and single dashes: `chat-room`.
pub(crate) fn validate_class(class: &str) -> Result<(), Error> {
    let ok = !class.is_empty()
        && class.len() <= MAX_CLASS_LEN
        && class
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !class.starts_with('-')
        && !class.ends_with('-')
        && !class.contains("--");
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidAddress(format!(
            "the class `{class}` must be 1 to {MAX_CLASS_LEN} characters of a-z, 0-9 and single inner dashes"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_validated_and_hashed() {
        let a = AgentKey::new("counter", "../../etc/passwd").unwrap();
        assert_eq!(a.id().len(), 32);
        assert!(a.id().bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(
            a.id(),
            AgentKey::new("counter", "../../etc/passwd2").unwrap().id()
        );
        // the separator keeps ("a", "b-c") apart from ("a-b", "c")
        assert_ne!(
            AgentKey::new("a", "b-c").unwrap().id(),
            AgentKey::new("a-b", "c").unwrap().id()
        );
        assert!(AgentKey::new("counter", "").is_err());
        assert!(AgentKey::new("counter", &"x".repeat(MAX_NAME_LEN + 1)).is_err());
        assert!(AgentKey::new("counter", &"x".repeat(MAX_NAME_LEN)).is_ok());
        for bad in ["", "Counter", "a_b", "-a", "a-", "a--b", "a/b"] {
            assert!(AgentKey::new(bad, "x").is_err(), "{bad}");
        }
    }
}
