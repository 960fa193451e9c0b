//! What isolation this host offers, found once at start-up.
//!
//! The server runs its own binary as `__kernel-sandbox --probe UID`; that
//! process tries each layer on itself (namespaces, becoming `UID`, then each
//! family of Landlock rules), prints what worked as JSON, and exits. The
//! server itself is never restricted.

use serde::{Deserialize, Serialize};

use super::WRAPPER_ARG;

/// How much of a Landlock family the running Linux enforces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LandlockSupport {
    Full,
    Partial,
    None,
}

/// The layers a kernel can get on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    /// File rules (ABI 1–5).
    pub landlock_fs: LandlockSupport,
    /// TCP connect rules (ABI 4).
    pub landlock_net: bool,
    /// Signal and abstract-socket scopes (ABI 6).
    pub landlock_scopes: bool,
    /// A private mount namespace (private /tmp, /proc, masks); without
    /// root, inside an unprivileged user namespace.
    pub mount_ns: bool,
    /// A PID namespace per kernel.
    pub pid_ns: bool,
    /// The probe could become the test uid (the server is root with
    /// CAP_SETUID); false when no uid was asked for.
    pub setuid: bool,
}

impl Capabilities {
    /// Nothing at all (the probe could not run).
    pub const NONE: Self = Self {
        landlock_fs: LandlockSupport::None,
        landlock_net: false,
        landlock_scopes: false,
        mount_ns: false,
        pid_ns: false,
        setuid: false,
    };
}

/// Runs the probe; `uid` is a uid the kernels would run as, if any.
pub fn run(exe: &std::path::Path, uid: Option<u32>) -> Capabilities {
    let mut cmd = std::process::Command::new(exe);
    cmd.args([WRAPPER_ARG, "--probe"]);
    if let Some(u) = uid {
        cmd.arg(u.to_string());
    }
    let out = cmd
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output();
    out.ok()
        .and_then(|o| serde_json::from_slice(&o.stdout).ok())
        .unwrap_or(Capabilities::NONE)
}

/// The probe side (`__kernel-sandbox --probe [UID]`): tries everything on
/// itself, prints the result, and the process then exits.
pub fn probe_main(uid: Option<u32>) {
    use nix::sched::{CloneFlags, unshare};
    // First, in our own namespaces: can the server start kernels in PID
    // namespaces? (Then, without root, the way the wrapper would go.)
    let pid_ns = unshare(CloneFlags::CLONE_NEWPID).is_ok();
    let root = nix::unistd::Uid::effective().is_root();
    let mount_ns = (root || super::mounts::own_user_namespace().is_ok())
        && unshare(CloneFlags::CLONE_NEWNS).is_ok()
        && nix::mount::mount(
            None::<&str>,
            "/",
            None::<&str>,
            nix::mount::MsFlags::MS_REC | nix::mount::MsFlags::MS_PRIVATE,
            None::<&str>,
        )
        .is_ok();
    let setuid = uid
        .is_some_and(|u| super::users::become_user(super::KernelUser { uid: u, gid: u }).is_ok());
    let families = super::rules::probe_families();
    let support = |s: &landlock::RulesetStatus| match s {
        landlock::RulesetStatus::FullyEnforced => LandlockSupport::Full,
        landlock::RulesetStatus::PartiallyEnforced => LandlockSupport::Partial,
        landlock::RulesetStatus::NotEnforced => LandlockSupport::None,
    };
    let caps = Capabilities {
        landlock_fs: support(&families[0].1),
        landlock_net: support(&families[1].1) == LandlockSupport::Full,
        landlock_scopes: support(&families[2].1) == LandlockSupport::Full,
        mount_ns,
        pid_ns,
        setuid,
    };
    use std::io::Write;
    let _ = writeln!(
        std::io::stdout(),
        "{}",
        serde_json::to_string(&caps).unwrap_or_default()
    );
}
