//! Recipient addresses: normalisation, then resolution against the user directory.
//!
//! Normalised: surrounding `<>` and spaces dropped, local part and domain in lower case (the
//! directory matches addresses case-insensitively), one trailing dot of the domain dropped
//! (`example.org.` is `example.org`). Resolution, first match wins:
//! 1. the address itself: a user's address, or an alias (one or more users);
//! 2. without its `+tag` (`user+tag@domain` → `user@domain`), the same way;
//! 3. the domain's catch-all user, if it has one.

use std::sync::Arc;

use crate::users::{DirectoryError, User, UserDirectory};

/// The separator of plus-addressing.
pub const TAG_SEPARATOR: char = '+';

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error("empty address")]
    Empty,
    #[error("{0:?} has no domain")]
    NoDomain(String),
}

/// An address as the directory is asked about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Normalised {
    pub local: String,
    pub domain: String,
}

impl Normalised {
    pub fn address(&self) -> String {
        format!("{}@{}", self.local, self.domain)
    }

    /// The address without its `+tag`, if it has one.
    pub fn untagged(&self) -> Option<Normalised> {
        let (base, _tag) = self.local.split_once(TAG_SEPARATOR)?;
        (!base.is_empty()).then(|| Normalised {
            local: base.to_string(),
            domain: self.domain.clone(),
        })
    }
}

pub fn normalise(address: &str) -> Result<Normalised, AddressError> {
    let a = address.trim();
    let a = a
        .strip_prefix('<')
        .and_then(|a| a.strip_suffix('>'))
        .unwrap_or(a)
        .trim();
    if a.is_empty() {
        return Err(AddressError::Empty);
    }
    let (local, domain) = a
        .rsplit_once('@')
        .ok_or_else(|| AddressError::NoDomain(a.to_string()))?;
    let domain = domain.strip_suffix('.').unwrap_or(domain);
    if local.is_empty() || domain.is_empty() {
        return Err(AddressError::NoDomain(a.to_string()));
    }
    Ok(Normalised {
        local: local.to_lowercase(),
        domain: domain.to_lowercase(),
    })
}

/// How a recipient was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// A user's address or an alias.
    Exact,
    /// After dropping a `+tag`.
    Untagged,
    /// The domain's catch-all.
    CatchAll,
}

#[derive(Debug, Clone)]
pub struct Resolved {
    pub address: Normalised,
    pub users: Vec<Arc<User>>,
    pub route: Route,
}

/// The users `address` delivers to; `None` when nobody gets it.
pub async fn resolve(
    directory: &dyn UserDirectory,
    address: &Normalised,
) -> Result<Option<Resolved>, DirectoryError> {
    let found = |users: Vec<Arc<User>>, route| {
        Some(Resolved {
            address: address.clone(),
            users,
            route,
        })
    };
    let users = directory.recipients(&address.address()).await?;
    if !users.is_empty() {
        return Ok(found(users, Route::Exact));
    }
    if let Some(base) = address.untagged() {
        let users = directory.recipients(&base.address()).await?;
        if !users.is_empty() {
            return Ok(found(users, Route::Untagged));
        }
    }
    if let Some(user) = directory.catch_all(&address.domain).await? {
        return Ok(found(vec![user], Route::CatchAll));
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalisation() {
        let n = normalise(" <Alice+Lists@Example.ORG.> ").unwrap();
        assert_eq!(n.address(), "alice+lists@example.org");
        assert_eq!(n.untagged().unwrap().address(), "alice@example.org");
        assert_eq!(normalise("bob@x").unwrap().untagged(), None);
        assert_eq!(normalise("+tag@x").unwrap().untagged(), None);
        assert_eq!(normalise("<>"), Err(AddressError::Empty));
        assert_eq!(normalise(""), Err(AddressError::Empty));
        assert!(matches!(
            normalise("postmaster"),
            Err(AddressError::NoDomain(_))
        ));
        assert!(matches!(normalise("a@."), Err(AddressError::NoDomain(_))));
        // The last @ splits: a quoted local part may hold one.
        assert_eq!(normalise("\"a@b\"@c").unwrap().domain, "c");
    }
}
