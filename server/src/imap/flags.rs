//! Flags as the mail model stores them (strings such as `\Seen` or `$Forwarded`) and as IMAP
//! sends them. System flags are stored in their canonical spelling (`\seen` from a client is
//! stored as `\Seen`), so a search or a store is case-insensitive for them.

use std::collections::BTreeSet;

use imap_codec::imap_types::core::Atom;
use imap_codec::imap_types::flag::{Flag, FlagFetch, FlagPerm};

pub const SEEN: &str = "\\Seen";
pub const DELETED: &str = "\\Deleted";
pub const ANSWERED: &str = "\\Answered";
pub const FLAGGED: &str = "\\Flagged";
pub const DRAFT: &str = "\\Draft";

/// The system flags every mailbox announces.
pub const SYSTEM: [&str; 5] = [ANSWERED, FLAGGED, DELETED, SEEN, DRAFT];

/// The stored form of a client's flag (`Flag`'s display is canonical for system flags).
pub fn stored(flag: &Flag<'_>) -> String {
    flag.to_string()
}

/// The IMAP form of a stored flag; `None` for a string that is no valid flag (never written by
/// this server, skipped rather than sent malformed).
pub fn imap(stored: &str) -> Option<Flag<'static>> {
    match stored.strip_prefix('\\') {
        Some(system) => Atom::try_from(system.to_string()).ok().map(Flag::system),
        None => Atom::try_from(stored.to_string()).ok().map(Flag::Keyword),
    }
}

/// A message's flags as FETCH sends them: system flags first, then keywords.
pub fn fetch_list(flags: &BTreeSet<String>) -> Vec<FlagFetch<'static>> {
    let system = flags.iter().filter(|f| !is_keyword(f));
    let keywords = flags.iter().filter(|f| is_keyword(f));
    system
        .chain(keywords)
        .filter_map(|f| imap(f))
        .map(FlagFetch::Flag)
        .collect()
}

/// FLAGS of a mailbox: the system flags and the keywords in use.
pub fn mailbox_flags(keywords: &BTreeSet<String>) -> Vec<Flag<'static>> {
    SYSTEM
        .iter()
        .copied()
        .chain(keywords.iter().map(String::as_str))
        .filter_map(imap)
        .collect()
}

/// PERMANENTFLAGS: the same, plus `\*` (clients may create keywords).
pub fn permanent_flags(keywords: &BTreeSet<String>) -> Vec<FlagPerm<'static>> {
    let mut out: Vec<FlagPerm<'static>> = mailbox_flags(keywords)
        .into_iter()
        .map(FlagPerm::Flag)
        .collect();
    out.push(FlagPerm::Asterisk);
    out
}

pub fn is_keyword(stored: &str) -> bool {
    !stored.starts_with('\\')
}
