//! The kernels' Python environment: provisioned on first start, reused after.
//!
//! Without `--python`, the server keeps a virtual environment under a
//! per-user folder, named after a hash of `kernel-requirements.txt` (compiled
//! into the binary) and of the base interpreter's version, so a changed pin
//! set or interpreter builds a new environment. The base interpreter is
//! `--base-python`, else a CPython 3.12 or 3.13 of the machine if it has one
//! (their kernels share the template's memory for good, see
//! [`default_base_python`]), else `python3`; the choice is recorded in the
//! folder (`base-python`), so later starts run no interpreter to make it. Creation
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

/// What `python -c code` prints, if it runs and succeeds.
fn ask(python: &Path, code: &str) -> Option<String> {
    let out = Command::new(python)
        .args(["-c", code])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Asks the interpreter where it lives.
fn prefixes(python: &Path) -> Vec<PathBuf> {
    let said = ask(
        python,
        "import sys; print(sys.prefix); print(sys.base_prefix); print(sys.exec_prefix)",
    )
    .unwrap_or_default();
    let mut dirs: Vec<PathBuf> = said
        .lines()
        .filter(|l| !l.is_empty())
        .map(PathBuf::from)
        .collect();
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

/// Folder of the provisioned environment for the compiled-in requirements
/// and the base interpreter's version (`python_version`, "3.12.1"): a
/// changed pin set, or a base Python upgraded or replaced, builds a new one.
pub fn env_dir(envs_root: &Path, python_version: &str) -> PathBuf {
    let mut hash = Sha256::new();
    hash.update(REQUIREMENTS.as_bytes());
    hash.update(b"\npython ");
    hash.update(python_version.as_bytes());
    let hex: String = hash
        .finalize()
        .iter()
        .take(6)
        .map(|b| format!("{b:02x}"))
        .collect();
    envs_root.join(format!("kernel-env-{hex}"))
}

/// Where the interpreter the environment was last built with is recorded:
/// its path, then its version, a line each.
const BASE_RECORD: &str = "base-python";

/// The base interpreter and its version: the one recorded by the last start
/// if it still applies (`given` is it, or nothing is given and it is still
/// there) and its environment is complete, so that a start runs no
/// interpreter to choose one (running one costs about 0.1 s, the first call
/// of a desktop client waits for it); else `given`, or the default
/// ([`default_base_python`]), and its version. (So a Python installed after
/// the first start is chosen only once the record is removed.)
fn base_interpreter(envs_root: &Path, given: Option<&Path>) -> Result<(PathBuf, String), EnvError> {
    let recorded = std::fs::read_to_string(envs_root.join(BASE_RECORD))
        .ok()
        .and_then(|r| {
            let mut lines = r.lines();
            Some((PathBuf::from(lines.next()?), lines.next()?.to_string()))
        });
    if let Some((path, version)) = recorded {
        let applies = match given {
            Some(g) => g == path,
            // A bare name ("python3") is looked up on PATH: kept.
            None => path.is_file() || path.components().count() == 1,
        };
        if applies && env_dir(envs_root, &version).join(COMPLETE_MARKER).exists() {
            return Ok((path, version));
        }
    }
    let base = given
        .map(Path::to_path_buf)
        .unwrap_or_else(default_base_python);
    let version = python_version(&base).ok_or_else(|| EnvError::Step {
        command: format!("{} -c 'import venv, ensurepip'", base.display()),
        status: "it does not run, or cannot make a virtual environment (on Debian: \
                 apt-get install python3-venv)"
            .into(),
    })?;
    Ok((base, version))
}

/// The CPython minor versions the kernel environment prefers, best first:
/// from 3.12 on, objects can be made immortal, so kernels forked from the
/// template share its memory for good (`kernel/template.py`, `_immortalize`;
/// an idle session after a plot: about 12 MB instead of 24 MB). The pinned
/// packages install on both.
const PREFERRED_MINORS: [u32; 2] = [12, 13];

/// The interpreter the environment is built with when `--base-python` is not
/// given: a CPython of [`PREFERRED_MINORS`] if the machine has one that can
/// make a virtual environment (on `PATH` as `python3.12`/`python3.13`, else
/// installed by pyenv or uv in their usual folders), else `python3`.
fn default_base_python() -> PathBuf {
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let root = |var: &str, under_home: &str| {
        std::env::var_os(var)
            .map(PathBuf::from)
            .or_else(|| home.as_ref().map(|h| h.join(under_home)))
    };
    let pyenv = root("PYENV_ROOT", ".pyenv").map(|r| r.join("versions"));
    let uv = root("XDG_DATA_HOME", ".local/share").map(|r| r.join("uv/python"));
    let mut found: Vec<PathBuf> = Vec::new();
    for minor in PREFERRED_MINORS {
        let name = format!("python3.{minor}");
        if let Some(path) = std::env::var_os("PATH") {
            found.extend(
                std::env::split_paths(&path)
                    // pyenv's shims run only the versions it is told to
                    // (and take 0.2 s to say no): its versions come next.
                    .filter(|d| !d.ends_with("shims"))
                    .map(|d| d.join(&name)),
            );
        }
        for (folder, prefix) in [
            (&pyenv, format!("3.{minor}.")),
            (&uv, format!("cpython-3.{minor}.")),
        ] {
            if let Some(folder) = folder {
                found.extend(installs(folder, &prefix, &name));
            }
        }
    }
    found
        .into_iter()
        .find(|p| p.is_file() && python_version(p).is_some())
        .unwrap_or_else(|| PathBuf::from("python3"))
}

/// `folder/<name starting with prefix>/bin/<exe>`, newest first (by the
/// patch number after the prefix).
fn installs(folder: &Path, prefix: &str, exe: &str) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(folder) else {
        return Vec::new();
    };
    let mut found: Vec<(u32, PathBuf)> = entries
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            let rest = name.strip_prefix(prefix)?;
            let patch: String = rest.chars().take_while(char::is_ascii_digit).collect();
            // CPython releases only (not "3.12.1t" or uv's "3.12.8+freethreaded",
            // free-threaded builds, nor "3.13.0rc1" and the like); uv's
            // folders go on with "-<platform>".
            let tail = &rest[patch.len()..];
            if !(tail.is_empty() || tail.starts_with('-')) {
                return None;
            }
            Some((
                patch.parse().ok()?,
                folder.join(&name).join("bin").join(exe),
            ))
        })
        .collect();
    found.sort_by_key(|f| std::cmp::Reverse(f.0));
    found.into_iter().map(|(_, p)| p).collect()
}

/// The version of `python` ("3.12.1"), if it runs and can make a virtual
/// environment with pip (Debian splits `venv` and `ensurepip` off).
fn python_version(python: &Path) -> Option<String> {
    let version = ask(
        python,
        "import sys, venv, ensurepip; print('%d.%d.%d' % sys.version_info[:3])",
    )?;
    let version = version.trim();
    (!version.is_empty()).then(|| version.to_string())
}

/// Returns the provisioned environment under `envs_root`, creating it first if
/// needed with `base_python -m venv` and pip. Blocking: call from
/// `spawn_blocking` or before the runtime starts.
pub fn provision(envs_root: &Path, given: Option<&Path>) -> Result<KernelPython, EnvError> {
    let (base_python, version) = base_interpreter(envs_root, given)?;
    let base_python = base_python.as_path();
    let dir = env_dir(envs_root, &version);
    let python = dir.join("bin").join("python");
    let ready = || KernelPython {
        python: python.clone(),
        bin_dir: Some(dir.join("bin")),
        prefixes: prefixes(&python),
        mpl_config: mpl_cache(&python, &dir.join("mplconfig")),
    };
    // Remembered for the next start, which then runs no interpreter to
    // choose one (see base_interpreter). Best effort: the folder may be
    // read-only (a provisioned image).
    let remember = || {
        let record = format!("{}\n{version}\n", base_python.display());
        let path = envs_root.join(BASE_RECORD);
        if std::fs::read_to_string(&path).ok().as_deref() != Some(record.as_str()) {
            let _ = std::fs::write(&path, record);
        }
    };
    if dir.join(COMPLETE_MARKER).exists() {
        remember();
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
        remember();
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
        "mcp-python-interpreter: [1/3] creating a virtual environment with {} (Python {version})",
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
    remember();
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
    fn installs_lists_cpython_releases_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "3.12.1",
            "3.12.10",
            "3.12.3t",
            "3.13.0rc1",
            "3.11.7",
            "pypy3.12-7.3",
        ] {
            std::fs::create_dir_all(dir.path().join(name).join("bin")).unwrap();
        }
        let found = installs(dir.path(), "3.12.", "python3.12");
        let names: Vec<_> = found
            .iter()
            .map(|p| p.strip_prefix(dir.path()).unwrap().to_str().unwrap())
            .collect();
        assert_eq!(names, ["3.12.10/bin/python3.12", "3.12.1/bin/python3.12"]);
        let uv = tempfile::tempdir().unwrap();
        for name in [
            "cpython-3.12.7-linux-x86_64-gnu",
            "cpython-3.12.8+freethreaded-linux-x86_64-gnu",
        ] {
            std::fs::create_dir_all(uv.path().join(name)).unwrap();
        }
        let found = installs(uv.path(), "cpython-3.12.", "python3.12");
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].ends_with("cpython-3.12.7-linux-x86_64-gnu/bin/python3.12"));
    }

    #[test]
    fn env_dir_depends_on_requirements_and_python_version() {
        let a = env_dir(Path::new("/x"), "3.12.1");
        assert_eq!(a, env_dir(Path::new("/x"), "3.12.1"));
        assert_ne!(a, env_dir(Path::new("/x"), "3.11.7"));
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
