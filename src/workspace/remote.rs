//! A session folder that is not on our disk: it lives beside a remote
//! kernel (a Jupyter server's or gateway's machine, a Kubernetes pod) and is
//! reached through [`RemoteFiles`], which the kernel backend provides.
//!
//! What differs from a local folder:
//! - **Changes** come from listings (path, size, mtime), not inotify: the
//!   listing taken right after a call (the kernel backend asks for it in the
//!   call's own request, so it costs no extra round trip) is compared with
//!   the previous one.
//! - **Writes the server makes while a call runs** (the file that receives
//!   long output, HTML displays, figures) cannot go through a kernel that is
//!   busy running that call: they are staged here (output in an anonymous
//!   temporary file, the rest in memory) under a name chosen at once, and
//!   written when the folder is next refreshed, that is after the call. A
//!   staged file that cannot be written then (no kernel) waits for the next
//!   refresh.
//! - **Reads and listings** wait for the kernel: while a call runs they
//!   queue behind it, bounded by the backend's time limit.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::{Change, FileInfo, ReadError, Snapshot, file_info};

pub use crate::BoxFuture;

/// Every regular file beneath a folder: path, size, mtime in ns.
#[derive(Debug, Default, Clone)]
pub struct Listing {
    pub files: Vec<(String, u64, i64)>,
    pub truncated: bool,
}

/// How [`RemoteFiles::write`] treats an existing name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteMode {
    /// Never over an existing name.
    Exclusive,
    /// A temporary file renamed over the name.
    Replace,
    /// Created, or added to at the end.
    Append,
}

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("the session's kernel is not running; run code in the session to start it")]
    NoKernel,
    #[error("the session's kernel did not answer in time (it may be busy with a long call)")]
    Timeout,
    /// The kernel-side operation failed: `kind` is a Python exception name
    /// or one of `TooLarge`, `NotAFile`.
    #[error("{kind}: {detail}")]
    Failed {
        kind: String,
        detail: String,
        size: Option<u64>,
    },
    #[error("{0}")]
    Other(String),
}

/// File operations on folders beside remote kernels, provided by the
/// kernel backend. `root` is the folder as the kernel sees it
/// ([`super::Workspace::root`]); `rel` a checked relative path.
pub trait RemoteFiles: Send + Sync + 'static {
    fn listing<'a>(&'a self, root: &'a Path) -> BoxFuture<'a, Result<Listing, RemoteError>>;
    fn read<'a>(
        &'a self,
        root: &'a Path,
        rel: &'a str,
        max_bytes: u64,
    ) -> BoxFuture<'a, Result<Vec<u8>, RemoteError>>;
    /// Returns the written file's size and mtime (ns).
    fn write<'a>(
        &'a self,
        root: &'a Path,
        rel: &'a str,
        bytes: Vec<u8>,
        mode: WriteMode,
    ) -> BoxFuture<'a, Result<(u64, i64), RemoteError>>;
    /// Deletes the folder (through its kernel, while it still runs).
    fn remove<'a>(&'a self, root: &'a Path) -> BoxFuture<'a, Result<(), RemoteError>>;
}

/// A staged write (see the module doc).
enum Staged {
    Bytes { name: String, bytes: Vec<u8> },
    Spill { name: String, file: std::fs::File },
}

impl Staged {
    fn name(&self) -> &str {
        match self {
            Staged::Bytes { name, .. } | Staged::Spill { name, .. } => name,
        }
    }
}

/// Most bytes of a staged output file sent per write.
const CHUNK: usize = 4 << 20;

pub(super) struct Remote {
    pub(super) files: Arc<dyn RemoteFiles>,
    staged: Mutex<Vec<Staged>>,
    /// The last listing seen, for names and for a listing while the kernel
    /// cannot answer.
    last: Mutex<Snapshot>,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Remote")
    }
}

fn to_snapshot(l: Listing) -> Snapshot {
    let mut s = Snapshot {
        truncated: l.truncated,
        ..Default::default()
    };
    for (path, size, mtime) in l.files {
        s.files.insert(path, (size, Some(mtime_of(mtime))));
    }
    s
}

fn mtime_of(ns: i64) -> SystemTime {
    if ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    } else {
        UNIX_EPOCH
    }
}

impl Remote {
    pub(super) fn new(files: Arc<dyn RemoteFiles>) -> Self {
        Self {
            files,
            staged: Mutex::new(Vec::new()),
            last: Mutex::new(Snapshot::default()),
        }
    }

    fn last(&self) -> std::sync::MutexGuard<'_, Snapshot> {
        self.last.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn staged(&self) -> std::sync::MutexGuard<'_, Vec<Staged>> {
        self.staged.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) async fn snapshot(&self, root: &Path) -> Snapshot {
        match self.files.listing(root).await {
            Ok(l) => {
                let s = to_snapshot(l);
                *self.last() = s.clone();
                s
            }
            Err(e) => {
                tracing::debug!("listing {}: {e}", root.display());
                self.last().clone()
            }
        }
    }

    /// The first `{stem}_{n}.{ext}` neither listed nor staged.
    fn free_name(&self, stem: &str, ext: &str) -> String {
        let last = self.last();
        let staged = self.staged();
        (1..)
            .map(|n| format!("{stem}_{n}.{ext}"))
            .find(|c| !last.files.contains_key(c) && !staged.iter().any(|s| s.name() == c))
            .expect("a free name")
    }

    pub(super) fn stage_bytes(&self, stem: &str, ext: &str, bytes: Vec<u8>) -> FileInfo {
        let name = self.free_name(stem, ext);
        let info = file_info(&name, bytes.len() as u64);
        self.staged().push(Staged::Bytes { name, bytes });
        info
    }

    /// An anonymous local file whose content is written as `{stem}_{n}.{ext}`
    /// at the next refresh.
    pub(super) async fn stage_file(
        &self,
        stem: &str,
        ext: &str,
    ) -> std::io::Result<(tokio::fs::File, String)> {
        let name = self.free_name(stem, ext);
        let file = tokio::task::spawn_blocking(|| {
            let fd = rustix::fs::open(
                std::env::temp_dir(),
                rustix::fs::OFlags::TMPFILE
                    | rustix::fs::OFlags::RDWR
                    | rustix::fs::OFlags::CLOEXEC,
                rustix::fs::Mode::from_raw_mode(0o600),
            )?;
            Ok::<_, std::io::Error>(std::fs::File::from(fd))
        })
        .await
        .map_err(std::io::Error::other)??;
        let keep = file.try_clone()?;
        self.staged().push(Staged::Spill {
            name: name.clone(),
            file: keep,
        });
        Ok((tokio::fs::File::from_std(file), name))
    }

    /// Writes what is staged; returns what was written. What cannot be
    /// written now stays staged.
    async fn flush(&self, root: &Path) -> Vec<(String, u64, i64)> {
        let pending: Vec<Staged> = std::mem::take(&mut *self.staged());
        let mut written = Vec::new();
        let mut keep = Vec::new();
        for s in pending {
            let result = match &s {
                Staged::Bytes { name, bytes } => {
                    self.files
                        .write(root, name, bytes.clone(), WriteMode::Replace)
                        .await
                }
                Staged::Spill { name, file } => self.send_file(root, name, file).await,
            };
            match result {
                Ok((size, mtime)) => written.push((s.name().to_string(), size, mtime)),
                Err(RemoteError::NoKernel) => keep.push(s),
                Err(e) => tracing::warn!("could not write {} beside its kernel: {e}", s.name()),
            }
        }
        if !keep.is_empty() {
            let mut staged = self.staged();
            keep.append(&mut staged);
            *staged = keep;
        }
        written
    }

    async fn send_file(
        &self,
        root: &Path,
        name: &str,
        file: &std::fs::File,
    ) -> Result<(u64, i64), RemoteError> {
        let mut at = 0u64;
        let mut last = self
            .files
            .write(root, name, Vec::new(), WriteMode::Replace)
            .await?;
        loop {
            let mut buf = vec![0u8; CHUNK];
            let n = file
                .read_at(&mut buf, at)
                .map_err(|e| RemoteError::Other(e.to_string()))?;
            if n == 0 {
                break;
            }
            buf.truncate(n);
            at += n as u64;
            last = self.files.write(root, name, buf, WriteMode::Append).await?;
        }
        Ok(last)
    }

    pub(super) async fn refresh(
        &self,
        root: &Path,
        snap: &mut Snapshot,
    ) -> Vec<(FileInfo, Change)> {
        let listing = self.files.listing(root).await;
        let written = self.flush(root).await;
        let mut next = match listing {
            Ok(l) => to_snapshot(l),
            Err(e) => {
                tracing::debug!("listing {}: {e}", root.display());
                snap.clone()
            }
        };
        for (path, size, mtime) in written {
            next.files.insert(path, (size, Some(mtime_of(mtime))));
        }
        let changes = snap.changes(&next);
        *self.last() = next.clone();
        *snap = next;
        changes
    }

    pub(super) async fn read(
        &self,
        root: &Path,
        rel: &str,
        max_bytes: u64,
    ) -> Result<(Vec<u8>, FileInfo), ReadError> {
        match self.files.read(root, rel, max_bytes).await {
            Ok(bytes) => {
                let info = file_info(rel, bytes.len() as u64);
                Ok((bytes, info))
            }
            Err(RemoteError::Failed { kind, detail, size }) => Err(match kind.as_str() {
                "TooLarge" => ReadError::TooLarge {
                    size: size.unwrap_or(max_bytes + 1),
                    max: max_bytes,
                },
                "FileNotFoundError" => ReadError::Path(super::PathError::NotFound),
                "IsADirectoryError" => ReadError::Folder,
                "NotAFile" => ReadError::NotAFile,
                "OSError" if detail.contains("symbolic") => ReadError::NotAFile,
                _ => ReadError::Io(std::io::Error::other(format!("{kind}: {detail}"))),
            }),
            Err(e) => Err(ReadError::Unavailable(e.to_string())),
        }
    }

    /// Writes `bytes` at `rel` now (the kernel is idle: the caller holds the
    /// session's queue). Returns the stamp and whether a file was replaced.
    pub(super) async fn write_now(
        &self,
        root: &Path,
        rel: &str,
        bytes: Vec<u8>,
        mode: WriteMode,
    ) -> Result<((u64, Option<SystemTime>), bool), RemoteError> {
        let existed = self.last().files.contains_key(rel);
        let (size, mtime) = self.files.write(root, rel, bytes, mode).await?;
        let stamp = (size, Some(mtime_of(mtime)));
        self.last().files.insert(rel.to_string(), stamp);
        Ok((stamp, existed))
    }

    pub(super) fn exists(&self, rel: &str) -> bool {
        self.last().files.contains_key(rel)
    }

    pub(super) fn used_bytes(&self) -> u64 {
        self.last().total_bytes()
    }

    pub(super) async fn remove(&self, root: &Path) -> std::io::Result<()> {
        self.staged().clear();
        match self.files.remove(root).await {
            Ok(()) | Err(RemoteError::NoKernel) => Ok(()),
            Err(e) => Err(std::io::Error::other(e.to_string())),
        }
    }
}
