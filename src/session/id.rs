//! Session ids: generated from a CSPRNG, validated before any lookup.

use std::fmt;

/// Length of generated ids: 22 URL-safe characters, 132 bits of entropy.
pub const GENERATED_LEN: usize = 22;
const MIN_LEN: usize = 16;
const MAX_LEN: usize = 64;

/// A syntactically valid session id. Ids are only ever looked up in the
/// registry; they are never joined onto a path by the caller's say-so.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(String);

impl SessionId {
    pub fn generate() -> Self {
        Self(crate::random_token(GENERATED_LEN))
    }

    /// Accepts 16 to 64 characters from `A-Z a-z 0-9 - _`, nothing else.
    pub fn parse(s: &str) -> Option<Self> {
        let ok = (MIN_LEN..=MAX_LEN).contains(&s.len())
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        ok.then(|| Self(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn generated_ids_are_valid_and_distinct() {
        let ids: HashSet<String> = (0..1000).map(|_| SessionId::generate().0).collect();
        assert_eq!(ids.len(), 1000);
        for id in &ids {
            assert_eq!(id.len(), GENERATED_LEN);
            assert_eq!(SessionId::parse(id).unwrap().as_str(), id);
        }
    }

    #[test]
    fn hostile_or_malformed_ids_are_refused() {
        for bad in [
            "",
            "0",
            "..",
            "/etc",
            "../../../../etc/passwd",
            "short",
            "abc/def/ghijklmnopq",
            "abcdefghijklmnop\0",
            "abcdefghijklmnop ",
            "ABCDEFGHIJKLMNO%2e",
            "ÄÖÜäöüßÄÖÜäöüßÄÖÜ",
        ] {
            assert!(SessionId::parse(bad).is_none(), "{bad:?} accepted");
        }
        assert!(SessionId::parse(&"a".repeat(65)).is_none());
        assert!(SessionId::parse(&"a".repeat(64)).is_some());
        assert!(SessionId::parse("abcdefgh-_123456").is_some());
    }
}
