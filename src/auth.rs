//! Who is calling: principals and bearer-token authentication for HTTP.
//!
//! Over stdio the caller is the process that started us ([`Principal::local`]).
//! Over HTTP, when tokens are configured, every request must carry
//! `Authorization: Bearer TOKEN`; the matching principal is put in the
//! request's extensions, where the MCP layer finds it. Sessions belong to the
//! principal that created them.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

/// The owner of sessions.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Principal(pub Arc<str>);

impl Principal {
    /// The caller over stdio, or over HTTP without authentication.
    pub fn local() -> Self {
        Self(Arc::from("local"))
    }
}

/// Accepted bearer tokens, by SHA-256 digest, and whose they are.
#[derive(Debug, Clone, Default)]
pub struct Tokens {
    by_digest: HashMap<[u8; 32], Principal>,
}

#[derive(Debug, thiserror::Error)]
pub enum TokensError {
    #[error("line {line}: expected `NAME TOKEN` (or `NAME:TOKEN`)")]
    Syntax { line: usize },
    #[error("line {line}: tokens must be at least 16 characters")]
    Short { line: usize },
}

/// Shortest token accepted.
const MIN_TOKEN: usize = 16;

impl Tokens {
    pub fn is_empty(&self) -> bool {
        self.by_digest.is_empty()
    }

    /// One token for one principal (`--auth-token`).
    pub fn single(token: &str) -> Result<Self, TokensError> {
        let mut t = Self::default();
        t.add("default", token, 1)?;
        Ok(t)
    }

    /// A tokens file: one `NAME TOKEN` (or `NAME:TOKEN`) per line; `#` comments.
    pub fn parse(text: &str) -> Result<Self, TokensError> {
        let mut t = Self::default();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (name, token) = line
                .split_once(|c: char| c == ':' || c.is_whitespace())
                .ok_or(TokensError::Syntax { line: i + 1 })?;
            t.add(name.trim(), token.trim(), i + 1)?;
        }
        Ok(t)
    }

    fn add(&mut self, name: &str, token: &str, line: usize) -> Result<(), TokensError> {
        if name.is_empty() {
            return Err(TokensError::Syntax { line });
        }
        if token.len() < MIN_TOKEN {
            return Err(TokensError::Short { line });
        }
        self.by_digest
            .insert(digest(token), Principal(Arc::from(name)));
        Ok(())
    }

    /// The principal a presented token belongs to. Comparing digests keeps the
    /// lookup independent of how much of a guessed token is right.
    pub fn principal(&self, token: &str) -> Option<&Principal> {
        self.by_digest.get(&digest(token))
    }
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// axum middleware: requires a valid bearer token when tokens are configured,
/// and records the caller's [`Principal`] in the request extensions.
pub async fn require_bearer(
    State(tokens): State<Arc<Tokens>>,
    mut req: Request,
    next: Next,
) -> Response {
    let principal = if tokens.is_empty() {
        Principal::local()
    } else {
        let presented = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            });
        match presented.and_then(|t| tokens.principal(t.trim())) {
            Some(p) => p.clone(),
            None => {
                let mut r = (
                    StatusCode::UNAUTHORIZED,
                    "a valid `Authorization: Bearer TOKEN` header is required\n",
                )
                    .into_response();
                r.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                return r;
            }
        }
    };
    req.extensions_mut().insert(principal);
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_file_names_principals() {
        let t = Tokens::parse("# team\nalice  aaaaaaaaaaaaaaaaaaaa\nbob:bbbbbbbbbbbbbbbbbbbb\n")
            .unwrap();
        assert_eq!(
            t.principal("aaaaaaaaaaaaaaaaaaaa").unwrap().0.as_ref(),
            "alice"
        );
        assert_eq!(
            t.principal("bbbbbbbbbbbbbbbbbbbb").unwrap().0.as_ref(),
            "bob"
        );
        assert!(t.principal("cccccccccccccccccccc").is_none());
        assert!(t.principal("").is_none());
    }

    #[test]
    fn bad_tokens_files_are_refused() {
        assert!(matches!(
            Tokens::parse("alice"),
            Err(TokensError::Syntax { line: 1 })
        ));
        assert!(matches!(
            Tokens::parse("\nalice short"),
            Err(TokensError::Short { line: 2 })
        ));
        assert!(Tokens::single("short").is_err());
    }
}
