//! What the server advertises. Only what works end to end is listed; `docs/imap.md` says what
//! is still missing (IMAP4rev2 itself waits for ESEARCH, LIST-EXTENDED and friends).

use imap_codec::imap_types::auth::AuthMechanism;
use imap_codec::imap_types::core::{Atom, Vec1};
use imap_codec::imap_types::response::Capability;

fn other(name: &str) -> Option<Capability<'static>> {
    Atom::try_from(name.to_string()).ok().map(Capability::from)
}

/// What a connection is in a position to be offered.
pub struct Offer {
    pub authenticated: bool,
    /// A password may be sent in the clear (TLS is active, or plaintext is allowed).
    pub password_ok: bool,
    /// TLS is available and not active yet.
    pub starttls: bool,
    pub max_literal: u32,
}

/// The capability list for a connection in the given state.
pub fn capabilities(offer: Offer) -> Vec1<Capability<'static>> {
    let Offer {
        authenticated,
        password_ok,
        starttls,
        max_literal,
    } = offer;
    let mut caps = vec![Capability::Imap4Rev1];
    if !authenticated {
        if starttls {
            caps.push(Capability::StartTls);
        }
        if password_ok {
            caps.push(Capability::Auth(AuthMechanism::Plain));
        } else {
            caps.push(Capability::LoginDisabled);
        }
        // SCRAM does not reveal the password: fine without TLS too.
        caps.push(Capability::Auth(AuthMechanism::ScramSha256));
        caps.push(Capability::SaslIr);
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
            Capability::QResync,
            Capability::StatusSize,
        ]);
        caps.push(Capability::Quota);
        caps.extend(other("QUOTA=RES-STORAGE"));
        caps.extend(other("SPECIAL-USE"));
        caps.extend(other("CHILDREN"));
        caps.extend(other(&format!("APPENDLIMIT={max_literal}")));
    }
    Vec1::try_from(caps).unwrap_or_else(|_| Vec1::from(Capability::Imap4Rev1))
}
