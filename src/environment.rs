//! The kernels' Python environment: provisioned on first start, reused after.
//!
//! Without `--python`, the server keeps a virtual environment under a
//! per-user folder, named after a hash of `kernel-requirements.txt` (compiled
//! into the binary), so a changed pin set builds a new environment. Creation
//! is serialised across processes with a file lock and marked complete only at
//! the end, so an interrupted install is redone, never half-used. pip's own
//! output is shown on stderr (stdout may be the MCP stdio channel).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::logging;

/// The pinned kernel packages.
pub const REQUIREMENTS: &str = include_str!("../kernel-requirements.txt");

const COMPLETE_MARKER: &str = ".provisioned";

#[derive(Debug, thiserror::Error)]
pub enum EnvError {
    #[error("cannot create the kernel environment in {dir}: {source}")]
    Io {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}); see the output above")]
    Step { command: String, status: String },
    #[error(
        "{python} cannot import ipykernel: install it (`{python} -m pip install ipykernel`) or omit --python to let the server provision its own environment"
    )]
    NoIpykernel { python: String },
}

/// An interpreter kernels can run with.
#[derive(Debug, Clone)]
pub struct KernelPython {
    pub python: PathBuf,
    /// The environment's `bin` folder, put first on the kernels' PATH so
    /// `pip` and `python` in `!commands` are this environment's.
    pub bin_dir: Option<PathBuf>,
    /// `sys.prefix`, `sys.base_prefix`, `sys.exec_prefix`: what a sandboxed
    /// kernel must be able to read.
    pub prefixes: Vec<PathBuf>,
    /// A prebuilt matplotlib cache (font list), shared read-only by kernels.
    pub mpl_config: Option<PathBuf>,
}

/// Asks the interpreter where it lives.
fn prefixes(python: &Path) -> Vec<PathBuf> {
    let out = Command::new(python)
        .args([
            "-c",
            "import sys; print(sys.prefix); print(sys.base_prefix); print(sys.exec_prefix)",
        ])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output();
    let mut dirs: Vec<PathBuf> = match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter(|l| !l.is_empty())
            .map(PathBuf::from)
            .collect(),
        _ => Vec::new(),
    };
    // The interpreter itself may be a symlink into yet another folder.
    if let Ok(real) = std::fs::canonicalize(python)
        && let Some(dir) = real.parent().and_then(Path::parent)
    {
        dirs.push(dir.to_path_buf());
    }
    dirs.sort();
    dirs.dedup();
    dirs
}

/// Builds matplotlib's font cache in `dir` once, so kernels (whose HOME is
/// private and short-lived) do not rebuild it on their first plot.
fn mpl_cache(python: &Path, dir: &Path) -> Option<PathBuf> {
    let built = std::fs::read_dir(dir)
        .map(|mut d| {
            d.any(|e| {
                e.map(|e| e.file_name().to_string_lossy().starts_with("fontlist"))
                    .unwrap_or(false)
            })
        })
        .unwrap_or(false);
    if !built {
        let ok = Command::new(python)
            .args(["-c", "import matplotlib.font_manager"])
            .env("MPLCONFIGDIR", dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            return None;
        }
    }
    Some(dir.to_path_buf())
}

/// Uses an existing interpreter given with `--python`, after checking it has ipykernel.
pub fn existing(python: &Path) -> Result<KernelPython, EnvError> {
    let ok = Command::new(python)
        .args(["-c", "import ipykernel"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        return Err(EnvError::NoIpykernel {
            python: python.display().to_string(),
        });
    }
    Ok(KernelPython {
        python: python.to_path_buf(),
        bin_dir: python.parent().map(Path::to_path_buf),
        prefixes: prefixes(python),
        mpl_config: None,
    })
}

/// Folder of the provisioned environment for the compiled-in requirements.
pub fn env_dir(envs_root: &Path) -> PathBuf {
    let hash = Sha256::digest(REQUIREMENTS.as_bytes());
    let hex: String = hash.iter().take(6).map(|b| format!("{b:02x}")).collect();
    envs_root.join(format!("kernel-env-{hex}"))
}

/// Returns the provisioned environment under `envs_root`, creating it first if
/// needed with `base_python -m venv` and pip. Blocking: call from
/// `spawn_blocking` or before the runtime starts.
pub fn provision(envs_root: &Path, base_python: &Path) -> Result<KernelPython, EnvError> {
    let dir = env_dir(envs_root);
    let python = dir.join("bin").join("python");
    let ready = || KernelPython {
        python: python.clone(),
        bin_dir: Some(dir.join("bin")),
        prefixes: prefixes(&python),
        mpl_config: mpl_cache(&python, &dir.join("mplconfig")),
    };
    if dir.join(COMPLETE_MARKER).exists() {
        return Ok(ready());
    }
    let io = |source| EnvError::Io {
        dir: dir.clone(),
        source,
    };
    std::fs::create_dir_all(envs_root).map_err(io)?;
    let lock = std::fs::File::create(envs_root.join(".provision.lock")).map_err(io)?;
    if lock.try_lock().is_err() {
        logging::line(
            "mcp-python-interpreter: another process is provisioning the kernel environment; waiting for it…",
        );
        lock.lock().map_err(io)?;
    }
    if dir.join(COMPLETE_MARKER).exists() {
        return Ok(ready());
    }
    if dir.exists() {
        logging::line(format_args!(
            "mcp-python-interpreter: removing an unfinished kernel environment at {}",
            dir.display()
        ));
        std::fs::remove_dir_all(&dir).map_err(io)?;
    }
    logging::line(format_args!(
        "mcp-python-interpreter: first start: provisioning the kernel environment in {}\n\
         mcp-python-interpreter: (ipykernel, pandas, numpy, matplotlib, seaborn, plotly, kaleido, sympy; about a minute, once)",
        dir.display()
    ));
    logging::line(format_args!(
        "mcp-python-interpreter: [1/3] creating a virtual environment with {}",
        base_python.display()
    ));
    run(Command::new(base_python).arg("-m").arg("venv").arg(&dir))?;
    let req = dir.join("kernel-requirements.txt");
    std::fs::write(&req, REQUIREMENTS).map_err(io)?;
    logging::line(
        "mcp-python-interpreter: [2/3] installing the pinned packages (pip output follows)",
    );
    run(Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "--progress-bar",
            "off",
            "-r",
        ])
        .arg(&req))?;
    logging::line("mcp-python-interpreter: [3/3] checking the environment");
    existing(&python)?;
    std::fs::write(dir.join(COMPLETE_MARKER), "").map_err(io)?;
    logging::line("mcp-python-interpreter: kernel environment ready");
    drop(lock);
    Ok(ready())
}

/// Runs a provisioning step with its output on our stderr.
fn run(cmd: &mut Command) -> Result<(), EnvError> {
    let command = format!("{cmd:?}");
    // The step writes to our stderr directly: our lines queued so far first.
    logging::flush(Duration::from_secs(1));
    let status = cmd
        .stdin(Stdio::null())
        .stdout(std::io::stderr())
        .stderr(std::io::stderr())
        .status()
        .map_err(|e| EnvError::Step {
            command: command.clone(),
            status: e.to_string(),
        })?;
    if !status.success() {
        return Err(EnvError::Step {
            command,
            status: status.to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_dir_depends_on_requirements_only() {
        let a = env_dir(Path::new("/x"));
        assert_eq!(a, env_dir(Path::new("/x")));
        assert!(
            a.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("kernel-env-")
        );
    }

    #[test]
    fn requirements_pin_every_promised_package() {
        for pkg in [
            "ipykernel",
            "pandas",
            "numpy",
            "matplotlib",
            "seaborn",
            "plotly",
            "kaleido",
            "sympy",
        ] {
            assert!(
                REQUIREMENTS
                    .lines()
                    .any(|l| l.starts_with(&format!("{pkg}=="))),
                "{pkg} is not pinned"
            );
        }
    }
}
