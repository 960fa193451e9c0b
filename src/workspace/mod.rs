//! Workspaces: the folder of one session on disk, and what changed in it.
//!
//! A workspace knows nothing about kernels or MCP. It lists files, tells what
//! an execution created or changed (by comparing snapshots of size and mtime),
//! saves images a kernel displayed, and resolves client paths safely
//! ([`path::resolve`]).

pub mod path;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

pub use path::PathError;

/// At most this many files are tracked per session folder; beyond it a
/// snapshot stops walking (and the caller is told, see [`Snapshot::truncated`]).
const MAX_TRACKED_FILES: usize = 20_000;

/// A file in a session folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileInfo {
    /// Path relative to the session folder, `/`-separated.
    pub path: String,
    pub size: u64,
    pub mime: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Created,
    Updated,
}

/// Size and modification time of every file, keyed by relative path.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    files: HashMap<String, (u64, Option<SystemTime>)>,
    pub truncated: bool,
}

/// The folder of one session.
#[derive(Debug)]
pub struct Workspace {
    root: PathBuf,
}

impl Workspace {
    /// Creates the folder (owner-only permissions) and returns its workspace.
    pub async fn create(root: PathBuf) -> std::io::Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        let r = root.clone();
        tokio::task::spawn_blocking(move || {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&r)
        })
        .await
        .map_err(std::io::Error::other)??;
        Ok(Self { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Resolves a client-supplied relative path inside this folder.
    pub fn resolve(&self, rel: &str) -> Result<PathBuf, PathError> {
        path::resolve(&self.root, rel)
    }

    /// Walks the folder (symlinks are not followed) and records every file.
    pub async fn snapshot(&self) -> Snapshot {
        let root = self.root.clone();
        tokio::task::spawn_blocking(move || snapshot_blocking(&root))
            .await
            .unwrap_or_default()
    }

    /// Every file in the folder, sorted by path.
    pub async fn list(&self) -> Vec<FileInfo> {
        let snap = self.snapshot().await;
        let mut files: Vec<FileInfo> = snap
            .files
            .iter()
            .map(|(p, (size, _))| file_info(p, *size))
            .collect();
        files.sort_by(|a, b| a.path.cmp(&b.path));
        files
    }

    /// Saves bytes as `{stem}_{n}.{ext}` with the first free `n`.
    pub async fn save_new(
        &self,
        stem: &str,
        ext: &str,
        bytes: Vec<u8>,
    ) -> std::io::Result<FileInfo> {
        use tokio::io::AsyncWriteExt;
        let (mut file, name) = self.create_new(stem, ext).await?;
        file.write_all(&bytes).await?;
        file.flush().await?;
        Ok(file_info(&name, bytes.len() as u64))
    }

    /// Creates `{stem}_{n}.{ext}` with the first free `n` (never overwrites);
    /// returns the open file and its relative name.
    pub async fn create_new(
        &self,
        stem: &str,
        ext: &str,
    ) -> std::io::Result<(tokio::fs::File, String)> {
        for n in 1u32.. {
            let name = format!("{stem}_{n}.{ext}");
            match tokio::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(self.root.join(&name))
                .await
            {
                Ok(f) => return Ok((f, name)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
        Err(std::io::Error::other("no free file name"))
    }

    /// Deletes the folder and everything in it.
    pub async fn remove(&self) -> std::io::Result<()> {
        match tokio::fs::remove_dir_all(&self.root).await {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }
}

impl Snapshot {
    /// Files present in `after` that are new or differ from `self`, by path.
    pub fn changes(&self, after: &Snapshot) -> Vec<(FileInfo, Change)> {
        let mut out: Vec<(FileInfo, Change)> = after
            .files
            .iter()
            .filter_map(|(p, meta)| match self.files.get(p) {
                None => Some((file_info(p, meta.0), Change::Created)),
                Some(old) if old != meta => Some((file_info(p, meta.0), Change::Updated)),
                Some(_) => None,
            })
            .collect();
        out.sort_by(|a, b| a.0.path.cmp(&b.0.path));
        out
    }

    /// Bytes in all tracked files.
    pub fn total_bytes(&self) -> u64 {
        self.files.values().map(|(size, _)| size).sum()
    }

    /// Records a file the server itself wrote, so it is not reported twice.
    pub fn insert(&mut self, root: &Path, rel: &str) {
        if let Ok(meta) = std::fs::metadata(root.join(rel)) {
            self.files
                .insert(rel.to_string(), (meta.len(), meta.modified().ok()));
        }
    }
}

fn snapshot_blocking(root: &Path) -> Snapshot {
    let mut snap = Snapshot::default();
    for entry in walkdir::WalkDir::new(root).min_depth(1).follow_links(false) {
        let Ok(entry) = entry else { continue };
        if !entry.file_type().is_file() {
            continue;
        }
        if snap.files.len() >= MAX_TRACKED_FILES {
            snap.truncated = true;
            break;
        }
        let Ok(rel) = entry.path().strip_prefix(root) else {
            continue;
        };
        let Some(rel) = rel.to_str() else { continue };
        let Ok(meta) = entry.metadata() else { continue };
        snap.files
            .insert(rel.to_string(), (meta.len(), meta.modified().ok()));
    }
    snap
}

fn file_info(rel: &str, size: u64) -> FileInfo {
    FileInfo {
        path: rel.to_string(),
        size,
        mime: mime_for(rel),
    }
}

/// MIME type by file extension; `application/octet-stream` when unknown.
pub fn mime_for(path: &str) -> String {
    mime_guess::from_path(path)
        .first_raw()
        .unwrap_or("application/octet-stream")
        .to_string()
}

/// Whether a file of this type is served as text (when it is valid UTF-8).
pub fn is_textual(mime: &str) -> bool {
    mime.starts_with("text/")
        || matches!(
            mime,
            "application/json"
                | "application/xml"
                | "application/javascript"
                | "application/x-ipynb+json"
                | "image/svg+xml"
                | "application/toml"
                | "application/yaml"
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn changes_report_created_and_updated_files() {
        let dir = tempfile::tempdir().unwrap();
        let ws = Workspace::create(dir.path().join("s")).await.unwrap();
        std::fs::write(ws.root().join("keep.txt"), "1").unwrap();
        std::fs::write(ws.root().join("edit.csv"), "1").unwrap();
        let before = ws.snapshot().await;
        std::fs::create_dir(ws.root().join("sub")).unwrap();
        std::fs::write(ws.root().join("sub/new.png"), "png").unwrap();
        std::fs::write(ws.root().join("edit.csv"), "1,2").unwrap();
        let after = ws.snapshot().await;
        let changes = before.changes(&after);
        assert_eq!(changes.len(), 2);
        assert_eq!(changes[0].0.path, "edit.csv");
        assert_eq!(changes[0].1, Change::Updated);
        assert_eq!(changes[0].0.mime, "text/csv");
        assert_eq!(changes[1].0.path, "sub/new.png");
        assert_eq!(changes[1].1, Change::Created);
        assert_eq!(changes[1].0.mime, "image/png");
    }

    #[tokio::test]
    async fn save_new_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let ws = Workspace::create(dir.path().join("s")).await.unwrap();
        std::fs::write(ws.root().join("figure_1.png"), "mine").unwrap();
        let f = ws.save_new("figure", "png", b"x".to_vec()).await.unwrap();
        assert_eq!(f.path, "figure_2.png");
        assert_eq!(
            std::fs::read(ws.root().join("figure_1.png")).unwrap(),
            b"mine"
        );
    }
}
