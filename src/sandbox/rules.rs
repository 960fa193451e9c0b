//! The kernel's Landlock ruleset.
//!
//! - Files (ABI 1–5): read and execute beneath `read_only` and read-only
//!   shared host folders, everything beneath `read_write` and `:rw` shared
//!   folders, nothing elsewhere.
//! - Network (ABI 4): with [`NetworkPolicy::Web`], TCP `connect` only to the
//!   listed ports. Binding is left alone (a cell may serve on a port, but no
//!   other kernel can connect to it).
//! - Scopes (ABI 6): no signals to, and no connections to abstract Unix
//!   sockets of, processes outside the kernel's own domain (the server,
//!   other kernels, the host's daemons).
//!
//! Features the running Linux lacks are dropped (best effort); the start-up
//! probe has already told the log which ones.

use landlock::{
    ABI, Access, AccessFs, AccessNet, NetPort, Ruleset, RulesetAttr, RulesetCreatedAttr,
    RulesetError, RulesetStatus, Scope, path_beneath_rules,
};

use std::path::PathBuf;

use landlock::BitFlags;
use serde::{Deserialize, Serialize};

use super::{NetworkPolicy, SandboxError, SandboxSpec};

const FS_ABI: ABI = ABI::V5;
const SCOPE_ABI: ABI = ABI::V6;

fn err(e: RulesetError) -> SandboxError {
    SandboxError::Landlock(e.to_string())
}

/// The ruleset as data, for a kernel forked by the template (which applies
/// it itself with the raw system calls, masked to its Linux's ABI): the same
/// access rights as [`restrict`], from the same definitions.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LandlockPlan {
    pub handled_fs: u64,
    pub handled_net: u64,
    pub scoped: u64,
    /// (path, access for a folder, access for a file): a rule on a file may
    /// only name file rights, as `path_beneath_rules` does.
    pub paths: Vec<(PathBuf, u64, u64)>,
    pub ports: Vec<(u16, u64)>,
}

pub(super) fn plan(spec: &SandboxSpec) -> LandlockPlan {
    let rule = |p: &PathBuf, access: BitFlags<AccessFs>| {
        (
            p.clone(),
            access.bits(),
            (access & AccessFs::from_file(FS_ABI)).bits(),
        )
    };
    let mut paths: Vec<(PathBuf, u64, u64)> = spec
        .read_only
        .iter()
        .map(|p| rule(p, AccessFs::from_read(FS_ABI)))
        .chain(
            spec.read_write
                .iter()
                .map(|p| rule(p, AccessFs::from_all(FS_ABI))),
        )
        .collect();
    for m in &spec.host_mounts {
        let access = if m.writable {
            AccessFs::from_all(FS_ABI)
        } else {
            AccessFs::from_read(FS_ABI)
        };
        paths.push(rule(&m.target, access));
    }
    let connect: BitFlags<AccessNet> = AccessNet::ConnectTcp.into();
    let (handled_net, ports) = match &spec.network {
        NetworkPolicy::Web { ports } => (
            connect.bits(),
            ports.iter().map(|&p| (p, connect.bits())).collect(),
        ),
        _ => (0, Vec::new()),
    };
    LandlockPlan {
        handled_fs: AccessFs::from_all(FS_ABI).bits(),
        handled_net,
        scoped: Scope::from_all(SCOPE_ABI).bits(),
        paths,
        ports,
    }
}

pub(super) fn restrict(spec: &SandboxSpec) -> Result<RulesetStatus, SandboxError> {
    let mut ruleset = Ruleset::default()
        .handle_access(AccessFs::from_all(FS_ABI))
        .map_err(err)?
        .scope(Scope::from_all(SCOPE_ABI))
        .map_err(err)?;
    if let NetworkPolicy::Web { .. } = spec.network {
        ruleset = ruleset.handle_access(AccessNet::ConnectTcp).map_err(err)?;
    }
    let mut created = ruleset
        .create()
        .map_err(err)?
        .add_rules(path_beneath_rules(
            &spec.read_only,
            AccessFs::from_read(FS_ABI),
        ))
        .map_err(err)?
        .add_rules(path_beneath_rules(
            &spec.read_write,
            AccessFs::from_all(FS_ABI),
        ))
        .map_err(err)?;
    // Shared host folders, at the path the kernel sees them.
    for m in &spec.host_mounts {
        let access = if m.writable {
            AccessFs::from_all(FS_ABI)
        } else {
            AccessFs::from_read(FS_ABI)
        };
        created = created
            .add_rules(path_beneath_rules([&m.target], access))
            .map_err(err)?;
    }
    if let NetworkPolicy::Web { ports } = &spec.network {
        for &port in ports {
            created = created
                .add_rule(NetPort::new(port, AccessNet::ConnectTcp))
                .map_err(err)?;
        }
    }
    Ok(created.restrict_self().map_err(err)?.ruleset)
}

/// What each family of rules achieves here; used by the probe, which
/// restricts itself step by step and then exits.
pub(super) fn probe_families() -> [(&'static str, RulesetStatus); 3] {
    let status = |r: Result<RulesetStatus, RulesetError>| r.unwrap_or(RulesetStatus::NotEnforced);
    let fs = status((|| {
        Ok(Ruleset::default()
            .handle_access(AccessFs::from_all(FS_ABI))?
            .create()?
            .restrict_self()?
            .ruleset)
    })());
    let net = status((|| {
        Ok(Ruleset::default()
            .handle_access(AccessNet::ConnectTcp)?
            .create()?
            .restrict_self()?
            .ruleset)
    })());
    let scope = status((|| {
        Ok(Ruleset::default()
            .scope(Scope::from_all(SCOPE_ABI))?
            .create()?
            .restrict_self()?
            .ruleset)
    })());
    [("fs", fs), ("net", net), ("scope", scope)]
}
