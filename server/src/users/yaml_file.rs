//! The users file (`users.yaml`): loaded at start, reloaded when its modification time or size
//! changes (checked at most once per `RECHECK` on lookups), written atomically (temp + rename).
//! A file that fails to parse on reload is logged and the last good version stays in service.
//!
//! Besides `users`, the file may hold `aliases` (an address delivering to users by login name)
//! and `catch_all` (per domain, the login name of the user who gets mail for that domain's
//! unknown addresses). Both are optional, so files written before they existed still load.
//! Removing a user drops it from both.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::{Alias, DirectoryError, User, UserDirectory};

const RECHECK: Duration = Duration::from_secs(1);

#[derive(Default, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct UsersFile {
    #[serde(default)]
    users: Vec<User>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    aliases: Vec<Alias>,
    /// Domain → login name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    catch_all: BTreeMap<String, String>,
}

#[derive(Default)]
struct Snapshot {
    stamp: Option<(SystemTime, u64)>,
    checked: Option<Instant>,
    by_name: BTreeMap<String, Arc<User>>,
    by_address: HashMap<String, Arc<User>>,
    /// Alias address → its users.
    aliases: HashMap<String, Vec<Arc<User>>>,
    /// Domain → its catch-all user.
    catch_all: HashMap<String, Arc<User>>,
    /// The aliases and catch-alls as written, to write them back.
    alias_defs: Vec<Alias>,
    catch_all_defs: BTreeMap<String, String>,
}

/// A catch-all's domain as looked up: lower case, without a leading `@` or a trailing dot.
fn domain_key(domain: &str) -> String {
    let d = domain.trim();
    let d = d.strip_prefix('@').unwrap_or(d);
    d.strip_suffix('.').unwrap_or(d).to_lowercase()
}

pub struct YamlDirectory {
    path: PathBuf,
    snapshot: RwLock<Snapshot>,
    writer: tokio::sync::Mutex<()>,
}

fn file_err(path: &Path, detail: impl std::fmt::Display) -> DirectoryError {
    DirectoryError::File {
        path: path.display().to_string(),
        detail: detail.to_string(),
    }
}

async fn stamp_of(path: &Path) -> Result<Option<(SystemTime, u64)>, DirectoryError> {
    match tokio::fs::metadata(path).await {
        Ok(m) => Ok(Some((
            m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            m.len(),
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(file_err(path, e)),
    }
}

/// Parses and validates a users file; the error says which user or address is wrong.
fn parse(path: &Path, text: &str) -> Result<Snapshot, DirectoryError> {
    let file: UsersFile = serde_yaml::from_str(text).map_err(|e| file_err(path, e))?;
    let mut snap = Snapshot::default();
    for user in file.users {
        let user = Arc::new(user);
        if snap
            .by_name
            .insert(user.name.clone(), user.clone())
            .is_some()
        {
            return Err(file_err(
                path,
                format!("user {:?} appears twice", user.name),
            ));
        }
        for addr in &user.addresses {
            let key = addr.to_lowercase();
            if let Some(owner) = snap.by_address.insert(key, user.clone()) {
                return Err(DirectoryError::AddressTaken {
                    address: addr.clone(),
                    owner: owner.name.clone(),
                });
            }
        }
    }
    for alias in &file.aliases {
        let key = alias.address.trim().to_lowercase();
        if !key.contains('@') {
            return Err(file_err(
                path,
                format!("alias {:?} is not an address (local@domain)", alias.address),
            ));
        }
        if let Some(owner) = snap.by_address.get(&key) {
            return Err(DirectoryError::AddressTaken {
                address: alias.address.clone(),
                owner: owner.name.clone(),
            });
        }
        if alias.to.is_empty() {
            return Err(file_err(
                path,
                format!("alias {:?} delivers to nobody", alias.address),
            ));
        }
        let mut members: Vec<Arc<User>> = Vec::with_capacity(alias.to.len());
        for name in &alias.to {
            let user = snap.by_name.get(name).ok_or_else(|| {
                file_err(path, format!("alias {:?}: no user {name:?}", alias.address))
            })?;
            if !members.iter().any(|m| m.name == user.name) {
                members.push(user.clone());
            }
        }
        if snap.aliases.insert(key, members).is_some() {
            return Err(file_err(
                path,
                format!("alias {:?} appears twice", alias.address),
            ));
        }
    }
    for (domain, name) in &file.catch_all {
        let user = snap
            .by_name
            .get(name)
            .ok_or_else(|| file_err(path, format!("catch-all of {domain:?}: no user {name:?}")))?;
        let key = domain_key(domain);
        if key.is_empty() || key.contains('@') {
            return Err(file_err(
                path,
                format!("catch-all {domain:?} is not a domain"),
            ));
        }
        if snap.catch_all.insert(key, user.clone()).is_some() {
            return Err(file_err(
                path,
                format!("catch-all of {domain:?} appears twice"),
            ));
        }
    }
    snap.alias_defs = file.aliases;
    snap.catch_all_defs = file.catch_all;
    Ok(snap)
}

impl YamlDirectory {
    /// Opens the file; a missing file is an empty directory (created on the first `put`).
    pub async fn open(path: impl Into<PathBuf>) -> Result<YamlDirectory, DirectoryError> {
        let path = path.into();
        let dir = YamlDirectory {
            snapshot: RwLock::new(Snapshot::default()),
            writer: tokio::sync::Mutex::new(()),
            path,
        };
        let snap = dir.load().await?;
        *dir.write_snapshot() = snap;
        Ok(dir)
    }

    fn read_snapshot(&self) -> std::sync::RwLockReadGuard<'_, Snapshot> {
        self.snapshot.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_snapshot(&self) -> std::sync::RwLockWriteGuard<'_, Snapshot> {
        self.snapshot.write().unwrap_or_else(|p| p.into_inner())
    }

    async fn load(&self) -> Result<Snapshot, DirectoryError> {
        let stamp = stamp_of(&self.path).await?;
        let mut snap = match stamp {
            None => Snapshot::default(),
            Some(_) => {
                let text = tokio::fs::read_to_string(&self.path)
                    .await
                    .map_err(|e| file_err(&self.path, e))?;
                parse(&self.path, &text)?
            }
        };
        snap.stamp = stamp;
        snap.checked = Some(Instant::now());
        Ok(snap)
    }

    /// Reloads if the file changed since the last look (at most one stat per `RECHECK`).
    async fn refresh(&self) {
        let (due, old_stamp) = {
            let s = self.read_snapshot();
            (s.checked.is_none_or(|t| t.elapsed() >= RECHECK), s.stamp)
        };
        if !due {
            return;
        }
        match stamp_of(&self.path).await {
            Ok(stamp) if stamp == old_stamp => {
                self.write_snapshot().checked = Some(Instant::now());
            }
            Ok(_) => match self.load().await {
                Ok(snap) => {
                    tracing::info!(path = %self.path.display(), users = snap.by_name.len(), "users file reloaded");
                    *self.write_snapshot() = snap;
                }
                Err(e) => {
                    tracing::error!(error = %e, "users file changed but cannot be used; keeping the previous version");
                    self.write_snapshot().checked = Some(Instant::now());
                }
            },
            Err(e) => tracing::error!(error = %e, "cannot stat the users file"),
        }
    }

    async fn write_file(&self, file: UsersFile) -> Result<(), DirectoryError> {
        let text = serde_yaml::to_string(&file).map_err(|e| file_err(&self.path, e))?;
        // Validate what we are about to write with the same rules as a reload.
        parse(&self.path, &text)?;
        let tmp = self
            .path
            .with_extension(format!("tmp-{:08x}", rand::random::<u32>()));
        tokio::fs::write(&tmp, text.as_bytes())
            .await
            .map_err(|e| file_err(&tmp, e))?;
        tokio::fs::rename(&tmp, &self.path)
            .await
            .map_err(|e| file_err(&self.path, e))?;
        let snap = self.load().await?;
        *self.write_snapshot() = snap;
        Ok(())
    }

    async fn modify(
        &self,
        f: impl FnOnce(&mut Vec<User>) -> Result<(), DirectoryError>,
    ) -> Result<(), DirectoryError> {
        let _guard = self.writer.lock().await;
        // Start from the file as it is now, not from a possibly stale snapshot.
        let fresh = self.load().await?;
        let mut users: Vec<User> = fresh.by_name.values().map(|u| (**u).clone()).collect();
        f(&mut users)?;
        // A removed user leaves the aliases and catch-alls that named it.
        let exists = |name: &String| users.iter().any(|u| &u.name == name);
        let mut aliases = fresh.alias_defs;
        for alias in &mut aliases {
            alias.to.retain(exists);
        }
        aliases.retain(|a| !a.to.is_empty());
        let mut catch_all = fresh.catch_all_defs;
        catch_all.retain(|_, name| exists(name));
        self.write_file(UsersFile {
            users,
            aliases,
            catch_all,
        })
        .await
    }
}

#[async_trait]
impl UserDirectory for YamlDirectory {
    async fn user(&self, name: &str) -> Result<Option<Arc<User>>, DirectoryError> {
        self.refresh().await;
        Ok(self.read_snapshot().by_name.get(name).cloned())
    }

    async fn by_address(&self, address: &str) -> Result<Option<Arc<User>>, DirectoryError> {
        self.refresh().await;
        Ok(self
            .read_snapshot()
            .by_address
            .get(&address.to_lowercase())
            .cloned())
    }

    async fn recipients(&self, address: &str) -> Result<Vec<Arc<User>>, DirectoryError> {
        self.refresh().await;
        let key = address.to_lowercase();
        let snap = self.read_snapshot();
        if let Some(user) = snap.by_address.get(&key) {
            return Ok(vec![user.clone()]);
        }
        Ok(snap.aliases.get(&key).cloned().unwrap_or_default())
    }

    async fn catch_all(&self, domain: &str) -> Result<Option<Arc<User>>, DirectoryError> {
        self.refresh().await;
        Ok(self
            .read_snapshot()
            .catch_all
            .get(&domain_key(domain))
            .cloned())
    }

    async fn list(&self) -> Result<Vec<Arc<User>>, DirectoryError> {
        self.refresh().await;
        Ok(self.read_snapshot().by_name.values().cloned().collect())
    }

    async fn put(&self, user: User, replace: bool) -> Result<(), DirectoryError> {
        self.modify(|users| {
            match users.iter_mut().find(|u| u.name == user.name) {
                Some(existing) if replace => *existing = user,
                Some(_) => return Err(DirectoryError::Exists(user.name)),
                None if replace => return Err(DirectoryError::NoSuchUser(user.name)),
                None => users.push(user),
            }
            Ok(())
        })
        .await
    }

    async fn remove(&self, name: &str) -> Result<(), DirectoryError> {
        self.modify(|users| {
            let before = users.len();
            users.retain(|u| u.name != name);
            if users.len() == before {
                return Err(DirectoryError::NoSuchUser(name.to_string()));
            }
            Ok(())
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::{Argon2Params, UserSecrets};
    use crate::users::UserId;

    fn user(name: &str, addr: &str) -> User {
        let cheap = Argon2Params {
            memory_kib: 64,
            iterations: 1,
            parallelism: 1,
        };
        User {
            name: name.into(),
            id: UserId::generate(),
            addresses: vec![addr.into()],
            quota_bytes: None,
            keys: UserSecrets::create("pw", cheap, false).unwrap().0,
        }
    }

    #[tokio::test]
    async fn add_lookup_reload_and_reject_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users.yaml");
        let d = YamlDirectory::open(&path).await.unwrap();
        assert!(d.list().await.unwrap().is_empty());
        d.put(user("alice", "Alice@Example.org"), false)
            .await
            .unwrap();
        assert!(matches!(
            d.put(user("alice", "x@example.org"), false).await,
            Err(DirectoryError::Exists(_))
        ));
        assert!(matches!(
            d.put(user("bob", "alice@example.org"), false).await,
            Err(DirectoryError::AddressTaken { .. })
        ));
        let a = d.by_address("alice@example.org").await.unwrap().unwrap();
        assert_eq!(a.name, "alice");

        // Another process edits the file: the change shows up after the recheck interval.
        let other = YamlDirectory::open(&path).await.unwrap();
        other
            .put(user("bob", "bob@example.org"), false)
            .await
            .unwrap();
        tokio::time::sleep(RECHECK + Duration::from_millis(50)).await;
        assert!(d.user("bob").await.unwrap().is_some());

        // A broken file keeps the last good version in service.
        tokio::fs::write(&path, "users: [ {name: 1").await.unwrap();
        tokio::time::sleep(RECHECK + Duration::from_millis(50)).await;
        assert!(d.user("alice").await.unwrap().is_some());
        match YamlDirectory::open(&path).await {
            Err(DirectoryError::File { path: p, .. }) => assert!(p.ends_with("users.yaml")),
            other => panic!("a broken file must not open: {:?}", other.err()),
        }
    }

    #[tokio::test]
    async fn aliases_and_catch_alls() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users.yaml");
        let d = YamlDirectory::open(&path).await.unwrap();
        d.put(user("alice", "alice@example.org"), false)
            .await
            .unwrap();
        d.put(user("bob", "bob@example.org"), false).await.unwrap();
        // A file without aliases (as written before they existed) has none.
        assert!(d.recipients("team@example.org").await.unwrap().is_empty());
        assert!(d.catch_all("example.org").await.unwrap().is_none());

        let mut text = tokio::fs::read_to_string(&path).await.unwrap();
        assert!(
            !text.contains("aliases") && !text.contains("catch_all"),
            "{text}"
        );
        text.push_str(
            "aliases:\n- address: Team@Example.org\n  to: [alice, bob, alice]\n\
             catch_all:\n  '@Example.ORG.': bob\n",
        );
        tokio::fs::write(&path, &text).await.unwrap();
        let d = YamlDirectory::open(&path).await.unwrap();
        let names =
            |users: Vec<Arc<User>>| users.iter().map(|u| u.name.clone()).collect::<Vec<_>>();
        assert_eq!(
            names(d.recipients("team@example.org").await.unwrap()),
            ["alice", "bob"]
        );
        assert_eq!(
            names(d.recipients("ALICE@example.org").await.unwrap()),
            ["alice"]
        );
        assert!(d.recipients("carol@example.org").await.unwrap().is_empty());
        assert_eq!(
            d.catch_all("example.org").await.unwrap().unwrap().name,
            "bob"
        );
        assert!(d.catch_all("example.net").await.unwrap().is_none());

        // Writing the file keeps them; removing a user takes it out of both.
        d.put(user("carol", "carol@example.org"), false)
            .await
            .unwrap();
        assert_eq!(
            names(d.recipients("team@example.org").await.unwrap()),
            ["alice", "bob"]
        );
        d.remove("bob").await.unwrap();
        assert_eq!(
            names(d.recipients("team@example.org").await.unwrap()),
            ["alice"]
        );
        assert!(d.catch_all("example.org").await.unwrap().is_none());
        d.remove("alice").await.unwrap();
        assert!(d.recipients("team@example.org").await.unwrap().is_empty());

        // What a file may not say.
        for bad in [
            "aliases:\n- address: carol@example.org\n  to: [carol]\n",
            "aliases:\n- address: x@example.org\n  to: [nobody]\n",
            "aliases:\n- address: x@example.org\n  to: []\n",
            "aliases:\n- address: no-domain\n  to: [carol]\n",
            "catch_all:\n  example.org: nobody\n",
        ] {
            let text = format!("{}{bad}", tokio::fs::read_to_string(&path).await.unwrap());
            let other = dir.path().join("bad.yaml");
            tokio::fs::write(&other, text).await.unwrap();
            assert!(
                YamlDirectory::open(&other).await.is_err(),
                "accepted: {bad}"
            );
        }
    }
}
