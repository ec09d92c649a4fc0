//! The network side: a TCP listener and one task per connection that moves bytes between the
//! socket and the sans-I/O core ([`Input`] → [`Session`] → [`Out`]).
//!
//! Bounded everywhere: the socket is read only when every complete command has been handled
//! (so a pipelining client fills at most one read buffer ahead), output is flushed in chunks
//! with a write timeout, and each state has a timeout (login, a half-sent command, inactivity).
//! TCP_NODELAY is set on every socket: multi-line replies must not wait for delayed ACKs.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

use super::ImapConfig;
use super::input::Input;
use super::output::Out;
use super::session::{Context, Flow, Session};
use crate::mail::account::Accounts;

/// Bytes read from the socket at a time.
const READ_CHUNK: usize = 8 * 1024;

pub struct ImapServer {
    ctx: Arc<Context>,
}

impl ImapServer {
    pub fn new(config: ImapConfig, accounts: Arc<Accounts>) -> ImapServer {
        ImapServer {
            ctx: Arc::new(Context { config, accounts }),
        }
    }

    /// Accepts connections until `shutdown` resolves.
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
                        let ctx = self.ctx.clone();
                        tokio::spawn(connection(ctx, stream, peer));
                    }
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
    }
}

async fn connection(ctx: Arc<Context>, stream: TcpStream, peer: SocketAddr) {
    if let Err(e) = stream.set_nodelay(true) {
        tracing::warn!(%peer, error = %e, "cannot set TCP_NODELAY");
    }
    tracing::debug!(%peer, "connected");
    let cfg = ctx.config.clone();
    let (mut reader, writer) = stream.into_split();
    let mut out = Out::to_sink(Box::new(writer), cfg.flush_threshold, cfg.write_timeout);
    let mut session = Session::new(ctx, peer.to_string());
    let mut input = Input::new(cfg.max_line, cfg.max_literal);
    session.greeting(&mut out);
    if out.flush().await.is_err() {
        return;
    }
    let mut buf = vec![0u8; READ_CHUNK];
    let mut last_command = Instant::now();
    let mut command_started: Option<Instant> = None;
    let mut next_keepalive = Instant::now() + cfg.keepalive;
    loop {
        while let Some(event) = input.next_event() {
            let was_idling = session.idling();
            match session.handle(event, &mut out).await {
                Ok(Flow::Continue) => {}
                Ok(Flow::Close) => {
                    out.shutdown().await;
                    tracing::debug!(%peer, "closed");
                    return;
                }
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "connection lost");
                    return;
                }
            }
            input.set_mode(session.input_mode());
            last_command = Instant::now();
            if session.idling() && !was_idling {
                next_keepalive = Instant::now() + cfg.keepalive;
            }
            if let Err(e) = out.flush().await {
                tracing::debug!(%peer, error = %e, "connection lost");
                return;
            }
        }
        command_started = match (input.partial(), command_started) {
            (true, None) => Some(Instant::now()),
            (true, started) => started,
            (false, _) => None,
        };
        let (deadline, why) = match command_started {
            Some(t) => (t + cfg.command_timeout, "command not completed in time"),
            None if session.authenticated() => {
                (last_command + cfg.idle_timeout, "idle for too long")
            }
            None => (last_command + cfg.login_timeout, "no login in time"),
        };
        let idling = session.idling();
        tokio::select! {
            read = reader.read(&mut buf) => match read {
                Ok(0) | Err(_) => {
                    tracing::debug!(%peer, "client went away");
                    return;
                }
                Ok(n) => input.push(&buf[..n]),
            },
            _ = tokio::time::sleep_until(deadline) => {
                out.bye(None, &format!("autologout: {why}"));
                out.shutdown().await;
                return;
            }
            _ = session.changed(), if idling => {
                if session.idle_update(&mut out).await.is_err() || out.flush().await.is_err() {
                    return;
                }
            }
            _ = tokio::time::sleep_until(next_keepalive), if idling => {
                next_keepalive = Instant::now() + cfg.keepalive;
                out.untagged(
                    imap_codec::imap_types::response::StatusKind::Ok,
                    None,
                    "still here",
                );
                if out.flush().await.is_err() {
                    return;
                }
            }
        }
    }
}
