//! Unprivileged Unix users for kernels.
//!
//! A root server runs each live session's kernel as a uid of its own, taken
//! from a configurable range (as judge and CI sandboxes do), with a group of
//! the same number and no supplementary groups. Unix permissions alone then
//! keep sessions apart (a session folder is mode 0700, owned by its uid), and
//! root-only files stay unreadable. uids that `/etc/passwd` names are skipped.
//! The allocator hands uids out in rotation, so a uid freed by one session is
//! the last to be given to another; a uid is only freed once every process
//! of its kernel is gone. A range of one uid is shared by every kernel (the
//! operator's choice: Landlock and namespaces then keep kernels apart, not
//! Unix permissions).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use nix::unistd::{Gid, Uid, setgroups, setresgid, setresuid};

use super::{KernelUser, SandboxError};

/// Switches the calling process to `user` for good (real, effective and
/// saved ids; no supplementary groups). Root's capabilities go with it.
pub(super) fn become_user(user: KernelUser) -> Result<(), SandboxError> {
    let fail = |e| SandboxError::User(user.uid, e);
    setgroups(&[]).map_err(fail)?;
    let gid = Gid::from_raw(user.gid);
    setresgid(gid, gid, gid).map_err(fail)?;
    let uid = Uid::from_raw(user.uid);
    setresuid(uid, uid, uid).map_err(fail)?;
    if Uid::effective() != uid || Uid::current() != uid {
        return Err(fail(nix::errno::Errno::EPERM));
    }
    Ok(())
}

/// Wrapper argument: `__kernel-sandbox --kill-uid UID`.
pub const KILL_UID_ARG: &str = "--kill-uid";

/// Kills every process of `uid` (run as its own short-lived process: it
/// becomes `uid`, then `kill(-1, SIGKILL)` reaches exactly that user's
/// processes). Used when a kernel had neither a PID namespace nor a cgroup
/// to take its leftovers with it, before its uid goes to another session.
pub fn kill_all_of(uid: u32) -> Result<(), SandboxError> {
    use nix::sys::signal::{Signal, kill};
    if uid == 0 {
        return Err(SandboxError::User(0, nix::errno::Errno::EPERM));
    }
    become_user(KernelUser { uid, gid: uid })?;
    for _ in 0..20 {
        // -1: every process we may signal, except ourselves.
        match kill(nix::unistd::Pid::from_raw(-1), Signal::SIGKILL) {
            Err(nix::errno::Errno::ESRCH) => return Ok(()),
            _ => std::thread::sleep(std::time::Duration::from_millis(5)),
        }
    }
    Ok(())
}

/// A range of uids, `first..=last`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UidRange {
    pub first: u32,
    pub last: u32,
}

impl UidRange {
    /// Parses `A-B` or a single uid `A`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = || format!("'{text}' is not a uid range such as 60000-60999");
        let (a, b) = match text.trim().split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (text.trim(), text.trim()),
        };
        let first: u32 = a.parse().map_err(|_| bad())?;
        let last: u32 = b.parse().map_err(|_| bad())?;
        if first == 0 || last < first || last >= u32::MAX - 1 {
            return Err(format!(
                "'{text}': a uid range must be non-empty, exclude 0 (root) and be ascending"
            ));
        }
        Ok(Self { first, last })
    }
}

/// Hands out uids of a range to kernels.
#[derive(Debug, Clone)]
pub struct UidPool {
    inner: Arc<Mutex<PoolState>>,
}

#[derive(Debug)]
struct PoolState {
    range: UidRange,
    /// uids with a live kernel.
    in_use: HashSet<u32>,
    /// uids of existing accounts, never handed out.
    reserved: HashSet<u32>,
    /// Where the rotation continues.
    next: u32,
}

/// One uid, owned until dropped.
#[derive(Debug)]
pub struct UidLease {
    uid: u32,
    /// `None` for a shared uid.
    pool: Option<Arc<Mutex<PoolState>>>,
}

impl UidLease {
    /// Whether no other kernel has this uid (a range of one is shared).
    pub fn is_exclusive(&self) -> bool {
        self.pool.is_some()
    }

    pub fn user(&self) -> KernelUser {
        KernelUser {
            uid: self.uid,
            gid: self.uid,
        }
    }
}

impl Drop for UidLease {
    fn drop(&mut self) {
        if let Some(pool) = &self.pool {
            let mut s = pool.lock().unwrap_or_else(|p| p.into_inner());
            s.in_use.remove(&self.uid);
        }
    }
}

impl UidPool {
    /// A pool over `range`, minus the uids `passwd` (the text of
    /// `/etc/passwd`) gives to accounts.
    pub fn new(range: UidRange, passwd: &str) -> Self {
        let reserved = passwd
            .lines()
            .filter_map(|l| l.split(':').nth(2)?.parse().ok())
            .collect();
        Self {
            inner: Arc::new(Mutex::new(PoolState {
                range,
                in_use: HashSet::new(),
                reserved,
                next: range.first,
            })),
        }
    }

    /// `preferred` if it is in the range and free (a session's folder is
    /// already owned by it), else the next free uid in rotation.
    pub fn acquire(&self, preferred: Option<u32>) -> Option<UidLease> {
        let mut s = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if s.range.first == s.range.last {
            return Some(UidLease {
                uid: s.range.first,
                pool: None,
            });
        }
        let free = |s: &PoolState, u: u32| {
            u >= s.range.first
                && u <= s.range.last
                && !s.in_use.contains(&u)
                && !s.reserved.contains(&u)
        };
        let uid = match preferred.filter(|&u| free(&s, u)) {
            Some(u) => u,
            None => {
                let len = u64::from(s.range.last - s.range.first) + 1;
                let start = s.next;
                let mut found = None;
                for i in 0..len {
                    let u = s.range.first + ((u64::from(start - s.range.first) + i) % len) as u32;
                    if free(&s, u) {
                        found = Some(u);
                        break;
                    }
                }
                let u = found?;
                s.next = if u == s.range.last {
                    s.range.first
                } else {
                    u + 1
                };
                u
            }
        };
        s.in_use.insert(uid);
        Some(UidLease {
            uid,
            pool: Some(self.inner.clone()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse() {
        assert_eq!(
            UidRange::parse("60000-60999"),
            Ok(UidRange {
                first: 60000,
                last: 60999
            })
        );
        assert_eq!(
            UidRange::parse("1234"),
            Ok(UidRange {
                first: 1234,
                last: 1234
            })
        );
        assert!(UidRange::parse("0-10").is_err());
        assert!(UidRange::parse("10-5").is_err());
        assert!(UidRange::parse("x").is_err());
    }

    #[test]
    fn leases_rotate_skip_accounts_and_come_back() {
        let pool = UidPool::new(
            UidRange::parse("100-103").unwrap(),
            "root:x:0:0::/root:/bin/sh\nbob:x:101:101::/home/bob:/bin/sh\n",
        );
        let a = pool.acquire(None).unwrap();
        let b = pool.acquire(None).unwrap();
        assert_eq!((a.uid, b.uid), (100, 102));
        drop(a);
        // Rotation: 103 before the freed 100.
        let c = pool.acquire(None).unwrap();
        assert_eq!(c.uid, 103);
        let d = pool.acquire(None).unwrap();
        assert_eq!(d.uid, 100);
        assert!(
            pool.acquire(None).is_none(),
            "101 is bob's, the rest in use"
        );
        drop(b);
        // A session whose folder is owned by 102 gets 102 back.
        let e = pool.acquire(Some(102)).unwrap();
        assert_eq!(e.uid, 102);
        drop(e);
        assert_eq!(pool.acquire(Some(101)).unwrap().uid, 102);
    }

    #[test]
    fn a_single_uid_is_shared() {
        let pool = UidPool::new(UidRange::parse("65534").unwrap(), "");
        let a = pool.acquire(None).unwrap();
        let b = pool.acquire(None).unwrap();
        assert_eq!((a.uid, b.uid), (65534, 65534));
    }
}
