//! The embedded single-node store, Tern's default (`tern dev`): rows in a redb database with the
//! same causality semantics as K2V (a one-node DVVS), blobs as files. Every acknowledged write is
//! durable (redb commits with fsync; blobs are written to a temp file, fsynced and renamed), so a
//! restart or a `kill -9` loses nothing acknowledged and never shows a torn value.

mod blobs;
mod rows;

use std::path::Path;
use std::sync::Arc;

pub use blobs::LocalBlobs;
pub use rows::LocalRows;

use super::error::{Result, StorageError};

/// Opens (creating if needed) the store in `dir`: `dir/rows.redb` and `dir/blobs/`.
pub async fn open(dir: &Path) -> Result<(LocalRows, LocalBlobs)> {
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || {
        std::fs::create_dir_all(&dir).map_err(|e| StorageError::io(dir.display(), e))?;
        let db_path = dir.join("rows.redb");
        let db = redb::Database::create(&db_path).map_err(|e| {
            StorageError::Backend(format!(
                "cannot open local store {}: {e}",
                db_path.display()
            ))
        })?;
        let db = Arc::new(db);
        let rows = LocalRows::open(db.clone())?;
        let blobs = LocalBlobs::open(db, dir.join("blobs"))?;
        Ok((rows, blobs))
    })
    .await
    .map_err(|e| StorageError::Backend(format!("local store task failed: {e}")))?
}

/// Turns any redb error into a storage error that names the store.
fn db_err(e: impl Into<redb::Error>) -> StorageError {
    StorageError::Backend(format!("local store: {}", e.into()))
}

/// Runs blocking database work off the async runtime.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StorageError::Backend(format!("local store task failed: {e}")))?
}
