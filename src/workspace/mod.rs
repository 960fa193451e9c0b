//! Workspaces: the folder of one session on disk, and what changed in it.
//!
//! A workspace knows nothing about kernels or MCP. It lists files, tells what
//! an execution created or changed (a snapshot of size and mtime per file,
//! brought up to date from inotify's list of touched paths, see [`watch`]),
//! creates the files the server writes (figures, long output), reads
//! files for clients, and writes the files clients upload ([`upload`]).
//!
//! The folder is opened once, when the workspace is created, and every file
//! operation afterwards is relative to that descriptor: a folder renamed or
//! replaced by a symlink later redirects nothing. Paths below it are opened
//! with [`path::open`] (`openat2`, `RESOLVE_BENEATH`, no symlinks followed),
//! walks descend folder by folder through descriptors, and what is checked
//! (regular file, size) is the opened file (`fstat`), never a name. The
//! kernel runs in this folder and may swap any name in it at any moment.

pub mod path;
pub mod remote;
mod upload;
mod watch;

use std::collections::HashMap;
use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rustix::fs::{AtFlags, Dir, FileType, Mode, OFlags, Stat};
use rustix::io::Errno;
use watch::{Changed, Watcher};

pub use path::PathError;
pub use upload::{WriteError, WriteOptions, Written};

/// At most this many files are tracked per session folder; beyond it a
/// snapshot stops walking (and the caller is told, see [`Snapshot::truncated`]).
pub const MAX_TRACKED_FILES: usize = 20_000;
/// [`Workspace::create_new`] tries at most this many names; a kernel that
/// planted files or links at all of them makes it fail rather than spin.
const MAX_NAME_TRIES: u32 = 10_000;

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

/// Why [`Workspace::read_file`] returned no bytes.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Path(#[from] PathError),
    #[error("this is a folder, not a file")]
    Folder,
    #[error("this is not a regular file")]
    NotAFile,
    #[error("the file is {size} bytes; files over {max} bytes are not served")]
    TooLarge { size: u64, max: u64 },
    #[error("reading failed: {0}")]
    Io(#[from] std::io::Error),
    /// A remote folder's kernel cannot answer now (not running, busy).
    #[error("{0}")]
    Unavailable(String),
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
    /// Where the folder was created: the kernel's working directory, and
    /// what [`Workspace::remove`] deletes. Never used to reach files in it.
    /// For a remote kernel, the folder as that kernel sees it.
    root: PathBuf,
    backend: Backend,
}

#[derive(Debug)]
enum Backend {
    Local(Local),
    /// Beside a remote kernel ([`remote`]).
    Remote(remote::Remote),
}

#[derive(Debug)]
struct Local {
    /// The folder, opened at creation; every file operation starts here.
    dir: Arc<OwnedFd>,
    /// What changed since the last look; `None` if inotify is unavailable
    /// (then every look walks the folder).
    watcher: Arc<Mutex<Option<Watcher>>>,
}

/// Where session folders are made: on our disk, or beside remote kernels.
#[derive(Clone)]
pub enum Folders {
    Local {
        data_dir: PathBuf,
    },
    Remote {
        /// The folder holding session folders, as remote kernels see it.
        base: PathBuf,
        files: Arc<dyn remote::RemoteFiles>,
    },
}

impl Folders {
    /// The workspace of session `id`, its folder created (locally now;
    /// remotely by the kernel that starts in it).
    pub async fn open(&self, id: &str) -> std::io::Result<Workspace> {
        match self {
            Folders::Local { data_dir } => Workspace::create(data_dir.join(id)).await,
            Folders::Remote { base, files } => Ok(Workspace {
                root: base.join(id),
                backend: Backend::Remote(remote::Remote::new(files.clone())),
            }),
        }
    }
}

impl Workspace {
    /// Creates the folder (owner-only permissions) and returns its workspace.
    pub async fn create(root: PathBuf) -> std::io::Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        let r = root.clone();
        let (dir, watcher) = tokio::task::spawn_blocking(move || {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&r)?;
            let dir = rustix::fs::open(
                &r,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )?;
            let watcher = Watcher::new(dir.as_fd());
            Ok::<_, std::io::Error>((dir, watcher))
        })
        .await
        .map_err(std::io::Error::other)??;
        Ok(Self {
            root,
            backend: Backend::Local(Local {
                dir: Arc::new(dir),
                watcher: Arc::new(Mutex::new(watcher)),
            }),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Beside a remote kernel: reached through the kernel ([`remote`]).
    pub fn is_remote(&self) -> bool {
        matches!(self.backend, Backend::Remote(_))
    }

    /// Walks the folder (symlinks are not followed) and records every file.
    pub async fn snapshot(&self) -> Snapshot {
        let l = match &self.backend {
            Backend::Local(l) => l,
            Backend::Remote(r) => return r.snapshot(&self.root).await,
        };
        let dir = l.dir.clone();
        tokio::task::spawn_blocking(move || walk(dir.as_fd(), &mut None))
            .await
            .unwrap_or_default()
    }

    /// Brings `snap` up to date and returns the files created or changed
    /// since it was taken. Only the paths inotify reports are looked at; the
    /// folder is walked when that view is incomplete (see [`watch`]).
    pub async fn refresh(&self, snap: &mut Snapshot) -> Vec<(FileInfo, Change)> {
        let l = match &self.backend {
            Backend::Local(l) => l,
            Backend::Remote(r) => return r.refresh(&self.root, snap).await,
        };
        // The common case, nothing written, is one non-blocking read: answer
        // it here rather than hand it to a blocking thread.
        let changed = match l.lock_watcher().as_mut() {
            Some(w) => w.drain(),
            None => Changed::Everything,
        };
        if changed == Changed::Nothing {
            return Vec::new();
        }
        let dir = l.dir.clone();
        let watcher = l.watcher.clone();
        let prev = std::mem::take(snap);
        let (next, changes) = tokio::task::spawn_blocking(move || {
            let mut watcher = watcher.lock().unwrap_or_else(|p| p.into_inner());
            refresh_blocking(dir.as_fd(), &mut watcher, changed, prev)
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

    /// The bytes of the regular file at `rel` (a client's path, checked by
    /// [`path::parse`]), if it is at most `max_bytes` long. The file is
    /// opened once, beneath the folder and through no symlink, and the
    /// opened file is the one checked and read.
    pub async fn read_file(
        &self,
        rel: &str,
        max_bytes: u64,
    ) -> Result<(Vec<u8>, FileInfo), ReadError> {
        let rel = path::parse(rel)?;
        let l = match &self.backend {
            Backend::Local(l) => l,
            Backend::Remote(r) => return r.read(&self.root, rel.as_str(), max_bytes).await,
        };
        let dir = l.dir.clone();
        tokio::task::spawn_blocking(move || read_blocking(dir.as_fd(), rel.as_str(), max_bytes))
            .await
            .map_err(std::io::Error::other)?
    }

    /// Saves bytes as `{stem}_{n}.{ext}` with the first free `n`.
    pub async fn save_new(
        &self,
        stem: &str,
        ext: &str,
        bytes: Vec<u8>,
    ) -> std::io::Result<FileInfo> {
        use tokio::io::AsyncWriteExt;
        if let Backend::Remote(r) = &self.backend {
            return Ok(r.stage_bytes(stem, ext, bytes));
        }
        let (mut file, name) = self.create_new(stem, ext).await?;
        file.write_all(&bytes).await?;
        file.flush().await?;
        Ok(file_info(&name, bytes.len() as u64))
    }

    /// Creates `{stem}_{n}.{ext}` with the first free `n` (never overwrites);
    /// returns the open file and its relative name. Every file the server
    /// creates in a session folder is created here: `O_CREAT | O_EXCL |
    /// O_NOFOLLOW` beneath the folder's descriptor (a name taken by anything,
    /// a planted symlink included, is skipped), mode 0644, then given to the
    /// folder's owner, so a kernel running as that user may change or delete
    /// it (a no-op when the server owns the folder; refused, and ignored,
    /// when the server may not give files away).
    pub async fn create_new(
        &self,
        stem: &str,
        ext: &str,
    ) -> std::io::Result<(tokio::fs::File, String)> {
        let l = match &self.backend {
            Backend::Local(l) => l,
            Backend::Remote(r) => return r.stage_file(stem, ext).await,
        };
        let dir = l.dir.clone();
        let (stem, ext) = (stem.to_string(), ext.to_string());
        let (file, name) =
            tokio::task::spawn_blocking(move || create_blocking(dir.as_fd(), &stem, &ext))
                .await
                .map_err(std::io::Error::other)??;
        Ok((tokio::fs::File::from_std(file), name))
    }

    /// Saves bytes under exactly `name`, a plain file name (no folders),
    /// created as [`Workspace::create_new`] creates files: never over an
    /// existing name (`AlreadyExists`, whatever holds it).
    pub async fn save_as(&self, name: &str, bytes: Vec<u8>) -> std::io::Result<FileInfo> {
        use std::io::Write;
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "not a plain file name",
            ));
        }
        let l = match &self.backend {
            Backend::Local(l) => l,
            Backend::Remote(r) => {
                if r.exists(name) {
                    return Err(std::io::ErrorKind::AlreadyExists.into());
                }
                return r
                    .write_now(&self.root, name, bytes, remote::WriteMode::Exclusive)
                    .await
                    .map(|((size, _), _)| file_info(name, size))
                    .map_err(|e| match e {
                        remote::RemoteError::Failed { kind, .. } if kind == "FileExistsError" => {
                            std::io::ErrorKind::AlreadyExists.into()
                        }
                        e => std::io::Error::other(e.to_string()),
                    });
            }
        };
        let dir = l.dir.clone();
        let name = name.to_string();
        tokio::task::spawn_blocking(move || {
            let owner = rustix::fs::fstat(dir.as_fd())?;
            let mut file = create_exact(dir.as_fd(), &name, &owner)?;
            file.write_all(&bytes)?;
            Ok(file_info(&name, bytes.len() as u64))
        })
        .await
        .map_err(std::io::Error::other)?
    }

    /// Deletes the folder and everything in it. Symlinks are removed, never
    /// followed: `remove_dir_all` opens each folder with `O_NOFOLLOW` and
    /// unlinks relative to it, and if the folder's own path has become a
    /// symlink, only that link goes.
    pub async fn remove(&self) -> std::io::Result<()> {
        if let Backend::Remote(r) = &self.backend {
            return r.remove(&self.root).await;
        }
        match tokio::fs::remove_dir_all(&self.root).await {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }
}

impl Workspace {
    #[cfg(test)]
    fn local(&self) -> &Local {
        match &self.backend {
            Backend::Local(l) => l,
            Backend::Remote(_) => panic!("a remote workspace"),
        }
    }
}

impl Local {
    fn lock_watcher(&self) -> std::sync::MutexGuard<'_, Option<Watcher>> {
        self.watcher.lock().unwrap_or_else(|p| p.into_inner())
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

fn read_blocking(
    dir: BorrowedFd<'_>,
    rel: &str,
    max_bytes: u64,
) -> Result<(Vec<u8>, FileInfo), ReadError> {
    // O_NONBLOCK: a FIFO planted at the name must not hang the read.
    let fd = path::open(
        dir,
        rel,
        OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY,
        Mode::empty(),
    )
    .map_err(|e| match path::error_of(e) {
        Ok(p) => ReadError::Path(p),
        Err(e) => ReadError::Io(e.into()),
    })?;
    let st = rustix::fs::fstat(&fd).map_err(std::io::Error::from)?;
    match FileType::from_raw_mode(st.st_mode) {
        FileType::RegularFile => {}
        FileType::Directory => return Err(ReadError::Folder),
        _ => return Err(ReadError::NotAFile),
    }
    let size = size_of(&st);
    if size > max_bytes {
        return Err(ReadError::TooLarge {
            size,
            max: max_bytes,
        });
    }
    let mut bytes = Vec::with_capacity(size as usize);
    // The file may grow after the fstat; never read past the limit.
    std::fs::File::from(fd)
        .take(max_bytes + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max_bytes {
        return Err(ReadError::TooLarge {
            size: bytes.len() as u64,
            max: max_bytes,
        });
    }
    let info = file_info(rel, bytes.len() as u64);
    Ok((bytes, info))
}

fn create_blocking(
    dir: BorrowedFd<'_>,
    stem: &str,
    ext: &str,
) -> std::io::Result<(std::fs::File, String)> {
    let owner = rustix::fs::fstat(dir)?;
    for n in 1..=MAX_NAME_TRIES {
        let name = format!("{stem}_{n}.{ext}");
        match create_exact(dir, &name, &owner) {
            Ok(file) => return Ok((file, name)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::other(format!(
        "no free name {stem}_N.{ext} for N up to {MAX_NAME_TRIES}"
    )))
}

/// Creates `name` beneath `dir` (`O_EXCL | O_NOFOLLOW`, mode 0644) and
/// gives it to the folder's owner; a name taken by anything is
/// `AlreadyExists`.
fn create_exact(dir: BorrowedFd<'_>, name: &str, owner: &Stat) -> std::io::Result<std::fs::File> {
    let fd = path::open(
        dir,
        name,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL,
        Mode::from_raw_mode(0o644),
    )?;
    if let Err(e) = give_to_owner_of(&fd, owner) {
        let _ = rustix::fs::unlinkat(dir, name, AtFlags::empty());
        return Err(e.into());
    }
    Ok(std::fs::File::from(fd))
}

/// Gives the file `fd` the owner and group of the folder `owner` describes.
/// `EPERM` (the server may not give files away) is not an error.
fn give_to_owner_of(fd: &OwnedFd, owner: &Stat) -> rustix::io::Result<()> {
    let st = rustix::fs::fstat(fd)?;
    if (st.st_uid, st.st_gid) == (owner.st_uid, owner.st_gid) {
        return Ok(());
    }
    match rustix::fs::fchown(
        fd,
        Some(rustix::fs::Uid::from_raw(owner.st_uid)),
        Some(rustix::fs::Gid::from_raw(owner.st_gid)),
    ) {
        Err(Errno::PERM) => Ok(()),
        other => other,
    }
}

fn size_of(st: &Stat) -> u64 {
    u64::try_from(st.st_size).unwrap_or(0)
}

/// What a snapshot remembers of a regular file; `None` for anything else.
fn stamp(st: &Stat) -> Option<(u64, Option<SystemTime>)> {
    if !FileType::from_raw_mode(st.st_mode).is_file() {
        return None;
    }
    let mtime = u64::try_from(st.st_mtime)
        .ok()
        .zip(u32::try_from(st.st_mtime_nsec).ok())
        .and_then(|(s, ns)| SystemTime::UNIX_EPOCH.checked_add(Duration::new(s, ns)));
    Some((size_of(st), mtime))
}

fn refresh_blocking(
    dir: BorrowedFd<'_>,
    watcher: &mut Option<Watcher>,
    changed: Changed,
    mut snap: Snapshot,
) -> (Snapshot, Vec<(FileInfo, Change)>) {
    match changed {
        Changed::Nothing => (snap, Vec::new()),
        Changed::Paths(paths) => {
            let mut out = Vec::new();
            for rel in paths {
                let Some(meta) = path::stat(dir, &rel).ok().as_ref().and_then(stamp) else {
                    // Removed, no longer a regular file, or behind a symlink.
                    snap.files.remove(&rel);
                    continue;
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
            let next = walk(dir, watcher);
            let changes = snap.changes(&next);
            (next, changes)
        }
    }
}

/// Walks the folder, one sub-folder at a time, each opened beneath the
/// folder through no symlink ([`path::open`]); symlinks are skipped, as are
/// names that are not UTF-8. With a watcher, (re-)watches every folder
/// before reading it, so nothing created in it afterwards goes unseen; a
/// watcher that cannot add a watch (limit reached) is dropped for good.
fn walk(root: BorrowedFd<'_>, watcher: &mut Option<Watcher>) -> Snapshot {
    let mut snap = Snapshot::default();
    // Folders still to read, relative to the root ("" is the root). Only
    // the folder being read is open, so deep trees cost no descriptors.
    let mut todo = vec![String::new()];
    'walk: while let Some(rel) = todo.pop() {
        let opened = if rel.is_empty() {
            Dir::read_from(root)
        } else {
            path::open(
                root,
                &rel,
                OFlags::RDONLY | OFlags::DIRECTORY,
                Mode::empty(),
            )
            .and_then(Dir::new)
        };
        let Ok(mut entries) = opened else { continue };
        let Ok(fd) = entries.fd() else { continue };
        if let Some(w) = watcher
            && let Err(e) = w.watch_dir(fd, &rel)
        {
            tracing::debug!("cannot watch {rel:?} ({e}); this folder will be walked");
            *watcher = None;
        }
        let mut files = Vec::new();
        while let Some(Ok(entry)) = entries.next() {
            let name = entry.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            let Ok(name) = std::str::from_utf8(name) else {
                continue;
            };
            let child = if rel.is_empty() {
                name.to_string()
            } else {
                format!("{rel}/{name}")
            };
            match entry.file_type() {
                FileType::Directory => todo.push(child),
                FileType::RegularFile | FileType::Unknown => files.push((name.to_string(), child)),
                _ => {}
            }
        }
        let Ok(fd) = entries.fd() else { continue };
        for (name, child) in files {
            let Ok(st) = rustix::fs::statat(fd, name.as_str(), AtFlags::SYMLINK_NOFOLLOW) else {
                continue;
            };
            if FileType::from_raw_mode(st.st_mode).is_dir() {
                // A file system that does not report types in listings.
                todo.push(child);
                continue;
            }
            let Some(meta) = stamp(&st) else { continue };
            if snap.files.len() >= MAX_TRACKED_FILES {
                snap.truncated = true;
                break 'walk;
            }
            snap.files.insert(child, meta);
        }
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
    // Jupyter's own type for notebooks, which mime_guess does not know.
    if path.ends_with(".ipynb") {
        return "application/x-ipynb+json".to_string();
    }
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
        assert!(ws.local().lock_watcher().is_some(), "inotify unavailable");
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
        assert!(ws.local().lock_watcher().is_some());
    }

    #[tokio::test]
    async fn save_as_never_overwrites_nor_follows_links() {
        let dir = tempfile::tempdir().unwrap();
        let out = outside(&dir);
        let ws = Workspace::create(dir.path().join("s")).await.unwrap();
        let f = ws.save_as("nb.ipynb", b"{}".to_vec()).await.unwrap();
        assert_eq!((f.path.as_str(), f.size), ("nb.ipynb", 2));
        let again = ws.save_as("nb.ipynb", b"new".to_vec()).await.unwrap_err();
        assert_eq!(again.kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(ws.root().join("nb.ipynb")).unwrap(), b"{}");
        std::os::unix::fs::symlink(out.join("x.ipynb"), ws.root().join("l.ipynb")).unwrap();
        let linked = ws.save_as("l.ipynb", b"{}".to_vec()).await.unwrap_err();
        assert_eq!(linked.kind(), std::io::ErrorKind::AlreadyExists);
        assert!(!out.join("x.ipynb").exists());
        for bad in ["", "a/b.ipynb", "..", "../x.ipynb"] {
            assert!(ws.save_as(bad, Vec::new()).await.is_err(), "{bad:?}");
        }
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

    fn outside(dir: &tempfile::TempDir) -> PathBuf {
        let out = dir.path().join("outside");
        std::fs::create_dir(&out).unwrap();
        std::fs::write(out.join("secret.txt"), "secret").unwrap();
        out
    }

    #[tokio::test]
    async fn reads_serve_regular_files_beneath_the_folder_only() {
        let dir = tempfile::tempdir().unwrap();
        let out = outside(&dir);
        let ws = Workspace::create(dir.path().join("s")).await.unwrap();
        let root = ws.root().to_path_buf();
        std::fs::create_dir(root.join("sub")).unwrap();
        std::fs::write(root.join("sub/data.csv"), "a,b\n").unwrap();
        std::fs::write(root.join("big.bin"), [0u8; 11]).unwrap();
        std::os::unix::fs::symlink(out.join("secret.txt"), root.join("out.txt")).unwrap();
        std::os::unix::fs::symlink(&out, root.join("out_dir")).unwrap();
        std::os::unix::fs::symlink("sub/data.csv", root.join("in.csv")).unwrap();
        std::os::unix::fs::symlink("sub", root.join("in_dir")).unwrap();
        rustix::fs::mknodat(
            rustix::fs::CWD,
            root.join("fifo"),
            FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();

        let (bytes, info) = ws.read_file("sub%2Fdata.csv", 10).await.unwrap();
        assert_eq!(bytes, b"a,b\n");
        assert_eq!((info.path.as_str(), info.size), ("sub/data.csv", 4));
        assert_eq!(info.mime, "text/csv");
        let refused = |r: Result<(Vec<u8>, FileInfo), ReadError>| format!("{:?}", r.unwrap_err());
        assert_eq!(refused(ws.read_file("sub", 10).await), "Folder");
        assert_eq!(refused(ws.read_file("fifo", 10).await), "NotAFile");
        assert_eq!(
            refused(ws.read_file("big.bin", 10).await),
            "TooLarge { size: 11, max: 10 }"
        );
        assert_eq!(refused(ws.read_file("nope", 10).await), "Path(NotFound)");
        assert_eq!(
            refused(ws.read_file("../outside/secret.txt", 10).await),
            "Path(Traversal)"
        );
        for link in ["out.txt", "out_dir/secret.txt", "in.csv", "in_dir/data.csv"] {
            assert_eq!(
                refused(ws.read_file(link, 10).await),
                "Path(Symlink)",
                "{link}"
            );
        }
    }

    /// Walks list neither symlinks nor what they lead to.
    #[tokio::test]
    async fn listings_skip_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let out = outside(&dir);
        let ws = Workspace::create(dir.path().join("s")).await.unwrap();
        let root = ws.root().to_path_buf();
        let mut snap = ws.snapshot().await;
        std::fs::create_dir(root.join("sub")).unwrap();
        std::fs::write(root.join("sub/a.txt"), "a").unwrap();
        std::os::unix::fs::symlink(&out, root.join("out_dir")).unwrap();
        std::os::unix::fs::symlink(out.join("secret.txt"), root.join("sub/out.txt")).unwrap();
        let names = |files: Vec<FileInfo>| files.into_iter().map(|f| f.path).collect::<Vec<_>>();
        assert_eq!(names(ws.list().await), vec!["sub/a.txt"]);
        let changed = ws.refresh(&mut snap).await;
        assert_eq!(
            names(changed.into_iter().map(|(f, _)| f).collect()),
            vec!["sub/a.txt"]
        );
        // A file written where a folder turned into a symlink out.
        std::fs::rename(root.join("sub"), root.join("sub_real")).unwrap();
        std::os::unix::fs::symlink(&out, root.join("sub")).unwrap();
        std::fs::write(out.join("new.txt"), "n").unwrap();
        ws.refresh(&mut snap).await;
        assert_eq!(names(ws.list().await), vec!["sub_real/a.txt"]);
        assert_eq!(
            snap.files.keys().collect::<Vec<_>>(),
            vec!["sub_real/a.txt"]
        );
    }

    /// A kernel that plants symlinks at the names the server is about to
    /// create makes it pick another name, never write through them.
    #[tokio::test]
    async fn creation_never_follows_a_planted_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let out = outside(&dir);
        let ws = Workspace::create(dir.path().join("s")).await.unwrap();
        let root = ws.root().to_path_buf();
        std::os::unix::fs::symlink(out.join("secret.txt"), root.join("figure_1.png")).unwrap();
        std::os::unix::fs::symlink(out.join("new.png"), root.join("figure_2.png")).unwrap();
        std::os::unix::fs::symlink(out.join("secret.txt"), root.join("output_1.txt")).unwrap();
        let f = ws.save_new("figure", "png", b"png".to_vec()).await.unwrap();
        assert_eq!(f.path, "figure_3.png");
        let (_, name) = ws.create_new("output", "txt").await.unwrap();
        assert_eq!(name, "output_2.txt");
        assert_eq!(
            std::fs::read_to_string(out.join("secret.txt")).unwrap(),
            "secret"
        );
        assert!(!out.join("new.png").exists());
        assert!(
            std::fs::symlink_metadata(root.join("figure_3.png"))
                .unwrap()
                .is_file()
        );
    }

    /// Files the server creates belong to the folder's owner (a kernel
    /// running as that user may then change or delete them).
    #[tokio::test]
    async fn created_files_belong_to_the_folder_owner() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let ws = Workspace::create(dir.path().join("s")).await.unwrap();
        let f = ws.save_new("figure", "png", b"png".to_vec()).await.unwrap();
        let meta = std::fs::metadata(ws.root().join(&f.path)).unwrap();
        assert_eq!(meta.mode() & 0o777 & !0o022, 0o644 & !0o022);
        // The temporary folder is ours: its owner is the server's user.
        let me = std::fs::metadata(dir.path()).unwrap().uid();
        assert_eq!(meta.uid(), me);
        if me != 0 {
            eprintln!("not root: giving files away is not testable");
            return;
        }
        std::os::unix::fs::chown(ws.root(), Some(4242), Some(4343)).unwrap();
        let (_, name) = ws.create_new("output", "txt").await.unwrap();
        let meta = std::fs::metadata(ws.root().join(name)).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (4242, 4343));
    }

    /// Clearing removes symlinks, never what they point to; a folder whose
    /// path became a symlink loses only the link.
    #[tokio::test]
    async fn remove_deletes_links_not_their_targets() {
        let dir = tempfile::tempdir().unwrap();
        let out = outside(&dir);
        let ws = Workspace::create(dir.path().join("s")).await.unwrap();
        std::os::unix::fs::symlink(&out, ws.root().join("dir_link")).unwrap();
        std::os::unix::fs::symlink(out.join("secret.txt"), ws.root().join("file_link")).unwrap();
        ws.remove().await.unwrap();
        assert!(!ws.root().exists());
        assert_eq!(
            std::fs::read_to_string(out.join("secret.txt")).unwrap(),
            "secret"
        );

        let ws = Workspace::create(dir.path().join("t")).await.unwrap();
        std::fs::rename(ws.root(), dir.path().join("t_moved")).unwrap();
        std::os::unix::fs::symlink(&out, ws.root()).unwrap();
        ws.remove().await.unwrap();
        assert!(std::fs::symlink_metadata(ws.root()).is_err());
        assert_eq!(
            std::fs::read_to_string(out.join("secret.txt")).unwrap(),
            "secret"
        );
    }

    /// The folder's descriptor, not its path, is what every operation uses:
    /// a folder moved away and replaced by a symlink redirects nothing.
    #[tokio::test]
    async fn a_replaced_folder_redirects_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let out = outside(&dir);
        let ws = Workspace::create(dir.path().join("s")).await.unwrap();
        std::fs::write(ws.root().join("mine.txt"), "mine").unwrap();
        let moved = dir.path().join("moved");
        std::fs::rename(ws.root(), &moved).unwrap();
        std::os::unix::fs::symlink(&out, ws.root()).unwrap();
        assert_eq!(ws.read_file("mine.txt", 10).await.unwrap().0, b"mine");
        assert!(ws.read_file("secret.txt", 10).await.is_err());
        let listed: Vec<String> = ws.list().await.into_iter().map(|f| f.path).collect();
        assert_eq!(listed, vec!["mine.txt"]);
        ws.save_new("figure", "png", b"png".to_vec()).await.unwrap();
        assert!(moved.join("figure_1.png").is_file());
        assert!(!out.join("figure_1.png").exists());
    }
}
