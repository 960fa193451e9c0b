//! Paths inside a session folder: checking what a client sends, and opening
//! files without ever leaving the folder.
//!
//! A client's text becomes a [`RelPath`] through [`parse`] only (no `..`,
//! `.`, absolute paths, NUL bytes, bad percent-encoding); nothing in the
//! server joins client text onto a path.
//!
//! Every file the server opens in a session folder, for a client or because
//! the kernel touched it, is opened by [`open`]: relative to a directory
//! descriptor of the folder, resolved and opened in one step by `openat2`
//! with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS`. There
//! is no check by name followed by an open by name, so a kernel swapping a
//! name between a file and a symlink while the server looks at it gains
//! nothing: whatever the name is at the instant of the open is what is
//! opened, and it is never reached through a symlink. Callers check the
//! opened descriptor (`fstat`), never the name.
//!
//! **Symlinks are never followed**, wherever they point: a path whose last
//! or any intermediate component is a symlink is refused
//! ([`PathError::Symlink`]), one pointing inside the folder included. That
//! makes one rule for every kernel version (the fallback below cannot
//! follow links safely), and it matches what listings show: folder walks
//! skip symlinks, so every file a client can read is a file it can list.
//! Nothing is ever written or created through a symlink either.
//!
//! Where `openat2` is missing (Linux < 5.6, or a seccomp filter that denies
//! it), [`open`] walks the path one component at a time with
//! `openat(O_NOFOLLOW | O_DIRECTORY)` from the folder's descriptor, and opens
//! the last component with `O_NOFOLLOW`: the same rule, a few more system
//! calls.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Component, Path};
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::fs::{Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

#[derive(Debug, Clone, Copy, thiserror::Error, PartialEq, Eq)]
pub enum PathError {
    #[error("the path is empty")]
    Empty,
    #[error("the path contains a NUL byte")]
    Nul,
    #[error("the path is not valid percent-encoded UTF-8")]
    Encoding,
    #[error("the path must be relative to the session folder")]
    Absolute,
    #[error("the path may not contain '..' or '.' segments")]
    Traversal,
    #[error("the path leads outside the session folder")]
    Escapes,
    #[error("the path goes through a symbolic link; symbolic links are not followed")]
    Symlink,
    #[error("no such file in this session")]
    NotFound,
}

/// A checked path relative to a session folder: `/`-separated, non-empty,
/// every segment a plain name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelPath(String);

impl RelPath {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Turns `rel` (as found in a `kernel://` URI, possibly percent-encoded)
/// into a [`RelPath`], or refuses. Empty segments (`a//b`) are dropped.
pub fn parse(rel: &str) -> Result<RelPath, PathError> {
    let decoded = percent_encoding::percent_decode_str(rel)
        .decode_utf8()
        .map_err(|_| PathError::Encoding)?;
    if decoded.is_empty() {
        return Err(PathError::Empty);
    }
    if decoded.contains('\0') {
        return Err(PathError::Nul);
    }
    if decoded.starts_with('/') || decoded.starts_with('\\') {
        return Err(PathError::Absolute);
    }
    let mut parts = Vec::new();
    for part in decoded.split('/') {
        if part.is_empty() {
            continue;
        }
        if part == ".." || part == "." {
            return Err(PathError::Traversal);
        }
        match Path::new(part).components().next() {
            Some(Component::Normal(_)) => parts.push(part),
            _ => return Err(PathError::Traversal),
        }
    }
    if parts.is_empty() {
        return Err(PathError::Empty);
    }
    Ok(RelPath(parts.join("/")))
}

/// What an error from [`open`] means for a client.
pub(crate) fn error_of(e: Errno) -> Result<PathError, Errno> {
    match e {
        Errno::NOENT | Errno::NOTDIR => Ok(PathError::NotFound),
        Errno::LOOP => Ok(PathError::Symlink),
        Errno::XDEV => Ok(PathError::Escapes),
        other => Err(other),
    }
}

/// Whether `openat2` may be tried (cleared at the first `ENOSYS`).
static OPENAT2: AtomicBool = AtomicBool::new(true);

/// Opens `rel` (`/`-separated, relative) beneath the folder `root` with
/// `flags` (and `mode` when creating), never following a symlink and never
/// leaving the folder; see the module doc. `O_NOFOLLOW` and `O_CLOEXEC` are
/// always added. A symlink anywhere on the path is `ELOOP` (with `O_PATH`, a
/// last component that is a symlink is opened as the link itself), a path
/// that would leave the folder `EXDEV`, and `..`, `.` or empty segments
/// `EINVAL`.
pub(crate) fn open(
    root: BorrowedFd<'_>,
    rel: &str,
    flags: OFlags,
    mode: Mode,
) -> rustix::io::Result<OwnedFd> {
    if rel.is_empty()
        || rel.starts_with('/')
        || rel
            .split('/')
            .any(|s| s.is_empty() || s == "." || s == "..")
    {
        return Err(Errno::INVAL);
    }
    let flags = flags | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    if OPENAT2.load(Ordering::Relaxed) {
        let resolve =
            ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
        // EAGAIN: a rename during the lookup (not expected without `..`);
        // after a few tries the walk answers.
        for _ in 0..8 {
            match rustix::fs::openat2(root, rel, flags, mode, resolve) {
                Err(Errno::AGAIN) | Err(Errno::INTR) => continue,
                Err(Errno::NOSYS) => {
                    tracing::debug!("openat2 unavailable; paths are walked one folder at a time");
                    OPENAT2.store(false, Ordering::Relaxed);
                    break;
                }
                // Some seccomp filters answer EPERM for system calls they do
                // not know; the walk gives the real answer.
                Err(Errno::PERM) => break,
                other => return other,
            }
        }
    }
    open_by_walking(root, rel, flags, mode)
}

/// [`open`] without `openat2`: one `openat` per component, each refusing
/// symlinks, each relative to the folder opened just before.
fn open_by_walking(
    root: BorrowedFd<'_>,
    rel: &str,
    flags: OFlags,
    mode: Mode,
) -> rustix::io::Result<OwnedFd> {
    let (dirs, last) = match rel.rsplit_once('/') {
        Some((dirs, last)) => (Some(dirs), last),
        None => (None, rel),
    };
    let mut at: Option<OwnedFd> = None;
    for name in dirs.into_iter().flat_map(|d| d.split('/')) {
        let base = at.as_ref().map_or(root, |f| f.as_fd());
        let next = rustix::fs::openat(
            base,
            name,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| {
            // A symlink here is ENOTDIR (O_DIRECTORY is checked first); say
            // ELOOP, as openat2 does. Only the error code depends on this.
            let link = || {
                rustix::fs::statat(base, name, rustix::fs::AtFlags::SYMLINK_NOFOLLOW)
                    .is_ok_and(|st| rustix::fs::FileType::from_raw_mode(st.st_mode).is_symlink())
            };
            if e == Errno::NOTDIR && link() {
                Errno::LOOP
            } else {
                e
            }
        })?;
        at = Some(next);
    }
    let base = at.as_ref().map_or(root, |f| f.as_fd());
    rustix::fs::openat(base, last, flags | OFlags::NOFOLLOW | OFlags::CLOEXEC, mode)
}

/// The type, size and times of `rel` itself (a symlink is reported as one),
/// when no component before it is a symlink.
pub(crate) fn stat(root: BorrowedFd<'_>, rel: &str) -> rustix::io::Result<rustix::fs::Stat> {
    use rustix::fs::AtFlags;
    match rel.rsplit_once('/') {
        None if !rel.is_empty() && rel != "." && rel != ".." => {
            rustix::fs::statat(root, rel, AtFlags::SYMLINK_NOFOLLOW)
        }
        None => Err(Errno::INVAL),
        Some((dir, name)) => {
            if name.is_empty() || name == "." || name == ".." {
                return Err(Errno::INVAL);
            }
            let dir = open(root, dir, OFlags::PATH | OFlags::DIRECTORY, Mode::empty())?;
            rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn setup() -> (tempfile::TempDir, PathBuf, OwnedFd) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("session");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::write(root.join("a.txt"), "a").unwrap();
        std::fs::write(root.join("sub/b.csv"), "b").unwrap();
        std::fs::write(dir.path().join("secret"), "s").unwrap();
        let fd =
            rustix::fs::open(&root, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty()).unwrap();
        (dir, root, fd)
    }

    fn parsed(rel: &str) -> String {
        parse(rel).unwrap().as_str().to_string()
    }

    #[test]
    fn plain_and_nested_paths_parse() {
        assert_eq!(parsed("a.txt"), "a.txt");
        assert_eq!(parsed("sub/b.csv"), "sub/b.csv");
        assert_eq!(parsed("sub%2Fb.csv"), "sub/b.csv");
        assert_eq!(parsed("sub//b.csv"), "sub/b.csv");
        assert_eq!(parsed("my%20data.csv"), "my data.csv");
    }

    #[test]
    fn traversal_is_refused() {
        assert_eq!(parse("../secret"), Err(PathError::Traversal));
        assert_eq!(parse("sub/../../secret"), Err(PathError::Traversal));
        assert_eq!(parse("%2e%2e/secret"), Err(PathError::Traversal));
        assert_eq!(parse("%2E%2E%2Fsecret"), Err(PathError::Traversal));
        assert_eq!(parse("./a.txt"), Err(PathError::Traversal));
    }

    #[test]
    fn absolute_nul_and_bad_encoding_are_refused() {
        assert_eq!(parse("/etc/passwd"), Err(PathError::Absolute));
        assert_eq!(parse("%2Fetc%2Fpasswd"), Err(PathError::Absolute));
        assert_eq!(parse("a.txt%00"), Err(PathError::Nul));
        assert_eq!(parse("%ff"), Err(PathError::Encoding));
        assert_eq!(parse(""), Err(PathError::Empty));
    }

    /// Both ways of opening (openat2, and the walk used without it) give the
    /// same answers.
    fn opens(root: BorrowedFd<'_>, rel: &str) -> Vec<Result<String, PathError>> {
        let read = |fd: rustix::io::Result<OwnedFd>| match fd {
            Ok(fd) => Ok(std::io::read_to_string(std::fs::File::from(fd)).unwrap()),
            Err(e) => Err(error_of(e).unwrap()),
        };
        vec![
            read(open(root, rel, OFlags::RDONLY, Mode::empty())),
            read(open_by_walking(root, rel, OFlags::RDONLY, Mode::empty())),
        ]
    }

    fn both<T: Clone>(x: T) -> Vec<T> {
        vec![x.clone(), x]
    }

    #[test]
    fn files_open_beneath_the_folder() {
        let (_d, _root, fd) = setup();
        assert_eq!(opens(fd.as_fd(), "a.txt"), both(Ok("a".to_string())));
        assert_eq!(opens(fd.as_fd(), "sub/b.csv"), both(Ok("b".to_string())));
        assert_eq!(
            opens(fd.as_fd(), "missing.txt"),
            both(Err(PathError::NotFound))
        );
        assert_eq!(opens(fd.as_fd(), "a.txt/x"), both(Err(PathError::NotFound)));
        for bad in [
            "",
            "/etc/passwd",
            "../secret",
            "sub/../a.txt",
            "./a.txt",
            "a//b",
        ] {
            assert_eq!(
                open(fd.as_fd(), bad, OFlags::RDONLY, Mode::empty()).err(),
                Some(Errno::INVAL),
                "{bad}"
            );
        }
    }

    #[test]
    fn symlinks_are_never_followed() {
        let (d, root, fd) = setup();
        let link = |target: PathBuf, name: &str| {
            std::os::unix::fs::symlink(target, root.join(name)).unwrap()
        };
        link(d.path().join("secret"), "out");
        link("/etc".into(), "etc");
        link(d.path().into(), "up");
        link(root.join("a.txt"), "in_abs");
        link("a.txt".into(), "in_rel");
        link("sub".into(), "sub_link");
        for rel in [
            "out",
            "etc/passwd",
            "up/secret",
            "in_abs",
            "in_rel",
            "sub_link/b.csv",
        ] {
            assert_eq!(
                opens(fd.as_fd(), rel),
                both(Err(PathError::Symlink)),
                "{rel}"
            );
        }
        // Type and size of the link itself; a link on the way is refused.
        let st = stat(fd.as_fd(), "in_rel").unwrap();
        assert!(rustix::fs::FileType::from_raw_mode(st.st_mode).is_symlink());
        let st = stat(fd.as_fd(), "sub/b.csv").unwrap();
        assert!(rustix::fs::FileType::from_raw_mode(st.st_mode).is_file());
        assert_eq!(st.st_size, 1);
        assert!(stat(fd.as_fd(), "sub_link/b.csv").is_err());
        assert!(stat(fd.as_fd(), "up/secret").is_err());
    }

    /// A planted symlink at a name the server creates is never written
    /// through, dangling or not.
    #[test]
    fn creation_never_follows_a_planted_symlink() {
        let (d, root, fd) = setup();
        let victim = d.path().join("secret");
        std::os::unix::fs::symlink(&victim, root.join("figure_1.png")).unwrap();
        std::os::unix::fs::symlink(d.path().join("new"), root.join("figure_2.png")).unwrap();
        let create = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL;
        for name in ["figure_1.png", "figure_2.png"] {
            for r in [
                open(fd.as_fd(), name, create, Mode::from_raw_mode(0o644)),
                open_by_walking(fd.as_fd(), name, create, Mode::from_raw_mode(0o644)),
            ] {
                assert_eq!(r.err(), Some(Errno::EXIST), "{name}");
            }
        }
        // Without O_EXCL, O_NOFOLLOW alone still refuses.
        let trunc = OFlags::WRONLY | OFlags::CREATE | OFlags::TRUNC;
        assert_eq!(
            open(fd.as_fd(), "figure_1.png", trunc, Mode::empty()).err(),
            Some(Errno::LOOP)
        );
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "s");
        assert!(!d.path().join("new").exists());
    }
}
