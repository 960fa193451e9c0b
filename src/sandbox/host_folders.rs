//! Host folders shared with every kernel (`--mount HOST_DIR[:NAME][:rw]`).
//!
//! A shared folder is readable by every kernel of every session (and
//! writable with `:rw`), and nothing else is opened up. Where kernels get a
//! private mount namespace, the wrapper binds the folder at `/mnt/NAME`
//! (over an empty tmpfs on `/mnt`, from a descriptor opened before anything
//! is covered, so a folder under a hidden one such as `/root` works too);
//! a read-only share is then remounted `MS_RDONLY`, so even a kernel whose
//! uid may write the folder cannot, and the bind is not recursive, so
//! mounts beneath the folder are not shared. Landlock grants the target
//! read (or read-write) access. Without mount namespaces the folder appears
//! at its own path, and Landlock (with Unix permissions) is what keeps a
//! read-only share read-only.
//!
//! [`resolve`] decides, at start-up, where each folder appears and refuses
//! what kernels could not use or what would expose the server's own data:
//! a folder kernels of other uids may not read (or write, for `:rw`), a
//! folder holding the session folders or the kernels' runtime files, a
//! target over the Python installation.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::users::UidRange;

/// Where shared folders appear in kernels that have a mount namespace.
pub const MOUNT_BASE: &str = "/mnt";

/// What one `--mount` asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountRequest {
    pub host: PathBuf,
    /// A single path segment: the folder is `/mnt/NAME` in kernels.
    pub name: String,
    pub writable: bool,
}

/// A shared folder as the wrapper applies it and kernels see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostMount {
    /// The folder on the host (canonical).
    pub host: PathBuf,
    /// Where kernels find it: `/mnt/NAME`, or `host` without mount namespaces.
    pub target: PathBuf,
    pub writable: bool,
}

impl MountRequest {
    /// Parses `HOST_DIR[:NAME][:rw|:ro]`. NAME defaults to the folder's own
    /// name. Host paths containing `:` or `,` cannot be given.
    pub fn parse(text: &str) -> Result<Self, String> {
        let parts: Vec<&str> = text.split(':').collect();
        let (host, name, mode) = match parts[..] {
            [host] => (host, None, None),
            [host, m @ ("rw" | "ro")] => (host, None, Some(m)),
            [host, name] => (host, Some(name), None),
            [host, name, m @ ("rw" | "ro")] => (host, Some(name), Some(m)),
            [_, _, m] => return Err(format!("--mount {text:?}: {m:?} is neither rw nor ro")),
            _ => {
                return Err(format!(
                    "--mount {text:?}: expected HOST_DIR[:NAME][:rw] (host paths with ':' are not supported)"
                ));
            }
        };
        if host.is_empty() {
            return Err(format!("--mount {text:?}: no host folder"));
        }
        let host = PathBuf::from(host);
        let name = match name {
            Some(n) => n.to_string(),
            None => host
                .file_name()
                .and_then(|n| n.to_str())
                .ok_or_else(|| format!("--mount {text:?}: give a NAME (HOST_DIR:NAME)"))?
                .to_string(),
        };
        if !valid_name(&name) {
            return Err(format!(
                "--mount {text:?}: the name {name:?} must be 1-64 of A-Z a-z 0-9 . _ - and not \
                 start with '.'; give one as HOST_DIR:NAME"
            ));
        }
        Ok(Self {
            host,
            name,
            writable: mode == Some("rw"),
        })
    }
}

fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// How kernels run, as far as shared folders care.
#[derive(Debug, Clone, Copy)]
pub enum Kernels {
    /// `--no-sandbox`: kernels have the server's rights; nothing is checked.
    Unconfined,
    Confined {
        /// Kernels get a private mount namespace (shares are bound at `/mnt/NAME`).
        mount_ns: bool,
        /// The server is root: kernels run as these uids, not as the server's.
        uids: Option<UidRange>,
    },
}

/// Paths of the server that no share may expose or cover.
pub struct Protected<'a> {
    /// Parent of the session folders.
    pub data_dir: &'a Path,
    /// Kernels' connection files and sockets.
    pub runtime_dir: &'a Path,
    /// The Python installation.
    pub python_dirs: &'a [PathBuf],
}

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("--mount {0}: {1}")]
    Missing(PathBuf, std::io::Error),
    #[error("--mount {0}: not a folder")]
    NotAFolder(PathBuf),
    #[error("--mount: the name {0:?} is given twice")]
    DuplicateName(String),
    #[error(
        "--mount {path}: it holds {what} ({inner}); sharing it would let every kernel reach that. \
         Share a folder beside it instead"
    )]
    Exposes {
        path: PathBuf,
        what: &'static str,
        inner: PathBuf,
    },
    #[error(
        "--mount {path}: kernels would see it at {target}, which overlaps {inner}; give it another \
         NAME (HOST_DIR:NAME)"
    )]
    Covers {
        path: PathBuf,
        target: PathBuf,
        inner: PathBuf,
    },
    #[error(
        "--mount {path}: kernels run as unprivileged users (uids {first}-{last}), who may not \
         {access} it. Make it {chmod} (chmod {mode}), or share another folder"
    )]
    Permission {
        path: PathBuf,
        first: u32,
        last: u32,
        access: &'static str,
        chmod: &'static str,
        mode: &'static str,
    },
    #[error(
        "--mount {path}: kernels of another uid cannot reach it: {blocker} is not searchable by \
         others, and this host has no mount namespaces to bind it elsewhere. Share a folder \
         elsewhere, or make {blocker} searchable (chmod o+x)"
    )]
    Unreachable { path: PathBuf, blocker: PathBuf },
    #[error("--mount {path}: the server's user may not {access} it")]
    ServerAccess { path: PathBuf, access: &'static str },
}

/// Checks every request and decides where kernels find it; see the module doc.
pub fn resolve(
    requests: &[MountRequest],
    kernels: Kernels,
    protected: &Protected<'_>,
) -> Result<Vec<HostMount>, MountError> {
    let mut out: Vec<HostMount> = Vec::new();
    let mut names: Vec<&str> = Vec::new();
    for r in requests {
        if names.contains(&r.name.as_str()) {
            return Err(MountError::DuplicateName(r.name.clone()));
        }
        names.push(&r.name);
        let host =
            std::fs::canonicalize(&r.host).map_err(|e| MountError::Missing(r.host.clone(), e))?;
        let meta = std::fs::metadata(&host).map_err(|e| MountError::Missing(host.clone(), e))?;
        if !meta.is_dir() {
            return Err(MountError::NotAFolder(host));
        }
        let inner = [
            ("the session folders", protected.data_dir),
            ("the kernels' private files", protected.runtime_dir),
        ];
        for (what, p) in inner {
            let p = std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
            if p.starts_with(&host) || host.starts_with(&p) {
                return Err(MountError::Exposes {
                    path: host,
                    what,
                    inner: p,
                });
            }
        }
        let target = match kernels {
            Kernels::Confined { mount_ns: true, .. } if Path::new(MOUNT_BASE).is_dir() => {
                Path::new(MOUNT_BASE).join(&r.name)
            }
            _ => host.clone(),
        };
        let busy = protected
            .python_dirs
            .iter()
            .map(PathBuf::as_path)
            .chain([protected.data_dir, protected.runtime_dir]);
        for p in busy {
            if target.starts_with(p) || p.starts_with(&target) {
                return Err(MountError::Covers {
                    path: host,
                    target,
                    inner: p.to_path_buf(),
                });
            }
        }
        if let Kernels::Confined { mount_ns, uids, .. } = kernels {
            check_access(&host, &meta, r.writable, mount_ns, uids)?;
        }
        out.push(HostMount {
            host,
            target,
            writable: r.writable,
        });
    }
    Ok(out)
}

/// Whether kernels can use the folder: its own permissions for their uids,
/// and, where it is not bound elsewhere, the folders on the way to it.
fn check_access(
    host: &Path,
    meta: &std::fs::Metadata,
    writable: bool,
    mount_ns: bool,
    uids: Option<UidRange>,
) -> Result<(), MountError> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let Some(uids) = uids else {
        // Kernels run as the server's user.
        use nix::unistd::{AccessFlags, access};
        let mut flags = AccessFlags::R_OK | AccessFlags::X_OK;
        if writable {
            flags |= AccessFlags::W_OK;
        }
        return access(host, flags).map_err(|_| MountError::ServerAccess {
            path: host.to_path_buf(),
            access: if writable { "write" } else { "read" },
        });
    };
    let mode = meta.permissions().mode();
    let need = if writable { 0o7 } else { 0o5 };
    // A range of one uid may own the folder (or be its group); otherwise
    // kernels are "others" to it.
    let single = (uids.first == uids.last).then_some(uids.first);
    let bits = if single == Some(meta.uid()) {
        mode >> 6
    } else if single == Some(meta.gid()) {
        mode >> 3
    } else {
        mode
    };
    if bits & need != need {
        return Err(MountError::Permission {
            path: host.to_path_buf(),
            first: uids.first,
            last: uids.last,
            access: if writable { "write" } else { "read" },
            chmod: if writable {
                "writable by others"
            } else {
                "readable by others"
            },
            mode: if writable { "o+rwx" } else { "o+rx" },
        });
    }
    if !mount_ns && let Some(blocker) = super::plan::unsearchable_ancestor(host) {
        return Err(MountError::Unreachable {
            path: host.to_path_buf(),
            blocker,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(host: &str, name: &str, writable: bool) -> MountRequest {
        MountRequest {
            host: host.into(),
            name: name.into(),
            writable,
        }
    }

    #[test]
    fn requests_parse() {
        assert_eq!(
            MountRequest::parse("/home/me/data"),
            Ok(req("/home/me/data", "data", false))
        );
        assert_eq!(
            MountRequest::parse("/home/me/data:rw"),
            Ok(req("/home/me/data", "data", true))
        );
        assert_eq!(
            MountRequest::parse("/srv/x:sales"),
            Ok(req("/srv/x", "sales", false))
        );
        assert_eq!(
            MountRequest::parse("/srv/x:sales:ro"),
            Ok(req("/srv/x", "sales", false))
        );
        assert_eq!(
            MountRequest::parse("/srv/x:out:rw"),
            Ok(req("/srv/x", "out", true))
        );
        for bad in [
            "",
            ":x",
            "/",
            "/srv/x:..",
            "/srv/x:a/b",
            "/srv/x:.hidden",
            "/srv/My Data",
            "/srv/x:n:rx",
            "/a:b:c:d",
        ] {
            assert!(MountRequest::parse(bad).is_err(), "{bad}");
        }
        assert!(MountRequest::parse("/srv/My Data:mydata").is_ok());
    }

    fn confined(mount_ns: bool, uids: Option<UidRange>) -> Kernels {
        Kernels::Confined { mount_ns, uids }
    }

    #[test]
    fn shares_never_expose_or_cover_the_servers_folders() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for sub in ["data/sessions", "run", "share", "py"] {
            std::fs::create_dir_all(d.join(sub)).unwrap();
            std::fs::set_permissions(d.join(sub), std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        std::fs::write(d.join("file"), "").unwrap();
        let py = vec![d.join("py")];
        let protected = Protected {
            data_dir: &d.join("data/sessions"),
            runtime_dir: &d.join("run"),
            python_dirs: &py,
        };
        let ok = resolve(
            &[req(d.join("share").to_str().unwrap(), "share", false)],
            Kernels::Unconfined,
            &protected,
        )
        .unwrap();
        assert_eq!(
            ok[0].target,
            std::fs::canonicalize(d.join("share")).unwrap()
        );
        let err = |host: PathBuf, kernels| {
            resolve(
                &[req(host.to_str().unwrap(), "n", false)],
                kernels,
                &protected,
            )
            .unwrap_err()
            .to_string()
        };
        for exposing in [
            d.to_path_buf(),
            d.join("data"),
            d.join("data/sessions"),
            d.join("run"),
        ] {
            assert!(
                err(exposing.clone(), Kernels::Unconfined).contains("it holds"),
                "{exposing:?}"
            );
        }
        // Without mount namespaces the target is the host path itself: the
        // Python installation cannot be shared writable that way.
        assert!(err(d.join("py"), confined(false, None)).contains("overlaps"));
        assert!(err(d.join("file"), Kernels::Unconfined).contains("not a folder"));
        assert!(err(d.join("missing"), Kernels::Unconfined).contains("missing"));
        let twice = resolve(
            &[
                req(d.join("share").to_str().unwrap(), "a", false),
                req(d.join("py").to_str().unwrap(), "a", false),
            ],
            Kernels::Unconfined,
            &protected,
        );
        assert!(twice.unwrap_err().to_string().contains("given twice"));
    }

    #[test]
    fn kernels_of_other_uids_must_be_able_to_use_the_share() {
        use std::os::unix::fs::PermissionsExt;
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("not root: other uids are not testable");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700)).unwrap();
        let share = d.join("share");
        std::fs::create_dir(&share).unwrap();
        let protected = Protected {
            data_dir: Path::new("/nonexistent/sessions"),
            runtime_dir: Path::new("/nonexistent/run"),
            python_dirs: &[],
        };
        let range = UidRange::parse("60000-60999").ok();
        let try_with = |mode: u32, writable: bool, mount_ns: bool, uids| {
            std::fs::set_permissions(&share, std::fs::Permissions::from_mode(mode)).unwrap();
            resolve(
                &[req(share.to_str().unwrap(), "share", writable)],
                confined(mount_ns, uids),
                &protected,
            )
            .map_err(|e| e.to_string())
        };
        let msg = try_with(0o700, false, true, range).unwrap_err();
        assert!(msg.contains("o+rx"), "{msg}");
        let ok = try_with(0o755, false, true, range).unwrap();
        assert_eq!(ok[0].target.parent(), Some(Path::new(MOUNT_BASE)));
        let msg = try_with(0o755, true, true, range).unwrap_err();
        assert!(msg.contains("o+rwx"), "{msg}");
        assert!(try_with(0o777, true, true, range).is_ok());
        // The folder under a 0700 one is reachable only by a bind.
        let msg = try_with(0o755, false, false, range).unwrap_err();
        assert!(msg.contains("not searchable"), "{msg}");
        // One uid that owns the folder needs no bits for others.
        std::os::unix::fs::chown(&share, Some(60000), None).unwrap();
        assert!(try_with(0o700, true, true, UidRange::parse("60000").ok()).is_ok());
        // The server's own uid: whatever the server may do.
        assert!(try_with(0o700, true, true, None).is_ok());
    }
}
