//! The warm pool: kernels started before anyone asks for them.
//!
//! Each pooled entry is a whole future session: a fresh id, its folder, and a
//! kernel already running in that folder (start-up code run, optionally the
//! scientific stack imported). `Registry::create` takes one if there is one;
//! a taken entry is never returned, so no state can pass between sessions.
//! [`run`] refills the pool in the background.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::{Registry, SessionId};
use crate::kernel::{ExecMessage, KernelHandle};
use crate::workspace::Workspace;

/// A session-to-be.
pub(crate) struct Prepared {
    pub id: SessionId,
    pub workspace: Workspace,
    pub kernel: KernelHandle,
}

#[derive(Default)]
pub(crate) struct Pool {
    ready: Mutex<VecDeque<Prepared>>,
    /// Woken when an entry is taken.
    taken: Notify,
}

impl Pool {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Prepared>> {
        self.ready.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn take(&self) -> Option<Prepared> {
        let p = self.lock().pop_front();
        if p.is_some() {
            self.taken.notify_one();
        }
        p
    }

    pub(crate) fn drain(&self) -> Vec<Prepared> {
        self.lock().drain(..).collect()
    }

    fn len(&self) -> usize {
        self.lock().len()
    }
}

/// What the pool keeps ready.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    pub size: usize,
    /// Modules imported in pooled kernels before use (`--preload`).
    pub preload: Vec<String>,
}

/// Keeps `settings.size` entries ready until `cancel` fires.
pub async fn run(registry: Arc<Registry>, settings: PoolSettings, cancel: CancellationToken) {
    if settings.size == 0 {
        return;
    }
    let preload = preload_code(&settings.preload);
    let mut failures = 0u32;
    loop {
        while registry.pool.len() < settings.size && !cancel.is_cancelled() {
            let prepared = tokio::select! {
                p = registry.prepare() => p,
                _ = cancel.cancelled() => return,
            };
            match prepared {
                Ok(p) => {
                    if let Some(code) = &preload {
                        run_silently(&p.kernel, code).await;
                    }
                    failures = 0;
                    registry.pool.lock().push_back(p);
                }
                Err(e) => {
                    failures += 1;
                    tracing::warn!("could not start a pooled kernel: {e}");
                    // Back off (bounded) instead of spinning on a broken setup.
                    let wait = Duration::from_millis(500 * 2u64.pow(failures.min(6)));
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = cancel.cancelled() => return,
                    }
                }
            }
        }
        tokio::select! {
            _ = registry.pool.taken.notified() => {}
            _ = cancel.cancelled() => return,
        }
    }
}

/// `import a, b` for module names made of identifier characters and dots.
fn preload_code(modules: &[String]) -> Option<String> {
    let ok: Vec<&str> = modules
        .iter()
        .map(|m| m.trim())
        .filter(|m| {
            !m.is_empty()
                && m.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
        })
        .collect();
    if ok.is_empty() {
        return None;
    }
    // Imported inside a function: the modules are cached in sys.modules but
    // no name is bound in the user's namespace. matplotlib.pyplot is what
    // users import; importing it also sets up the backend.
    let names: Vec<String> = ok
        .iter()
        .map(|m| match *m {
            "matplotlib" => "'matplotlib.pyplot'".to_string(),
            other => format!("'{other}'"),
        })
        .collect();
    Some(format!(
        "def __mcp_preload():\n    for name in [{}]:\n        try:\n            __import__(name)\n        except Exception:\n            pass\n__mcp_preload()\ndel __mcp_preload",
        names.join(", ")
    ))
}

/// Runs code in a pooled kernel and waits for it, ignoring its output.
async fn run_silently(kernel: &KernelHandle, code: &str) {
    let Ok(mut stream) = kernel.execute(code.to_string()).await else {
        return;
    };
    while let Some(msg) = stream.recv().await {
        if matches!(msg, ExecMessage::End(_)) {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preload_accepts_module_names_only() {
        let code =
            preload_code(&["numpy".into(), "os; rm -rf".into(), "matplotlib".into()]).unwrap();
        assert!(code.contains("'numpy'"));
        assert!(code.contains("'matplotlib.pyplot'"));
        assert!(!code.contains("rm"));
        assert!(preload_code(&[]).is_none());
    }
}
