//! The network side: a TCP listener and one task per connection that moves bytes between the
//! socket and the sans-I/O core ([`Input`] → [`Session`] → reply bytes).
//!
//! Bounded everywhere: the socket is read only when every complete event has been handled (so
//! a pipelining client is at most one read buffer ahead, a message at most the size limit plus
//! one read), replies go out with a write timeout, and the time for a command and between the
//! reads of a message is limited. Connections beyond `max_connections` are answered 421.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::LmtpConfig;
use super::input::Input;
use super::reply::Reply;
use super::session::{Context, Flow, Session};
use crate::mail::account::Accounts;
use crate::mail::delivery::Deliverer;

/// Bytes read from the socket at a time.
const READ_CHUNK: usize = 64 * 1024;

pub struct LmtpServer {
    ctx: Arc<Context>,
    slots: Arc<Semaphore>,
}

impl LmtpServer {
    pub fn new(config: LmtpConfig, accounts: Arc<Accounts>) -> LmtpServer {
        let slots = Arc::new(Semaphore::new(config.max_connections));
        LmtpServer {
            ctx: Context::new(config, accounts),
            slots,
        }
    }

    pub fn deliverer(&self) -> &Arc<Deliverer> {
        &self.ctx.deliverer
    }

    /// Accepts connections until `shutdown` resolves. Connections already open finish on
    /// their own (each has its timeouts).
    pub async fn serve(
        &self,
        listener: TcpListener,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> std::io::Result<()> {
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => return Ok(()),
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        if let Err(e) = stream.set_nodelay(true) {
                            tracing::warn!(%peer, error = %e, "cannot set TCP_NODELAY");
                        }
                        self.spawn(stream, peer.to_string());
                    }
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                },
            }
        }
    }

    /// Serves one connection of any stream (TCP, a Unix socket) on a task of its own. `peer`
    /// names the client in logs and in the Received line (`ip:port` for TCP).
    pub fn spawn<S>(&self, stream: S, peer: String)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let ctx = self.ctx.clone();
        match self.slots.clone().try_acquire_owned() {
            Ok(slot) => {
                tokio::spawn(async move {
                    connection(ctx, stream, peer).await;
                    drop(slot);
                });
            }
            Err(_) => {
                tracing::warn!(%peer, "too many LMTP connections; refused");
                tokio::spawn(async move {
                    let mut stream = stream;
                    let mut out = Vec::new();
                    Reply::new(
                        421,
                        [4, 3, 2],
                        format!(
                            "{} Too many connections, try again later",
                            ctx.config.hostname
                        ),
                    )
                    .write(&mut out);
                    let _ = tokio::time::timeout(ctx.config.write_timeout, async {
                        stream.write_all(&out).await?;
                        stream.shutdown().await
                    })
                    .await;
                });
            }
        }
    }
}

async fn send<W: AsyncWrite + Unpin>(
    writer: &mut W,
    out: &mut Vec<u8>,
    ctx: &Context,
) -> std::io::Result<()> {
    if out.is_empty() {
        return Ok(());
    }
    let written = tokio::time::timeout(ctx.config.write_timeout, writer.write_all(out)).await;
    out.clear();
    match written {
        Ok(r) => r,
        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
    }
}

async fn connection<S>(ctx: Arc<Context>, stream: S, peer: String)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    tracing::debug!(peer, "LMTP connected");
    let cfg = ctx.config.clone();
    let (mut reader, mut writer) = tokio::io::split(stream);
    let mut session = Session::new(ctx.clone(), peer.clone());
    let mut input = Input::new(cfg.max_line, cfg.max_message_size);
    let mut out = Vec::new();
    session.greeting(&mut out);
    if send(&mut writer, &mut out, &ctx).await.is_err() {
        return;
    }
    let mut buf = vec![0u8; READ_CHUNK];
    let mut last_read = Instant::now();
    let mut last_command = Instant::now();
    loop {
        while let Some(event) = input.next_event() {
            let flow = session.handle(event, &mut out).await;
            input.set_mode(session.input_mode());
            last_command = Instant::now();
            if flow == Flow::Close {
                let _ = send(&mut writer, &mut out, &ctx).await;
                let _ = tokio::time::timeout(cfg.write_timeout, writer.shutdown()).await;
                tracing::debug!(peer, "LMTP closed");
                return;
            }
        }
        if let Err(e) = send(&mut writer, &mut out, &ctx).await {
            tracing::debug!(peer, error = %e, "LMTP connection lost");
            return;
        }
        let (deadline, why) = if input.in_message() {
            (last_read + cfg.data_timeout, "message data")
        } else {
            (last_command + cfg.command_timeout, "a command")
        };
        tokio::select! {
            read = reader.read(&mut buf) => match read {
                Ok(0) | Err(_) => {
                    tracing::debug!(peer, "LMTP client went away");
                    return;
                }
                Ok(n) => {
                    last_read = Instant::now();
                    input.push(&buf[..n]);
                }
            },
            _ = tokio::time::sleep_until(deadline) => {
                tracing::info!(peer, "LMTP timeout waiting for {why}");
                Reply::new(
                    421,
                    [4, 4, 2],
                    format!("{} Timeout waiting for {why}, closing connection", cfg.hostname),
                )
                .write(&mut out);
                let _ = send(&mut writer, &mut out, &ctx).await;
                let _ = tokio::time::timeout(cfg.write_timeout, writer.shutdown()).await;
                return;
            }
        }
    }
}
