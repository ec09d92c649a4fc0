//! ENVELOPE, BODYSTRUCTURE, BODY and INTERNALDATE from a message summary (`mail/summary.rs`),
//! as imap-types values: no body is read for any of them.

use base64::Engine;
use imap_codec::imap_types::body::{
    BasicFields, Body, BodyStructure, Disposition, Language, Location, MultiPartExtensionData,
    SinglePartExtensionData, SpecificFields,
};
use imap_codec::imap_types::core::{IString, Literal, NString, Quoted, Vec1};
use imap_codec::imap_types::datetime::DateTime;
use imap_codec::imap_types::envelope::{Address, Envelope};

use crate::mail::summary::{self, AddressEntry, BodyPart, InternalDate, MailAddress};

/// An IMAP string of any bytes: quoted when it can be, a literal otherwise. A NUL (never valid
/// in IMAP4rev1 strings) is sent as 0x80, as Dovecot does, rather than failing the response.
pub fn istring(bytes: &[u8]) -> IString<'static> {
    if let Ok(q) = Quoted::try_from(bytes.to_vec()) {
        return IString::Quoted(q);
    }
    let clean: Vec<u8> = bytes
        .iter()
        .map(|&b| if b == 0 { 0x80 } else { b })
        .collect();
    Literal::try_from(clean)
        .map(IString::Literal)
        .unwrap_or_else(|_| IString::Quoted(Quoted::unvalidated("")))
}

/// Always a literal (message data: lines and 8-bit bytes must not be quoted).
pub fn literal(bytes: &[u8]) -> NString<'static> {
    let lit = match Literal::try_from(bytes.to_vec()) {
        Ok(l) => l,
        Err(_) => {
            let clean: Vec<u8> = bytes
                .iter()
                .map(|&b| if b == 0 { 0x80 } else { b })
                .collect();
            match Literal::try_from(clean) {
                Ok(l) => l,
                Err(_) => return NString(None),
            }
        }
    };
    NString(Some(IString::Literal(lit)))
}

pub fn nstring(bytes: Option<&[u8]>) -> NString<'static> {
    NString(bytes.map(istring))
}

fn nstr(s: Option<&str>) -> NString<'static> {
    nstring(s.map(str::as_bytes))
}

/// A display name for an ENVELOPE: sent as is when ASCII, else as an RFC 2047 encoded word
/// (clients that did not enable UTF8=ACCEPT expect 7-bit headers).
fn display_name(name: &str) -> Vec<u8> {
    if name.is_ascii() {
        return name.as_bytes().to_vec();
    }
    let b64 = base64::engine::general_purpose::STANDARD.encode(name.as_bytes());
    format!("=?utf-8?b?{b64}?=").into_bytes()
}

fn address(a: &MailAddress) -> Address<'static> {
    Address {
        name: NString(a.name.as_deref().map(|n| istring(&display_name(n)))),
        adl: nstr(a.adl.as_deref()),
        // A NIL host marks a group: an address without one gets a placeholder, as Dovecot does.
        mailbox: nstr(Some(a.mailbox.as_deref().unwrap_or("MISSING_MAILBOX"))),
        host: nstr(Some(a.host.as_deref().unwrap_or("MISSING_DOMAIN"))),
    }
}

fn addresses(list: &[AddressEntry]) -> Vec<Address<'static>> {
    let mut out = Vec::new();
    for entry in list {
        match entry {
            AddressEntry::Mailbox(a) => out.push(address(a)),
            AddressEntry::Group { name, members } => {
                out.push(Address {
                    name: NString::NIL,
                    adl: NString::NIL,
                    mailbox: nstr(Some(name)),
                    host: NString::NIL,
                });
                out.extend(members.iter().map(address));
                out.push(Address {
                    name: NString::NIL,
                    adl: NString::NIL,
                    mailbox: NString::NIL,
                    host: NString::NIL,
                });
            }
        }
    }
    out
}

pub fn envelope(e: &summary::Envelope) -> Envelope<'static> {
    let from = addresses(&e.from);
    // RFC 3501: Sender and Reply-To default to From.
    let sender = if e.sender.is_empty() {
        from.clone()
    } else {
        addresses(&e.sender)
    };
    let reply_to = if e.reply_to.is_empty() {
        from.clone()
    } else {
        addresses(&e.reply_to)
    };
    Envelope {
        date: nstring(e.date.as_deref()),
        subject: nstring(e.subject.as_deref()),
        from,
        sender,
        reply_to,
        to: addresses(&e.to),
        cc: addresses(&e.cc),
        bcc: addresses(&e.bcc),
        in_reply_to: nstring(e.in_reply_to.as_deref()),
        message_id: nstring(e.message_id.as_deref()),
    }
}

fn params(list: &[(String, String)]) -> Vec<(IString<'static>, IString<'static>)> {
    list.iter()
        .map(|(k, v)| (istring(k.as_bytes()), istring(v.as_bytes())))
        .collect()
}

fn upper(s: &str) -> IString<'static> {
    istring(s.to_ascii_uppercase().as_bytes())
}

fn clamp(n: u64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn disposition(part: &BodyPart) -> Disposition<'static> {
    Disposition {
        disposition: part
            .disposition
            .as_ref()
            .map(|d| (upper(&d.kind), params(&d.params))),
        tail: Some(Language {
            language: part
                .language
                .iter()
                .map(|l| istring(l.as_bytes()))
                .collect(),
            tail: Some(Location {
                location: nstring(part.location.as_deref()),
                extensions: Vec::new(),
            }),
        }),
    }
}

/// BODYSTRUCTURE (`extended`) or BODY (not extended) of a part.
pub fn body_structure(part: &BodyPart, extended: bool) -> BodyStructure<'static> {
    if part.is_multipart()
        && let Ok(bodies) = Vec1::try_from(
            part.children
                .iter()
                .map(|c| body_structure(c, extended))
                .collect::<Vec<_>>(),
        )
    {
        return BodyStructure::Multi {
            bodies,
            subtype: upper(&part.media_subtype),
            extension_data: extended.then(|| MultiPartExtensionData {
                parameter_list: params(&part.params),
                tail: Some(disposition(part)),
            }),
        };
    }
    let mut parameter_list = params(&part.params);
    // RFC 2045's default, spelled out as most servers do (clients decode with it).
    if part.media_type == "text"
        && !part
            .params
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("charset"))
    {
        parameter_list.push((istring(b"charset"), istring(b"us-ascii")));
    }
    let basic = BasicFields {
        parameter_list,
        id: nstring(part.id.as_deref()),
        description: nstring(part.description.as_deref()),
        content_transfer_encoding: match &part.encoding {
            Some(e) => istring(e.to_ascii_uppercase().as_slice()),
            None => istring(b"7BIT"),
        },
        size: clamp(part.size),
    };
    let lines = clamp(part.lines.unwrap_or(0));
    let specific = match (&part.message, part.media_type.as_str()) {
        (Some(enc), "message") => SpecificFields::Message {
            envelope: Box::new(envelope(&enc.envelope)),
            body_structure: Box::new(body_structure(&enc.body, extended)),
            number_of_lines: lines,
        },
        (_, "text") => SpecificFields::Text {
            subtype: upper(&part.media_subtype),
            number_of_lines: lines,
        },
        _ => SpecificFields::Basic {
            r#type: upper(&part.media_type),
            subtype: upper(&part.media_subtype),
        },
    };
    BodyStructure::Single {
        body: Body { basic, specific },
        extension_data: extended.then(|| SinglePartExtensionData {
            md5: nstring(part.md5.as_deref()),
            tail: Some(disposition(part)),
        }),
    }
}

/// INTERNALDATE in the zone it was given in.
pub fn internal_date(d: &InternalDate) -> Option<DateTime> {
    let offset = chrono::FixedOffset::east_opt(i32::from(d.offset_minutes) * 60)
        .or_else(|| chrono::FixedOffset::east_opt(0))?;
    let utc = chrono::DateTime::from_timestamp(d.unix_seconds, 0)?;
    DateTime::try_from(utc.with_timezone(&offset)).ok()
}

/// The INTERNALDATE a client gave (APPEND).
pub fn from_imap_date(d: &DateTime) -> InternalDate {
    let dt = d.as_ref();
    InternalDate {
        unix_seconds: dt.timestamp(),
        offset_minutes: (dt.offset().local_minus_utc() / 60) as i16,
    }
}

/// The calendar date of an INTERNALDATE in its own zone (SEARCH BEFORE/ON/SINCE).
pub fn internal_day(d: &InternalDate) -> Option<chrono::NaiveDate> {
    let local = d
        .unix_seconds
        .checked_add(i64::from(d.offset_minutes) * 60)?;
    chrono::DateTime::from_timestamp(local, 0).map(|t| t.date_naive())
}

#[cfg(test)]
mod tests {
    use imap_codec::ResponseCodec;
    use imap_codec::encode::Encoder;
    use imap_codec::imap_types::fetch::MessageDataItem;
    use imap_codec::imap_types::response::{Data, Response};

    use super::*;
    use crate::mail::summary::Summary;

    fn render(items: Vec<MessageDataItem<'static>>) -> String {
        let data = Data::fetch(1, items).unwrap();
        let bytes = ResponseCodec::default()
            .encode(&Response::Data(data))
            .dump();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    #[test]
    fn envelope_and_structure_of_a_multipart_message() {
        let raw = b"From: =?utf-8?q?J=C3=B6rg?= <jorg@example.org>\r\n\
To: a@example.com, Friends: b@example.com, c@example.com;\r\n\
Subject: Hi there\r\n\
Message-ID: <abc@example.org>\r\n\
Date: Mon, 7 Feb 1994 21:52:25 -0800\r\n\
MIME-Version: 1.0\r\n\
Content-Type: multipart/mixed; boundary=XX\r\n\
\r\n\
--XX\r\n\
Content-Type: text/plain; charset=us-ascii\r\n\
\r\n\
hello\r\n\
world\r\n\
--XX\r\n\
Content-Type: application/octet-stream\r\n\
Content-Transfer-Encoding: base64\r\n\
Content-Disposition: attachment; filename=a.bin\r\n\
\r\n\
AAEC\r\n\
--XX--\r\n";
        let s = Summary::parse(
            raw,
            InternalDate {
                unix_seconds: 760_686_745,
                offset_minutes: -480,
            },
        );
        let text = render(vec![
            MessageDataItem::Envelope(envelope(&s.envelope)),
            MessageDataItem::BodyStructure(body_structure(&s.body, true)),
            MessageDataItem::InternalDate(internal_date(&s.internal_date).unwrap()),
        ]);
        assert!(
            text.contains(r#"ENVELOPE ("Mon, 7 Feb 1994 21:52:25 -0800" "Hi there" (("=?utf-8?b?SsO2cmc=?=" NIL "jorg" "example.org"))"#),
            "{text}"
        );
        assert!(
            text.contains(r#""<abc@example.org>")"#),
            "message id keeps its brackets: {text}"
        );
        // The group: start marker, members, end marker.
        assert!(
            text.contains(r#"(NIL NIL "Friends" NIL)(NIL NIL "b" "example.com")(NIL NIL "c" "example.com")(NIL NIL NIL NIL)"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"BODYSTRUCTURE (("TEXT" "PLAIN" ("charset" "us-ascii") NIL NIL "7BIT" 12 2"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#""APPLICATION" "OCTET-STREAM" NIL NIL NIL "BASE64" 4 NIL ("ATTACHMENT" ("filename" "a.bin"))"#),
            "{text}"
        );
        assert!(text.contains(r#" "MIXED" ("boundary" "XX")"#), "{text}");
        assert!(
            text.contains(r#"INTERNALDATE "07-Feb-1994 21:52:25 -0800""#),
            "{text}"
        );
        assert_eq!(
            internal_day(&s.internal_date),
            chrono::NaiveDate::from_ymd_opt(1994, 2, 7)
        );
    }
}
