//! Which paths in a session folder changed since the last look (inotify).
//!
//! After every call the server must tell which files the code created or
//! changed. Walking the folder costs time in proportion to the files in it;
//! with inotify the kernel keeps a list of what was touched, and a call that
//! wrote nothing costs one `read` that returns `EAGAIN`. The queue is drained
//! synchronously when asked, so every write that finished before the question
//! is in the answer (no background thread, no race with the reply).
//!
//! Anything the incremental view cannot follow exactly (a directory created,
//! moved or removed, a queue overflow, a lost watch) answers `Everything`, and
//! the caller walks the folder as before; the walk re-adds the watches. If
//! inotify is unavailable (no instances or watches left), the workspace
//! simply walks every time.
//!
//! Watches are added on the folders' descriptors (through
//! `/proc/self/fd/N`), the same descriptors a walk reads, never on a path
//! the kernel could meanwhile have turned into a symlink. Without `/proc`,
//! no watch can be added and every look walks.
//!
//! Not seen: a file changed only through a shared memory mapping (`mmap`)
//! and never closed after writing; inotify reports no event for that. It is
//! reported once anything else touches it, or the folder is walked.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsRawFd, BorrowedFd};

use nix::errno::Errno;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};

/// Beyond this many changed paths a walk is as cheap as stat-ing each.
const MAX_PATHS: usize = 4096;

/// What changed since the previous [`Watcher::drain`].
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Changed {
    /// Nothing under the folder was written, created, moved or removed.
    Nothing,
    /// These files (relative paths) may have changed.
    Paths(HashSet<String>),
    /// Walk the folder.
    Everything,
}

#[derive(Debug)]
pub(crate) struct Watcher {
    fd: Inotify,
    /// Watched directories, relative to the root (`""` is the root).
    dirs: HashMap<WatchDescriptor, String>,
}

fn mask() -> AddWatchFlags {
    AddWatchFlags::IN_CREATE
        | AddWatchFlags::IN_MODIFY
        | AddWatchFlags::IN_CLOSE_WRITE
        | AddWatchFlags::IN_ATTRIB
        | AddWatchFlags::IN_DELETE
        | AddWatchFlags::IN_MOVED_FROM
        | AddWatchFlags::IN_MOVED_TO
        | AddWatchFlags::IN_DELETE_SELF
        | AddWatchFlags::IN_MOVE_SELF
        | AddWatchFlags::IN_ONLYDIR
}

impl Watcher {
    /// A watcher on the folder `root` alone; [`Watcher::watch_dir`] adds
    /// subfolders.
    pub(crate) fn new(root: BorrowedFd<'_>) -> Option<Self> {
        let fd = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
            .inspect_err(|e| tracing::debug!("inotify unavailable, folders are walked: {e}"))
            .ok()?;
        let mut w = Self {
            fd,
            dirs: HashMap::new(),
        };
        w.watch_dir(root, "").ok()?;
        Some(w)
    }

    /// Watches the open folder `dir`, which is `rel` below the root
    /// (idempotent).
    pub(crate) fn watch_dir(&mut self, dir: BorrowedFd<'_>, rel: &str) -> nix::Result<()> {
        // The magic link names exactly the open folder; following it is
        // the point (so no IN_DONT_FOLLOW).
        let path = format!("/proc/self/fd/{}", dir.as_raw_fd());
        let wd = self.fd.add_watch(path.as_str(), mask())?;
        self.dirs.insert(wd, rel.to_string());
        Ok(())
    }

    /// Everything that happened since the previous call, read without waiting.
    pub(crate) fn drain(&mut self) -> Changed {
        let mut paths = HashSet::new();
        let mut everything = false;
        loop {
            let events = match self.fd.read_events() {
                Ok(events) => events,
                Err(Errno::EAGAIN) => break,
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    tracing::debug!("inotify read failed: {e}");
                    return Changed::Everything;
                }
            };
            for ev in events {
                if ev.mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                    everything = true;
                    continue;
                }
                if ev.mask.contains(AddWatchFlags::IN_IGNORED) {
                    // The directory is gone (or moved away): forget the watch.
                    self.dirs.remove(&ev.wd);
                    everything = true;
                    continue;
                }
                if ev.mask.intersects(
                    AddWatchFlags::IN_ISDIR
                        | AddWatchFlags::IN_DELETE_SELF
                        | AddWatchFlags::IN_MOVE_SELF,
                ) {
                    // The tree's shape changed; a walk sees it and re-watches.
                    everything = true;
                    continue;
                }
                let (Some(dir), Some(name)) = (self.dirs.get(&ev.wd), &ev.name) else {
                    everything = true;
                    continue;
                };
                if everything || paths.len() >= MAX_PATHS {
                    everything = true;
                    continue;
                }
                let Some(name) = name.to_str() else {
                    continue; // not valid UTF-8: walks skip it too
                };
                paths.insert(if dir.is_empty() {
                    name.to_string()
                } else {
                    format!("{dir}/{name}")
                });
            }
        }
        if everything {
            Changed::Everything
        } else if paths.is_empty() {
            Changed::Nothing
        } else {
            Changed::Paths(paths)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn reports_written_files_and_tree_changes() {
        use rustix::fs::{Mode, OFlags};
        let open = |p: &std::path::Path| {
            rustix::fs::open(p, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty()).unwrap()
        };
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let mut w = Watcher::new(open(root).as_fd()).unwrap();
        assert_eq!(w.drain(), Changed::Nothing);

        std::fs::write(root.join("a.csv"), "1").unwrap();
        assert_eq!(
            w.drain(),
            Changed::Paths(HashSet::from(["a.csv".to_string()]))
        );
        assert_eq!(w.drain(), Changed::Nothing);

        std::fs::create_dir(root.join("sub")).unwrap();
        assert_eq!(w.drain(), Changed::Everything);
        w.watch_dir(open(&root.join("sub")).as_fd(), "sub").unwrap();
        std::fs::write(root.join("sub/b.png"), "png").unwrap();
        assert_eq!(
            w.drain(),
            Changed::Paths(HashSet::from(["sub/b.png".to_string()]))
        );

        std::fs::remove_file(root.join("sub/b.png")).unwrap();
        assert!(matches!(w.drain(), Changed::Paths(_)));
        std::fs::remove_dir(root.join("sub")).unwrap();
        assert_eq!(w.drain(), Changed::Everything);
    }
}
