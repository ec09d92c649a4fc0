//! The accounts one process serves, shared by every protocol session in it (IMAP, LMTP
//! delivery, and the SASL service later).
//!
//! - A user is unlocked once per process: the first login runs argon2id and opens the user's
//!   identity; later logins of the same user, while one of their sessions is alive, are checked
//!   against a salted in-memory hash of the password and share the same [`Account`].
//! - A mailbox is opened once per process: one [`OpenMailbox`] (one `Mailbox` handle, one writer
//!   id, one storage watcher) whatever the number of sessions that use it. Every session
//!   subscribes to the handle's change notifications; none polls storage itself.
//! - Nothing is kept for nobody: the registries hold weak references, so an account and its
//!   mailbox handles go away with their last session, and the watcher stops with its handle.

use std::collections::{HashMap, VecDeque};
use std::ops::Deref;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use age::x25519;
use sha2::{Digest, Sha256};
use tokio::task::JoinHandle;

use super::mailbox::{Mailbox, MailboxError, MailboxKeys};
use super::mailbox_list::{ListError, MailboxId, MailboxList};
use super::message::{MessageError, MessageStore};
use super::summary::SummaryRecord;
use super::sweep::{SweepConfig, Sweeper};
use super::view::MessageId;
use crate::crypto::CryptoError;
use crate::log::store::LogStore;
use crate::storage::Store;
use crate::users::{DirectoryError, User, UserDirectory, UserId};

#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    /// Unknown user or wrong password (deliberately not told apart).
    #[error("invalid credentials")]
    Rejected,
    #[error(transparent)]
    Directory(#[from] DirectoryError),
    #[error("the user's key material cannot be used: {0}")]
    Keys(CryptoError),
    #[error(transparent)]
    List(#[from] ListError),
    #[error(transparent)]
    Message(#[from] MessageError),
    #[error("login task failed: {0}")]
    Task(String),
}

/// Every account of this process.
pub struct Accounts {
    store: Store,
    directory: Arc<dyn UserDirectory>,
    open: Mutex<HashMap<UserId, Weak<Account>>>,
    /// Salt of the in-memory password checks; never leaves the process.
    salt: [u8; 32],
    /// The blob sweep of each unlocked account (it needs the key): how often, and with what
    /// grace. `None`: never (tests that count blobs).
    sweep: Mutex<Option<(Duration, SweepConfig)>>,
}

/// How often an unlocked account's blobs are swept by default (`mail/sweep.rs`: two passes a
/// grace apart remove what no mailbox references, e.g. after DELETE).
pub const SWEEP_EVERY: Duration = Duration::from_secs(6 * 3600);

impl Accounts {
    pub fn new(store: Store, directory: Arc<dyn UserDirectory>) -> Arc<Accounts> {
        Arc::new(Accounts {
            store,
            directory,
            open: Mutex::new(HashMap::new()),
            salt: rand::random(),
            sweep: Mutex::new(Some((SWEEP_EVERY, SweepConfig::default()))),
        })
    }

    /// Sets the sweep schedule of accounts unlocked from now on (`None`: no sweep).
    pub fn set_sweep(&self, schedule: Option<(Duration, SweepConfig)>) {
        *self.sweep.lock().unwrap_or_else(|p| p.into_inner()) = schedule;
    }

    pub fn directory(&self) -> &Arc<dyn UserDirectory> {
        &self.directory
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    fn password_check(&self, user: &User, password: &str) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.salt);
        h.update(user.keys.password_verifier.as_bytes());
        h.update([0]);
        h.update(password.as_bytes());
        h.finalize().into()
    }

    fn live(&self, id: &UserId) -> Option<Arc<Account>> {
        let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.get(id).and_then(Weak::upgrade)
    }

    /// Checks a password and returns the user's account, unlocking it if no session of this
    /// user is alive in the process. Argon2id runs on the blocking pool, never on the runtime.
    pub async fn login(&self, name: &str, password: &str) -> Result<Arc<Account>, AccountError> {
        let user = self
            .directory
            .user(name)
            .await?
            .ok_or(AccountError::Rejected)?;
        let check = self.password_check(&user, password);
        if let Some(account) = self.live(&user.id)
            && account.user.keys == user.keys
            && same_check(&account.password_check, &check)
        {
            return Ok(account);
        }
        let (keys, pw) = (user.keys.clone(), password.to_string());
        let unlocked = tokio::task::spawn_blocking(move || keys.unlock_with_password(&pw))
            .await
            .map_err(|e| AccountError::Task(e.to_string()))?
            .map_err(|e| match e {
                CryptoError::WrongKey => AccountError::Rejected,
                other => AccountError::Keys(other),
            })?;
        self.register(user, unlocked.identity, check).await
    }

    /// A login proven by SCRAM-SHA-256: `client_key` (recovered from a verified proof) opens
    /// the user's identity, which is cheap (no argon2id), so there is no cache to consult.
    pub async fn login_scram(
        &self,
        user: Arc<User>,
        client_key: &[u8; 32],
    ) -> Result<Arc<Account>, AccountError> {
        if let Some(account) = self.live(&user.id)
            && account.user.keys == user.keys
        {
            return Ok(account);
        }
        let unlocked = user
            .keys
            .unlock_with_scram(client_key)
            .map_err(|e| match e {
                CryptoError::WrongKey => AccountError::Rejected,
                other => AccountError::Keys(other),
            })?;
        // Never matches a password: a later LOGIN of this user runs argon2id once.
        let check: [u8; 32] = rand::random();
        self.register(user, unlocked.identity, check).await
    }

    /// A salt for a SCRAM exchange with a user name that does not exist: stable per name, so
    /// that asking twice does not tell unknown names from known ones.
    pub fn decoy_salt(&self, name: &str) -> [u8; 16] {
        let mut h = Sha256::new();
        h.update(self.salt);
        h.update(b"scram-decoy");
        h.update(name.to_lowercase().as_bytes());
        let d: [u8; 32] = h.finalize().into();
        let mut salt = [0u8; 16];
        salt.copy_from_slice(&d[..16]);
        salt
    }

    /// Makes an unlocked user this process's account for it.
    async fn register(
        &self,
        user: Arc<User>,
        identity: x25519::Identity,
        check: [u8; 32],
    ) -> Result<Arc<Account>, AccountError> {
        let identity = Arc::new(identity);
        let account = Arc::new(Account::new(&self.store, user, identity, check)?);
        // A first login in this process: make sure INBOX and the special-use folders exist.
        account.list.ensure_defaults().await?;
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.retain(|_, a| a.strong_count() > 0);
        // Two first logins raced: keep the one registered first, so that both sessions share
        // one set of mailbox handles.
        if let Some(existing) = open.get(&account.user.id).and_then(Weak::upgrade)
            && existing.user.keys == account.user.keys
        {
            return Ok(existing);
        }
        open.insert(account.user.id.clone(), Arc::downgrade(&account));
        drop(open);
        let schedule = self.sweep.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some((every, config)) = schedule {
            Self::spawn_sweep(&self.store, &account, every, config);
        }
        Ok(account)
    }

    /// Sweeps the account's blobs every `every` (the first pass after a random part of it, so that
    /// a fleet restarting at once does not sweep at once) while the account stays unlocked in this
    /// process. Passes of several processes are serialised by the sweep's own lease.
    fn spawn_sweep(store: &Store, account: &Arc<Account>, every: Duration, config: SweepConfig) {
        let sweeper = match Sweeper::new(store, account.user.id.clone(), account.identity.clone()) {
            Ok(s) => s.with_config(config),
            Err(e) => {
                tracing::warn!(user = %account.user.name, error = %e, "no blob sweep");
                return;
            }
        };
        let weak = Arc::downgrade(account);
        let name = account.user.name.clone();
        tokio::spawn(async move {
            let first = every.mul_f64(rand::random::<f64>());
            tokio::time::sleep(first).await;
            loop {
                if weak.strong_count() == 0 {
                    return;
                }
                match sweeper.run_once().await {
                    Ok(stats) => tracing::info!(user = %name, ?stats, "blob sweep"),
                    Err(e) => tracing::warn!(user = %name, error = %e, "blob sweep failed"),
                }
                tokio::time::sleep(every).await;
            }
        });
    }

    /// The handle this process's sessions hold on one of `user`'s mailboxes, if any session
    /// holds one. A delivery writes through it so that those sessions (IDLE too) see the
    /// message at once; it never opens one (that needs the key, and nobody would watch it).
    pub async fn held_mailbox(
        &self,
        user: &UserId,
        mailbox: &MailboxId,
    ) -> Option<Arc<OpenMailbox>> {
        self.live(user)?.held(mailbox).await
    }

    /// How many accounts are unlocked in this process (for tests and metrics).
    pub fn live_accounts(&self) -> usize {
        let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.values().filter(|a| a.strong_count() > 0).count()
    }
}

/// A mailbox handle shared by the sessions of this process, with its storage watcher.
pub struct OpenMailbox {
    pub id: MailboxId,
    mailbox: Arc<Mailbox>,
    watcher: JoinHandle<()>,
}

impl Deref for OpenMailbox {
    type Target = Mailbox;
    fn deref(&self) -> &Mailbox {
        &self.mailbox
    }
}

impl Drop for OpenMailbox {
    fn drop(&mut self) {
        // Without this the watcher would notice the handle is gone only at its next wake-up.
        self.watcher.abort();
    }
}

/// Decrypted summaries kept in memory, bounded in bytes (oldest out first).
struct SummaryCache {
    entries: HashMap<MessageId, Arc<SummaryRecord>>,
    order: VecDeque<(MessageId, usize)>,
    bytes: usize,
}

/// Bytes of summaries an account keeps in memory.
const SUMMARY_CACHE_BYTES: usize = 4 << 20;

impl SummaryCache {
    fn weight(record: &SummaryRecord) -> usize {
        // The header block dominates; the rest is a few hundred bytes per MIME part.
        record.summary.header.len() + 512
    }

    fn get(&self, id: &MessageId) -> Option<Arc<SummaryRecord>> {
        self.entries.get(id).cloned()
    }

    fn put(&mut self, id: MessageId, record: Arc<SummaryRecord>) {
        let weight = Self::weight(&record);
        if weight > SUMMARY_CACHE_BYTES || self.entries.contains_key(&id) {
            return;
        }
        while self.bytes + weight > SUMMARY_CACHE_BYTES {
            let Some((old, w)) = self.order.pop_front() else {
                break;
            };
            self.entries.remove(&old);
            self.bytes -= w;
        }
        self.order.push_back((id.clone(), weight));
        self.entries.insert(id, record);
        self.bytes += weight;
    }
}

/// A logged-in user, as every session of this user in this process shares it.
pub struct Account {
    pub user: Arc<User>,
    identity: Arc<x25519::Identity>,
    recipient: x25519::Recipient,
    pub list: MailboxList,
    pub messages: MessageStore,
    store: Store,
    mailboxes: tokio::sync::Mutex<HashMap<MailboxId, Weak<OpenMailbox>>>,
    summaries: Mutex<SummaryCache>,
    password_check: [u8; 32],
}

impl Account {
    fn new(
        store: &Store,
        user: Arc<User>,
        identity: Arc<x25519::Identity>,
        password_check: [u8; 32],
    ) -> Result<Account, AccountError> {
        let recipient = identity.to_public();
        Ok(Account {
            list: MailboxList::new(
                store.rows.clone(),
                user.id.clone(),
                recipient.clone(),
                identity.clone(),
            ),
            messages: MessageStore::from_store(store, &user.id.0)?,
            store: store.clone(),
            user,
            identity,
            recipient,
            mailboxes: tokio::sync::Mutex::new(HashMap::new()),
            summaries: Mutex::new(SummaryCache {
                entries: HashMap::new(),
                order: VecDeque::new(),
                bytes: 0,
            }),
            password_check,
        })
    }

    pub fn identity(&self) -> &x25519::Identity {
        &self.identity
    }

    pub fn recipient(&self) -> &x25519::Recipient {
        &self.recipient
    }

    /// The process's handle on a mailbox, opened (and its watcher started) if no session holds
    /// it yet.
    pub async fn mailbox(&self, id: &MailboxId) -> Result<Arc<OpenMailbox>, MailboxError> {
        let mut map = self.mailboxes.lock().await;
        if let Some(open) = map.get(id).and_then(Weak::upgrade) {
            return Ok(open);
        }
        let log = LogStore::new(
            self.store.rows.clone(),
            self.store.blobs.clone(),
            id.log_partition(),
        );
        let keys = MailboxKeys {
            recipient: self.recipient.clone(),
            identity: Some(self.identity.clone()),
        };
        let mailbox = Arc::new(Mailbox::open(log, keys).await?);
        let watcher = mailbox.spawn_watcher();
        let open = Arc::new(OpenMailbox {
            id: id.clone(),
            mailbox,
            watcher,
        });
        map.retain(|_, m| m.strong_count() > 0);
        map.insert(id.clone(), Arc::downgrade(&open));
        Ok(open)
    }

    /// The handle on `id` if a session of this process holds one; opens nothing.
    pub async fn held(&self, id: &MailboxId) -> Option<Arc<OpenMailbox>> {
        let map = self.mailboxes.lock().await;
        map.get(id).and_then(Weak::upgrade)
    }

    /// How many mailbox handles of this account are open (for tests and metrics).
    pub async fn open_mailboxes(&self) -> usize {
        let map = self.mailboxes.lock().await;
        map.values().filter(|m| m.strong_count() > 0).count()
    }

    /// A message's summary (and body key), from memory when it was read recently.
    pub async fn summary(&self, id: &MessageId) -> Result<Arc<SummaryRecord>, MessageError> {
        if let Some(hit) = self
            .summaries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
        {
            return Ok(hit);
        }
        let record = Arc::new(self.messages.load_summary(&id.0, &self.identity).await?);
        self.summaries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .put(id.clone(), record.clone());
        Ok(record)
    }

    /// Remembers a summary just written (APPEND), so that the FETCH that usually follows does
    /// not read it back.
    pub fn remember_summary(&self, id: MessageId, record: Arc<SummaryRecord>) {
        self.summaries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .put(id, record);
    }
}

/// Compares two password checks in constant time.
fn same_check(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A fresh message id (hex, as the message store wants it).
pub fn new_message_id() -> MessageId {
    MessageId(hex::encode(rand::random::<[u8; 16]>()))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::crypto::{Argon2Params, UserSecrets};
    use crate::storage::StorageConfig;
    use crate::users::YamlDirectory;

    pub(crate) fn cheap() -> Argon2Params {
        Argon2Params {
            memory_kib: 64,
            iterations: 1,
            parallelism: 1,
        }
    }

    async fn env() -> (tempfile::TempDir, Arc<Accounts>) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&StorageConfig::Local {
            path: dir.path().join("store"),
        })
        .await
        .unwrap();
        let users = YamlDirectory::open(dir.path().join("users.yaml"))
            .await
            .unwrap();
        let (keys, _, _) = UserSecrets::create("pw", cheap(), false).unwrap();
        users
            .put(
                User {
                    name: "alice".into(),
                    id: UserId::generate(),
                    addresses: vec!["alice@localhost".into()],
                    quota_bytes: None,
                    keys,
                },
                false,
            )
            .await
            .unwrap();
        (dir, Accounts::new(store, Arc::new(users)))
    }

    #[tokio::test]
    async fn one_account_and_one_handle_per_mailbox_while_sessions_live() {
        let (_dir, accounts) = env().await;
        assert!(matches!(
            accounts.login("alice", "wrong").await,
            Err(AccountError::Rejected)
        ));
        assert!(matches!(
            accounts.login("bob", "pw").await,
            Err(AccountError::Rejected)
        ));
        let a = accounts.login("alice", "pw").await.unwrap();
        let b = accounts.login("alice", "pw").await.unwrap();
        assert!(Arc::ptr_eq(&a, &b), "second session shares the account");
        assert!(matches!(
            accounts.login("alice", "nope").await,
            Err(AccountError::Rejected)
        ));
        let names: Vec<String> = a
            .list
            .list()
            .await
            .unwrap()
            .into_iter()
            .map(|m| m.name)
            .collect();
        assert_eq!(
            names,
            ["Archive", "Drafts", "INBOX", "Junk", "Sent", "Trash"],
            "defaults created on first login"
        );

        let inbox = a.list.find("INBOX").await.unwrap().unwrap();
        let m1 = a.mailbox(&inbox.id).await.unwrap();
        let m2 = b.mailbox(&inbox.id).await.unwrap();
        assert!(Arc::ptr_eq(&m1, &m2), "one handle per (process, mailbox)");
        let mut woken = m2.subscribe();
        woken.borrow_and_update();
        m1.write(|uid| crate::mail::view::MailOp::Add {
            msg: new_message_id(),
            flags: Default::default(),
            uid_floor: uid,
        })
        .await
        .unwrap();
        tokio::time::timeout(Duration::from_secs(5), woken.changed())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(a.open_mailboxes().await, 1);
        drop((m1, m2, woken));
        assert_eq!(
            a.open_mailboxes().await,
            0,
            "handle dropped with its sessions"
        );

        drop((a, b));
        assert_eq!(
            accounts.live_accounts(),
            0,
            "account dropped with its sessions"
        );
        // A new login after that unlocks again (and still checks the password).
        assert!(matches!(
            accounts.login("alice", "nope").await,
            Err(AccountError::Rejected)
        ));
        assert!(accounts.login("alice", "pw").await.is_ok());
    }
}
