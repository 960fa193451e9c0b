//! The kernel's private view of the file system (a mount namespace).
//!
//! Made by the wrapper, as root, before it drops privileges:
//! - a fresh `/proc` when the wrapper is PID 1 of its own PID namespace, so
//!   the kernel sees only its own processes;
//! - the kernel's private folder bound over `/tmp`, and an empty tmpfs over
//!   `/dev/shm` (nothing is shared with other kernels through either; kept
//!   folders beneath either, such as runtime folders under TMPDIR=/dev/shm,
//!   are bound back as beneath a mask);
//! - each folder of `masks` (private folders such as `/root` on the way to
//!   the Python installation or the session folder) replaced by an empty
//!   tmpfs, into which the kept folders beneath it are bound back at their
//!   old paths. The kernel can then reach its interpreter and its folder,
//!   and nothing else that was there;
//! - host folders shared with `--mount` ([`super::host_folders`]): an empty
//!   tmpfs over `/mnt`, and each folder bound (not recursively: mounts
//!   beneath it are not shared) at `/mnt/NAME`, then remounted read-only
//!   unless shared `:rw`, and `nosuid`, `nodev` either way.
//!
//! Kept and shared folders are opened before anything is covered and bound
//! from those open descriptors, so covering a parent cannot hide them.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use nix::mount::{MsFlags, mount};

use super::host_folders::{HostMount, MOUNT_BASE};
use super::{SandboxError, SandboxSpec};

/// What [`private_view`] managed to set up.
pub(super) struct View {
    /// `/tmp` is the kernel's own (writable) folder.
    pub tmp: bool,
}

/// Enters a new user namespace in which we keep our uid and gid (mapped to
/// themselves) and hold, until we `exec`, the capabilities to make mount
/// and network namespaces: how a server that is not root still gives its
/// kernels a private `/tmp`. Needs a single-threaded process (the wrapper
/// is one) and a Linux that allows unprivileged user namespaces.
pub(super) fn own_user_namespace() -> std::io::Result<()> {
    let (uid, gid) = (nix::unistd::getuid(), nix::unistd::getgid());
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWUSER).map_err(io)?;
    std::fs::write("/proc/self/setgroups", "deny")?;
    std::fs::write("/proc/self/uid_map", format!("{uid} {uid} 1"))?;
    std::fs::write("/proc/self/gid_map", format!("{gid} {gid} 1"))
}

fn io(e: nix::Error) -> std::io::Error {
    std::io::Error::from_raw_os_error(e as i32)
}

/// The kernel's private view of the file system. The folders made for it
/// (mount points on masking tmpfs, kept paths) must be searchable by the
/// kernel's uid whatever umask the server was started with (under `umask
/// 077` they would be root's alone and no kernel could reach Python), so
/// they are made under umask 022, and the caller's umask is restored.
pub(super) fn private_view(spec: &SandboxSpec, pid1: bool) -> Result<View, SandboxError> {
    use nix::sys::stat::{Mode, umask};
    let old = umask(Mode::from_bits_truncate(0o022));
    let view = make_private_view(spec, pid1);
    umask(old);
    view
}

fn make_private_view(spec: &SandboxSpec, pid1: bool) -> Result<View, SandboxError> {
    let fail = |p: &Path, e: std::io::Error| SandboxError::Mask(p.to_path_buf(), e);
    let root = Path::new("/");
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).map_err(|e| fail(root, io(e)))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| fail(root, io(e)))?;
    if pid1 {
        // Best effort: without it /proc still shows the host's processes,
        // but none of them can be signalled from this namespace.
        let _ = mount(
            Some("proc"),
            "/proc",
            Some("proc"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            None::<&str>,
        );
    }

    let mut covered: Vec<&Path> = spec.masks.iter().map(PathBuf::as_path).collect();
    if spec.private_tmp.is_some() {
        covered.push(Path::new("/tmp"));
    }
    // Covered by an empty tmpfs below: what the kernel keeps there (a
    // runtime or data folder under TMPDIR=/dev/shm) is bound back too.
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        covered.push(shm);
    }
    let base = Path::new(MOUNT_BASE);
    let cover_base = spec.host_mounts.iter().any(|m| m.target.starts_with(base));
    if cover_base {
        covered.push(base);
    }
    // Shared folders, opened (as root) before anything is covered.
    let shared: Vec<(&HostMount, File)> = spec
        .host_mounts
        .iter()
        .map(|m| {
            File::open(&m.host)
                .map(|f| (m, f))
                .map_err(|e| SandboxError::HostFolder(m.host.clone(), e))
        })
        .collect::<Result<_, _>>()?;
    // Hold every kept folder (and the private /tmp) open before anything is covered.
    let mut kept: Vec<(PathBuf, File)> = spec
        .read_only
        .iter()
        .chain(&spec.read_write)
        .filter(|p| covered.iter().any(|c| p.starts_with(c) && p != c))
        .filter_map(|p| File::open(p).ok().map(|f| (p.clone(), f)))
        .collect();
    kept.sort_by_key(|(p, _)| p.components().count());
    kept.dedup_by(|a, b| a.0 == b.0);
    let tmp = match &spec.private_tmp {
        Some(dir) => Some(File::open(dir).map_err(|e| fail(dir, e))?),
        None => None,
    };

    for m in &spec.masks {
        mount(
            Some("tmpfs"),
            m,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=0755,size=1m"),
        )
        .map_err(|e| fail(m, io(e)))?;
    }
    if cover_base {
        mount(
            Some("tmpfs"),
            base,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=0755,size=1m"),
        )
        .map_err(|e| fail(base, io(e)))?;
    }
    if let Some(t) = &tmp {
        bind_fd(t, Path::new("/tmp")).map_err(|e| fail(Path::new("/tmp"), e))?;
    }
    if shm.is_dir() {
        let _ = mount(
            Some("tmpfs"),
            shm,
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some(format!("mode=1777,size={}", spec.shm_bytes.max(1 << 20)).as_str()),
        );
    }
    for (path, file) in &kept {
        let is_dir = file.metadata().map(|m| m.is_dir()).unwrap_or(false);
        if is_dir {
            mount_point_dirs(path).map_err(|e| fail(path, e))?;
        } else {
            if let Some(parent) = path.parent() {
                mount_point_dirs(parent).map_err(|e| fail(path, e))?;
            }
            File::create(path).map_err(|e| fail(path, e))?;
        }
        bind_fd(file, path).map_err(|e| fail(path, e))?;
    }
    for (m, file) in &shared {
        share(m, file).map_err(|e| SandboxError::HostFolder(m.host.clone(), e))?;
    }
    // The working folder the server gave us is the host's, now covered:
    // enter it again by its path, in this view, so that `..` from it is its
    // parent here (what a forked kernel, which enters it after the view is
    // made, sees too). A working folder the view lacks is kept as it was.
    if let Ok(cwd) = std::env::current_dir() {
        let _ = std::env::set_current_dir(cwd);
    }
    Ok(View { tmp: tmp.is_some() })
}

/// The folders on the way to a kept path, made in the view's covering
/// file systems: 0711, so the kernel passes through them and lists none of
/// them (as it cannot list the host's 0711 data folder they stand for).
fn mount_point_dirs(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o711)
        .create(path)
}

/// Binds the shared folder open as `source` at its target, alone (not
/// recursively), then sets the bind's flags: read-only unless shared
/// `:rw`, no set-uid programs, no devices.
fn share(m: &HostMount, source: &File) -> std::io::Result<()> {
    std::fs::create_dir_all(&m.target)?;
    let from = format!("/proc/self/fd/{}", source.as_raw_fd());
    mount(
        Some(from.as_str()),
        &m.target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(io)?;
    let mut flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    if !m.writable {
        flags |= MsFlags::MS_RDONLY;
    }
    mount(None::<&str>, &m.target, None::<&str>, flags, None::<&str>).map_err(io)
}

/// Binds the folder or file open as `source` at `target`.
fn bind_fd(source: &File, target: &Path) -> std::io::Result<()> {
    let from = format!("/proc/self/fd/{}", source.as_raw_fd());
    mount(
        Some(from.as_str()),
        target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(io)
}
