//! A real Jupyter server for the remote-kernel tests: Jupyter Kernel Gateway
//! or Jupyter Server, from the venv `scripts/test` makes
//! (`target/gateway-venv`, pinned in `tests/gateway-requirements.txt`),
//! listening on loopback with a random token. Its kernels run the
//! provisioned kernel environment (a `python3` kernel spec in a private
//! `JUPYTER_PATH`). It is killed when dropped, and stops by itself when the
//! test process is gone (or after half an hour).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

/// Which server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    KernelGateway,
    JupyterServer,
    /// Jupyter Server that only speaks the legacy JSON WebSocket frames.
    JupyterServerJson,
}

impl Kind {
    /// From `MCP_TEST_GATEWAY` (`kg`, `server`, `server-json`).
    pub fn from_env() -> Option<Kind> {
        match std::env::var("MCP_TEST_GATEWAY").ok()?.as_str() {
            "kg" => Some(Kind::KernelGateway),
            "server" => Some(Kind::JupyterServer),
            "server-json" => Some(Kind::JupyterServerJson),
            "" => None,
            other => panic!("MCP_TEST_GATEWAY={other}: expected kg, server or server-json"),
        }
    }
}

pub struct Gateway {
    pub url: String,
    pub token: String,
    pub kind: Kind,
    /// The folder kernels start in (session folders are below it).
    pub root: tempfile::TempDir,
    _spec: tempfile::TempDir,
    child: Child,
}

/// Runs the module named by the first argument with the rest, and exits
/// (taking its kernels along: they poll their parent) when the test process
/// is gone or after half an hour, so no gateway outlives its test.
const BOOTSTRAP: &str = r#"
import os, runpy, sys, threading, time
parent = os.getppid()
def watch():
    end = time.monotonic() + 1800
    while os.getppid() == parent and time.monotonic() < end:
        time.sleep(0.5)
    os._exit(0)
threading.Thread(target=watch, daemon=True).start()
module = sys.argv[1]
sys.argv = [module] + sys.argv[2:]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"#;

fn venv_python() -> PathBuf {
    if let Ok(p) = std::env::var("MCP_TEST_GATEWAY_PYTHON") {
        return PathBuf::from(p);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/gateway-venv/bin/python")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Gateway {
    pub async fn start(kind: Kind) -> Gateway {
        let python = venv_python();
        assert!(
            python.exists(),
            "{} is missing: scripts/test makes the gateway venv",
            python.display()
        );
        let spec = tempfile::tempdir().unwrap();
        let kernels = spec.path().join("kernels/python3");
        std::fs::create_dir_all(&kernels).unwrap();
        let argv = serde_json::json!({
            "argv": [super::kernel_python(), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python 3 (test)",
            "language": "python",
        });
        std::fs::write(kernels.join("kernel.json"), argv.to_string()).unwrap();
        let root = tempfile::tempdir().unwrap();
        let token = format!("tok{}", rand_suffix());
        for _attempt in 0..5 {
            let port = free_port();
            let mut cmd = Command::new(&python);
            cmd.arg("-c").arg(BOOTSTRAP);
            match kind {
                Kind::KernelGateway => {
                    cmd.env("KG_LIST_KERNELS", "True");
                    cmd.arg("kernel_gateway").args([
                        "--KernelGatewayApp.ip=127.0.0.1".to_string(),
                        format!("--KernelGatewayApp.port={port}"),
                        "--KernelGatewayApp.port_retries=0".to_string(),
                        format!("--KernelGatewayApp.auth_token={token}"),
                    ]);
                }
                Kind::JupyterServer | Kind::JupyterServerJson => {
                    cmd.arg("jupyter_server").args([
                        "--ServerApp.allow_root=True".to_string(),
                        "--ServerApp.ip=127.0.0.1".to_string(),
                        format!("--ServerApp.port={port}"),
                        "--ServerApp.port_retries=0".to_string(),
                        format!("--IdentityProvider.token={token}"),
                        format!("--ServerApp.root_dir={}", root.path().display()),
                        "--ServerApp.open_browser=False".to_string(),
                    ]);
                    if kind == Kind::JupyterServerJson {
                        cmd.arg("--ZMQChannelsWebsocketConnection.kernel_ws_protocol=");
                    }
                }
            }
            // The output-bound tests print far more than the servers' default
            // 1 MB/s (beyond it they drop output); README tells deployments.
            cmd.arg("--ZMQChannelsWebsocketConnection.limit_rate=False");
            let data = spec.path().join("data");
            cmd.current_dir(root.path())
                .env("JUPYTER_PATH", spec.path())
                .env("JUPYTER_DATA_DIR", &data)
                .env("JUPYTER_RUNTIME_DIR", data.join("runtime"))
                .env("JUPYTER_CONFIG_DIR", spec.path().join("config"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(if std::env::var_os("MCP_TEST_GATEWAY_LOG").is_some() {
                    Stdio::inherit()
                } else {
                    Stdio::null()
                })
                .kill_on_drop(true);
            let mut child = cmd.spawn().expect("start the gateway");
            let url = format!("http://127.0.0.1:{port}");
            if wait_ready(&url, &token, &mut child).await {
                return Gateway {
                    url,
                    token,
                    kind,
                    root,
                    _spec: spec,
                    child,
                };
            }
            let _ = child.kill().await;
        }
        panic!("the {kind:?} did not start");
    }

    /// Flags that point our server at this gateway.
    pub fn args(&self) -> Vec<String> {
        vec![
            "--kernel-gateway".into(),
            self.url.clone(),
            "--gateway-token".into(),
            self.token.clone(),
        ]
    }

    /// The ids of the kernels the server runs now.
    pub async fn kernels(&self) -> Vec<String> {
        let v: serde_json::Value = reqwest::Client::new()
            .get(format!("{}/api/kernels", self.url))
            .header("Authorization", format!("token {}", self.token))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|k| k["id"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    }

    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

fn rand_suffix() -> String {
    use std::time::{SystemTime, UNIX_EPOCH};
    let n = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{n:08x}{}", std::process::id())
}

async fn wait_ready(url: &str, token: &str, child: &mut Child) -> bool {
    for _ in 0..200 {
        if let Ok(Some(_)) = child.try_wait() {
            return false;
        }
        let ok = reqwest::Client::new()
            .get(format!("{url}/api/kernelspecs"))
            .header("Authorization", format!("token {token}"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if ok {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}
