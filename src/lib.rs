//! mcp-python-interpreter: a stateful Python interpreter (Jupyter kernels)
//! served over the Model Context Protocol.
//!
//! See ARCHITECTURE.md for the map. In short: [`mcp`] is the only layer that
//! knows MCP and JSON; [`session`] owns the registry of interpreter sessions;
//! [`kernel`] starts and drives ipykernel processes; [`workspace`] is the
//! files of one session on disk; [`environment`] provisions the kernels'
//! Python; [`serve`] runs the transports; [`logging`] writes our stderr.

pub mod auth;
pub mod config;
pub mod environment;
pub mod kernel;
pub mod logging;
pub mod mcp;
pub mod sandbox;
pub mod serve;
pub mod session;
pub mod workspace;

/// A boxed future, so the traits with async methods (kernel factories,
/// remote files) stay object safe.
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// `len` URL-safe characters (`A-Z a-z 0-9 - _`) from the OS-seeded CSPRNG
/// (6 bits of entropy each).
pub fn random_token(len: usize) -> String {
    use rand::Rng;
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut rng = rand::rng();
    (0..len)
        .map(|_| ALPHABET[rng.random_range(0..64)] as char)
        .collect()
}
