//! Workspaces: the folder of one session on disk, and what changed in it.
//!
//! A workspace knows nothing about kernels or MCP. It lists files, tells what
//! an execution created or changed (a snapshot of size and mtime per file,
//! brought up to date from inotify's list of touched paths, see [`watch`]),
//! saves images a kernel displayed, and resolves client paths safely
//! ([`path::resolve`]).

pub mod path;
mod watch;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use watch::{Changed, Watcher};

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
    /// What changed since the last look; `None` if inotify is unavailable
    /// (then every look walks the folder).
    watcher: Arc<Mutex<Option<Watcher>>>,
}

impl Workspace {
    /// Creates the folder (owner-only permissions) and returns its workspace.
    pub async fn create(root: PathBuf) -> std::io::Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        let r = root.clone();
        let watcher = tokio::task::spawn_blocking(move || {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&r)?;
            Ok::<_, std::io::Error>(Watcher::new(&r))
        })
        .await
        .map_err(std::io::Error::other)??;
        Ok(Self {
            root,
            watcher: Arc::new(Mutex::new(watcher)),
        })
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
        tokio::task::spawn_blocking(move || snapshot_blocking(&root, &mut None))
            .await
            .unwrap_or_default()
    }

    /// Brings `snap` up to date and returns the files created or changed
    /// since it was taken. Only the paths inotify reports are looked at; the
    /// folder is walked when that view is incomplete (see [`watch`]).
    pub async fn refresh(&self, snap: &mut Snapshot) -> Vec<(FileInfo, Change)> {
        // The common case, nothing written, is one non-blocking read: answer
        // it here rather than hand it to a blocking thread.
        let changed = match self.lock_watcher().as_mut() {
            Some(w) => w.drain(),
            None => Changed::Everything,
        };
        if changed == Changed::Nothing {
            return Vec::new();
        }
        let root = self.root.clone();
        let watcher = self.watcher.clone();
        let prev = std::mem::take(snap);
        let (next, changes) = tokio::task::spawn_blocking(move || {
            let mut watcher = watcher.lock().unwrap_or_else(|p| p.into_inner());
            refresh_blocking(&root, &mut watcher, changed, prev)
        })
        .await
        .unwrap_or_default();
        *snap = next;
        changes
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

    fn lock_watcher(&self) -> std::sync::MutexGuard<'_, Option<Watcher>> {
        self.watcher.lock().unwrap_or_else(|p| p.into_inner())
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
}

fn refresh_blocking(
    root: &Path,
    watcher: &mut Option<Watcher>,
    changed: Changed,
    mut snap: Snapshot,
) -> (Snapshot, Vec<(FileInfo, Change)>) {
    match changed {
        Changed::Nothing => (snap, Vec::new()),
        Changed::Paths(paths) => {
            let mut out = Vec::new();
            for rel in paths {
                let meta = match std::fs::symlink_metadata(root.join(&rel)) {
                    Ok(m) if m.is_file() => (m.len(), m.modified().ok()),
                    // Removed, or no longer a regular file.
                    _ => {
                        snap.files.remove(&rel);
                        continue;
                    }
                };
                let change = match snap.files.get(&rel) {
                    None if snap.files.len() >= MAX_TRACKED_FILES => {
                        snap.truncated = true;
                        continue;
                    }
                    None => Change::Created,
                    Some(old) if *old != meta => Change::Updated,
                    Some(_) => continue,
                };
                out.push((file_info(&rel, meta.0), change));
                snap.files.insert(rel, meta);
            }
            out.sort_by(|a, b| a.0.path.cmp(&b.0.path));
            (snap, out)
        }
        Changed::Everything => {
            let next = snapshot_blocking(root, watcher);
            let changes = snap.changes(&next);
            (next, changes)
        }
    }
}

/// Walks the folder. With a watcher, (re-)watches every directory before
/// reading it, so nothing created in it afterwards goes unseen; a watcher
/// that cannot add a watch (limit reached) is dropped for good.
fn snapshot_blocking(root: &Path, watcher: &mut Option<Watcher>) -> Snapshot {
    let mut snap = Snapshot::default();
    if let Some(w) = watcher
        && w.watch_dir(root, "").is_err()
    {
        *watcher = None;
    }
    for entry in walkdir::WalkDir::new(root).min_depth(1).follow_links(false) {
        let Ok(entry) = entry else { continue };
        if entry.file_type().is_dir() {
            if let Some(w) = watcher
                && let Some(rel) = entry.path().strip_prefix(root).ok().and_then(Path::to_str)
                && let Err(e) = w.watch_dir(root, rel)
            {
                tracing::debug!("cannot watch {rel} ({e}); this folder will be walked");
                *watcher = None;
            }
            continue;
        }
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

    /// `refresh` (inotify's paths, walks when the tree changes) agrees with
    /// a full walk after every step, and reports what each step did.
    #[tokio::test]
    async fn refresh_follows_every_change() {
        let dir = tempfile::tempdir().unwrap();
        let ws = Workspace::create(dir.path().join("s")).await.unwrap();
        assert!(ws.lock_watcher().is_some(), "inotify unavailable");
        let root = ws.root().to_path_buf();
        std::fs::write(root.join("old.txt"), "1").unwrap();
        let mut snap = ws.snapshot().await;

        type Step = Box<dyn Fn(&Path)>;
        let steps: Vec<(Step, Vec<(&str, Change)>)> = vec![
            (Box::new(|_| {}), vec![]),
            (
                Box::new(|r| std::fs::write(r.join("a.csv"), "1").unwrap()),
                vec![("a.csv", Change::Created)],
            ),
            (
                Box::new(|r| std::fs::write(r.join("a.csv"), "1,2").unwrap()),
                vec![("a.csv", Change::Updated)],
            ),
            (
                Box::new(|r| {
                    std::fs::create_dir_all(r.join("d/e")).unwrap();
                    std::fs::write(r.join("d/e/f.png"), "png").unwrap();
                }),
                vec![("d/e/f.png", Change::Created)],
            ),
            (
                Box::new(|r| std::fs::write(r.join("d/e/f.png"), "png2").unwrap()),
                vec![("d/e/f.png", Change::Updated)],
            ),
            (
                Box::new(|r| std::fs::remove_file(r.join("old.txt")).unwrap()),
                vec![],
            ),
            (
                Box::new(|r| std::fs::rename(r.join("d"), r.join("g")).unwrap()),
                vec![("g/e/f.png", Change::Created)],
            ),
            (
                Box::new(|r| std::fs::write(r.join("g/e/h.txt"), "h").unwrap()),
                vec![("g/e/h.txt", Change::Created)],
            ),
        ];
        for (i, (step, want)) in steps.iter().enumerate() {
            step(&root);
            let got: Vec<(String, Change)> = ws
                .refresh(&mut snap)
                .await
                .into_iter()
                .map(|(f, c)| (f.path, c))
                .collect();
            let want: Vec<(String, Change)> =
                want.iter().map(|(p, c)| (p.to_string(), *c)).collect();
            assert_eq!(got, want, "step {i}");
            let walked = ws.snapshot().await;
            assert_eq!(snap.files, walked.files, "step {i}");
        }
        assert!(ws.lock_watcher().is_some());
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
