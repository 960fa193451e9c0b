//! Writing a client's file into a session folder (the `upload_file` tool).
//!
//! The path is a client's, checked by [`path::parse`] like a resource path.
//! Nothing is reached by name from outside the folder: missing folders on
//! the way are made with `mkdirat` relative to their parent's descriptor,
//! and each is then opened with [`path::open`] (no symlink followed), so a
//! kernel that swaps a name for a symlink meanwhile gets a refusal, never a
//! write elsewhere. The bytes go to a fresh temporary file (`O_CREAT |
//! O_EXCL | O_NOFOLLOW`) in the target's folder, which is then renamed over
//! the name: readers see the old file or the whole new one, never half of
//! it, and a symlink planted at the name at the last instant is replaced
//! as a name, never written through. Without `overwrite`, the rename is
//! `RENAME_NOREPLACE` (or `link` where the file system lacks it), so an
//! existing file is never replaced. New folders and the file are given to
//! the folder's owner (the kernel's user).
//!
//! Before anything is written the folder's usage is measured (a walk): an
//! upload that would take it over its quota writes nothing.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::SystemTime;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, RenameFlags};
use rustix::io::Errno;

use super::path::RelPath;
use super::{FileInfo, PathError, Snapshot, Workspace, file_info, give_to_owner_of, path, stamp};

/// Why [`Workspace::write_file`] wrote nothing.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Path(#[from] PathError),
    #[error("a folder on the way is a file, not a folder")]
    NotAFolder,
    #[error("a folder is at this path")]
    Folder,
    #[error("something other than a regular file is at this path")]
    NotAFile,
    #[error("a file already exists at this path")]
    Exists,
    /// The folder would hold `used - replaced + size` bytes, over `max`.
    #[error(
        "the session folder holds {used} bytes; adding {size} bytes would exceed its limit of {max} bytes"
    )]
    Quota { used: u64, size: u64, max: u64 },
    #[error("writing failed: {0}")]
    Io(#[from] std::io::Error),
}

/// How [`Workspace::write_file`] treats what is there.
#[derive(Debug, Clone, Copy)]
pub struct WriteOptions {
    /// Replace an existing regular file (never a folder or a symlink).
    pub overwrite: bool,
    /// The folder's quota: the upload is refused if the folder would hold more.
    pub max_folder_bytes: u64,
}

/// A file [`Workspace::write_file`] wrote.
#[derive(Debug, Clone)]
pub struct Written {
    pub info: FileInfo,
    /// A file of that name was replaced.
    pub replaced: bool,
    /// What a snapshot records for the new file (see [`Snapshot::record`]).
    stamp: (u64, Option<SystemTime>),
}

impl Workspace {
    /// Writes `bytes` to `rel` (a client's path, as [`path::parse`] checked
    /// it), creating missing folders; see the module doc.
    pub async fn write_file(
        &self,
        rel: &RelPath,
        bytes: Vec<u8>,
        options: WriteOptions,
    ) -> Result<Written, WriteError> {
        let l = match &self.backend {
            super::Backend::Local(l) => l,
            super::Backend::Remote(r) => {
                return write_remote(r, &self.root, rel, bytes, options).await;
            }
        };
        let rel = rel.clone();
        let dir = l.dir.clone();
        tokio::task::spawn_blocking(move || {
            write_blocking(dir.as_fd(), rel.as_str(), &bytes, options)
        })
        .await
        .map_err(std::io::Error::other)?
    }
}

/// An upload beside a remote kernel: the quota is checked against the last
/// listing (the kernel may have written since; the next call's check sees
/// it), the bytes go to a temporary file renamed over the name.
async fn write_remote(
    r: &super::remote::Remote,
    root: &std::path::Path,
    rel: &RelPath,
    bytes: Vec<u8>,
    options: WriteOptions,
) -> Result<Written, WriteError> {
    use super::remote::{RemoteError, WriteMode};
    let rel = rel.as_str();
    if !options.overwrite && r.exists(rel) {
        return Err(WriteError::Exists);
    }
    let used = r.used_bytes();
    let size = bytes.len() as u64;
    if used.saturating_add(size) > options.max_folder_bytes {
        return Err(WriteError::Quota {
            used,
            size,
            max: options.max_folder_bytes,
        });
    }
    let mode = if options.overwrite {
        WriteMode::Replace
    } else {
        WriteMode::Exclusive
    };
    match r.write_now(root, rel, bytes, mode).await {
        Ok((stamp, replaced)) => Ok(Written {
            info: file_info(rel, stamp.0),
            replaced,
            stamp,
        }),
        Err(RemoteError::Failed { kind, detail, .. }) => Err(match kind.as_str() {
            "FileExistsError" => WriteError::Exists,
            "IsADirectoryError" => WriteError::Folder,
            "NotADirectoryError" => WriteError::NotAFolder,
            _ => WriteError::Io(std::io::Error::other(format!("{kind}: {detail}"))),
        }),
        Err(e) => Err(WriteError::Io(std::io::Error::other(e.to_string()))),
    }
}

impl Snapshot {
    /// Records a file the server wrote, so that the next look does not
    /// report it as created or changed by the code.
    pub fn record(&mut self, w: &Written) {
        if self.files.len() < super::MAX_TRACKED_FILES || self.files.contains_key(&w.info.path) {
            self.files.insert(w.info.path.clone(), w.stamp);
        }
    }
}

impl From<Errno> for WriteError {
    fn from(e: Errno) -> Self {
        WriteError::Io(e.into())
    }
}

fn path_error(e: Errno) -> WriteError {
    match path::error_of(e) {
        Ok(p) => WriteError::Path(p),
        Err(e) => WriteError::Io(e.into()),
    }
}

/// What `ENOTDIR` for `rel` means: one of its folders is a symlink (which
/// is not followed) or something else that is not a folder.
fn not_a_folder(root: BorrowedFd<'_>, rel: &str) -> WriteError {
    let mut prefix = String::new();
    for part in rel.split('/') {
        if !prefix.is_empty() {
            prefix.push('/');
        }
        prefix.push_str(part);
        match path::stat(root, &prefix).map(|st| FileType::from_raw_mode(st.st_mode)) {
            Ok(FileType::Directory) => continue,
            Ok(FileType::Symlink) => return PathError::Symlink.into(),
            _ => break,
        }
    }
    WriteError::NotAFolder
}

fn write_blocking(
    root: BorrowedFd<'_>,
    rel: &str,
    bytes: &[u8],
    options: WriteOptions,
) -> Result<Written, WriteError> {
    // What is there now decides, before anything is written.
    let existing = match path::stat(root, rel) {
        Ok(st) => match FileType::from_raw_mode(st.st_mode) {
            FileType::RegularFile if options.overwrite => Some(super::size_of(&st)),
            FileType::RegularFile => return Err(WriteError::Exists),
            FileType::Directory => return Err(WriteError::Folder),
            FileType::Symlink => return Err(PathError::Symlink.into()),
            _ => return Err(WriteError::NotAFile),
        },
        Err(Errno::NOENT) => None,
        Err(Errno::NOTDIR) => return Err(not_a_folder(root, rel)),
        Err(e) => return Err(path_error(e)),
    };
    let used = super::walk(root, &mut None).total_bytes();
    let size = bytes.len() as u64;
    if used
        .saturating_sub(existing.unwrap_or(0))
        .saturating_add(size)
        > options.max_folder_bytes
    {
        return Err(WriteError::Quota {
            used,
            size,
            max: options.max_folder_bytes,
        });
    }

    let owner = rustix::fs::fstat(root)?;
    let (dirs, name) = match rel.rsplit_once('/') {
        Some((dirs, name)) => (Some(dirs), name),
        None => (None, rel),
    };
    let mut at: Option<OwnedFd> = None;
    for part in dirs.into_iter().flat_map(|d| d.split('/')) {
        let base = at.as_ref().map_or(root, |f| f.as_fd());
        let created = match rustix::fs::mkdirat(base, part, Mode::from_raw_mode(0o755)) {
            Ok(()) => true,
            Err(Errno::EXIST) => false,
            Err(e) => return Err(path_error(e)),
        };
        let fd = path::open(
            base,
            part,
            OFlags::RDONLY | OFlags::DIRECTORY,
            Mode::empty(),
        )
        .map_err(|e| match e {
            Errno::NOTDIR => not_a_folder(base, part),
            e => path_error(e),
        })?;
        if created {
            give_to_owner_of(&fd, &owner)?;
        }
        at = Some(fd);
    }
    let folder = at.as_ref().map_or(root, |f| f.as_fd());

    let tmp = format!(".upload-{}.tmp", crate::random_token(16));
    let fd = path::open(
        folder,
        &tmp,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL,
        Mode::from_raw_mode(0o644),
    )
    .map_err(path_error)?;
    let committed = fill(fd, &owner, bytes).and_then(|st| {
        commit(folder, &tmp, name, options.overwrite)?;
        Ok(st)
    });
    let st = match committed {
        Ok(st) => st,
        Err(e) => {
            let _ = rustix::fs::unlinkat(folder, tmp.as_str(), AtFlags::empty());
            return Err(e);
        }
    };
    Ok(Written {
        info: file_info(rel, size),
        replaced: existing.is_some(),
        stamp: stamp(&st).unwrap_or((size, None)),
    })
}

/// Gives the new file to the folder's owner and writes it; returns what it
/// then is (size and mtime survive the rename).
fn fill(
    fd: OwnedFd,
    owner: &rustix::fs::Stat,
    bytes: &[u8],
) -> Result<rustix::fs::Stat, WriteError> {
    use std::io::Write;
    give_to_owner_of(&fd, owner)?;
    let mut file = std::fs::File::from(fd);
    file.write_all(bytes)?;
    Ok(rustix::fs::fstat(&file)?)
}

/// Puts `tmp` at `name` in `folder`: over an existing file with
/// `overwrite`, else only if the name is free.
fn commit(
    folder: BorrowedFd<'_>,
    tmp: &str,
    name: &str,
    overwrite: bool,
) -> Result<(), WriteError> {
    let renamed = if overwrite {
        rustix::fs::renameat(folder, tmp, folder, name)
    } else {
        match rustix::fs::renameat_with(folder, tmp, folder, name, RenameFlags::NOREPLACE) {
            // A file system without RENAME_NOREPLACE: a hard link is just as
            // exclusive (and never follows a symlink at `name`).
            Err(Errno::INVAL) | Err(Errno::NOSYS) => {
                rustix::fs::linkat(folder, tmp, folder, name, AtFlags::empty()).map(|()| {
                    let _ = rustix::fs::unlinkat(folder, tmp, AtFlags::empty());
                })
            }
            other => other,
        }
    };
    renamed.map_err(|e| match e {
        Errno::EXIST => WriteError::Exists,
        Errno::ISDIR | Errno::NOTEMPTY => WriteError::Folder,
        e => WriteError::Io(e.into()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};

    const ROOMY: WriteOptions = WriteOptions {
        overwrite: false,
        max_folder_bytes: 1 << 20,
    };
    const REPLACE: WriteOptions = WriteOptions {
        overwrite: true,
        max_folder_bytes: 1 << 20,
    };

    async fn setup() -> (tempfile::TempDir, Workspace, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("outside");
        std::fs::create_dir(&out).unwrap();
        std::fs::write(out.join("secret.txt"), "secret").unwrap();
        let ws = Workspace::create(dir.path().join("s")).await.unwrap();
        (dir, ws, out)
    }

    fn err(r: Result<Written, WriteError>) -> String {
        format!("{:?}", r.unwrap_err())
    }

    impl Workspace {
        /// [`Workspace::write_file`] with the client's text, as the tool gets it.
        async fn upload(
            &self,
            rel: &str,
            bytes: Vec<u8>,
            options: WriteOptions,
        ) -> Result<Written, WriteError> {
            self.write_file(&path::parse(rel)?, bytes, options).await
        }
    }

    /// Every file under `dir`, as relative paths (what an upload left).
    fn tree(dir: &Path) -> Vec<String> {
        let mut out = Vec::new();
        let mut todo = vec![dir.to_path_buf()];
        while let Some(d) = todo.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                out.push(p.strip_prefix(dir).unwrap().display().to_string());
                if std::fs::symlink_metadata(&p).unwrap().is_dir() {
                    todo.push(p);
                }
            }
        }
        out.sort();
        out
    }

    #[tokio::test]
    async fn writes_files_and_makes_folders() {
        let (_d, ws, _out) = setup().await;
        let w = ws
            .upload("data/2024/sales.csv", b"a,b\n".to_vec(), ROOMY)
            .await
            .unwrap();
        assert_eq!(w.info.path, "data/2024/sales.csv");
        assert_eq!((w.info.size, w.info.mime.as_str()), (4, "text/csv"));
        assert!(!w.replaced);
        let bin: Vec<u8> = (0..=255).collect();
        ws.upload("blob.bin", bin.clone(), ROOMY).await.unwrap();
        assert_eq!(std::fs::read(ws.root().join("blob.bin")).unwrap(), bin);
        assert_eq!(
            std::fs::read(ws.root().join("data/2024/sales.csv")).unwrap(),
            b"a,b\n"
        );
        // No temporary file is left behind.
        assert_eq!(
            tree(ws.root()),
            ["blob.bin", "data", "data/2024", "data/2024/sales.csv"]
        );
    }

    #[tokio::test]
    async fn existing_files_are_replaced_only_when_asked() {
        let (_d, ws, _out) = setup().await;
        ws.upload("a.txt", b"one".to_vec(), ROOMY).await.unwrap();
        assert_eq!(
            err(ws.upload("a.txt", b"two".to_vec(), ROOMY).await),
            "Exists"
        );
        assert_eq!(std::fs::read(ws.root().join("a.txt")).unwrap(), b"one");
        let w = ws.upload("a.txt", b"two".to_vec(), REPLACE).await.unwrap();
        assert!(w.replaced);
        assert_eq!(std::fs::read(ws.root().join("a.txt")).unwrap(), b"two");
        std::fs::create_dir(ws.root().join("dir")).unwrap();
        assert_eq!(
            err(ws.upload("dir", b"x".to_vec(), REPLACE).await),
            "Folder"
        );
        assert_eq!(
            err(ws.upload("a.txt/b.txt", b"x".to_vec(), ROOMY).await),
            "NotAFolder"
        );
        assert_eq!(tree(ws.root()), ["a.txt", "dir"]);
    }

    /// Hostile paths and planted symlinks: nothing is written outside the
    /// folder, and what is outside is untouched.
    #[tokio::test]
    async fn nothing_lands_outside_the_folder() {
        let (d, ws, out) = setup().await;
        let root = ws.root().to_path_buf();
        std::os::unix::fs::symlink(out.join("secret.txt"), root.join("link.txt")).unwrap();
        std::os::unix::fs::symlink(out.join("new.txt"), root.join("dangling.txt")).unwrap();
        std::os::unix::fs::symlink(&out, root.join("out")).unwrap();
        for (rel, want) in [
            ("../x", "Path(Traversal)"),
            ("a/../../x", "Path(Traversal)"),
            ("%2e%2e/x", "Path(Traversal)"),
            ("/etc/x", "Path(Absolute)"),
            ("x%00", "Path(Nul)"),
            ("link.txt", "Path(Symlink)"),
            ("dangling.txt", "Path(Symlink)"),
            ("out/secret.txt", "Path(Symlink)"),
            ("out/new.txt", "Path(Symlink)"),
            ("out/sub/new.txt", "Path(Symlink)"),
        ] {
            for options in [ROOMY, REPLACE] {
                assert_eq!(
                    err(ws.upload(rel, b"pwned".to_vec(), options).await),
                    want,
                    "{rel}"
                );
            }
        }
        assert_eq!(
            std::fs::read_to_string(out.join("secret.txt")).unwrap(),
            "secret"
        );
        assert_eq!(tree(&out), ["secret.txt"]);
        let stray = |p: &&String| p.as_str() == "x" || p.ends_with("/x") || p.contains("x%00");
        assert_eq!(tree(d.path()).iter().filter(stray).count(), 0);
        assert!(!Path::new("/etc/x").exists());
        assert_eq!(tree(&root), ["dangling.txt", "link.txt", "out"]);
    }

    /// The rename at the end never follows a symlink planted at the name
    /// after the checks: the link is replaced, its target untouched.
    #[test]
    fn the_final_rename_replaces_a_link_not_its_target() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("secret"), "s").unwrap();
        let root = dir.path().join("s");
        std::fs::create_dir(&root).unwrap();
        std::fs::write(root.join("tmp"), "new").unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret"), root.join("name")).unwrap();
        let fd =
            rustix::fs::open(&root, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty()).unwrap();
        assert_eq!(
            format!(
                "{:?}",
                commit(fd.as_fd(), "tmp", "name", false).unwrap_err()
            ),
            "Exists"
        );
        commit(fd.as_fd(), "tmp", "name", true).unwrap();
        assert_eq!(std::fs::read_to_string(root.join("name")).unwrap(), "new");
        assert!(
            std::fs::symlink_metadata(root.join("name"))
                .unwrap()
                .is_file()
        );
        assert_eq!(
            std::fs::read_to_string(dir.path().join("secret")).unwrap(),
            "s"
        );
    }

    #[tokio::test]
    async fn quota_refusals_write_nothing() {
        let (_d, ws, _out) = setup().await;
        let small = |overwrite| WriteOptions {
            overwrite,
            max_folder_bytes: 10,
        };
        ws.upload("a.txt", vec![b'a'; 6], small(false))
            .await
            .unwrap();
        assert_eq!(
            err(ws.upload("new/b.txt", vec![b'b'; 5], small(false)).await),
            "Quota { used: 6, size: 5, max: 10 }"
        );
        assert_eq!(tree(ws.root()), ["a.txt"]);
        // Replacing a file counts the new size instead of the old one.
        ws.upload("a.txt", vec![b'c'; 10], small(true))
            .await
            .unwrap();
        assert_eq!(
            err(ws.upload("a.txt", vec![b'c'; 11], small(true)).await),
            "Quota { used: 10, size: 11, max: 10 }"
        );
        assert_eq!(
            std::fs::read(ws.root().join("a.txt")).unwrap(),
            vec![b'c'; 10]
        );
    }

    /// A recorded upload is not reported as the code's change; folders and
    /// files belong to the folder's owner.
    #[tokio::test]
    async fn recorded_uploads_are_not_reported_as_changes() {
        use std::os::unix::fs::MetadataExt;
        let (_d, ws, _out) = setup().await;
        let mut snap = ws.snapshot().await;
        let w = ws.upload("d/e/f.txt", b"f".to_vec(), ROOMY).await.unwrap();
        snap.record(&w);
        assert!(ws.refresh(&mut snap).await.is_empty());
        let w = ws.upload("g.txt", b"g".to_vec(), ROOMY).await.unwrap();
        snap.record(&w);
        assert!(ws.refresh(&mut snap).await.is_empty());
        std::fs::write(ws.root().join("g.txt"), "gg").unwrap();
        let changed = ws.refresh(&mut snap).await;
        assert_eq!(changed.len(), 1);
        assert_eq!(changed[0].0.path, "g.txt");
        if !nix::unistd::Uid::effective().is_root() {
            return;
        }
        std::os::unix::fs::chown(ws.root(), Some(4242), Some(4343)).unwrap();
        ws.upload("h/i.txt", b"i".to_vec(), ROOMY).await.unwrap();
        for p in ["h", "h/i.txt"] {
            let meta = std::fs::symlink_metadata(ws.root().join(p)).unwrap();
            assert_eq!((meta.uid(), meta.gid()), (4242, 4343), "{p}");
        }
    }
}
