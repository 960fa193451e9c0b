//! The kernel WebSocket of a Jupyter server: `/api/kernels/{id}/channels`.
//!
//! All channels share one socket. We offer the binary subprotocol
//! `v1.kernel.websocket.jupyter.org` (frames: a count of offsets, the
//! offsets, the channel name, then header, parent header, metadata, content
//! and buffers); a server that does not select it makes the handshake fail
//! (tungstenite refuses an answer that drops an offered protocol), and we
//! connect again without it, to the legacy JSON text frames that carry a
//! `channel` field.
//!
//! Jupyter servers never set `TCP_NODELAY`, so a small reply they send while
//! our acknowledgement of their previous segment is delayed waits for it
//! (about 40 ms on Linux). [`QuickAck`] re-arms `TCP_QUICKACK` after every
//! read, so we acknowledge at once (see `../shared/FACTS.md`: 48 ms to under
//! 10 ms per call).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::{SinkExt, StreamExt};
use jupyter_protocol::{Channel, JupyterMessage};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Bytes, Message};

/// The binary subprotocol's name.
pub const V1_PROTOCOL: &str = "v1.kernel.websocket.jupyter.org";
/// Largest message we accept from the server (a big display, a file read).
const MAX_MESSAGE: usize = 256 << 20;

/// How messages are framed on the socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    V1,
    Json,
}

/// A TCP stream that re-arms `TCP_QUICKACK` after each read.
pub struct QuickAck(TcpStream);

impl AsyncRead for QuickAck {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.0).poll_read(cx, buf);
        if r.is_ready() {
            // Linux turns quick acknowledgements off again on its own.
            let _ = rustix::net::sockopt::set_tcp_quickack(&self.0, true);
        }
        r
    }
}

impl AsyncWrite for QuickAck {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// One kernel's socket.
pub struct KernelSocket {
    ws: WebSocketStream<QuickAck>,
    pub framing: Framing,
}

/// Opens the channels socket at `url` (`ws://…/api/kernels/ID/channels?session_id=…`).
pub async fn connect(url: &str, token: Option<&str>) -> Result<KernelSocket, String> {
    match connect_with(url, token, Framing::V1).await {
        Ok(s) => Ok(s),
        Err(first) => {
            tracing::debug!("kernel socket without the v1 protocol ({first}); trying JSON frames");
            connect_with(url, token, Framing::Json)
                .await
                .map_err(|e| format!("{first}; without the v1 protocol: {e}"))
        }
    }
}

async fn connect_with(
    url: &str,
    token: Option<&str>,
    framing: Framing,
) -> Result<KernelSocket, String> {
    let mut request = url.into_client_request().map_err(|e| e.to_string())?;
    let uri = request.uri().clone();
    let host = uri.host().ok_or("the gateway URL has no host")?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(80);
    if let Some(t) = token {
        let value = HeaderValue::from_str(&format!("token {t}")).map_err(|e| e.to_string())?;
        request.headers_mut().insert("Authorization", value);
    }
    if framing == Framing::V1 {
        request.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_static(V1_PROTOCOL),
        );
    }
    let tcp = TcpStream::connect((host, port))
        .await
        .map_err(|e| format!("cannot reach {host}:{port}: {e}"))?;
    let _ = rustix::net::sockopt::set_tcp_nodelay(&tcp, true);
    let mut config = WebSocketConfig::default();
    config.max_message_size = Some(MAX_MESSAGE);
    config.max_frame_size = Some(MAX_MESSAGE);
    let (ws, _) = tokio_tungstenite::client_async_with_config(request, QuickAck(tcp), Some(config))
        .await
        .map_err(|e| e.to_string())?;
    Ok(KernelSocket { ws, framing })
}

impl KernelSocket {
    pub async fn send(&mut self, msg: &JupyterMessage, channel: Channel) -> Result<(), String> {
        let frame = match self.framing {
            Framing::V1 => Message::Binary(encode_v1(msg, channel)?),
            Framing::Json => {
                let mut value = serde_json::to_value(msg).map_err(|e| e.to_string())?;
                value["channel"] = serde_json::to_value(channel).map_err(|e| e.to_string())?;
                Message::Text(value.to_string().into())
            }
        };
        self.ws.send(frame).await.map_err(|e| e.to_string())
    }

    /// The next kernel message; `None` once the socket is closed. Frames
    /// that do not parse are skipped (logged).
    pub async fn recv(&mut self) -> Option<JupyterMessage> {
        loop {
            let frame = match self.ws.next().await? {
                Ok(f) => f,
                Err(e) => {
                    tracing::debug!("kernel socket: {e}");
                    return None;
                }
            };
            let parsed = match frame {
                Message::Binary(b) => decode_v1(&b),
                Message::Text(t) => {
                    serde_json::from_str::<JupyterMessage>(t.as_str()).map_err(|e| e.to_string())
                }
                Message::Close(_) => return None,
                _ => continue,
            };
            match parsed {
                Ok(m) => return Some(m),
                Err(e) => tracing::debug!("skipping a kernel message that does not parse: {e}"),
            }
        }
    }
}

fn channel_name(channel: Channel) -> &'static str {
    match channel {
        Channel::Shell => "shell",
        Channel::Control => "control",
        Channel::Stdin => "stdin",
        Channel::IOPub => "iopub",
        Channel::Heartbeat => "hb",
    }
}

/// A message in the v1 binary framing.
fn encode_v1(msg: &JupyterMessage, channel: Channel) -> Result<Bytes, String> {
    let parts: Vec<Vec<u8>> = vec![
        to_json(&msg.header)?,
        match &msg.parent_header {
            Some(h) => to_json(h)?,
            None => b"{}".to_vec(),
        },
        to_json(&msg.metadata)?,
        to_json(&msg.content)?,
    ];
    let channel = channel_name(channel).as_bytes();
    let buffers: Vec<&[u8]> = msg.buffers.iter().map(|b| b.as_ref()).collect();
    // Offsets: start of the channel, then the end of every part.
    let count = 1 + 1 + parts.len() + buffers.len();
    let mut offsets = Vec::with_capacity(count);
    let mut at = 8 * (1 + count);
    offsets.push(at);
    at += channel.len();
    offsets.push(at);
    for p in parts
        .iter()
        .map(Vec::as_slice)
        .chain(buffers.iter().copied())
    {
        at += p.len();
        offsets.push(at);
    }
    let mut out = Vec::with_capacity(at);
    out.extend_from_slice(&(offsets.len() as u64).to_le_bytes());
    for o in &offsets {
        out.extend_from_slice(&(*o as u64).to_le_bytes());
    }
    out.extend_from_slice(channel);
    for p in parts
        .iter()
        .map(Vec::as_slice)
        .chain(buffers.iter().copied())
    {
        out.extend_from_slice(p);
    }
    Ok(Bytes::from(out))
}

/// A message from the v1 binary framing.
fn decode_v1(frame: &[u8]) -> Result<JupyterMessage, String> {
    let word = |i: usize| -> Result<usize, String> {
        frame
            .get(8 * i..8 * i + 8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize)
            .ok_or_else(|| "truncated frame".to_string())
    };
    let n = word(0)?;
    if !(6..=1 + 4096).contains(&n) {
        return Err(format!("{n} offsets"));
    }
    let offsets: Vec<usize> = (1..=n).map(word).collect::<Result<_, _>>()?;
    if offsets.windows(2).any(|w| w[0] > w[1]) || offsets[n - 1] > frame.len() {
        return Err("offsets out of order".into());
    }
    let part = |i: usize| &frame[offsets[i]..offsets[i + 1]];
    let channel = std::str::from_utf8(part(0)).map_err(|e| e.to_string())?;
    let parse = |i: usize| -> Result<serde_json::Value, String> {
        serde_json::from_slice(part(i)).map_err(|e| e.to_string())
    };
    let value = serde_json::json!({
        "header": parse(1)?,
        "parent_header": parse(2)?,
        "metadata": parse(3)?,
        "content": parse(4)?,
    });
    let mut msg = JupyterMessage::from_value(value).map_err(|e| e.to_string())?;
    msg.buffers = (5..n - 1)
        .map(|i| Bytes::copy_from_slice(part(i)))
        .collect();
    msg.channel = serde_json::from_value(serde_json::Value::String(channel.into())).ok();
    Ok(msg)
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, String> {
    serde_json::to_vec(v).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use jupyter_protocol::{ExecuteRequest, JupyterMessageContent};

    #[test]
    fn v1_frames_round_trip() {
        let msg: JupyterMessage = ExecuteRequest::new("x = 1".into()).into();
        let frame = encode_v1(&msg, Channel::Shell).unwrap();
        let back = decode_v1(&frame).unwrap();
        assert_eq!(back.header.msg_id, msg.header.msg_id);
        assert!(matches!(back.channel, Some(Channel::Shell)));
        match back.content {
            JupyterMessageContent::ExecuteRequest(r) => assert_eq!(r.code, "x = 1"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn v1_frames_that_lie_are_refused() {
        let mut frame = encode_v1(&ExecuteRequest::new("1".into()).into(), Channel::Shell)
            .unwrap()
            .to_vec();
        frame[8..16].copy_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(decode_v1(&frame).is_err());
        assert!(decode_v1(&frame[..20]).is_err());
        assert!(decode_v1(&[]).is_err());
    }
}
