//! The background task that removes expired sessions.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Registry;

/// Sweeps `registry` every `interval` until `cancel` fires.
pub async fn run(registry: Arc<Registry>, interval: Duration, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // the first tick is immediate
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let n = registry.sweep().await;
                if n > 0 {
                    tracing::info!("removed {n} expired session(s)");
                }
            }
            _ = cancel.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::sync::mpsc;

    use super::*;
    use crate::auth::Principal;
    use crate::kernel::{BoxFuture, Command, KernelError, KernelFactory, KernelHandle};
    use crate::session::{SessionError, SessionSettings};

    /// Stands in for a kernel: answers shutdown, counts live kernels.
    struct StubFactory {
        live: Arc<AtomicUsize>,
    }

    impl KernelFactory for StubFactory {
        fn start<'a>(&'a self, _: &'a Path) -> BoxFuture<'a, Result<KernelHandle, KernelError>> {
            let live = self.live.clone();
            Box::pin(async move {
                let (tx, mut rx) = mpsc::channel(4);
                live.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    while let Some(cmd) = rx.recv().await {
                        if let Command::Shutdown { done } = cmd {
                            live.fetch_sub(1, Ordering::SeqCst);
                            let _ = done.send(());
                            return;
                        }
                    }
                });
                Ok(KernelHandle::new(tx, None, Default::default()))
            })
        }
    }

    fn registry(dir: &Path, live: Arc<AtomicUsize>) -> Arc<Registry> {
        Arc::new(Registry::new(
            Arc::new(StubFactory { live }),
            SessionSettings {
                data_dir: dir.to_path_buf(),
                idle_timeout: Duration::from_secs(1800),
                execution_timeout: Duration::from_secs(300),
                interrupt_grace: Duration::from_secs(5),
                max_output_chars: 20_000,
                max_sessions: 100,
                max_session_bytes: 1 << 30,
                durable: true,
                restore: crate::session::Restore::Replay,
                replay_timeout: Duration::from_secs(120),
                inline_images: Default::default(),
                host_folders: Vec::new(),
            },
        ))
    }

    #[tokio::test(start_paused = true)]
    async fn idle_sessions_expire_and_take_kernel_and_folder() {
        let dir = tempfile::tempdir().unwrap();
        let live = Arc::new(AtomicUsize::new(0));
        let reg = registry(dir.path(), live.clone());
        let cancel = CancellationToken::new();
        let sweeper = tokio::spawn(run(reg.clone(), Duration::from_secs(300), cancel.clone()));

        let old = reg.create(&Principal::local()).await.unwrap();
        let folder = old.workspace.root().to_path_buf();
        assert!(folder.is_dir());
        tokio::time::sleep(Duration::from_secs(1000)).await;
        let fresh = reg.create(&Principal::local()).await.unwrap();
        // Used again at 1500 s: its clock restarts.
        tokio::time::sleep(Duration::from_secs(500)).await;
        reg.get(fresh.id.as_str(), &Principal::local())
            .await
            .unwrap()
            .touch();

        // At 1800 s + one sweep the old one is gone, the used one is not.
        tokio::time::sleep(Duration::from_secs(601)).await;
        assert_eq!(reg.len(), 1);
        assert!(!folder.exists());
        assert_eq!(live.load(Ordering::SeqCst), 1);
        assert!(matches!(
            reg.get(old.id.as_str(), &Principal::local()).await,
            Err(SessionError::NotFound(_))
        ));
        assert!(
            reg.get(fresh.id.as_str(), &Principal::local())
                .await
                .is_ok()
        );

        cancel.cancel();
        sweeper.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn lookup_after_deadline_fails_before_the_sweeper_runs() {
        let dir = tempfile::tempdir().unwrap();
        let live = Arc::new(AtomicUsize::new(0));
        let reg = registry(dir.path(), live.clone());
        let s = reg.create(&Principal::local()).await.unwrap();
        tokio::time::sleep(Duration::from_secs(1800)).await;
        assert!(matches!(
            reg.get(s.id.as_str(), &Principal::local()).await,
            Err(SessionError::NotFound(_))
        ));
        assert_eq!(live.load(Ordering::SeqCst), 0);
        assert!(reg.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn sessions_are_private_to_their_owner_and_capped() {
        let dir = tempfile::tempdir().unwrap();
        let live = Arc::new(AtomicUsize::new(0));
        let reg = registry(dir.path(), live.clone());
        let alice = Principal(Arc::from("alice"));
        let bob = Principal(Arc::from("bob"));
        let s = reg.create(&alice).await.unwrap();
        let id = s.id.as_str();
        assert!(reg.get(id, &alice).await.is_ok());
        // Bob sees exactly what an unknown id looks like, and cannot clear it.
        let theirs = reg.get(id, &bob).await.err().unwrap().to_string();
        let unknown = reg
            .get("AAAAAAAAAAAAAAAAAAAAAA", &bob)
            .await
            .err()
            .unwrap()
            .to_string();
        assert_eq!(
            theirs.replace(id, "X"),
            unknown.replace("AAAAAAAAAAAAAAAAAAAAAA", "X")
        );
        assert!(reg.remove(id, &bob).await.is_err());
        assert!(s.workspace.root().is_dir());
        for _ in 1..100 {
            reg.create(&bob).await.unwrap();
        }
        assert!(matches!(
            reg.create(&bob).await,
            Err(SessionError::TooMany(100))
        ));
    }
}
