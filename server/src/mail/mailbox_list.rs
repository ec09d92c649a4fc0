//! A user's mailbox list: one K2V item per mailbox in the partition `u/<user>/mailboxes`, keyed
//! by an opaque mailbox id, its value (name, subscription, special use, UIDVALIDITY) encrypted to
//! the user. Merging is deterministic everywhere:
//! - concurrent changes to one mailbox are siblings of one item; the value with the highest
//!   stamp `(counter, writer)` wins (a logical clock, no wall time);
//! - two mailboxes given one name concurrently (two regions creating or renaming to the same
//!   name) both survive: the one created first (lowest stamp, then id) keeps the name, the others
//!   show as `name [abcdef]` (the first hex digits of their id) until the user renames them. No
//!   mailbox and no message is lost;
//! - INBOX has an id derived from the user, so a first delivery (LMTP writes to INBOX's log
//!   without reading this list) and a first login racing in two regions meet in one INBOX. The
//!   special-use folders also get derived ids when first created, so two first logins create
//!   one `Sent`, not two.
//! - A deleted mailbox stays as an entry marked deleted, so its UIDVALIDITY is remembered and a
//!   re-created mailbox of the same name gets a greater one (RFC 9051 §2.3.1.1).

use std::collections::BTreeMap;
use std::sync::Arc;

use age::x25519;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::crypto::{self, CryptoError};
use crate::storage::{CausalityToken, ReadRange, RowStore, StorageError};
use crate::users::UserId;

const FORMAT_VERSION: u8 = 1;
/// Hierarchy delimiter announced by LIST.
pub const DELIMITER: char = '/';

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct MailboxId(pub String);

impl MailboxId {
    fn derived(user: &UserId, role: &str) -> MailboxId {
        let h = Sha256::digest(format!("tern/mailbox/{}/{role}", user.0).as_bytes());
        MailboxId(hex::encode(&h[..16]))
    }

    pub fn inbox(user: &UserId) -> MailboxId {
        MailboxId::derived(user, "INBOX")
    }

    fn random() -> MailboxId {
        MailboxId(hex::encode(rand::random::<[u8; 16]>()))
    }

    /// The row partition of this mailbox's log.
    pub fn log_partition(&self) -> String {
        format!("log/{}", self.0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum SpecialUse {
    Sent,
    Drafts,
    Trash,
    Junk,
    Archive,
}

impl SpecialUse {
    pub const ALL: [SpecialUse; 5] = [
        SpecialUse::Sent,
        SpecialUse::Drafts,
        SpecialUse::Trash,
        SpecialUse::Junk,
        SpecialUse::Archive,
    ];

    pub fn default_name(self) -> &'static str {
        match self {
            SpecialUse::Sent => "Sent",
            SpecialUse::Drafts => "Drafts",
            SpecialUse::Trash => "Trash",
            SpecialUse::Junk => "Junk",
            SpecialUse::Archive => "Archive",
        }
    }

    /// The RFC 6154 attribute.
    pub fn attribute(self) -> &'static str {
        match self {
            SpecialUse::Sent => "\\Sent",
            SpecialUse::Drafts => "\\Drafts",
            SpecialUse::Trash => "\\Trash",
            SpecialUse::Junk => "\\Junk",
            SpecialUse::Archive => "\\Archive",
        }
    }
}

/// `(counter, writer)`: orders versions of list entries without wall clocks.
type Stamp = (u64, u64);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Entry {
    name: String,
    subscribed: bool,
    special_use: Option<SpecialUse>,
    uid_validity: u32,
    deleted: bool,
    created: Stamp,
    stamp: Stamp,
}

#[derive(Debug, thiserror::Error)]
pub enum ListError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    #[error("mailbox list entry {key}: {detail}")]
    Corrupt { key: String, detail: String },
    #[error("mailbox {0:?} does not exist")]
    NotFound(String),
    #[error("mailbox {0:?} already exists")]
    AlreadyExists(String),
    #[error("{0}")]
    Invalid(String),
}

/// A mailbox as LIST shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailboxInfo {
    pub id: MailboxId,
    /// The name to show (disambiguated if two mailboxes share one).
    pub name: String,
    pub subscribed: bool,
    pub special_use: Option<SpecialUse>,
    pub uid_validity: u32,
}

/// A mailbox id of the list, live or deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedId {
    pub id: MailboxId,
    /// As the merged entry says (the same rule as LIST).
    pub deleted: bool,
}

struct Loaded {
    /// Live and deleted entries by id, merged, with the token covering every sibling.
    entries: BTreeMap<MailboxId, (Entry, CausalityToken)>,
    max_counter: u64,
    max_uid_validity: u32,
}

pub struct MailboxList {
    rows: Arc<dyn RowStore>,
    partition: String,
    user: UserId,
    recipient: x25519::Recipient,
    identity: Arc<x25519::Identity>,
    writer: u64,
}

fn is_inbox(name: &str) -> bool {
    name.eq_ignore_ascii_case("INBOX")
}

fn normalise(name: &str) -> String {
    if is_inbox(name) {
        "INBOX".to_string()
    } else {
        name.to_string()
    }
}

impl MailboxList {
    pub fn new(
        rows: Arc<dyn RowStore>,
        user: UserId,
        recipient: x25519::Recipient,
        identity: Arc<x25519::Identity>,
    ) -> MailboxList {
        MailboxList {
            rows,
            partition: format!("u/{}/mailboxes", user.0),
            user,
            recipient,
            identity,
            writer: rand::random::<u64>(),
        }
    }

    fn encode(&self, entry: &Entry) -> Result<Vec<u8>, ListError> {
        let plain = postcard::to_allocvec(entry).map_err(|e| ListError::Corrupt {
            key: "(new entry)".into(),
            detail: e.to_string(),
        })?;
        let mut out = vec![FORMAT_VERSION];
        out.extend(crypto::encrypt_to(&self.recipient, &plain)?);
        Ok(out)
    }

    fn decode(&self, key: &str, raw: &[u8]) -> Result<Entry, ListError> {
        let corrupt = |detail: String| ListError::Corrupt {
            key: key.to_string(),
            detail,
        };
        match raw.split_first() {
            Some((&FORMAT_VERSION, rest)) => {
                let plain = crypto::decrypt_with(&self.identity, rest, key)?;
                postcard::from_bytes(&plain).map_err(|e| corrupt(e.to_string()))
            }
            Some((v, _)) => Err(corrupt(format!(
                "format version {v}; this server reads up to {FORMAT_VERSION}"
            ))),
            None => Err(corrupt("empty value".into())),
        }
    }

    async fn load(&self) -> Result<Loaded, ListError> {
        let mut loaded = Loaded {
            entries: BTreeMap::new(),
            max_counter: 0,
            max_uid_validity: 0,
        };
        let mut search = ReadRange::partition(self.partition.clone());
        loop {
            let page = self.rows.read_range(search.clone()).await?;
            for item in &page.items {
                let mut best: Option<Entry> = None;
                for raw in item.live_values() {
                    let e = self.decode(&item.sort_key, raw)?;
                    loaded.max_counter = loaded.max_counter.max(e.stamp.0).max(e.created.0);
                    loaded.max_uid_validity = loaded.max_uid_validity.max(e.uid_validity);
                    if best.as_ref().is_none_or(|b| e.stamp > b.stamp) {
                        best = Some(e);
                    }
                }
                if let Some(e) = best {
                    loaded
                        .entries
                        .insert(MailboxId(item.sort_key.clone()), (e, item.token.clone()));
                }
            }
            if !page.more {
                return Ok(loaded);
            }
            search.range.start = page.next_start;
        }
    }

    /// Live mailboxes with the names to show, sorted by name.
    pub async fn list(&self) -> Result<Vec<MailboxInfo>, ListError> {
        Ok(Self::visible(&self.load().await?))
    }

    fn visible(loaded: &Loaded) -> Vec<MailboxInfo> {
        let mut by_name: BTreeMap<String, Vec<(&MailboxId, &Entry)>> = BTreeMap::new();
        for (id, (e, _)) in &loaded.entries {
            if !e.deleted {
                by_name.entry(normalise(&e.name)).or_default().push((id, e));
            }
        }
        let mut out = Vec::new();
        for (name, mut claimants) in by_name {
            claimants.sort_by(|a, b| (a.1.created, a.0).cmp(&(b.1.created, b.0)));
            for (rank, (id, e)) in claimants.into_iter().enumerate() {
                let shown = if rank == 0 {
                    name.clone()
                } else {
                    format!("{name} [{}]", &id.0[..6])
                };
                out.push(MailboxInfo {
                    id: id.clone(),
                    name: shown,
                    subscribed: e.subscribed,
                    special_use: e.special_use,
                    uid_validity: e.uid_validity,
                });
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Every mailbox id the list has ever held, deleted entries included (their logs and
    /// messages are still in storage until collected), sorted by id. For the sweep.
    pub async fn all_ids(&self) -> Result<Vec<ListedId>, ListError> {
        Ok(self
            .load()
            .await?
            .entries
            .into_iter()
            .map(|(id, (e, _))| ListedId {
                id,
                deleted: e.deleted,
            })
            .collect())
    }

    pub async fn find(&self, name: &str) -> Result<Option<MailboxInfo>, ListError> {
        let name = normalise(name);
        Ok(self.list().await?.into_iter().find(|m| m.name == name))
    }

    async fn write(
        &self,
        id: &MailboxId,
        token: Option<&CausalityToken>,
        entry: &Entry,
    ) -> Result<(), ListError> {
        self.rows
            .insert_item(&self.partition, &id.0, token, self.encode(entry)?)
            .await?;
        Ok(())
    }

    /// Creates INBOX and the special-use folders that do not exist yet (first login).
    pub async fn ensure_defaults(&self) -> Result<(), ListError> {
        let loaded = self.load().await?;
        let inbox = MailboxId::inbox(&self.user);
        if !loaded.entries.contains_key(&inbox) {
            self.create_entry(&loaded, inbox, "INBOX", None).await?;
        }
        for role in SpecialUse::ALL {
            let exists = loaded
                .entries
                .values()
                .any(|(e, _)| e.special_use == Some(role));
            if !exists {
                let id = MailboxId::derived(&self.user, role.default_name());
                self.create_entry(&loaded, id, role.default_name(), Some(role))
                    .await?;
            }
        }
        Ok(())
    }

    async fn create_entry(
        &self,
        loaded: &Loaded,
        id: MailboxId,
        name: &str,
        special_use: Option<SpecialUse>,
    ) -> Result<MailboxInfo, ListError> {
        let stamp = (loaded.max_counter + 1, self.writer);
        let entry = Entry {
            name: normalise(name),
            subscribed: true,
            special_use,
            uid_validity: loaded.max_uid_validity + 1,
            deleted: false,
            created: stamp,
            stamp,
        };
        // A derived id may exist concurrently: write over what we saw so that equal creations
        // collapse into one value instead of piling up siblings.
        let token = loaded.entries.get(&id).map(|(_, t)| t);
        self.write(&id, token, &entry).await?;
        Ok(MailboxInfo {
            id,
            name: entry.name,
            subscribed: true,
            special_use,
            uid_validity: entry.uid_validity,
        })
    }

    fn check_name(name: &str) -> Result<(), ListError> {
        if name.is_empty()
            || name.starts_with(DELIMITER)
            || name.ends_with(DELIMITER)
            || name.contains("//")
            || name.chars().any(|c| c.is_control() || c == '*' || c == '%')
        {
            return Err(ListError::Invalid(format!(
                "{name:?} is not a valid mailbox name"
            )));
        }
        Ok(())
    }

    /// CREATE: a new mailbox (with a fresh id, so a re-created name gets a new UIDVALIDITY).
    pub async fn create(
        &self,
        name: &str,
        special_use: Option<SpecialUse>,
    ) -> Result<MailboxInfo, ListError> {
        Self::check_name(name)?;
        let loaded = self.load().await?;
        if Self::visible(&loaded)
            .iter()
            .any(|m| m.name == normalise(name))
        {
            return Err(ListError::AlreadyExists(name.to_string()));
        }
        self.create_entry(&loaded, MailboxId::random(), name, special_use)
            .await
    }

    async fn update(
        &self,
        loaded: &Loaded,
        id: &MailboxId,
        change: impl FnOnce(&mut Entry),
    ) -> Result<(), ListError> {
        let (entry, token) = loaded
            .entries
            .get(id)
            .ok_or_else(|| ListError::NotFound(id.0.clone()))?;
        let mut next = entry.clone();
        change(&mut next);
        next.stamp = (loaded.max_counter + 1, self.writer);
        self.write(id, Some(token), &next).await
    }

    /// RENAME, with the mailboxes below it.
    pub async fn rename(&self, from: &str, to: &str) -> Result<(), ListError> {
        Self::check_name(to)?;
        if is_inbox(from) {
            return Err(ListError::Invalid(
                "renaming INBOX moves its messages; that is done by the IMAP layer".into(),
            ));
        }
        let loaded = self.load().await?;
        let visible = Self::visible(&loaded);
        if visible.iter().any(|m| m.name == normalise(to)) {
            return Err(ListError::AlreadyExists(to.to_string()));
        }
        let prefix = format!("{from}{DELIMITER}");
        let moving: Vec<&MailboxInfo> = visible
            .iter()
            .filter(|m| m.name == from || m.name.starts_with(&prefix))
            .collect();
        if !moving.iter().any(|m| m.name == from) {
            return Err(ListError::NotFound(from.to_string()));
        }
        for m in moving {
            let new_name = format!("{to}{}", &m.name[from.len()..]);
            self.update(&loaded, &m.id, |e| e.name = new_name).await?;
        }
        Ok(())
    }

    /// DELETE: marks the entry deleted and returns the id whose log and bodies are to be
    /// collected. Mailboxes below it stay (RFC 9051 §6.3.4). The caller first writes
    /// `MailOp::ExpungeAll` to the mailbox's log: what it had seen goes, and a message appended
    /// concurrently survives and is moved to INBOX by `mail::rescue`.
    pub async fn delete(&self, name: &str) -> Result<MailboxId, ListError> {
        if is_inbox(name) {
            return Err(ListError::Invalid("INBOX cannot be deleted".into()));
        }
        let loaded = self.load().await?;
        let target = Self::visible(&loaded)
            .into_iter()
            .find(|m| m.name == name)
            .ok_or_else(|| ListError::NotFound(name.to_string()))?;
        self.update(&loaded, &target.id, |e| e.deleted = true)
            .await?;
        Ok(target.id)
    }

    /// SUBSCRIBE / UNSUBSCRIBE.
    pub async fn set_subscribed(&self, name: &str, subscribed: bool) -> Result<(), ListError> {
        let loaded = self.load().await?;
        let target = Self::visible(&loaded)
            .into_iter()
            .find(|m| m.name == normalise(name))
            .ok_or_else(|| ListError::NotFound(name.to_string()))?;
        self.update(&loaded, &target.id, |e| e.subscribed = subscribed)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{StorageConfig, Store};

    async fn two_processes() -> (tempfile::TempDir, MailboxList, MailboxList) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&StorageConfig::Local {
            path: dir.path().into(),
        })
        .await
        .unwrap();
        let id = Arc::new(x25519::Identity::generate());
        let user = UserId("u1".into());
        let a = MailboxList::new(store.rows.clone(), user.clone(), id.to_public(), id.clone());
        let b = MailboxList::new(store.rows.clone(), user, id.to_public(), id);
        (dir, a, b)
    }

    #[tokio::test]
    async fn racing_first_logins_make_one_inbox_and_one_of_each_folder() {
        let (_d, a, b) = two_processes().await;
        let (ra, rb) = tokio::join!(a.ensure_defaults(), b.ensure_defaults());
        ra.unwrap();
        rb.unwrap();
        let names: Vec<String> = a
            .list()
            .await
            .unwrap()
            .into_iter()
            .map(|m| m.name)
            .collect();
        assert_eq!(
            names,
            vec!["Archive", "Drafts", "INBOX", "Junk", "Sent", "Trash"]
        );
        assert_eq!(
            a.find("inbox").await.unwrap().unwrap().id,
            MailboxId::inbox(&a.user)
        );
        assert_eq!(a.list().await.unwrap(), b.list().await.unwrap());
    }

    #[tokio::test]
    async fn concurrent_creates_of_one_name_keep_both() {
        let (_d, a, b) = two_processes().await;
        // Both processes decide from the same (empty) view, as two regions would.
        let loaded_a = a.load().await.unwrap();
        let loaded_b = b.load().await.unwrap();
        let ma = a
            .create_entry(&loaded_a, MailboxId("aaaaaaaa".into()), "Projects", None)
            .await
            .unwrap();
        let mb = b
            .create_entry(&loaded_b, MailboxId("bbbbbbbb".into()), "Projects", None)
            .await
            .unwrap();
        let list = a.list().await.unwrap();
        let names: Vec<&str> = list.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(list.len(), 2, "{names:?}");
        assert!(names.contains(&"Projects"));
        let other = list.iter().find(|m| m.name != "Projects").unwrap();
        assert!(other.name.starts_with("Projects ["), "{}", other.name);
        assert!([&ma.id, &mb.id].contains(&&other.id));
        assert_eq!(
            list,
            b.list().await.unwrap(),
            "both processes show the same list"
        );
        // The user renames the loser away and both names are clean.
        a.rename(&other.name, "Projects-2").await.unwrap();
        let names: Vec<String> = b
            .list()
            .await
            .unwrap()
            .into_iter()
            .map(|m| m.name)
            .collect();
        assert_eq!(names, vec!["Projects", "Projects-2"]);
    }

    #[tokio::test]
    async fn rename_moves_children_delete_and_recreate_bumps_uidvalidity() {
        let (_d, a, _b) = two_processes().await;
        a.ensure_defaults().await.unwrap();
        let w = a.create("Work", None).await.unwrap();
        a.create("Work/2026", None).await.unwrap();
        assert!(
            a.create("work", None).await.is_ok(),
            "names are case-sensitive"
        );
        assert!(matches!(
            a.create("Work", None).await,
            Err(ListError::AlreadyExists(_))
        ));
        a.rename("Work", "Job").await.unwrap();
        let names: Vec<String> = a
            .list()
            .await
            .unwrap()
            .into_iter()
            .map(|m| m.name)
            .collect();
        assert!(names.contains(&"Job".to_string()) && names.contains(&"Job/2026".to_string()));
        let deleted = a.delete("Job").await.unwrap();
        assert_eq!(deleted, w.id);
        let again = a.create("Job", None).await.unwrap();
        assert_ne!(again.id, w.id);
        assert!(again.uid_validity > w.uid_validity);
        assert!(matches!(
            a.delete("INBOX").await,
            Err(ListError::Invalid(_))
        ));
        assert!(matches!(
            a.create("a//b", None).await,
            Err(ListError::Invalid(_))
        ));
        a.set_subscribed("Job", false).await.unwrap();
        assert!(!a.find("Job").await.unwrap().unwrap().subscribed);

        // Deleted entries stay listed by id for the sweep.
        let ids = a.all_ids().await.unwrap();
        assert_eq!(ids.len(), a.list().await.unwrap().len() + 1);
        assert!(ids.contains(&ListedId {
            id: w.id.clone(),
            deleted: true
        }));
        assert!(ids.contains(&ListedId {
            id: again.id.clone(),
            deleted: false
        }));
    }

    #[tokio::test]
    async fn concurrent_renames_of_one_mailbox_settle_on_one_name() {
        let (_d, a, b) = two_processes().await;
        a.create("X", None).await.unwrap();
        let la = a.load().await.unwrap();
        let lb = b.load().await.unwrap();
        let id = la.entries.keys().next().unwrap().clone();
        a.update(&la, &id, |e| e.name = "FromA".into())
            .await
            .unwrap();
        b.update(&lb, &id, |e| e.name = "FromB".into())
            .await
            .unwrap();
        let la2 = a.list().await.unwrap();
        assert_eq!(la2.len(), 1);
        assert_eq!(la2, b.list().await.unwrap());
        assert!(["FromA", "FromB"].contains(&la2[0].name.as_str()));
    }
}
