//! Kernels on a Jupyter server: Jupyter Server, Jupyter Kernel Gateway, or
//! Enterprise Gateway (which runs each kernel in its own Kubernetes pod).
//!
//! A kernel is created over REST ([`rest`]), driven over its channels
//! WebSocket ([`ws`]) by one task ([`actor`]), interrupted over REST, and
//! deleted when its session is done. Its session folder lives beside it,
//! reached through the kernel ([`files`]). A kernel outlives our restarts:
//! its id is its [`KernelHandle::resume_id`], kept in the session's record,
//! and [`KernelFactory::resume`] reconnects to it, variables intact.
//!
//! What we cannot do remotely, and say so at start-up: confine the kernel
//! (Landlock, uids, cgroups, namespaces are the local host's); that is the
//! deployment's job (a pod per kernel, its user, NetworkPolicy, limits).

mod actor;
mod files;
mod rest;
mod ws;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use files::GatewayFiles;

use super::local::STARTUP_CODE;
use super::{BoxFuture, KernelError, KernelFactory, KernelHandle};
use crate::workspace::remote::RemoteFiles;

/// How to reach the gateway and what to ask it for.
#[derive(Debug, Clone)]
pub struct GatewaySettings {
    /// `http://host:port[/prefix]`.
    pub url: String,
    /// Sent as `Authorization: token T`.
    pub token: Option<String>,
    /// The kernel spec to start (`python3`).
    pub kernel_name: String,
    /// `KERNEL_*` variables sent with each creation (Enterprise Gateway
    /// reads `KERNEL_USERNAME`, `KERNEL_NAMESPACE`, …).
    pub env: Vec<(String, String)>,
    /// Where session folders go, as the kernels see it (relative to their
    /// start folder, or absolute).
    pub folder: PathBuf,
    /// Longest a kernel may take from creation to its first answer
    /// (Enterprise Gateway may have to schedule a pod and pull an image).
    pub start_timeout: Duration,
    /// Longest a file operation waits for its kernel.
    pub file_timeout: Duration,
}

/// What every kernel task shares.
pub(crate) struct Shared {
    settings: GatewaySettings,
    rest: rest::Rest,
    files: Arc<GatewayFiles>,
}

pub struct GatewayKernelFactory {
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

impl GatewayKernelFactory {
    /// Checks that the gateway answers and takes our token.
    pub async fn connect(
        settings: GatewaySettings,
        shutdown: CancellationToken,
        tracker: TaskTracker,
    ) -> Result<Self, String> {
        let rest = rest::Rest::new(&settings.url, settings.token.clone())?;
        let about = rest.check().await?;
        tracing::info!(
            "kernels: on the Jupyter gateway at {} ({about})",
            settings.url
        );
        let files = Arc::new(GatewayFiles::new(settings.file_timeout));
        Ok(Self {
            shared: Arc::new(Shared {
                settings,
                rest,
                files,
            }),
            shutdown,
            tracker,
        })
    }

    fn env(&self) -> serde_json::Map<String, serde_json::Value> {
        self.shared
            .settings
            .env
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect()
    }

    /// Connects to kernel `id`, runs `setup`, and starts its task.
    async fn attach(
        &self,
        id: &str,
        workdir: &Path,
        setup: String,
    ) -> Result<KernelHandle, KernelError> {
        let session = crate::random_token(22);
        let limit = self.shared.settings.start_timeout;
        let mut sock = actor::open(&self.shared, id, &session, limit).await?;
        actor::run_silent(&mut sock, &session, setup, limit).await?;
        let (tx, rx) = mpsc::channel(16);
        let exited = Arc::new(AtomicBool::new(false));
        let handle = KernelHandle::new(tx, None, exited.clone()).with_resume_id(id);
        let token = self.shared.files.register(workdir, &handle);
        let task = actor::Actor {
            shared: self.shared.clone(),
            kernel_id: id.to_string(),
            session,
            sock,
            commands: rx,
            exited,
            cancel: self.shutdown.child_token(),
            folder: Some((workdir.to_path_buf(), token)),
        };
        self.tracker.spawn(task.run());
        Ok(handle)
    }
}

impl KernelFactory for GatewayKernelFactory {
    fn start<'a>(&'a self, workdir: &'a Path) -> BoxFuture<'a, Result<KernelHandle, KernelError>> {
        Box::pin(async move {
            let s = &self.shared.settings;
            let id = self
                .shared
                .rest
                .create(&s.kernel_name, &self.env(), s.start_timeout)
                .await
                .map_err(KernelError::Start)?;
            let setup = format!(
                "{}import os as __mcp_os\n__mcp_os.chdir(__import__('_mcp_fs').ROOT)\n\
                 del __mcp_os\n{STARTUP_CODE}",
                files::install_code(workdir, false)
            );
            match self.attach(&id, workdir, setup).await {
                Ok(h) => Ok(h),
                Err(e) => {
                    let _ = self.shared.rest.delete(&id).await;
                    Err(e)
                }
            }
        })
    }

    fn resume<'a>(
        &'a self,
        resume_id: &'a str,
        workdir: &'a Path,
    ) -> BoxFuture<'a, Result<Option<KernelHandle>, KernelError>> {
        Box::pin(async move {
            if !rest::valid_kernel_id(resume_id) {
                return Ok(None);
            }
            match self.shared.rest.exists(resume_id).await {
                Ok(true) => {}
                Ok(false) => return Ok(None),
                Err(e) => return Err(KernelError::Start(e)),
            }
            // The kernel kept its state, `_mcp_fs` included; install it again
            // only if the session's code removed it.
            let setup = files::install_code(workdir, true);
            self.attach(resume_id, workdir, setup).await.map(Some)
        })
    }

    fn discard<'a>(&'a self, resume_id: &'a str, workdir: &'a Path) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            if !rest::valid_kernel_id(resume_id) {
                return;
            }
            if let Ok(Some(k)) = self.resume(resume_id, workdir).await {
                let _ = self.shared.files.remove(workdir).await;
                k.shutdown().await;
            } else {
                let _ = self.shared.rest.delete(resume_id).await;
            }
        })
    }

    fn remote_files(&self) -> Option<(PathBuf, Arc<dyn RemoteFiles>)> {
        Some((
            self.shared.settings.folder.clone(),
            self.shared.files.clone() as Arc<dyn RemoteFiles>,
        ))
    }
}
