//! Blobs of the local store: one file per object under `blobs/`, named by the SHA-256 of the key
//! (so any key is a safe file name), and a `blobs` table in the rows database that lists keys in
//! order for `list`. A put writes a temp file, fsyncs it and renames it over the old one: readers
//! see the old or the new object, never half of one.

use std::io::SeekFrom;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::TryStreamExt;
use redb::{Database, ReadableDatabase, TableDefinition};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio_util::io::ReaderStream;

use super::{blocking, db_err};
use crate::storage::blob::{BlobMeta, BlobPage, BlobRead, BlobStore, ByteStream, clamp_range};
use crate::storage::error::{Result, StorageError};

/// Key → unit: the listing. A row is written before the file appears and removed before the file
/// goes, so a crash can leave a listed key without a file (cleaned by the next delete), never a
/// file nobody can find.
const BLOBS: TableDefinition<&str, ()> = TableDefinition::new("blobs");

/// Read buffer: bodies are streamed in pieces of this size.
const READ_CHUNK: usize = 256 * 1024;
const LIST_PAGE: usize = 1000;

#[derive(Clone)]
pub struct LocalBlobs {
    db: Arc<Database>,
    root: Arc<PathBuf>,
}

fn path_in(root: &Path, key: &str) -> PathBuf {
    let h = hex::encode(Sha256::digest(key.as_bytes()));
    root.join(&h[..2]).join(&h[2..])
}

fn io_err(path: &Path, e: std::io::Error) -> StorageError {
    StorageError::io(path.display(), e)
}

impl LocalBlobs {
    pub(super) fn open(db: Arc<Database>, root: PathBuf) -> Result<LocalBlobs> {
        std::fs::create_dir_all(&root).map_err(|e| io_err(&root, e))?;
        let txn = db.begin_write().map_err(db_err)?;
        txn.open_table(BLOBS).map_err(db_err)?;
        txn.commit().map_err(db_err)?;
        Ok(LocalBlobs {
            db,
            root: Arc::new(root),
        })
    }

    fn path_of(&self, key: &str) -> PathBuf {
        path_in(&self.root, key)
    }

    async fn set_listed(&self, key: &str, listed: bool) -> Result<()> {
        let (db, key) = (self.db.clone(), key.to_string());
        blocking(move || {
            let txn = db.begin_write().map_err(db_err)?;
            {
                let mut t = txn.open_table(BLOBS).map_err(db_err)?;
                if listed {
                    t.insert(key.as_str(), ()).map_err(db_err)?;
                } else {
                    t.remove(key.as_str()).map_err(db_err)?;
                }
            }
            txn.commit().map_err(db_err)
        })
        .await
    }

    /// Streams `body` into a temp file next to `dest`, fsyncs, renames, fsyncs the directory.
    async fn write_file(&self, dest: &Path, mut body: ByteStream) -> Result<u64> {
        let dir = dest.parent().unwrap_or(&self.root).to_path_buf();
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|e| io_err(&dir, e))?;
        let tmp = dir.join(format!(".tmp-{:016x}", rand::random::<u64>()));
        let result = async {
            let mut file = tokio::fs::File::create(&tmp)
                .await
                .map_err(|e| io_err(&tmp, e))?;
            let mut size = 0u64;
            while let Some(chunk) = body.try_next().await? {
                file.write_all(&chunk).await.map_err(|e| io_err(&tmp, e))?;
                size += chunk.len() as u64;
            }
            file.sync_all().await.map_err(|e| io_err(&tmp, e))?;
            drop(file);
            tokio::fs::rename(&tmp, dest)
                .await
                .map_err(|e| io_err(dest, e))?;
            let dir_handle = tokio::fs::File::open(&dir)
                .await
                .map_err(|e| io_err(&dir, e))?;
            dir_handle.sync_all().await.map_err(|e| io_err(&dir, e))?;
            Ok(size)
        }
        .await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&tmp).await;
        }
        result
    }
}

#[async_trait]
impl BlobStore for LocalBlobs {
    async fn put(&self, key: &str, body: ByteStream) -> Result<BlobMeta> {
        self.set_listed(key, true).await?;
        let size = self.write_file(&self.path_of(key), body).await?;
        Ok(BlobMeta {
            key: key.to_string(),
            size,
        })
    }

    async fn get(&self, key: &str, range: Option<Range<u64>>) -> Result<BlobRead> {
        let path = self.path_of(key);
        let mut file = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StorageError::NotFound(key.to_string()));
            }
            Err(e) => return Err(io_err(&path, e)),
        };
        let size = file.metadata().await.map_err(|e| io_err(&path, e))?.len();
        let range = match range {
            Some(r) => clamp_range(key, r, size)?,
            None => 0..size,
        };
        file.seek(SeekFrom::Start(range.start))
            .await
            .map_err(|e| io_err(&path, e))?;
        let reader = file.take(range.end - range.start);
        let key = key.to_string();
        let body = ReaderStream::with_capacity(reader, READ_CHUNK)
            .map_err(move |e| StorageError::io(format!("blob {key}"), e));
        Ok(BlobRead {
            size,
            body: Box::pin(body),
        })
    }

    async fn head(&self, key: &str) -> Result<Option<BlobMeta>> {
        let path = self.path_of(key);
        match tokio::fs::metadata(&path).await {
            Ok(m) => Ok(Some(BlobMeta {
                key: key.to_string(),
                size: m.len(),
            })),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(&path, e)),
        }
    }

    async fn delete(&self, key: &str) -> Result<()> {
        self.set_listed(key, false).await?;
        let path = self.path_of(key);
        match tokio::fs::remove_file(&path).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(&path, e)),
        }
    }

    async fn copy(&self, from: &str, to: &str) -> Result<()> {
        let read = self.get(from, None).await?;
        self.put(to, read.body).await.map(|_| ())
    }

    async fn list(&self, prefix: &str, continuation: Option<&str>) -> Result<BlobPage> {
        let (db, root, prefix, after) = (
            self.db.clone(),
            self.root.clone(),
            prefix.to_string(),
            continuation.map(str::to_string),
        );
        blocking(move || {
            let txn = db.begin_read().map_err(db_err)?;
            let t = txn.open_table(BLOBS).map_err(db_err)?;
            let start = after
                .as_deref()
                .unwrap_or(prefix.as_str())
                .max(prefix.as_str());
            let mut page = BlobPage::default();
            for entry in t.range::<&str>(start..).map_err(db_err)? {
                let (k, _) = entry.map_err(db_err)?;
                let k = k.value();
                if Some(k) == after.as_deref() {
                    continue;
                }
                if !k.starts_with(prefix.as_str()) {
                    break;
                }
                if page.blobs.len() == LIST_PAGE {
                    page.continuation = page.blobs.last().map(|b| b.key.clone());
                    break;
                }
                // Sizes come from the files, which are the truth; a listed key whose file is
                // gone (a crash mid-put) is still listed, with size 0, so a sweep deletes it.
                let size = std::fs::metadata(path_in(&root, k))
                    .map(|m| m.len())
                    .unwrap_or(0);
                page.blobs.push(BlobMeta {
                    key: k.to_string(),
                    size,
                });
            }
            Ok(page)
        })
        .await
    }

    async fn put_bytes(&self, key: &str, data: Bytes) -> Result<BlobMeta> {
        self.put(key, crate::storage::blob::stream_of(data)).await
    }
}
