//! The summary of a message: everything IMAP needs to answer FETCH (ENVELOPE, BODYSTRUCTURE,
//! RFC822.SIZE, INTERNALDATE, BODY[HEADER], header fields) and most of SEARCH without downloading
//! the body, plus the byte offsets that turn BODY[1.2], BODY[1.MIME] or BINARY[1] into one ranged
//! read of the body blob (`message.rs`).
//!
//! Parsing is mail-parser's (no MIME parser of our own). The summary follows what mail-parser
//! actually parsed, not what the headers claim, so offsets always describe real bytes:
//! - a part that declares `multipart/*` but whose boundary never appears was read as one text
//!   part, and is summarised as `text/plain`;
//! - a `message/rfc822` part that could not be parsed as a message is summarised as `text/plain`;
//! - so is a multipart or message nested deeper than `MAX_MIME_DEPTH`.
//!
//! Raw header values (subject, date, message-id, content-id, ...) are kept as bytes, unfolded and
//! trimmed but not decoded: IMAP sends them as they are, and 8-bit garbage must survive.
//! Addresses and MIME parameters are mail-parser's parsed (decoded) values.
//!
//! The summary is stored encrypted to the user's age recipient (`SummaryRecord`, see
//! `MessageStore::put_message`), together with the per-message body key.

use mail_parser::{Address, Header, HeaderName, HeaderValue, Message, MessageParser, PartType};
use serde::{Deserialize, Serialize};

use super::message::MessageKey;

/// Version of the `SummaryRecord` encoding (postcard). Readers refuse other versions with a
/// typed error instead of misreading them.
pub const SUMMARY_FORMAT_VERSION: u16 = 1;

/// Deeper MIME nesting than this is summarised as an opaque `text/plain` leaf. mail-parser itself parses
/// iteratively, but our conversion and the serde (de)serialisation of the tree recurse; a hostile
/// message with thousands of nested multiparts must not overflow the stack.
pub const MAX_MIME_DEPTH: usize = 48;

/// INTERNALDATE, as given by whoever delivers or appends the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct InternalDate {
    pub unix_seconds: i64,
    /// The zone the date is shown in (`-0700` is -420).
    pub offset_minutes: i16,
}

/// The Date header, parsed, for SENTBEFORE/SENTON/SENTSINCE. IMAP compares the calendar date as
/// written in the header (time and zone disregarded), so the fields are kept as written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SentDate {
    pub year: u16,
    pub month: u8,
    pub day: u8,
    pub hour: u8,
    pub minute: u8,
    pub second: u8,
    pub offset_minutes: i16,
    /// The same instant as seconds since the epoch (UTC), for sorting.
    pub unix_seconds: i64,
}

/// One address as an IMAP ENVELOPE shows it: `(name adl mailbox host)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MailAddress {
    /// Display name, decoded by mail-parser (RFC 2047): the IMAP layer re-encodes a non-ASCII
    /// name unless the client enabled UTF8=ACCEPT.
    pub name: Option<String>,
    /// Source route: mail-parser drops it, so this is always `None` (IMAP NIL).
    pub adl: Option<String>,
    /// `None` when mail-parser found only a display name (`Bcc: someone`).
    pub mailbox: Option<String>,
    /// `None` for an address without a domain. The IMAP layer must not send NIL there for a
    /// mailbox: a NIL host marks a group in an ENVELOPE (Dovecot sends `MISSING_DOMAIN`).
    pub host: Option<String>,
}

/// An entry of an address list: a mailbox, or an RFC 5322 group (IMAP renders a group as a
/// start marker `(NIL NIL name NIL)`, its members, and an end marker `(NIL NIL NIL NIL)`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AddressEntry {
    Mailbox(MailAddress),
    Group {
        name: String,
        members: Vec<MailAddress>,
    },
}

/// The fields of an IMAP ENVELOPE. Absent headers are `None`/empty; RFC 3501's defaults (Sender
/// and Reply-To fall back to From) are the IMAP layer's to apply, so the summary stays what the
/// message says. When a header appears more than once, the first occurrence counts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub date: Option<Vec<u8>>,
    pub subject: Option<Vec<u8>>,
    pub from: Vec<AddressEntry>,
    pub sender: Vec<AddressEntry>,
    pub reply_to: Vec<AddressEntry>,
    pub to: Vec<AddressEntry>,
    pub cc: Vec<AddressEntry>,
    pub bcc: Vec<AddressEntry>,
    pub in_reply_to: Option<Vec<u8>>,
    pub message_id: Option<Vec<u8>>,
}

/// Where a part lies in the raw message: its MIME header is `header..body`, its content
/// `body..end` (without the CRLF that precedes the next boundary, as IMAP's BODY[n] wants).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartOffsets {
    pub header: u64,
    pub body: u64,
    pub end: u64,
}

impl PartOffsets {
    pub fn header_range(&self) -> std::ops::Range<u64> {
        self.header..self.body
    }
    pub fn body_range(&self) -> std::ops::Range<u64> {
        self.body..self.end
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disposition {
    /// Lower-cased: `inline`, `attachment`, ...
    pub kind: String,
    pub params: Vec<(String, String)>,
}

/// A node of the MIME tree (BODYSTRUCTURE).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BodyPart {
    /// Lower-cased media type and subtype (defaults applied: `text/plain`, or `message/rfc822`
    /// inside `multipart/digest`).
    pub media_type: String,
    pub media_subtype: String,
    /// Content-Type parameters as mail-parser decoded them (RFC 2231 continuations joined).
    pub params: Vec<(String, String)>,
    /// Raw Content-ID (with its angle brackets).
    pub id: Option<Vec<u8>>,
    pub description: Option<Vec<u8>>,
    /// Raw Content-Transfer-Encoding; `None` means IMAP's default, 7BIT.
    pub encoding: Option<Vec<u8>>,
    pub md5: Option<Vec<u8>>,
    pub disposition: Option<Disposition>,
    pub language: Vec<String>,
    pub location: Option<Vec<u8>>,
    pub offsets: PartOffsets,
    /// Size of the content in octets, as encoded (`end - body`).
    pub size: u64,
    /// Line count of the content, for `text/*` and `message/rfc822` parts (IMAP requires it
    /// there): line feeds, plus one for a last line without one.
    pub lines: Option<u64>,
    /// Sub-parts of a multipart; never empty (a multipart without parts is summarised as
    /// `text/plain`, see the module comment).
    pub children: Vec<BodyPart>,
    /// The encapsulated message of a `message/rfc822` (or `message/global`) part.
    pub message: Option<Box<Encapsulated>>,
}

/// A message inside a `message/rfc822` part.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Encapsulated {
    pub envelope: Envelope,
    /// Its body; `body.offsets.header_range()` is its header block (BODY[n.HEADER]) and
    /// `body.offsets.body_range()` its text (BODY[n.TEXT]).
    pub body: BodyPart,
    /// False when the part had a base64/quoted-printable transfer encoding (RFC 2046 forbids it,
    /// but it happens): mail-parser then parsed the *decoded* bytes, so the offsets inside refer
    /// to those, not to the raw message, and cannot be served by a range read.
    pub in_place: bool,
}

impl BodyPart {
    pub fn is_multipart(&self) -> bool {
        self.media_type == "multipart"
    }
}

/// What IMAP needs of a message without its body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    /// RFC822.SIZE: the raw message's length in octets.
    pub size: u64,
    pub internal_date: InternalDate,
    /// The top-level header block including the empty line that ends it (BODY[HEADER]); empty
    /// when the message has no headers.
    pub header: Vec<u8>,
    pub envelope: Envelope,
    pub sent_date: Option<SentDate>,
    /// The body's MIME tree; its `offsets` are `0..header.len()` (header) and
    /// `header.len()..size` (BODY[TEXT]).
    pub body: BodyPart,
}

/// What `s/<user>/<message>` holds, encrypted as a whole to the user's age recipient: the
/// summary and the per-message key that opens the body blob. Delivery needs only the recipient;
/// reading needs the identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SummaryRecord {
    /// Serialised first, so a reader can check it before decoding the rest.
    pub version: u16,
    pub summary: Summary,
    pub body_key: MessageKey,
}

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error(
        "summary format version {0} is not supported (this build reads {SUMMARY_FORMAT_VERSION})"
    )]
    UnsupportedVersion(u16),
    #[error("malformed summary: {0}")]
    Malformed(String),
}

impl SummaryRecord {
    pub fn new(summary: Summary, body_key: MessageKey) -> SummaryRecord {
        SummaryRecord {
            version: SUMMARY_FORMAT_VERSION,
            summary,
            body_key,
        }
    }

    /// The postcard encoding. Zeroized on drop: it contains the body key.
    pub fn encode(&self) -> Result<zeroize::Zeroizing<Vec<u8>>, RecordError> {
        postcard::to_allocvec(self)
            .map(zeroize::Zeroizing::new)
            .map_err(|e| RecordError::Malformed(e.to_string()))
    }

    pub fn decode(bytes: &[u8]) -> Result<SummaryRecord, RecordError> {
        let (version, _) = postcard::take_from_bytes::<u16>(bytes)
            .map_err(|e| RecordError::Malformed(e.to_string()))?;
        if version != SUMMARY_FORMAT_VERSION {
            return Err(RecordError::UnsupportedVersion(version));
        }
        postcard::from_bytes(bytes).map_err(|e| RecordError::Malformed(e.to_string()))
    }
}

impl Summary {
    /// Summarises a raw message. Never fails and never panics: a message mail-parser cannot make
    /// sense of (empty, no header at all, larger than its 32-bit offsets) is summarised as a
    /// header-less `text/plain` body covering every byte.
    pub fn parse(raw: &[u8], internal_date: InternalDate) -> Summary {
        let size = raw.len() as u64;
        let parsed = if raw.len() < u32::MAX as usize {
            MessageParser::default().parse(raw)
        } else {
            None
        };
        let Some(message) = parsed.filter(|m| !m.parts.is_empty()) else {
            return Summary {
                size,
                internal_date,
                header: Vec::new(),
                envelope: Envelope::default(),
                sent_date: None,
                body: opaque_text(raw, 0, 0, size),
            };
        };
        let conv = Converter { top: raw };
        let mut body = conv.part(&message, 0, false, 0);
        // The header block starts at the very first byte, even if mail-parser skipped junk lines
        // before the first field: BODY[HEADER] + BODY[TEXT] must give back the whole message.
        body.offsets.header = 0;
        body.offsets.end = size;
        body.offsets.body = body.offsets.body.min(size);
        body.size = size - body.offsets.body;
        if body.lines.is_some() {
            body.lines = Some(count_lines(slice(raw, body.offsets.body, size)));
        }
        let header = slice(raw, 0, body.offsets.body).to_vec();
        let root_headers = &message.parts[0].headers;
        Summary {
            size,
            internal_date,
            header,
            envelope: envelope(raw, root_headers),
            sent_date: sent_date(root_headers),
            body,
        }
    }

    /// The part an IMAP section path names (`[1, 2]` for BODY[1.2]); `[]` is the message body
    /// itself. Follows RFC 3501: a non-multipart message has one part, `1`; the parts of a
    /// `message/rfc822` part are those of the message it encapsulates. `None` if the path names
    /// nothing, or goes inside a message whose offsets are not in the raw message.
    pub fn section(&self, path: &[u32]) -> Option<&BodyPart> {
        enum Ctx<'a> {
            /// The body of a (top-level or encapsulated) message.
            Message(&'a BodyPart),
            Multipart(&'a BodyPart),
            Leaf,
        }
        let mut selected = &self.body;
        let mut ctx = Ctx::Message(&self.body);
        for &n in path {
            let index = usize::try_from(n).ok()?.checked_sub(1)?;
            let chosen = match ctx {
                Ctx::Message(body) if body.is_multipart() => body.children.get(index)?,
                Ctx::Message(body) if index == 0 => body,
                Ctx::Multipart(p) => p.children.get(index)?,
                Ctx::Message(_) | Ctx::Leaf => return None,
            };
            selected = chosen;
            ctx = if chosen.is_multipart() {
                Ctx::Multipart(chosen)
            } else {
                match &chosen.message {
                    Some(enc) if enc.in_place => Ctx::Message(&enc.body),
                    _ => Ctx::Leaf,
                }
            };
        }
        Some(selected)
    }
}

/// Builds `BodyPart`s from mail-parser's flat part lists.
struct Converter<'r> {
    /// The raw message: nested messages whose buffer is this one are "in place".
    top: &'r [u8],
}

impl Converter<'_> {
    /// Part `id` of `msg`; offsets refer to `msg.raw_message`.
    fn part(&self, msg: &Message<'_>, id: u32, in_digest: bool, depth: usize) -> BodyPart {
        let raw: &[u8] = msg.raw_message.as_ref();
        let Some(part) = msg.parts.get(id as usize) else {
            // A dangling id would be a mail-parser bug; describe nothing rather than panic.
            return opaque_text(raw, 0, 0, 0);
        };
        let len = raw.len() as u64;
        let header = u64::from(part.offset_header).min(len);
        let body = u64::from(part.offset_body).clamp(header, len);
        let end = u64::from(part.offset_end).clamp(body, len);

        let ct = last_header(&part.headers, &HeaderName::ContentType)
            .and_then(|h| h.value.as_content_type());
        let (mut media_type, mut media_subtype) = match ct {
            Some(ct) => (
                ct.c_type.to_ascii_lowercase(),
                ct.c_subtype
                    .as_deref()
                    .map(str::to_ascii_lowercase)
                    .unwrap_or_default(),
            ),
            None if in_digest => ("message".to_string(), "rfc822".to_string()),
            None => ("text".to_string(), "plain".to_string()),
        };
        let mut params: Vec<(String, String)> = ct
            .and_then(|ct| ct.attributes.as_ref())
            .map(|attrs| {
                attrs
                    .iter()
                    .map(|a| (a.name.to_string(), a.value.to_string()))
                    .collect()
            })
            .unwrap_or_default();
        let disposition = last_header(&part.headers, &HeaderName::ContentDisposition)
            .and_then(|h| h.value.as_content_type())
            .map(|d| Disposition {
                kind: d.c_type.to_ascii_lowercase(),
                params: d
                    .attributes
                    .as_ref()
                    .map(|attrs| {
                        attrs
                            .iter()
                            .map(|a| (a.name.to_string(), a.value.to_string()))
                            .collect()
                    })
                    .unwrap_or_default(),
            });
        let language =
            match last_header(&part.headers, &HeaderName::ContentLanguage).map(|h| &h.value) {
                Some(HeaderValue::Text(t)) => vec![t.to_string()],
                Some(HeaderValue::TextList(l)) => l.iter().map(|t| t.to_string()).collect(),
                _ => Vec::new(),
            };
        let raw_last = |name: HeaderName<'static>| {
            last_header(&part.headers, &name).map(|h| raw_value(raw, h))
        };

        let mut children = Vec::new();
        let mut message = None;
        match &part.body {
            PartType::Multipart(ids) if depth < MAX_MIME_DEPTH && !ids.is_empty() => {
                let digest = media_subtype == "digest";
                children = ids
                    .iter()
                    // mail-parser lists sub-parts by index into the same flat list; an id at or
                    // before this part's would be a cycle.
                    .filter(|&&child| child > id)
                    .map(|&child| self.part(msg, child, digest, depth + 1))
                    .collect();
            }
            PartType::Message(nested) if depth < MAX_MIME_DEPTH && !nested.parts.is_empty() => {
                let nested_raw: &[u8] = nested.raw_message.as_ref();
                let in_place = std::ptr::eq(nested_raw, self.top);
                let nested_headers = &nested.parts[0].headers;
                message = Some(Box::new(Encapsulated {
                    envelope: envelope(nested_raw, nested_headers),
                    body: self.part(nested, 0, false, depth + 1),
                    in_place,
                }));
            }
            _ => {}
        }
        // Structure follows the parse: what mail-parser read as one text or binary part is a
        // leaf, whatever its Content-Type claims (see the module comment).
        let declared_container = media_type == "multipart"
            || (media_type == "message" && matches!(media_subtype.as_str(), "rfc822" | "global"));
        let parsed_container = !children.is_empty() || message.is_some();
        if declared_container && !parsed_container {
            media_type = "text".to_string();
            media_subtype = "plain".to_string();
            params.retain(|(name, _)| !name.eq_ignore_ascii_case("boundary"));
        } else if !declared_container && parsed_container {
            // Cannot happen with mail-parser's rules; keep the tree consistent regardless.
            children.clear();
            message = None;
        }
        if media_subtype.is_empty() {
            // A Content-Type without a subtype: IMAP needs one.
            media_subtype = if media_type == "text" {
                "plain".to_string()
            } else {
                "octet-stream".to_string()
            };
        }

        let content = slice(raw, body, end);
        let lines = (media_type == "text" || message.is_some()).then(|| count_lines(content));
        BodyPart {
            media_type,
            media_subtype,
            params,
            id: raw_last(HeaderName::ContentId),
            description: raw_last(HeaderName::ContentDescription),
            encoding: raw_last(HeaderName::ContentTransferEncoding),
            md5: raw_last(HeaderName::ContentMd5),
            disposition,
            language,
            location: raw_last(HeaderName::ContentLocation),
            offsets: PartOffsets { header, body, end },
            size: end - body,
            lines,
            children,
            message,
        }
    }
}

/// A `text/plain` leaf over `body..end` of `raw`, for what could not be parsed.
fn opaque_text(raw: &[u8], header: u64, body: u64, end: u64) -> BodyPart {
    BodyPart {
        media_type: "text".to_string(),
        media_subtype: "plain".to_string(),
        params: Vec::new(),
        id: None,
        description: None,
        encoding: None,
        md5: None,
        disposition: None,
        language: Vec::new(),
        location: None,
        offsets: PartOffsets { header, body, end },
        size: end - body,
        lines: Some(count_lines(slice(raw, body, end))),
        children: Vec::new(),
        message: None,
    }
}

/// `raw[start..end]`, empty when out of bounds (offsets come from a parser of untrusted input).
fn slice(raw: &[u8], start: u64, end: u64) -> &[u8] {
    let start = usize::try_from(start).unwrap_or(usize::MAX);
    let end = usize::try_from(end).unwrap_or(usize::MAX);
    raw.get(start..end).unwrap_or_default()
}

fn count_lines(content: &[u8]) -> u64 {
    let lf = content.iter().filter(|&&b| b == b'\n').count() as u64;
    match content.last() {
        Some(b'\n') | None => lf,
        Some(_) => lf + 1,
    }
}

/// The value of a header field as written: unfolded (line breaks removed, RFC 5322 §2.2.3) and
/// trimmed, not decoded.
fn raw_value(raw: &[u8], h: &Header<'_>) -> Vec<u8> {
    let bytes = slice(raw, h.offset_start.into(), h.offset_end.into());
    let unfolded: Vec<u8> = bytes
        .iter()
        .copied()
        .filter(|&b| b != b'\r' && b != b'\n')
        .collect();
    unfolded.trim_ascii().to_vec()
}

fn first_header<'h, 'x>(
    headers: &'h [Header<'x>],
    name: &HeaderName<'_>,
) -> Option<&'h Header<'x>> {
    headers.iter().find(|h| &h.name == name)
}

/// MIME headers: the last occurrence, as mail-parser uses it to decide the structure.
fn last_header<'h, 'x>(headers: &'h [Header<'x>], name: &HeaderName<'_>) -> Option<&'h Header<'x>> {
    headers.iter().rev().find(|h| &h.name == name)
}

fn envelope(raw: &[u8], headers: &[Header<'_>]) -> Envelope {
    let raw_first =
        |name: HeaderName<'static>| first_header(headers, &name).map(|h| raw_value(raw, h));
    let addresses = |name: HeaderName<'static>| {
        first_header(headers, &name)
            .and_then(|h| h.value.as_address())
            .map(address_entries)
            .unwrap_or_default()
    };
    Envelope {
        date: raw_first(HeaderName::Date),
        subject: raw_first(HeaderName::Subject),
        from: addresses(HeaderName::From),
        sender: addresses(HeaderName::Sender),
        reply_to: addresses(HeaderName::ReplyTo),
        to: addresses(HeaderName::To),
        cc: addresses(HeaderName::Cc),
        bcc: addresses(HeaderName::Bcc),
        in_reply_to: raw_first(HeaderName::InReplyTo),
        message_id: raw_first(HeaderName::MessageId),
    }
}

fn mail_address(a: &mail_parser::Addr<'_>) -> MailAddress {
    let (mailbox, host) = match a.address.as_deref() {
        Some(addr) => match addr.rsplit_once('@') {
            Some((local, domain)) => (Some(local.to_string()), Some(domain.to_string())),
            None => (Some(addr.to_string()), None),
        },
        None => (None, None),
    };
    MailAddress {
        name: a.name.as_deref().map(str::to_string),
        adl: None,
        mailbox,
        host,
    }
}

fn address_entries(address: &Address<'_>) -> Vec<AddressEntry> {
    match address {
        Address::List(list) => list
            .iter()
            .map(|a| AddressEntry::Mailbox(mail_address(a)))
            .collect(),
        // mail-parser puts addresses outside any group into a group without a name.
        Address::Group(groups) => groups
            .iter()
            .flat_map(|g| match &g.name {
                Some(name) => vec![AddressEntry::Group {
                    name: name.to_string(),
                    members: g.addresses.iter().map(mail_address).collect(),
                }],
                None => g
                    .addresses
                    .iter()
                    .map(|a| AddressEntry::Mailbox(mail_address(a)))
                    .collect(),
            })
            .collect(),
    }
}

fn sent_date(headers: &[Header<'_>]) -> Option<SentDate> {
    let dt = first_header(headers, &HeaderName::Date)?
        .value
        .as_datetime()?;
    if !dt.is_valid() {
        return None;
    }
    let offset = i16::from(dt.tz_hour) * 60 + i16::from(dt.tz_minute);
    Some(SentDate {
        year: dt.year,
        month: dt.month,
        day: dt.day,
        hour: dt.hour,
        minute: dt.minute,
        second: dt.second,
        offset_minutes: if dt.tz_before_gmt { -offset } else { offset },
        unix_seconds: dt.to_timestamp(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DATE: InternalDate = InternalDate {
        unix_seconds: 1_700_000_000,
        offset_minutes: 60,
    };

    fn crlf(s: &str) -> Vec<u8> {
        s.replace('\n', "\r\n").into_bytes()
    }

    fn at(raw: &[u8], r: std::ops::Range<u64>) -> &[u8] {
        &raw[r.start as usize..r.end as usize]
    }

    fn mailbox(name: Option<&str>, mailbox: &str, host: &str) -> AddressEntry {
        AddressEntry::Mailbox(MailAddress {
            name: name.map(str::to_string),
            adl: None,
            mailbox: Some(mailbox.to_string()),
            host: Some(host.to_string()),
        })
    }

    #[test]
    fn simple_text_mail() {
        let raw = crlf(SIMPLE);
        let s = Summary::parse(&raw, DATE);
        assert_eq!(s.size, raw.len() as u64);
        assert_eq!(s.internal_date, DATE);
        let header_end = SIMPLE.find("\n\n").unwrap() + 2;
        assert_eq!(s.header, crlf(&SIMPLE[..header_end]));
        assert_eq!(s.body.offsets.header_range(), 0..s.header.len() as u64);
        assert_eq!(
            at(&raw, s.body.offsets.body_range()),
            crlf("Hello Bob,\nsecond line\n")
        );
        assert_eq!(s.body.size, s.body.offsets.end - s.body.offsets.body);
        assert_eq!(s.body.lines, Some(2));
        assert_eq!(
            (s.body.media_type.as_str(), s.body.media_subtype.as_str()),
            ("text", "plain")
        );
        assert!(s.body.children.is_empty() && s.body.message.is_none());

        let e = &s.envelope;
        assert_eq!(
            e.date.as_deref(),
            Some(&b"Tue, 14 Nov 2023 10:11:12 -0700"[..])
        );
        // Raw: encoded word kept, folding removed, whitespace kept.
        assert_eq!(
            e.subject.as_deref(),
            Some(&b"=?utf-8?q?Caf=C3=A9?= and folded"[..])
        );
        assert_eq!(
            e.from,
            vec![mailbox(Some("Alice Example"), "alice", "example.org")]
        );
        assert_eq!(
            e.to,
            vec![
                mailbox(None, "bob", "example.net"),
                mailbox(Some("Carol"), "carol", "example.com"),
            ]
        );
        assert_eq!(
            e.cc,
            vec![AddressEntry::Group {
                name: "undisclosed-recipients".to_string(),
                members: vec![],
            }]
        );
        assert!(e.sender.is_empty() && e.reply_to.is_empty() && e.bcc.is_empty());
        assert_eq!(e.message_id.as_deref(), Some(&b"<m1@example.org>"[..]));
        assert_eq!(e.in_reply_to.as_deref(), Some(&b"<m0@example.org>"[..]));

        let sent = s.sent_date.unwrap();
        assert_eq!((sent.year, sent.month, sent.day), (2023, 11, 14));
        assert_eq!((sent.hour, sent.minute, sent.second), (10, 11, 12));
        assert_eq!(sent.offset_minutes, -420);
        assert_eq!(sent.unix_seconds, 1_699_981_872);

        // BODY[1] of a single-part message is its body.
        assert_eq!(s.section(&[]), Some(&s.body));
        assert_eq!(s.section(&[1]), Some(&s.body));
        assert_eq!(s.section(&[2]), None);
        assert_eq!(s.section(&[1, 1]), None);
        assert_eq!(s.section(&[0]), None);
    }

    #[test]
    fn group_syntax_and_mixed_lists() {
        let raw =
            crlf("From: a@x.org\nTo: Team: b@y.org, \"C D\" <c@y.org>;, e@z.org\nBcc: f\n\nbody\n");
        let s = Summary::parse(&raw, DATE);
        let to = &s.envelope.to;
        assert_eq!(to.len(), 2, "{to:?}");
        assert_eq!(
            to[0],
            AddressEntry::Group {
                name: "Team".to_string(),
                members: vec![
                    MailAddress {
                        name: None,
                        adl: None,
                        mailbox: Some("b".into()),
                        host: Some("y.org".into())
                    },
                    MailAddress {
                        name: Some("C D".into()),
                        adl: None,
                        mailbox: Some("c".into()),
                        host: Some("y.org".into())
                    },
                ],
            }
        );
        assert_eq!(to[1], mailbox(None, "e", "z.org"));
        // mail-parser reads a bare word as a display name without an address.
        assert_eq!(
            s.envelope.bcc,
            vec![AddressEntry::Mailbox(MailAddress {
                name: Some("f".into()),
                adl: None,
                mailbox: None,
                host: None
            })]
        );
    }

    #[test]
    fn multipart_alternative_with_base64_attachment() {
        for raw in [crlf(MULTI), MULTI.as_bytes().to_vec()] {
            let nl = if raw.contains(&b'\r') { "\r\n" } else { "\n" };
            let t = |s: &str| s.replace('\n', nl).into_bytes();
            let s = Summary::parse(&raw, DATE);
            let root = &s.body;
            assert_eq!(
                (root.media_type.as_str(), root.media_subtype.as_str()),
                ("multipart", "mixed")
            );
            assert_eq!(
                root.params,
                vec![("boundary".to_string(), "outer".to_string())]
            );
            assert_eq!(root.children.len(), 2);
            assert_eq!(at(&raw, root.offsets.body_range()), &raw[s.header.len()..]);

            let alt = s.section(&[1]).unwrap();
            assert_eq!(alt.media_subtype, "alternative");
            assert_eq!(
                at(&raw, alt.offsets.header_range()),
                t("Content-Type: multipart/alternative; boundary=inner\n\n")
            );
            let alt_body = at(&raw, alt.offsets.body_range());
            assert!(
                alt_body.starts_with(b"--inner"),
                "{:?}",
                String::from_utf8_lossy(alt_body)
            );
            assert!(
                alt_body.ends_with(&t("--inner--\n")),
                "{:?}",
                String::from_utf8_lossy(alt_body)
            );

            let plain = s.section(&[1, 1]).unwrap();
            assert_eq!(
                (plain.media_type.as_str(), plain.media_subtype.as_str()),
                ("text", "plain")
            );
            assert_eq!(
                plain.params,
                vec![("charset".to_string(), "utf-8".to_string())]
            );
            assert_eq!(plain.encoding.as_deref(), Some(&b"quoted-printable"[..]));
            assert_eq!(
                at(&raw, plain.offsets.header_range()),
                t(
                    "Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: quoted-printable\n\n"
                )
            );
            assert_eq!(at(&raw, plain.offsets.body_range()), b"plain text body");
            assert_eq!((plain.size, plain.lines), (15, Some(1)));

            let html = s.section(&[1, 2]).unwrap();
            assert_eq!(html.media_subtype, "html");
            assert_eq!(at(&raw, html.offsets.body_range()), b"<p>html body</p>");
            assert!(s.section(&[1, 3]).is_none());

            let pdf = s.section(&[2]).unwrap();
            assert_eq!(
                (pdf.media_type.as_str(), pdf.media_subtype.as_str()),
                ("application", "pdf")
            );
            assert_eq!(pdf.params, vec![("name".to_string(), "r.pdf".to_string())]);
            assert_eq!(
                pdf.disposition,
                Some(Disposition {
                    kind: "attachment".into(),
                    params: vec![("filename".into(), "r.pdf".into())]
                })
            );
            assert_eq!(pdf.encoding.as_deref(), Some(&b"base64"[..]));
            assert_eq!(pdf.id.as_deref(), Some(&b"<pdf1@example.org>"[..]));
            assert_eq!(pdf.description.as_deref(), Some(&b"the report"[..]));
            assert_eq!(pdf.language, vec!["en".to_string(), "fr".to_string()]);
            assert_eq!(
                pdf.location.as_deref(),
                Some(&b"http://example.org/r.pdf"[..])
            );
            assert_eq!(pdf.lines, None, "no line count for non-text parts");
            let b64 = at(&raw, pdf.offsets.body_range());
            assert!(b64.starts_with(b"JVBERi0xLjQK") && b64.ends_with(b"AgBE"));
            assert_eq!(pdf.size, b64.len() as u64);
            let mime = at(&raw, pdf.offsets.header_range());
            assert!(mime.starts_with(b"Content-Type: application/pdf"));
            assert!(mime.ends_with(&t("\n\n")));
            assert!(s.section(&[2, 1]).is_none());
            assert!(s.section(&[3]).is_none());
        }
    }

    const NESTED: &str = "From: outer@example.org
Subject: fwd
Content-Type: multipart/mixed; boundary=b1

--b1
Content-Type: text/plain

see attached
--b1
Content-Type: message/rfc822
Content-Description: forwarded

From: Inner Person <inner@example.net>
To: x@example.com
Subject: inner subject
Date: Mon, 2 Jan 2006 15:04:05 +0000
Message-ID: <inner@example.net>
Content-Type: multipart/alternative; boundary=b2

--b2
Content-Type: text/plain

inner plain
--b2
Content-Type: text/html

<b>inner</b>
--b2--
--b1--
";

    #[test]
    fn nested_message_rfc822() {
        let raw = crlf(NESTED);
        let s = Summary::parse(&raw, DATE);
        assert_eq!(s.body.children.len(), 2);
        assert_eq!(
            at(&raw, s.section(&[1]).unwrap().offsets.body_range()),
            b"see attached"
        );

        let part = s.section(&[2]).unwrap();
        assert_eq!(
            (part.media_type.as_str(), part.media_subtype.as_str()),
            ("message", "rfc822")
        );
        assert_eq!(part.description.as_deref(), Some(&b"forwarded"[..]));
        let enc = part.message.as_ref().unwrap();
        assert!(enc.in_place);
        assert_eq!(enc.envelope.subject.as_deref(), Some(&b"inner subject"[..]));
        assert_eq!(
            enc.envelope.from,
            vec![mailbox(Some("Inner Person"), "inner", "example.net")]
        );
        assert_eq!(
            enc.envelope.message_id.as_deref(),
            Some(&b"<inner@example.net>"[..])
        );
        assert_eq!(
            enc.envelope.date.as_deref(),
            Some(&b"Mon, 2 Jan 2006 15:04:05 +0000"[..])
        );

        // BODY[2] is the whole encapsulated message; BODY[2.HEADER] and BODY[2.TEXT] split it.
        let whole = at(&raw, part.offsets.body_range());
        assert!(whole.starts_with(b"From: Inner Person"));
        assert!(
            whole.ends_with(b"--b2--"),
            "{:?}",
            String::from_utf8_lossy(whole)
        );
        assert_eq!(part.lines, Some(count_lines(whole)));
        let inner = &enc.body;
        assert_eq!(inner.media_subtype, "alternative");
        assert_eq!(inner.offsets.header, part.offsets.body);
        assert_eq!(inner.offsets.end, part.offsets.end);
        let inner_header = at(&raw, inner.offsets.header_range());
        assert!(
            inner_header.starts_with(b"From: Inner Person") && inner_header.ends_with(b"\r\n\r\n")
        );
        assert!(at(&raw, inner.offsets.body_range()).starts_with(b"--b2\r\n"));

        // Parts of a message/rfc822 part are those of the message inside.
        let p21 = s.section(&[2, 1]).unwrap();
        assert_eq!(at(&raw, p21.offsets.body_range()), b"inner plain");
        assert_eq!(
            at(&raw, p21.offsets.header_range()),
            b"Content-Type: text/plain\r\n\r\n"
        );
        let p22 = s.section(&[2, 2]).unwrap();
        assert_eq!(p22.media_subtype, "html");
        assert_eq!(at(&raw, p22.offsets.body_range()), b"<b>inner</b>");
        assert!(s.section(&[2, 3]).is_none());
        assert!(s.section(&[2, 1, 1]).is_none());
    }

    #[test]
    fn nested_single_part_message() {
        let raw =
            crlf("Subject: o\nContent-Type: message/rfc822\n\nSubject: i\n\ninner text\nline 2\n");
        let s = Summary::parse(&raw, DATE);
        let enc = s.body.message.as_ref().unwrap();
        assert_eq!(enc.envelope.subject.as_deref(), Some(&b"i"[..]));
        assert_eq!(
            at(&raw, enc.body.offsets.body_range()),
            b"inner text\r\nline 2\r\n"
        );
        // BODY[1] is the encapsulated message, BODY[1.1] its (single) body.
        assert_eq!(s.section(&[1]), Some(&s.body));
        assert_eq!(s.section(&[1, 1]), Some(&enc.body));
    }

    #[test]
    fn digest_parts_default_to_message_rfc822() {
        let raw = crlf(
            "Content-Type: multipart/digest; boundary=d\n\n--d\n\nSubject: one\n\nfirst\n--d\n\nSubject: two\n\nsecond\n--d--\n",
        );
        let s = Summary::parse(&raw, DATE);
        assert_eq!(s.body.children.len(), 2);
        for (i, subject) in [(1u32, "one"), (2, "two")] {
            let p = s.section(&[i]).unwrap();
            assert_eq!(
                (p.media_type.as_str(), p.media_subtype.as_str()),
                ("message", "rfc822")
            );
            let enc = p.message.as_ref().unwrap();
            assert_eq!(enc.envelope.subject.as_deref(), Some(subject.as_bytes()));
        }
    }

    #[test]
    fn base64_encoded_message_part_is_not_in_place() {
        use base64::Engine;
        let inner = "Subject: hidden\r\n\r\ninner body\r\n";
        let b64 = base64::engine::general_purpose::STANDARD.encode(inner);
        let raw = crlf(&format!(
            "Content-Type: multipart/mixed; boundary=b\n\n--b\nContent-Type: message/rfc822\nContent-Transfer-Encoding: base64\n\n{b64}\n--b--\n"
        ));
        let s = Summary::parse(&raw, DATE);
        let p = s.section(&[1]).unwrap();
        assert_eq!(at(&raw, p.offsets.body_range()), b64.as_bytes());
        let enc = p.message.as_ref().unwrap();
        assert!(!enc.in_place);
        assert_eq!(enc.envelope.subject.as_deref(), Some(&b"hidden"[..]));
        assert!(
            s.section(&[1, 1]).is_none(),
            "offsets of a decoded message are not servable"
        );
    }

    /// Every summary must describe real bytes of the message.
    fn check_offsets(raw: &[u8], part: &BodyPart) {
        let o = part.offsets;
        assert!(
            o.header <= o.body && o.body <= o.end && o.end <= raw.len() as u64,
            "{o:?}"
        );
        assert_eq!(part.size, o.end - o.body);
        assert!(!part.media_type.is_empty() && !part.media_subtype.is_empty());
        if part.is_multipart() {
            assert!(!part.children.is_empty());
        }
        for c in &part.children {
            check_offsets(raw, c);
        }
        if let Some(enc) = &part.message
            && enc.in_place
        {
            check_offsets(raw, &enc.body);
        }
    }

    fn parse_checked(raw: &[u8]) -> Summary {
        let s = Summary::parse(raw, DATE);
        assert_eq!(s.size, raw.len() as u64);
        assert_eq!(s.header.len() as u64, s.body.offsets.body);
        assert_eq!(s.body.offsets.end, raw.len() as u64);
        assert_eq!(s.header.as_slice(), &raw[..s.header.len()]);
        check_offsets(raw, &s.body);
        // The record encoding must take whatever the parse produced.
        let rec = SummaryRecord::new(s.clone(), MessageKey::from_bytes([1; 32]));
        assert_eq!(SummaryRecord::decode(&rec.encode().unwrap()).unwrap(), rec);
        s
    }

    #[test]
    fn malformed_inputs_give_a_best_effort_summary() {
        // Empty.
        let s = parse_checked(b"");
        assert_eq!((s.size, s.body.size, s.body.lines), (0, 0, Some(0)));
        assert!(s.header.is_empty());

        // No header at all.
        let s = parse_checked(b"just some text\nwithout any header\n");
        assert_eq!(s.body.media_type, "text");
        assert_eq!(s.envelope, Envelope::default());

        // Headers only, no empty line, no final newline.
        let s = parse_checked(b"Subject: only headers\nFrom: a@b.c");
        assert_eq!(s.envelope.subject.as_deref(), Some(&b"only headers"[..]));
        assert_eq!(s.body.size, 0);

        // Bare LF line endings.
        let s = parse_checked(SIMPLE.as_bytes());
        assert_eq!(
            at(SIMPLE.as_bytes(), s.body.offsets.body_range()),
            b"Hello Bob,\nsecond line\n"
        );
        assert_eq!(
            s.envelope.subject.as_deref(),
            Some(&b"=?utf-8?q?Caf=C3=A9?= and folded"[..])
        );

        // A boundary that never appears: one text part, whatever the header claims.
        let raw = crlf(
            "Subject: broken\nContent-Type: multipart/mixed; boundary=nowhere\n\n--elsewhere\nContent-Type: text/plain\n\ntext\n",
        );
        let s = parse_checked(&raw);
        assert!(!s.body.is_multipart());
        assert_eq!(s.body.media_type, "text");
        assert!(s.body.params.iter().all(|(n, _)| n != "boundary"));

        // An unterminated multipart (no closing boundary).
        let raw = crlf(
            "Content-Type: multipart/mixed; boundary=b\n\n--b\nContent-Type: text/plain\n\nfirst\n--b\n\nsecond, never closed\n",
        );
        let s = parse_checked(&raw);
        assert!(s.body.is_multipart());

        // 8-bit garbage in headers and body, invalid dates.
        let mut raw = b"Subject: caf\xe9 \xff\xfe\r\nFrom: \xc3\x28 <x@\xff.org>\r\nDate: Someday, 99 Foo 20x\r\n\r\n".to_vec();
        raw.extend((0u8..=255).cycle().take(3000));
        let s = parse_checked(&raw);
        assert_eq!(
            s.envelope.subject.as_deref(),
            Some(&b"caf\xe9 \xff\xfe"[..])
        );
        assert_eq!(s.sent_date, None);
        assert!(s.envelope.date.is_some());

        // Content-Type without subtype, a message/rfc822 part with nothing inside.
        let raw = crlf(
            "Content-Type: multipart/mixed; boundary=b\n\n--b\nContent-Type: image\n\nxx\n--b\nContent-Type: message/rfc822\n\n--b--\n",
        );
        parse_checked(&raw);

        // Deep nesting is cut at MAX_MIME_DEPTH without overflowing the stack.
        let depth = 2000;
        let mut raw = String::new();
        for i in 0..depth {
            raw.push_str(&format!(
                "Content-Type: multipart/mixed; boundary=b{i}\n\n--b{i}\n"
            ));
        }
        raw.push_str("Content-Type: text/plain\n\ndeep\n");
        for i in (0..depth).rev() {
            raw.push_str(&format!("--b{i}--\n"));
        }
        let s = parse_checked(raw.as_bytes());
        let mut d = 0;
        let mut p = &s.body;
        while let Some(c) = p.children.first() {
            p = c;
            d += 1;
        }
        assert!(d <= MAX_MIME_DEPTH, "{d}");
    }

    #[test]
    fn random_inputs_never_panic() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let alphabet: &[&[u8]] = &[
            b"\r\n",
            b"\n",
            b"--b",
            b"--b--",
            b"Content-Type: multipart/mixed; boundary=b",
            b"Content-Type: message/rfc822",
            b"Content-Transfer-Encoding: base64",
            b": ",
            b"Subject: x",
            b"From: a@b",
            b"=?utf-8?b?w6k=?=",
            b"\xff\x00",
            b" ",
            b"abc",
        ];
        let seeds = [SIMPLE.as_bytes().to_vec(), crlf(MULTI), crlf(NESTED)];
        for round in 0..400 {
            let mut raw = seeds[round % seeds.len()].clone();
            for _ in 0..rng.random_range(1..20) {
                let at = rng.random_range(0..=raw.len());
                match rng.random_range(0..3) {
                    0 => {
                        let piece = alphabet[rng.random_range(0..alphabet.len())];
                        raw.splice(at..at, piece.iter().copied());
                    }
                    1 => {
                        let end = (at + rng.random_range(0..40)).min(raw.len());
                        raw.drain(at..end);
                    }
                    _ => raw.truncate(at),
                }
            }
            parse_checked(&raw);
        }
    }

    #[test]
    fn record_version_is_checked() {
        let s = Summary::parse(SIMPLE.as_bytes(), DATE);
        let mut rec = SummaryRecord::new(s, MessageKey::from_bytes([9; 32]));
        let bytes = rec.encode().unwrap();
        assert_eq!(SummaryRecord::decode(&bytes).unwrap(), rec);
        rec.version = 2;
        let bytes = rec.encode().unwrap();
        assert!(matches!(
            SummaryRecord::decode(&bytes),
            Err(RecordError::UnsupportedVersion(2))
        ));
        assert!(matches!(
            SummaryRecord::decode(&[1, 0, 3]),
            Err(RecordError::Malformed(_))
        ));
        assert!(matches!(
            SummaryRecord::decode(&[]),
            Err(RecordError::Malformed(_))
        ));
    }

    const SIMPLE: &str = "Return-Path: <alice@example.org>
Date: Tue, 14 Nov 2023 10:11:12 -0700
From: \"Alice Example\" <alice@example.org>
To: bob@example.net, Carol <carol@example.com>
Cc: undisclosed-recipients:;
Subject: =?utf-8?q?Caf=C3=A9?= and
 folded
Message-ID: <m1@example.org>
In-Reply-To: <m0@example.org>

Hello Bob,
second line
";

    const MULTI: &str = "From: alice@example.org
To: bob@example.net
Subject: report
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary=\"outer\"

preamble
--outer
Content-Type: multipart/alternative; boundary=inner

--inner
Content-Type: text/plain; charset=utf-8
Content-Transfer-Encoding: quoted-printable

plain text body
--inner
Content-Type: text/html; charset=utf-8

<p>html body</p>
--inner--

--outer
Content-Type: application/pdf; name=\"r.pdf\"
Content-Disposition: attachment; filename=\"r.pdf\"
Content-Transfer-Encoding: base64
Content-ID: <pdf1@example.org>
Content-Description: the report
Content-Language: en, fr
Content-Location: http://example.org/r.pdf

JVBERi0xLjQKJcOkw7zDtsOfCjIgMCBvYmoKPDwvTGVuZ3RoIDMgMCBSL0ZpbHRlci9G
bGF0ZURlY29kZT4+CnN0cmVhbQp4nDPQM1Qo5ypUMFAw0DMwslAwtTTVMzIxV0gx5CrkAgBE
--outer--
epilogue
";
}
