//! Bytes in, commands out. imap-codec's fragmentizer splits the stream into lines and literals
//! (so a malformed command is skipped whole, literal included, never re-read as commands), its
//! decoders parse complete messages; this module adds our limits and says when a synchronizing
//! literal may be sent.

use imap_codec::fragmentizer::{DecodeMessageError, FragmentInfo, Fragmentizer};
use imap_codec::imap_types::IntoStatic;
use imap_codec::imap_types::auth::AuthenticateData;
use imap_codec::imap_types::command::Command;
use imap_codec::imap_types::core::{LiteralMode, Tag};
use imap_codec::{AuthenticateDataCodec, CommandCodec, IdleDoneCodec};

/// What the next complete message is expected to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Command,
    /// A SASL response line (after `+` to AUTHENTICATE).
    AuthenticateData,
    /// `DONE` (during IDLE).
    IdleDone,
}

#[derive(Debug)]
pub enum Event {
    Command(Command<'static>),
    AuthenticateData(AuthenticateData<'static>),
    IdleDone,
    /// A synchronizing literal was announced and is acceptable: send a continuation request.
    Continue,
    /// A message that cannot be processed; the connection goes on.
    Reject {
        tag: Option<Tag<'static>>,
        /// TOOBIG literal (answered NO) rather than a syntax error (answered BAD).
        too_big: bool,
        reason: String,
    },
    /// The stream cannot be followed any more: answer BYE and close.
    Fatal {
        tag: Option<Tag<'static>>,
        reason: String,
    },
}

pub struct Input {
    fragmentizer: Fragmentizer,
    mode: Mode,
    max_line: usize,
    max_literal: u32,
    /// Where the line being read starts in the current message.
    line_start: usize,
    /// A fatal event was returned: the stream cannot be followed any more.
    dead: bool,
}

impl Input {
    pub fn new(max_line: usize, max_literal: u32) -> Input {
        // A message holds one command: its lines and its literals.
        let max_message = (max_literal as u64 + 4 * max_line as u64).min(u32::MAX as u64) as u32;
        Input {
            fragmentizer: Fragmentizer::new(max_message),
            mode: Mode::Command,
            max_line,
            max_literal,
            line_start: 0,
            dead: false,
        }
    }

    pub fn set_mode(&mut self, mode: Mode) {
        self.mode = mode;
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.fragmentizer.enqueue_bytes(bytes);
    }

    /// True while part of a message has arrived (the command timeout runs).
    pub fn partial(&self) -> bool {
        !self.fragmentizer.message_bytes().is_empty() && !self.fragmentizer.is_message_complete()
    }

    fn tag(&self) -> Option<Tag<'static>> {
        self.fragmentizer.decode_tag().map(IntoStatic::into_static)
    }

    /// The next event, or `None` when more bytes are needed.
    pub fn next_event(&mut self) -> Option<Event> {
        if self.dead {
            return None;
        }
        let event = self.scan();
        self.dead = matches!(event, Some(Event::Fatal { .. }));
        event
    }

    fn scan(&mut self) -> Option<Event> {
        loop {
            let Some(fragment) = self.fragmentizer.progress() else {
                let pending = self.fragmentizer.message_bytes().len();
                if !self.fragmentizer.is_message_complete()
                    && pending.saturating_sub(self.line_start) > self.max_line
                {
                    return Some(Event::Fatal {
                        tag: self.tag(),
                        reason: format!("line longer than {} bytes", self.max_line),
                    });
                }
                return None;
            };
            match fragment {
                FragmentInfo::Line {
                    start,
                    end,
                    announcement,
                    ..
                } => {
                    self.line_start = end;
                    if end - start > self.max_line {
                        return Some(Event::Fatal {
                            tag: self.tag(),
                            reason: format!("line longer than {} bytes", self.max_line),
                        });
                    }
                    if let Some(literal) = announcement {
                        if self.mode != Mode::Command {
                            // Nothing but a command takes literals; let decoding reject it.
                            self.fragmentizer.poison_message();
                            continue;
                        }
                        if literal.length > self.max_literal {
                            let tag = self.tag();
                            let reason = format!(
                                "literal of {} bytes is over the {}-byte limit",
                                literal.length, self.max_literal
                            );
                            if literal.mode == LiteralMode::Sync {
                                // The client waits for `+` and will not send the literal.
                                self.fragmentizer.skip_message();
                                self.line_start = 0;
                                return Some(Event::Reject {
                                    tag,
                                    too_big: true,
                                    reason,
                                });
                            }
                            return Some(Event::Fatal { tag, reason });
                        }
                        // The literal's bytes are no part of a line: the next line starts
                        // after them.
                        self.line_start = end + literal.length as usize;
                        if literal.mode == LiteralMode::Sync {
                            return Some(Event::Continue);
                        }
                        continue;
                    }
                }
                FragmentInfo::Literal { end, .. } => {
                    self.line_start = end;
                    continue;
                }
            }
            if !self.fragmentizer.is_message_complete() {
                continue;
            }
            self.line_start = 0;
            return Some(self.decode());
        }
    }

    fn decode(&self) -> Event {
        let rejected = |tag: Option<Tag<'static>>, reason: &str| Event::Reject {
            tag,
            too_big: false,
            reason: reason.to_string(),
        };
        match self.mode {
            Mode::Command => match self.fragmentizer.decode_message(&CommandCodec::default()) {
                Ok(command) => Event::Command(command.into_static()),
                Err(DecodeMessageError::MessageTooLong { .. }) => Event::Reject {
                    tag: self.tag(),
                    too_big: true,
                    reason: "command too long".into(),
                },
                Err(_) => rejected(
                    self.tag(),
                    "syntax error, or a command or argument this server does not know",
                ),
            },
            Mode::AuthenticateData => {
                match self
                    .fragmentizer
                    .decode_message(&AuthenticateDataCodec::default())
                {
                    Ok(data) => Event::AuthenticateData(data.into_static()),
                    Err(_) => rejected(None, "invalid SASL response (base64 expected)"),
                }
            }
            Mode::IdleDone => match self.fragmentizer.decode_message(&IdleDoneCodec::default()) {
                Ok(_) => Event::IdleDone,
                Err(_) => rejected(None, "DONE expected during IDLE"),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(input: &mut Input) -> Vec<Event> {
        std::iter::from_fn(|| input.next_event()).collect()
    }

    #[test]
    fn commands_literals_and_limits() {
        let mut i = Input::new(100, 10);
        i.push(b"a NOOP\r\nb LOGIN {3}\r\n");
        let ev = events(&mut i);
        assert!(matches!(&ev[0], Event::Command(c) if c.tag.inner() == "a"));
        assert!(matches!(ev[1], Event::Continue));
        assert!(i.partial());
        i.push(b"bob {2+}\r\npw\r\n");
        let ev = events(&mut i);
        assert!(
            matches!(&ev[0], Event::Command(c) if c.tag.inner() == "b"),
            "{ev:?}"
        );

        // A synchronizing literal over the limit: NO, the literal never comes, the next
        // command is read normally.
        i.push(b"c APPEND INBOX {11}\r\nd NOOP\r\n");
        let ev = events(&mut i);
        assert!(
            matches!(&ev[0], Event::Reject { tag: Some(t), too_big: true, .. } if t.inner() == "c")
        );
        assert!(matches!(&ev[1], Event::Command(c) if c.tag.inner() == "d"));

        // A non-synchronizing one: its bytes are on their way, so the connection ends.
        i.push(b"e APPEND INBOX {11+}\r\n");
        assert!(matches!(&events(&mut i)[0], Event::Fatal { .. }));

        let mut i = Input::new(100, 10);
        i.push(b"f FOO bar\r\ng NOOP\r\n");
        let ev = events(&mut i);
        assert!(
            matches!(&ev[0], Event::Reject { tag: Some(t), too_big: false, .. } if t.inner() == "f")
        );
        assert!(matches!(&ev[1], Event::Command(c) if c.tag.inner() == "g"));

        // A line that never ends is cut off once it passes the limit.
        i.push(&[b'x'; 150]);
        assert!(matches!(&events(&mut i)[0], Event::Fatal { .. }));
    }
}
