//! Storage layer: rows (Garage K2V semantics) and blobs (S3), behind two traits with two backends.
//!
//! - [`row::RowStore`]: items with concurrent values and causality tokens, ranges, polls.
//! - [`blob::BlobStore`]: objects streamed in bounded chunks.
//! - [`local`]: the embedded single-process default (redb + files), persistent across crashes.
//! - [`garage`]: a Garage cluster (K2V over signed HTTP, S3 through `aws-sdk-s3`).
//!
//! Layers above see only [`Store`]; nothing above this module knows which backend runs.

pub mod blob;
pub mod config;
pub mod dvvs;
pub mod error;
pub mod garage;
pub mod local;
pub mod row;

use std::sync::Arc;

pub use blob::{BlobMeta, BlobPage, BlobRead, BlobStore, ByteStream};
pub use config::{GarageConfig, StorageConfig};
pub use error::{Result, StorageError};
pub use row::{
    CausalityToken, DeleteRange, IndexEntry, IndexPage, InsertOp, Item, ItemPage, KeyRange,
    PollRange, RangeChanges, ReadRange, RowStore,
};

/// An opened store: one row store and one blob store, shared by every session of the process.
#[derive(Clone)]
pub struct Store {
    pub rows: Arc<dyn RowStore>,
    pub blobs: Arc<dyn BlobStore>,
}

impl Store {
    /// Opens the configured backend. For Garage this checks the credentials and the bucket, so a
    /// misconfiguration fails here, at start, with a typed error.
    pub async fn open(config: &StorageConfig) -> Result<Store> {
        match config {
            StorageConfig::Local { path } => {
                let (rows, blobs) = local::open(path).await?;
                Ok(Store {
                    rows: Arc::new(rows),
                    blobs: Arc::new(blobs),
                })
            }
            StorageConfig::Garage(cfg) => {
                let (rows, blobs) = garage::connect(cfg).await?;
                Ok(Store {
                    rows: Arc::new(rows),
                    blobs: Arc::new(blobs),
                })
            }
        }
    }
}
