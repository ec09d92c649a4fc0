//! Responses on their way out: encoded by imap-codec into a buffer that is written to the
//! client when it grows past a threshold and at the end of every command, so a FETCH of a
//! whole mailbox streams instead of piling up in memory.

use std::borrow::Cow;
use std::time::Duration;

use imap_codec::ResponseCodec;
use imap_codec::encode::Encoder;
use imap_codec::imap_types::core::{Tag, Text};
use imap_codec::imap_types::response::{
    Bye, Code, CommandContinuationRequest, Data, Response, Status, StatusBody, StatusKind, Tagged,
};
use tokio::io::{AsyncWrite, AsyncWriteExt};

/// A socket's writing side. `Any` so that the connection can take its own half back for
/// STARTTLS.
pub trait Sink: AsyncWrite + Unpin + Send + std::any::Any {}
impl<T: AsyncWrite + Unpin + Send + std::any::Any> Sink for T {}

/// Where encoded responses go. Without a sink (tests) everything stays in the buffer.
pub struct Out {
    codec: ResponseCodec,
    buf: Vec<u8>,
    sink: Option<Box<dyn Sink>>,
    flush_threshold: usize,
    write_timeout: Duration,
}

/// Human-readable text for a response: never empty, no CR or LF (imap-types refuses both).
pub fn text(s: &str) -> Text<'static> {
    let clean: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let clean = clean.trim();
    let clean = if clean.is_empty() { "done" } else { clean };
    // A text starting with '[' would be read as a response code.
    let clean = if clean.starts_with('[') {
        format!("- {clean}")
    } else {
        clean.to_string()
    };
    Text::try_from(clean).unwrap_or_else(|_| Text::unvalidated("done"))
}

/// A response code imap-types has no variant for (`NONEXISTENT`, `TRYCREATE`, ...).
pub fn code(atom: &'static str) -> Code<'static> {
    Code::Other(imap_codec::imap_types::response::CodeOther::unvalidated(
        Cow::Borrowed(atom.as_bytes()),
    ))
}

impl Out {
    /// An output that keeps everything in memory (tests, and the sans-I/O core).
    pub fn buffered() -> Out {
        Out {
            codec: ResponseCodec::default(),
            buf: Vec::new(),
            sink: None,
            flush_threshold: usize::MAX,
            write_timeout: Duration::MAX,
        }
    }

    pub fn to_sink(sink: Box<dyn Sink>, flush_threshold: usize, write_timeout: Duration) -> Out {
        Out {
            codec: ResponseCodec::default(),
            buf: Vec::with_capacity(flush_threshold.min(1 << 20)),
            sink: Some(sink),
            flush_threshold,
            write_timeout,
        }
    }

    /// Gives the sink back (after a flush), e.g. to start TLS on the socket.
    pub fn take_sink(&mut self) -> Option<Box<dyn Sink>> {
        self.sink.take()
    }

    fn encode(&mut self, response: &Response<'_>) {
        let bytes = self.codec.encode(response).dump();
        self.buf.extend_from_slice(&bytes);
    }

    pub fn data(&mut self, data: Data<'_>) {
        self.encode(&Response::Data(data));
    }

    pub fn data_opt(&mut self, data: Option<Data<'_>>) {
        if let Some(data) = data {
            self.data(data);
        }
    }

    pub fn tagged(
        &mut self,
        tag: Tag<'_>,
        kind: StatusKind,
        code: Option<Code<'_>>,
        message: &str,
    ) {
        self.encode(&Response::Status(Status::Tagged(Tagged {
            tag,
            body: StatusBody {
                kind,
                code,
                text: text(message),
            },
        })));
    }

    pub fn untagged(&mut self, kind: StatusKind, code: Option<Code<'_>>, message: &str) {
        self.encode(&Response::Status(Status::Untagged(StatusBody {
            kind,
            code,
            text: text(message),
        })));
    }

    pub fn bye(&mut self, code: Option<Code<'_>>, message: &str) {
        self.encode(&Response::Status(Status::Bye(Bye {
            code,
            text: text(message),
        })));
    }

    /// `+ text`: go on (a literal, IDLE).
    pub fn continue_text(&mut self, message: &str) {
        let req = CommandContinuationRequest::basic(None, text(message))
            .unwrap_or_else(|_| CommandContinuationRequest::base64(Vec::new()));
        self.encode(&Response::CommandContinuationRequest(req));
    }

    /// `+ <base64>`: a SASL challenge with data.
    pub fn continue_base64(&mut self, data: &[u8]) {
        self.encode(&Response::CommandContinuationRequest(
            CommandContinuationRequest::base64(data.to_vec()),
        ));
    }

    /// `+ ` with empty base64 data (a SASL challenge).
    pub fn continue_empty(&mut self) {
        self.encode(&Response::CommandContinuationRequest(
            CommandContinuationRequest::base64(Vec::new()),
        ));
    }

    /// Writes the buffer out if it has grown past the threshold.
    pub async fn maybe_flush(&mut self) -> std::io::Result<()> {
        if self.buf.len() >= self.flush_threshold {
            self.flush().await?;
        }
        Ok(())
    }

    /// Writes everything buffered (a no-op without a sink).
    pub async fn flush(&mut self) -> std::io::Result<()> {
        let Some(sink) = self.sink.as_mut() else {
            return Ok(());
        };
        if self.buf.is_empty() {
            return Ok(());
        }
        let write = async {
            sink.write_all(&self.buf).await?;
            sink.flush().await
        };
        match tokio::time::timeout(self.write_timeout, write).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "the client does not read its responses",
                ));
            }
        }
        self.buf.clear();
        Ok(())
    }

    /// Takes what was buffered (tests).
    pub fn take(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buf)
    }

    /// Closes the write side after a final flush.
    pub async fn shutdown(&mut self) {
        if self.flush().await.is_ok()
            && let Some(sink) = self.sink.as_mut()
        {
            let _ = sink.shutdown().await;
        }
    }
}
