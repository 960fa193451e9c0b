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
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Registry, SessionError, SessionId};
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
    state: Mutex<PoolState>,
    /// Woken when an entry is taken (the refill task waits on it).
    taken: Notify,
    /// Woken when a preparation ends (creators waiting for it).
    filled: Notify,
}

#[derive(Default)]
struct PoolState {
    ready: VecDeque<Prepared>,
    /// Entries being prepared right now.
    preparing: usize,
    /// Creators waiting for one of those.
    waiting: usize,
}

impl Pool {
    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A prepared entry: one that is ready, or one being prepared if no other
    /// creator is already waiting for it (it is further along than a kernel
    /// started now would be). `None` when the caller should start its own.
    pub(crate) async fn take(&self, registry: &Registry) -> Option<Prepared> {
        loop {
            let step = {
                let mut st = self.lock();
                if let Some(p) = st.ready.pop_front() {
                    Step::Take(p)
                } else if st.waiting >= st.preparing {
                    Step::Own
                } else {
                    st.waiting += 1;
                    // Registered before the lock is released, so the wake-up
                    // of a preparation that ends meanwhile is not missed.
                    let mut n = Box::pin(self.filled.notified());
                    n.as_mut().enable();
                    Step::Wait(n)
                }
            };
            match step {
                Step::Take(p) => {
                    self.taken.notify_one();
                    if p.kernel.is_alive() {
                        return Some(p);
                    }
                    // Died while waiting in the pool: discard it, try again.
                    registry.discard(p).await;
                }
                Step::Own => return None,
                Step::Wait(notified) => {
                    // Counted out again even if this future is dropped (the
                    // client cancelled its call), so the count never drifts.
                    let _waiting = WaitingGuard(self);
                    notified.await;
                }
            }
        }
    }

    pub(crate) fn drain(&self) -> Vec<Prepared> {
        self.lock().ready.drain(..).collect()
    }

    fn len_with_preparing(&self) -> usize {
        let st = self.lock();
        st.ready.len() + st.preparing
    }

    fn begin(&self) {
        self.lock().preparing += 1;
    }

    /// A preparation ended, with an entry or without.
    fn end(&self, prepared: Option<Prepared>) {
        {
            let mut st = self.lock();
            st.preparing -= 1;
            if let Some(p) = prepared {
                st.ready.push_back(p);
            }
        }
        self.filled.notify_waiters();
    }
}

enum Step<'a> {
    Take(Prepared),
    Own,
    Wait(std::pin::Pin<Box<tokio::sync::futures::Notified<'a>>>),
}

struct WaitingGuard<'a>(&'a Pool);

impl Drop for WaitingGuard<'_> {
    fn drop(&mut self) {
        self.0.lock().waiting -= 1;
    }
}

/// What the pool keeps ready.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    pub size: usize,
    /// Modules imported in pooled kernels before use (`--preload`).
    pub preload: Vec<String>,
}

/// At most this many pooled kernels start at once: a start is CPU-bound, so
/// more would only slow each other (and the sessions in use) down.
const PARALLEL_STARTS: usize = 2;

/// Keeps `settings.size` entries ready until `cancel` fires. Entries are
/// prepared concurrently (up to [`PARALLEL_STARTS`]) in tasks this function
/// owns; on shutdown it waits for them and discards what they prepared.
pub async fn run(registry: Arc<Registry>, settings: PoolSettings, cancel: CancellationToken) {
    if settings.size == 0 {
        return;
    }
    let preload: Option<Arc<str>> = preload_code(&settings.preload).map(Arc::from);
    let mut starts: JoinSet<Result<Prepared, SessionError>> = JoinSet::new();
    let mut failures = 0u32;
    // After a failure, no new start before this instant (bounded back-off
    // instead of spinning on a broken setup).
    let mut not_before = Instant::now();
    loop {
        while registry.pool.len_with_preparing() < settings.size
            && starts.len() < PARALLEL_STARTS
            && Instant::now() >= not_before
            && !cancel.is_cancelled()
        {
            registry.pool.begin();
            let (registry, preload) = (registry.clone(), preload.clone());
            starts.spawn(async move {
                let p = registry.prepare().await?;
                if let Some(code) = preload {
                    run_silently(&p.kernel, &code).await;
                }
                Ok(p)
            });
        }
        tokio::select! {
            Some(done) = starts.join_next() => {
                let prepared = match done {
                    Ok(Ok(p)) => Some(p),
                    Ok(Err(e)) => {
                        tracing::warn!("could not start a pooled kernel: {e}");
                        None
                    }
                    Err(e) => {
                        tracing::warn!("a pooled kernel's start failed: {e}");
                        None
                    }
                };
                if prepared.is_some() {
                    failures = 0;
                } else {
                    failures += 1;
                    not_before = Instant::now()
                        + Duration::from_millis(500 * 2u64.pow(failures.min(6)));
                }
                registry.pool.end(prepared);
            }
            _ = registry.pool.taken.notified() => {}
            _ = tokio::time::sleep_until(not_before), if Instant::now() < not_before => {}
            _ = cancel.cancelled() => break,
        }
    }
    // Shutting down: starts in flight end soon (their kernels are cancelled
    // too); whatever they prepared is shut down and its folder removed.
    while let Some(done) = starts.join_next().await {
        if let Ok(Ok(p)) = done {
            registry.discard(p).await;
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
