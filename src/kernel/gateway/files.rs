//! Session folders beside remote kernels, reached through the kernels
//! themselves: every remote kernel gets the module `_mcp_fs`
//! (`remote_fs.py`) at start-up, and each file operation is one silent
//! request whose user expression calls it (see [`KernelHandle::query`]).
//! This works on every Jupyter server, the Kernel Gateway (which has no
//! contents API) and Enterprise Gateway's pods (whose files only the kernel
//! can see) alike. The listing after a call comes with the call's own reply
//! ([`super::actor::SNAPSHOT_KEY`]) and waits here until the folder is
//! refreshed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use base64::Engine;

use crate::kernel::{KernelError, KernelHandle, WeakKernel};
use crate::workspace::remote::{BoxFuture, Listing, RemoteError, RemoteFiles, WriteMode};

/// The expression that lists the session folder.
pub(super) fn snapshot_expr() -> String {
    "__import__('_mcp_fs').snap()".to_string()
}

/// Code that installs `_mcp_fs` for the folder `root` (relative to the
/// kernel's start folder, or absolute; the module's `ROOT` is its absolute
/// path). A resumed kernel keeps its module, unless the session's code
/// removed it: `if_missing` installs it only then.
pub(super) fn install_code(root: &Path, if_missing: bool) -> String {
    let call = format!(
        "__mcp_install_fs({}, {})",
        py_str(&root.to_string_lossy()),
        crate::workspace::MAX_TRACKED_FILES
    );
    let call = if if_missing {
        format!("if '_mcp_fs' not in __import__('sys').modules:\n    {call}")
    } else {
        call
    };
    format!(
        "{}\n{call}\ndel __mcp_install_fs\n",
        include_str!("remote_fs.py")
    )
}

/// A Python string literal (JSON's escapes are Python's).
pub(super) fn py_str(s: &str) -> String {
    serde_json::Value::String(s.to_string()).to_string()
}

struct Entry {
    token: u64,
    kernel: WeakKernel,
    /// The listing delivered with the last call's reply, not yet taken.
    listing: Option<String>,
}

/// Which kernel serves which folder, and the file operations through it.
pub struct GatewayFiles {
    folders: Mutex<HashMap<PathBuf, Entry>>,
    next: AtomicU64,
    /// Longest a read or listing waits (behind a running call, say).
    timeout: Duration,
}

impl GatewayFiles {
    pub(super) fn new(timeout: Duration) -> Self {
        Self {
            folders: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
            timeout,
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, Entry>> {
        self.folders.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `kernel` now serves `root`; returns the token its task unregisters with.
    pub(super) fn register(&self, root: &Path, kernel: &KernelHandle) -> u64 {
        let token = self.next.fetch_add(1, Ordering::Relaxed);
        self.map().insert(
            root.to_path_buf(),
            Entry {
                token,
                kernel: kernel.downgrade(),
                listing: None,
            },
        );
        token
    }

    pub(super) fn unregister(&self, root: &Path, token: u64) {
        let mut map = self.map();
        if map.get(root).is_some_and(|e| e.token == token) {
            map.remove(root);
        }
    }

    pub(super) fn deliver(&self, root: &Path, listing: &str) {
        if let Some(e) = self.map().get_mut(root) {
            e.listing = Some(listing.to_string());
        }
    }

    fn kernel(&self, root: &Path) -> Result<KernelHandle, RemoteError> {
        self.map()
            .get(root)
            .and_then(|e| e.kernel.upgrade())
            .filter(KernelHandle::is_alive)
            .ok_or(RemoteError::NoKernel)
    }

    /// Calls `_mcp_fs.{call}` in `root`'s kernel; the answer's JSON.
    async fn call(
        &self,
        root: &Path,
        call: String,
        timeout: Duration,
    ) -> Result<serde_json::Value, RemoteError> {
        let kernel = self.kernel(root)?;
        let expr = format!("__import__('_mcp_fs').{call}");
        let text = match tokio::time::timeout(timeout, kernel.query(expr)).await {
            Err(_) => return Err(RemoteError::Timeout),
            Ok(Err(KernelError::Dead(_))) => return Err(RemoteError::NoKernel),
            Ok(Err(e)) => return Err(RemoteError::Other(e.to_string())),
            Ok(Ok(t)) => t,
        };
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|_| RemoteError::Other("the kernel's file helper answered nonsense".into()))?;
        match v.get("error").and_then(|e| e.as_str()) {
            Some(kind) => Err(RemoteError::Failed {
                kind: kind.to_string(),
                detail: v["detail"].as_str().unwrap_or_default().to_string(),
                size: v["size"].as_u64(),
            }),
            None => Ok(v),
        }
    }
}

fn parse_listing(v: &serde_json::Value) -> Result<Listing, RemoteError> {
    let bad = || RemoteError::Other("the kernel's listing does not parse".into());
    let files = v["files"]
        .as_array()
        .ok_or_else(bad)?
        .iter()
        .filter_map(|f| {
            let f = f.as_array()?;
            Some((
                f.first()?.as_str()?.to_string(),
                f.get(1)?.as_u64()?,
                f.get(2)?.as_i64()?,
            ))
        })
        .filter(|(p, _, _)| crate::workspace::path::parse(p).is_ok())
        .take(crate::workspace::MAX_TRACKED_FILES)
        .collect();
    Ok(Listing {
        files,
        truncated: v["truncated"].as_bool().unwrap_or(false),
    })
}

impl RemoteFiles for GatewayFiles {
    fn listing<'a>(&'a self, root: &'a Path) -> BoxFuture<'a, Result<Listing, RemoteError>> {
        Box::pin(async move {
            let delivered = self.map().get_mut(root).and_then(|e| e.listing.take());
            if let Some(text) = delivered
                && let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
                && v.get("error").is_none()
            {
                return parse_listing(&v);
            }
            let v = self.call(root, "snap()".into(), self.timeout).await?;
            parse_listing(&v)
        })
    }

    fn read<'a>(
        &'a self,
        root: &'a Path,
        rel: &'a str,
        max_bytes: u64,
    ) -> BoxFuture<'a, Result<Vec<u8>, RemoteError>> {
        Box::pin(async move {
            let v = self
                .call(
                    root,
                    format!("read({}, {max_bytes})", py_str(rel)),
                    self.timeout,
                )
                .await?;
            base64::engine::general_purpose::STANDARD
                .decode(v["data"].as_str().unwrap_or_default())
                .map_err(|e| RemoteError::Other(e.to_string()))
        })
    }

    fn write<'a>(
        &'a self,
        root: &'a Path,
        rel: &'a str,
        bytes: Vec<u8>,
        mode: WriteMode,
    ) -> BoxFuture<'a, Result<(u64, i64), RemoteError>> {
        Box::pin(async move {
            let mode = match mode {
                WriteMode::Exclusive => "excl",
                WriteMode::Replace => "replace",
                WriteMode::Append => "append",
            };
            let data = base64::engine::general_purpose::STANDARD.encode(&bytes);
            let v = self
                .call(
                    root,
                    format!("write({}, '{data}', '{mode}')", py_str(rel)),
                    self.timeout * 2,
                )
                .await?;
            Ok((
                v["size"].as_u64().unwrap_or(bytes.len() as u64),
                v["mtime"].as_i64().unwrap_or(0),
            ))
        })
    }

    fn remove<'a>(&'a self, root: &'a Path) -> BoxFuture<'a, Result<(), RemoteError>> {
        Box::pin(async move {
            self.call(root, "remove()".into(), self.timeout).await?;
            Ok(())
        })
    }
}
