//! [`Name`]: the unique, human-readable handle a peer enrolls under.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Longest name, in characters (all ASCII, so also bytes).
pub const MAX_NAME_LEN: usize = 32;

/// A validated name: 1 to [`MAX_NAME_LEN`] characters of `[A-Za-z0-9_-]`.
///
/// Names keep the case they were enrolled with for display, but are unique
/// case-insensitively: [`Name::key`] is what registries index by.
/// Deserializing validates too, so a `Name` from the network is always valid.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Name(String);

/// Why a string is not a valid [`Name`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("name is empty")]
    Empty,
    #[error("name is longer than {MAX_NAME_LEN} characters")]
    TooLong,
    #[error("name may only contain letters, digits, '_' and '-' (found {0:?})")]
    BadChar(char),
}

impl Name {
    /// Validates `s` as a name.
    pub fn parse(s: &str) -> Result<Self, NameError> {
        if s.is_empty() {
            return Err(NameError::Empty);
        }
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'))
        {
            return Err(NameError::BadChar(c));
        }
        if s.len() > MAX_NAME_LEN {
            return Err(NameError::TooLong);
        }
        Ok(Self(s.to_owned()))
    }

    /// The case-folded form under which names are unique.
    pub fn key(&self) -> String {
        self.0.to_ascii_lowercase()
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Name {
    type Error = NameError;
    fn try_from(s: String) -> Result<Self, NameError> {
        Self::parse(&s)
    }
}

impl From<Name> for String {
    fn from(n: Name) -> String {
        n.0
    }
}

impl std::str::FromStr for Name {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        Self::parse(s)
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_letters_digits_underscore_dash_up_to_32() {
        for ok in ["a", "bob", "Alice_2", "x-y", &"z".repeat(32)] {
            assert!(Name::parse(ok).is_ok(), "{ok} should be valid");
        }
    }

    #[test]
    fn rejects_empty_long_and_other_characters() {
        assert_eq!(Name::parse(""), Err(NameError::Empty));
        assert_eq!(Name::parse(&"z".repeat(33)), Err(NameError::TooLong));
        assert_eq!(Name::parse("bo b"), Err(NameError::BadChar(' ')));
        assert_eq!(Name::parse("bøb"), Err(NameError::BadChar('ø')));
        assert_eq!(Name::parse("a/b"), Err(NameError::BadChar('/')));
    }

    #[test]
    fn uniqueness_key_ignores_case_but_display_keeps_it() {
        let n = Name::parse("Alice").unwrap();
        assert_eq!(n.key(), Name::parse("aLiCe").unwrap().key());
        assert_eq!(n.to_string(), "Alice");
    }

    #[test]
    fn deserializing_an_invalid_name_fails() {
        let bytes = postcard::to_stdvec(&"no spaces".to_string()).unwrap();
        assert!(postcard::from_bytes::<Name>(&bytes).is_err());
    }
}
