//! What the server advertises. Only what works end to end is listed; `docs/imap.md` says what
//! is still missing (IMAP4rev2 itself waits for ESEARCH, LIST-EXTENDED and friends).

use imap_codec::imap_types::auth::AuthMechanism;
use imap_codec::imap_types::core::{Atom, Vec1};
use imap_codec::imap_types::response::Capability;

fn other(name: &str) -> Option<Capability<'static>> {
    Atom::try_from(name.to_string()).ok().map(Capability::from)
}

/// The capability list for a connection in the given state.
pub fn capabilities(
    authenticated: bool,
    allow_plaintext: bool,
    max_literal: u32,
) -> Vec1<Capability<'static>> {
    let mut caps = vec![Capability::Imap4Rev1];
    if !authenticated {
        if allow_plaintext {
            caps.push(Capability::Auth(AuthMechanism::Plain));
            caps.push(Capability::SaslIr);
        } else {
            caps.push(Capability::LoginDisabled);
        }
    }
    caps.extend([
        Capability::LiteralPlus,
        Capability::Id,
        Capability::Enable,
        Capability::Idle,
    ]);
    if authenticated {
        caps.extend([
            Capability::Namespace,
            Capability::UidPlus,
            Capability::Move,
            Capability::Unselect,
            Capability::CondStore,
            Capability::StatusSize,
        ]);
        caps.extend(other("SPECIAL-USE"));
        caps.extend(other("CHILDREN"));
        caps.extend(other(&format!("APPENDLIMIT={max_literal}")));
    }
    Vec1::try_from(caps).unwrap_or_else(|_| Vec1::from(Capability::Imap4Rev1))
}
