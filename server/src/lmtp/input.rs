//! Bytes → events. Command lines are framed here (so that our line limit holds, whatever the
//! parser's own) and parsed by smtp-proto's `Request::parse`; a message after DATA goes through
//! its `DataReceiver` (dot-unstuffing, the `CRLF.CRLF` end only: a bare-LF dot is data, which
//! keeps SMTP smuggling out), a BDAT chunk through its `BdatReceiver`. What goes past a limit
//! is read and thrown away by its `DummyDataReceiver`, so the conversation stays in step.
//!
//! BDAT is framed here, not by the session: its chunk follows its line at once, whether or not
//! the session will accept it.

use smtp_proto::Request;
use smtp_proto::request::receiver::{BdatReceiver, DataReceiver, DummyDataReceiver};

#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// A command line, parsed (never `Bdat`: see `Chunk`).
    Command(Request<String>),
    /// A command line the parser refused.
    Invalid(smtp_proto::Error),
    /// A command line longer than the limit; it was discarded up to its end.
    LineTooLong,
    /// The message after DATA, dot-unstuffed, without the final `.` line.
    Message(Vec<u8>),
    /// The message after DATA went past the size limit; the rest was read and discarded.
    MessageTooLarge,
    /// A BDAT chunk.
    Chunk { data: Vec<u8>, last: bool },
    /// A BDAT chunk larger than the size limit, read and discarded.
    ChunkTooLarge { last: bool },
}

/// What the next bytes are, as far as the session is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Command,
    /// The session accepted DATA (and sent 354).
    Data,
}

enum State {
    Lines,
    /// The rest of a line that went past the limit.
    SkipLine,
    Data(DataReceiver, Vec<u8>),
    DataDiscard(DummyDataReceiver),
    Chunk(BdatReceiver, Vec<u8>, bool),
    ChunkDiscard(DummyDataReceiver, bool),
}

pub struct Input {
    buf: Vec<u8>,
    /// Bytes of `buf` already consumed.
    at: usize,
    state: State,
    max_line: usize,
    max_message: u64,
}

impl Input {
    pub fn new(max_line: usize, max_message: u64) -> Input {
        Input {
            buf: Vec::new(),
            at: 0,
            state: State::Lines,
            max_line,
            max_message,
        }
    }

    pub fn push(&mut self, bytes: &[u8]) {
        if self.at > 0 {
            self.buf.drain(..self.at);
            self.at = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Switches to reading a message when the session accepted DATA.
    pub fn set_mode(&mut self, mode: Mode) {
        if mode == Mode::Data && matches!(self.state, State::Lines) {
            self.state = State::Data(DataReceiver::new(), Vec::new());
        }
    }

    /// A message (DATA or a BDAT chunk) is arriving.
    pub fn in_message(&self) -> bool {
        !matches!(self.state, State::Lines | State::SkipLine)
    }

    /// Part of a command line is buffered.
    pub fn partial(&self) -> bool {
        self.at < self.buf.len() || matches!(self.state, State::SkipLine)
    }

    fn too_big(&self, len: usize) -> bool {
        len as u64 > self.max_message
    }

    pub fn next_event(&mut self) -> Option<Event> {
        loop {
            let rest = &self.buf[self.at..];
            match &mut self.state {
                State::Lines => {
                    let Some(end) = rest.iter().position(|&b| b == b'\n') else {
                        if rest.len() >= self.max_line {
                            self.at = self.buf.len();
                            self.state = State::SkipLine;
                            return Some(Event::LineTooLong);
                        }
                        return None;
                    };
                    let line = &rest[..=end];
                    self.at += end + 1;
                    if line.len() > self.max_line {
                        return Some(Event::LineTooLong);
                    }
                    match Request::parse(&mut line.iter()) {
                        Ok(Request::Bdat {
                            chunk_size,
                            is_last,
                        }) => {
                            self.state = if self.too_big(chunk_size) {
                                State::ChunkDiscard(
                                    DummyDataReceiver::new_bdat(chunk_size),
                                    is_last,
                                )
                            } else {
                                State::Chunk(
                                    BdatReceiver::new(chunk_size, is_last),
                                    Vec::with_capacity(chunk_size.min(1 << 20)),
                                    is_last,
                                )
                            };
                        }
                        Ok(request) => return Some(Event::Command(request.into_owned())),
                        Err(e) => return Some(Event::Invalid(e)),
                    }
                }
                State::SkipLine => {
                    let Some(end) = rest.iter().position(|&b| b == b'\n') else {
                        self.at = self.buf.len();
                        return None;
                    };
                    self.at += end + 1;
                    self.state = State::Lines;
                }
                State::Data(receiver, data) => {
                    let mut it = rest.iter();
                    let done = receiver.ingest(&mut it, data);
                    self.at += rest.len() - it.len();
                    let over = data.len() as u64 > self.max_message;
                    if done {
                        let event = if over {
                            Event::MessageTooLarge
                        } else {
                            Event::Message(std::mem::take(data))
                        };
                        self.state = State::Lines;
                        return Some(event);
                    }
                    if over {
                        self.state = State::DataDiscard(DummyDataReceiver::new_data(receiver));
                        continue;
                    }
                    return None;
                }
                State::DataDiscard(receiver) => {
                    let mut it = rest.iter();
                    let done = receiver.ingest(&mut it);
                    self.at += rest.len() - it.len();
                    if !done {
                        return None;
                    }
                    self.state = State::Lines;
                    return Some(Event::MessageTooLarge);
                }
                State::Chunk(receiver, data, last) => {
                    let mut it = rest.iter();
                    let done = receiver.ingest(&mut it, data);
                    self.at += rest.len() - it.len();
                    if !done {
                        return None;
                    }
                    let event = Event::Chunk {
                        data: std::mem::take(data),
                        last: *last,
                    };
                    self.state = State::Lines;
                    return Some(event);
                }
                State::ChunkDiscard(receiver, last) => {
                    let mut it = rest.iter();
                    let done = receiver.ingest(&mut it);
                    self.at += rest.len() - it.len();
                    if !done {
                        return None;
                    }
                    let event = Event::ChunkTooLarge { last: *last };
                    self.state = State::Lines;
                    return Some(event);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(input: &mut Input, bytes: &[u8]) -> Vec<Event> {
        input.push(bytes);
        std::iter::from_fn(|| input.next_event()).collect()
    }

    /// Events of what was pushed so far, switching to DATA as a session that accepts it does.
    fn drain(input: &mut Input, got: &mut Vec<Event>) {
        while let Some(e) = input.next_event() {
            let data = e == Event::Command(Request::Data);
            got.push(e);
            if data {
                input.set_mode(Mode::Data);
            }
        }
    }

    #[test]
    fn lines_data_and_chunks_in_one_buffer_and_split_anywhere() {
        let wire: &[u8] = b"LHLO mx\r\nMAIL FROM:<a@b>\r\nDATA\r\nhi\r\n..dot\r\n.\r\nBDAT 3\r\nabcBDAT 0 LAST\r\nQUIT\r\n";
        for split in 0..wire.len() {
            let mut input = Input::new(100, 1000);
            let mut got = Vec::new();
            input.push(&wire[..split]);
            drain(&mut input, &mut got);
            input.push(&wire[split..]);
            drain(&mut input, &mut got);
            let names: Vec<String> = got
                .iter()
                .map(|e| match e {
                    Event::Command(r) => r.name().to_string(),
                    Event::Message(m) => String::from_utf8_lossy(m).into_owned(),
                    Event::Chunk { data, last } => {
                        format!(
                            "{}{}",
                            String::from_utf8_lossy(data),
                            if *last { "|" } else { "" }
                        )
                    }
                    other => format!("{other:?}"),
                })
                .collect();
            assert_eq!(
                names,
                ["LHLO", "MAIL", "DATA", "hi\r\n.dot\r\n", "abc", "|", "QUIT"],
                "split at {split}"
            );
            assert!(!input.partial() && !input.in_message());
        }
    }

    #[test]
    fn limits_discard_and_keep_in_step() {
        let mut input = Input::new(20, 10);
        let long = format!("NOOP {}\r\nNOOP\r\n", "x".repeat(40));
        let got = events(&mut input, long.as_bytes());
        assert_eq!(got[0], Event::LineTooLong);
        assert!(matches!(got[1], Event::Command(Request::Noop { .. })));
        // A long line split across reads: refused once the limit is reached, rest skipped.
        let got = events(&mut input, "NOOP xxxxxxxxxxxxxxxxxxxxxxxx".as_bytes());
        assert_eq!(got, [Event::LineTooLong]);
        assert!(input.partial());
        let got = events(&mut input, b"yyyy\r\nRSET\r\n");
        assert_eq!(got, [Event::Command(Request::Rset)]);

        input.set_mode(Mode::Data);
        let got = events(&mut input, b"0123456789abcdef\r\n");
        assert!(got.is_empty());
        assert!(input.in_message());
        let got = events(&mut input, b"more\r\n.\r\nRSET\r\n");
        assert_eq!(got, [Event::MessageTooLarge, Event::Command(Request::Rset)]);

        let got = events(&mut input, b"BDAT 11 LAST\r\n0123456789aQUIT\r\n");
        assert_eq!(
            got,
            [
                Event::ChunkTooLarge { last: true },
                Event::Command(Request::Quit)
            ]
        );
    }
}
