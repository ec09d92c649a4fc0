//! SEARCH and UID SEARCH. Keys are compiled once (sequence sets resolved to ranges, never
//! expanded), then evaluated per message with three-valued logic: a message is first tried
//! on its flags, UID and sequence number alone; its summary is loaded only when that cannot
//! decide, and its body only when the summary cannot either. So `UID SEARCH UID 1:4294967295`
//! or `SEARCH UNSEEN` read nothing but the mailbox state, and `SEARCH UID 5 BODY x` reads one
//! body.
//!
//! Header keys (FROM, TO, CC, BCC, SUBJECT, HEADER) and BODY/TEXT compare decoded text
//! (RFC 2047 words, quoted-printable, base64 and charsets, by mail-parser) case-insensitively;
//! date keys follow RFC 9051: SENTBEFORE/ON/SINCE on the Date header's calendar date, the others
//! on INTERNALDATE's calendar date in its own zone.

use std::num::NonZeroU64;

use imap_codec::imap_types::core::{Charset, Vec1};
use imap_codec::imap_types::response::{Code, Data};
use imap_codec::imap_types::search::SearchKey;
use mail_parser::{HeaderValue, Message, MessageParser, PartType};

use super::flags;
use super::output::Out;
use super::selected::nz32;
use super::sequence::Ranges;
use super::session::{Failure, Reply, Session, done, no_code};
use super::structure;
use crate::mail::summary::Summary;
use crate::mail::view::MessageState;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DateCmp {
    Before,
    On,
    Since,
}

/// A compiled search key.
#[derive(Debug)]
enum Key {
    Const(bool),
    And(Vec<Key>),
    Or(Box<Key>, Box<Key>),
    Not(Box<Key>),
    Seq(Ranges),
    Uid(Ranges),
    /// Has (or has not) this flag; keywords compare case-insensitively.
    Flag(String, bool),
    Larger(u64),
    Smaller(u64),
    Internal(DateCmp, chrono::NaiveDate),
    Sent(DateCmp, chrono::NaiveDate),
    /// Header field (lower case) contains the (lower-case) string.
    Header(String, String),
    Body(String),
    Text(String),
    ModSeq(u64),
}

fn text_of(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).to_lowercase()
}

fn compile(key: &SearchKey<'_>, exists: u64, largest_uid: u64, modseq_used: &mut bool) -> Key {
    use SearchKey as S;
    let flag = |f: &str, has: bool| Key::Flag(f.to_string(), has);
    let header = |name: &str, value: &[u8]| Key::Header(name.to_string(), text_of(value));
    match key {
        S::All => Key::Const(true),
        S::And(keys) => Key::And(
            keys.as_ref()
                .iter()
                .map(|k| compile(k, exists, largest_uid, modseq_used))
                .collect(),
        ),
        S::Or(a, b) => Key::Or(
            Box::new(compile(a, exists, largest_uid, modseq_used)),
            Box::new(compile(b, exists, largest_uid, modseq_used)),
        ),
        S::Not(k) => Key::Not(Box::new(compile(k, exists, largest_uid, modseq_used))),
        S::SequenceSet(set) => Key::Seq(Ranges::resolve(set, exists)),
        S::Uid(set) => Key::Uid(Ranges::resolve(set, largest_uid)),
        S::Answered => flag(flags::ANSWERED, true),
        S::Unanswered => flag(flags::ANSWERED, false),
        S::Deleted => flag(flags::DELETED, true),
        S::Undeleted => flag(flags::DELETED, false),
        S::Draft => flag(flags::DRAFT, true),
        S::Undraft => flag(flags::DRAFT, false),
        S::Flagged => flag(flags::FLAGGED, true),
        S::Unflagged => flag(flags::FLAGGED, false),
        S::Seen => flag(flags::SEEN, true),
        S::Unseen => flag(flags::SEEN, false),
        S::Keyword(k) => flag(k.as_ref(), true),
        S::Unkeyword(k) => flag(k.as_ref(), false),
        // \Recent is never set by this server (RFC 9051 dropped it): NEW = RECENT UNSEEN.
        S::Recent | S::New => Key::Const(false),
        S::Old => Key::Const(true),
        S::Larger(n) => Key::Larger(u64::from(*n)),
        S::Smaller(n) => Key::Smaller(u64::from(*n)),
        S::Before(d) => Key::Internal(DateCmp::Before, *d.as_ref()),
        S::On(d) => Key::Internal(DateCmp::On, *d.as_ref()),
        S::Since(d) => Key::Internal(DateCmp::Since, *d.as_ref()),
        S::SentBefore(d) => Key::Sent(DateCmp::Before, *d.as_ref()),
        S::SentOn(d) => Key::Sent(DateCmp::On, *d.as_ref()),
        S::SentSince(d) => Key::Sent(DateCmp::Since, *d.as_ref()),
        S::From(v) => header("from", v.as_ref()),
        S::To(v) => header("to", v.as_ref()),
        S::Cc(v) => header("cc", v.as_ref()),
        S::Bcc(v) => header("bcc", v.as_ref()),
        S::Subject(v) => header("subject", v.as_ref()),
        S::Header(name, v) => Key::Header(text_of(name.as_ref()), text_of(v.as_ref())),
        S::Body(v) => Key::Body(text_of(v.as_ref())),
        S::Text(v) => Key::Text(text_of(v.as_ref())),
        S::ModSequence { modseq, .. } => {
            *modseq_used = true;
            Key::ModSeq(*modseq)
        }
    }
}

/// The decoded header fields of a message: (lower-case name, lower-case searchable text).
fn header_texts(raw_header: &[u8]) -> Vec<(String, String)> {
    let Some(parsed) = MessageParser::default().parse_headers(raw_header) else {
        return Vec::new();
    };
    parsed
        .headers()
        .iter()
        .map(|h| {
            let raw = raw_header
                .get(h.offset_start() as usize..h.offset_end() as usize)
                .unwrap_or(b"");
            let mut text = match h.value() {
                HeaderValue::Text(t) => t.to_string(),
                HeaderValue::TextList(l) => l.join(", "),
                HeaderValue::Address(a) => a
                    .iter()
                    .map(|addr| {
                        format!(
                            "{} <{}>",
                            addr.name().unwrap_or(""),
                            addr.address().unwrap_or("")
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(", "),
                _ => String::new(),
            };
            // The raw value too: what a client sees when it fetches the header.
            text.push('\n');
            text.push_str(&String::from_utf8_lossy(raw));
            (h.name().to_lowercase(), text.to_lowercase())
        })
        .collect()
}

/// Every text part of a message, decoded (nested messages included, to a bounded depth).
fn body_text(message: &Message<'_>, depth: usize, out: &mut String) {
    for part in &message.parts {
        match &part.body {
            PartType::Text(t) | PartType::Html(t) => {
                out.push_str(&t.to_lowercase());
                out.push('\n');
            }
            PartType::Message(inner) if depth < 8 => {
                for h in header_texts(inner.raw_message()) {
                    out.push_str(&h.1);
                    out.push('\n');
                }
                body_text(inner, depth + 1, out);
            }
            _ => {}
        }
    }
}

/// What is known of one message while its keys are evaluated.
struct Candidate<'a> {
    seq: u64,
    uid: u64,
    state: &'a MessageState,
    summary: Option<&'a Summary>,
    headers: Option<&'a [(String, String)]>,
    body: Option<&'a str>,
}

fn date_cmp(cmp: DateCmp, day: chrono::NaiveDate, wanted: chrono::NaiveDate) -> bool {
    match cmp {
        DateCmp::Before => day < wanted,
        DateCmp::On => day == wanted,
        DateCmp::Since => day >= wanted,
    }
}

/// `Some(answer)`, or `None` when the key needs data not loaded yet.
fn eval(key: &Key, c: &Candidate<'_>) -> Option<bool> {
    match key {
        Key::Const(b) => Some(*b),
        Key::And(keys) => {
            let mut unknown = false;
            for k in keys {
                match eval(k, c) {
                    Some(false) => return Some(false),
                    Some(true) => {}
                    None => unknown = true,
                }
            }
            (!unknown).then_some(true)
        }
        Key::Or(a, b) => match (eval(a, c), eval(b, c)) {
            (Some(true), _) | (_, Some(true)) => Some(true),
            (Some(false), Some(false)) => Some(false),
            _ => None,
        },
        Key::Not(k) => eval(k, c).map(|b| !b),
        Key::Seq(r) => Some(r.contains(c.seq)),
        Key::Uid(r) => Some(r.contains(c.uid)),
        Key::Flag(f, has) => {
            let present = if flags::is_keyword(f) {
                c.state.flags.iter().any(|x| x.eq_ignore_ascii_case(f))
            } else {
                c.state.flags.contains(f)
            };
            Some(present == *has)
        }
        Key::ModSeq(m) => Some(c.state.modseq >= *m),
        Key::Larger(n) => c.summary.map(|s| s.size > *n),
        Key::Smaller(n) => c.summary.map(|s| s.size < *n),
        Key::Internal(cmp, d) => c.summary.map(|s| {
            structure::internal_day(&s.internal_date).is_some_and(|day| date_cmp(*cmp, day, *d))
        }),
        Key::Sent(cmp, d) => c.summary.map(|s| {
            // Without a usable Date header, INTERNALDATE stands in (as Dovecot does).
            let day = s
                .sent_date
                .and_then(|sd| {
                    chrono::NaiveDate::from_ymd_opt(
                        i32::from(sd.year),
                        u32::from(sd.month),
                        u32::from(sd.day),
                    )
                })
                .or_else(|| structure::internal_day(&s.internal_date));
            day.is_some_and(|day| date_cmp(*cmp, day, *d))
        }),
        Key::Header(name, needle) => c.headers.map(|hs| {
            hs.iter()
                .any(|(n, text)| n == name && text.contains(needle.as_str()))
        }),
        Key::Body(needle) => c.body.map(|b| b.contains(needle.as_str())),
        Key::Text(needle) => match (c.headers, c.body) {
            (Some(hs), Some(b)) => Some(
                b.contains(needle.as_str()) || hs.iter().any(|(_, t)| t.contains(needle.as_str())),
            ),
            _ => None,
        },
    }
}

/// Whether a key can need the headers (parsed from the summary) or the body.
fn needs(key: &Key) -> (bool, bool) {
    match key {
        Key::And(keys) => keys
            .iter()
            .map(needs)
            .fold((false, false), |a, b| (a.0 || b.0, a.1 || b.1)),
        Key::Or(a, b) => {
            let (a, b) = (needs(a), needs(b));
            (a.0 || b.0, a.1 || b.1)
        }
        Key::Not(k) => needs(k),
        Key::Header(..) => (true, false),
        Key::Body(_) => (false, true),
        Key::Text(_) => (true, true),
        _ => (false, false),
    }
}

impl Session {
    pub(super) async fn search(
        &mut self,
        charset: Option<&Charset<'_>>,
        criteria: &Vec1<SearchKey<'_>>,
        uid: bool,
        out: &mut Out,
    ) -> Result<Reply, Failure> {
        if let Some(cs) = charset {
            let cs = cs.as_ref();
            if !cs.eq_ignore_ascii_case("UTF-8") && !cs.eq_ignore_ascii_case("US-ASCII") {
                let allowed = ["UTF-8", "US-ASCII"]
                    .into_iter()
                    .filter_map(|c| Charset::try_from(c).ok())
                    .collect();
                return Err(no_code(
                    Code::BadCharset { allowed },
                    format!("charset {cs} is not supported"),
                ));
            }
        }
        let account = self.account()?;
        let selected = self.selected_mut()?;
        let exists = selected.exists() as u64;
        let largest_uid = selected.uids().last().copied().unwrap_or(0);
        let mut modseq_used = false;
        let key = Key::And(
            criteria
                .as_ref()
                .iter()
                .map(|k| compile(k, exists, largest_uid, &mut modseq_used))
                .collect(),
        );
        let (need_headers, need_body) = needs(&key);
        let mut hits = Vec::new();
        let mut highest = 0u64;
        for (i, &u) in selected.uids().iter().enumerate() {
            let Some(state) = selected.message(u) else {
                continue;
            };
            let mut candidate = Candidate {
                seq: i as u64 + 1,
                uid: u,
                state,
                summary: None,
                headers: None,
                body: None,
            };
            let mut verdict = eval(&key, &candidate);
            let record;
            let headers;
            let body;
            if verdict.is_none() {
                record = account.summary(&state.id).await?;
                headers = if need_headers {
                    header_texts(&record.summary.header)
                } else {
                    Vec::new()
                };
                candidate.summary = Some(&record.summary);
                candidate.headers = Some(&headers);
                verdict = eval(&key, &candidate);
                if verdict.is_none() && need_body {
                    let raw = account
                        .messages
                        .read_all(&state.id.0, &record.body_key)
                        .await?;
                    let mut text = String::new();
                    match MessageParser::default().parse(raw.as_ref()) {
                        Some(m) => body_text(&m, 0, &mut text),
                        None => text = text_of(&raw),
                    }
                    body = text;
                    candidate.body = Some(&body);
                    verdict = eval(&key, &candidate);
                }
            }
            if verdict == Some(true) {
                hits.push(nz32(if uid { u } else { i as u64 + 1 }));
                highest = highest.max(state.modseq);
            }
        }
        let modseq = if modseq_used {
            self.enabled.condstore = true;
            NonZeroU64::new(highest)
        } else {
            None
        };
        out.data(Data::Search(hits, modseq));
        done("SEARCH completed")
    }
}
