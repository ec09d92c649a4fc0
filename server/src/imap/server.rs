//! The network side: a TCP listener and one task per connection that moves bytes between the
//! socket and the sans-I/O core ([`Input`] → [`Session`] → [`Out`]).
//!
//! A connection goes: PROXY v2 header (from trusted load balancers only), the per-address
//! connection limit, the TLS handshake on an implicit-TLS listener, then the session. STARTTLS
//! hands the socket back here for the handshake; whatever the client pipelined after it is
//! discarded with the old input buffer (no plaintext command injection into the TLS session).
//!
//! Bounded everywhere: the socket is read only when every complete command has been handled
//! (so a pipelining client fills at most one read buffer ahead), output is flushed in chunks
//! with a write timeout, and each state has a timeout (login, a half-sent command, inactivity).
//! TCP_NODELAY is set on every socket: multi-line replies must not wait for delayed ACKs.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

use super::ImapConfig;
use super::input::Input;
use super::output::{Out, code};
use super::session::{Context, Flow, Session};
use crate::mail::account::Accounts;
use crate::net::{Stream, TlsProvider};

/// Bytes read from the socket at a time.
const READ_CHUNK: usize = 8 * 1024;

/// How a listener's connections start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listen {
    /// Plaintext; STARTTLS is offered when the server has a certificate.
    Plain,
    /// TLS from the first byte (port 993).
    ImplicitTls,
}

pub struct ImapServer {
    ctx: Arc<Context>,
}

impl ImapServer {
    /// A server without TLS (dev mode and tests).
    pub fn new(config: ImapConfig, accounts: Arc<Accounts>) -> ImapServer {
        ImapServer::with_tls(config, accounts, None)
    }

    pub fn with_tls(
        config: ImapConfig,
        accounts: Arc<Accounts>,
        tls: Option<Arc<TlsProvider>>,
    ) -> ImapServer {
        ImapServer {
            ctx: Arc::new(Context::new(config, accounts, tls)),
        }
    }

    pub fn context(&self) -> &Arc<Context> {
        &self.ctx
    }

    /// Accepts plaintext connections until `shutdown` resolves.
    pub async fn serve(
        &self,
        listener: TcpListener,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> std::io::Result<()> {
        self.serve_on(listener, Listen::Plain, shutdown).await
    }

    /// Accepts connections until `shutdown` resolves.
    pub async fn serve_on(
        &self,
        listener: TcpListener,
        listen: Listen,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> std::io::Result<()> {
        if listen == Listen::ImplicitTls && self.ctx.tls.is_none() {
            return Err(std::io::Error::other(
                "an implicit-TLS listener needs a certificate",
            ));
        }
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => return Ok(()),
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        let ctx = self.ctx.clone();
                        tokio::spawn(connection(ctx, stream, peer, listen));
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

async fn connection(ctx: Arc<Context>, mut tcp: TcpStream, peer: SocketAddr, listen: Listen) {
    if let Err(e) = tcp.set_nodelay(true) {
        tracing::warn!(%peer, error = %e, "cannot set TCP_NODELAY");
    }
    let cfg = &ctx.config;
    let client = match cfg
        .proxy
        .client_address(&mut tcp, peer, cfg.login_timeout)
        .await
    {
        Ok(client) => client,
        Err(e) => {
            tracing::warn!(%peer, error = %e, "connection dropped: PROXY protocol");
            return;
        }
    };
    let _address_slot = match ctx.limits.connect(client.ip()) {
        Ok(slot) => slot,
        Err(e) => {
            tracing::warn!(%client, "connection refused: {e}");
            let mut out = Out::to_sink(Box::new(tcp), 1024, cfg.write_timeout);
            out.bye(Some(code("LIMIT")), &e.to_string());
            out.shutdown().await;
            return;
        }
    };
    tracing::debug!(%client, %peer, "connected");
    let mut stream = match listen {
        Listen::Plain => Stream::Plain(tcp),
        Listen::ImplicitTls => match handshake(&ctx, tcp, client).await {
            Some(s) => s,
            None => return,
        },
    };
    let mut session = Session::new(ctx.clone(), client.to_string());
    session.set_client_ip(client.ip());
    if stream.is_tls() {
        session.tls_started();
    }
    let mut greet = true;
    loop {
        match drive(&mut session, stream, greet).await {
            Some(Stream::Plain(tcp)) => {
                stream = match handshake(&ctx, tcp, client).await {
                    Some(s) => s,
                    None => return,
                };
                session.tls_started();
                greet = false;
            }
            _ => return,
        }
    }
}

async fn handshake(ctx: &Context, tcp: TcpStream, client: SocketAddr) -> Option<Stream> {
    let tls = ctx.tls.as_ref()?;
    match tokio::time::timeout(ctx.config.login_timeout, tls.acceptor().accept(tcp)).await {
        Ok(Ok(s)) => Some(Stream::Tls(Box::new(s))),
        Ok(Err(e)) => {
            tracing::info!(%client, error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::info!(%client, "TLS handshake timed out");
            None
        }
    }
}

/// Runs the session on `stream` until it ends (`None`) or asks for STARTTLS (the plain stream
/// back, with the tagged OK already sent).
async fn drive(session: &mut Session, stream: Stream, greet: bool) -> Option<Stream> {
    let cfg = session.ctx().config.clone();
    let peer = session.peer.clone();
    let (mut reader, writer): (ReadHalf<Stream>, WriteHalf<Stream>) = tokio::io::split(stream);
    let mut out = Out::to_sink(Box::new(writer), cfg.flush_threshold, cfg.write_timeout);
    let mut input = Input::new(cfg.max_line, cfg.max_literal);
    if greet {
        session.greeting(&mut out);
        out.flush().await.ok()?;
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
                Ok(Flow::StartTls) => {
                    out.flush().await.ok()?;
                    let sink: Box<dyn std::any::Any> = out.take_sink()?;
                    let writer = sink.downcast::<WriteHalf<Stream>>().ok()?;
                    return Some(reader.unsplit(*writer));
                }
                Ok(Flow::Close) => {
                    out.shutdown().await;
                    tracing::debug!(%peer, "closed");
                    return None;
                }
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "connection lost");
                    return None;
                }
            }
            input.set_mode(session.input_mode());
            last_command = Instant::now();
            if session.idling() && !was_idling {
                next_keepalive = Instant::now() + cfg.keepalive;
            }
            if let Err(e) = out.flush().await {
                tracing::debug!(%peer, error = %e, "connection lost");
                return None;
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
                    return None;
                }
                Ok(n) => input.push(&buf[..n]),
            },
            _ = tokio::time::sleep_until(deadline) => {
                out.bye(None, &format!("autologout: {why}"));
                out.shutdown().await;
                return None;
            }
            _ = session.changed(), if idling => {
                if session.idle_update(&mut out).await.is_err() || out.flush().await.is_err() {
                    return None;
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
                    return None;
                }
            }
        }
    }
}
