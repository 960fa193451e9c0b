//! The REST half of a Jupyter server's kernel API: create, look up,
//! interrupt and delete kernels (`/api/kernels`). Every request carries
//! `Authorization: token T` and is bounded in time.

use std::time::Duration;

use reqwest::{Method, StatusCode};

/// Longest a REST call may take (a kernel's creation has its own limit).
const CALL_TIMEOUT: Duration = Duration::from_secs(15);

pub(super) struct Rest {
    http: reqwest::Client,
    /// `http://host:port[/prefix]`, without a trailing slash.
    base: String,
    token: Option<String>,
}

/// An error with its causes (reqwest's own text leaves out why a request failed).
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// Kernel ids come from the server, or from our records after a restart;
/// only plain ids are ever put in a URL.
pub(super) fn valid_kernel_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl Rest {
    pub(super) fn new(url: &str, token: Option<String>) -> Result<Self, String> {
        let base = url.trim_end_matches('/').to_string();
        if !base.starts_with("http://") {
            return Err(format!(
                "the gateway URL must start with http:// (got {base}); for a TLS endpoint, \
                 reach it through the cluster's service address or a local tunnel \
                 (kubectl port-forward)"
            ));
        }
        let http = reqwest::Client::builder()
            .timeout(CALL_TIMEOUT)
            .tcp_nodelay(true)
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Self { http, base, token })
    }

    fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        let rb = self.http.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(t) => rb.header("Authorization", format!("token {t}")),
            None => rb,
        }
    }

    /// The WebSocket URL of a kernel's channels.
    pub(super) fn channels_url(&self, id: &str, session: &str) -> String {
        let rest = self.base.trim_start_matches("http://");
        format!("ws://{rest}/api/kernels/{id}/channels?session_id={session}")
    }

    /// Checks that the server answers and accepts our token; returns what it
    /// says it is, for the log.
    pub(super) async fn check(&self) -> Result<String, String> {
        let resp = self
            .request(Method::GET, "/api/kernelspecs")
            .send()
            .await
            .map_err(|e| format!("cannot reach the gateway at {}: {}", self.base, chain(&e)))?;
        match resp.status() {
            s if s.is_success() => {}
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                return Err(format!(
                    "the gateway at {} refused our token ({}): set --gateway-token",
                    self.base,
                    resp.status()
                ));
            }
            s => return Err(format!("the gateway at {} answered {s}", self.base)),
        }
        let specs: serde_json::Value = resp.json().await.map_err(|e| e.to_string())?;
        let version = match self.request(Method::GET, "/api").send().await {
            Ok(r) => r
                .json::<serde_json::Value>()
                .await
                .ok()
                .and_then(|v| v["version"].as_str().map(String::from)),
            Err(_) => None,
        };
        Ok(format!(
            "default kernel {}, server version {}",
            specs["default"].as_str().unwrap_or("?"),
            version.as_deref().unwrap_or("?")
        ))
    }

    /// `POST /api/kernels`: a new kernel's id.
    pub(super) async fn create(
        &self,
        name: &str,
        env: &serde_json::Map<String, serde_json::Value>,
        timeout: Duration,
    ) -> Result<String, String> {
        let mut body = serde_json::json!({ "name": name });
        if !env.is_empty() {
            body["env"] = serde_json::Value::Object(env.clone());
        }
        let resp = self
            .request(Method::POST, "/api/kernels")
            .timeout(timeout)
            .json(&body)
            .send()
            .await
            .map_err(|e| format!("creating a kernel: {}", chain(&e)))?;
        let status = resp.status();
        if !status.is_success() {
            let text = resp.text().await.unwrap_or_default();
            let text: String = text.chars().take(500).collect();
            return Err(format!(
                "creating a kernel: the gateway answered {status}: {text}"
            ));
        }
        let v: serde_json::Value = resp.json().await.map_err(|e| e.to_string())?;
        match v["id"].as_str() {
            Some(id) if valid_kernel_id(id) => Ok(id.to_string()),
            _ => Err(format!("creating a kernel: unexpected answer {v}")),
        }
    }

    /// Whether the kernel still exists on the server.
    pub(super) async fn exists(&self, id: &str) -> Result<bool, String> {
        let resp = self
            .request(Method::GET, &format!("/api/kernels/{id}"))
            .send()
            .await
            .map_err(|e| chain(&e))?;
        match resp.status() {
            s if s.is_success() => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            s => Err(format!("looking up kernel {id}: {s}")),
        }
    }

    pub(super) async fn interrupt(&self, id: &str) -> Result<(), String> {
        let resp = self
            .request(Method::POST, &format!("/api/kernels/{id}/interrupt"))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(format!("interrupting kernel {id}: {}", resp.status()))
        }
    }

    /// Deletes a kernel. A kernel the server is restarting (after its
    /// death) cannot be deleted until the restart is over (the servers
    /// answer 500), so a server error is retried a few times.
    pub(super) async fn delete(&self, id: &str) -> Result<(), String> {
        let mut last = String::new();
        for attempt in 0..6 {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(250 << attempt.min(3))).await;
            }
            let resp = self
                .request(Method::DELETE, &format!("/api/kernels/{id}"))
                .send()
                .await
                .map_err(|e| e.to_string())?;
            match resp.status() {
                s if s.is_success() || s == StatusCode::NOT_FOUND => return Ok(()),
                s if s.is_server_error() => last = s.to_string(),
                s => return Err(format!("deleting kernel {id}: {s}")),
            }
        }
        Err(format!("deleting kernel {id}: {last}"))
    }
}
