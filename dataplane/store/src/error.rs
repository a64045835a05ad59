//! The store's one error type. Each variant says which object and operation failed,
//! so the gRPC edge can map it to a status code a person can act on.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{kind} {name:?} does not exist")]
    NotFound { kind: &'static str, name: String },

    #[error("{kind} {name:?} already exists with different parameters: {detail}")]
    AlreadyExists {
        kind: &'static str,
        name: String,
        detail: String,
    },

    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    #[error(
        "{op} of {len} bytes at offset {offset} is outside volume {volume:?} ({size_bytes} bytes)"
    )]
    OutOfRange {
        op: &'static str,
        volume: String,
        offset: u64,
        len: u64,
        size_bytes: u64,
    },

    #[error("volume {volume:?} cannot shrink from {size_bytes} to {requested_bytes} bytes")]
    ShrinkRefused {
        volume: String,
        size_bytes: u64,
        requested_bytes: u64,
    },

    #[error("{what} is read-only")]
    ReadOnly { what: String },

    #[error("pool is full: {needed_blocks} blocks of 4 KiB needed, {free_blocks} free")]
    NoSpace {
        needed_blocks: u64,
        free_blocks: u64,
    },

    #[error(
        "cannot take a {what}: the pool has {free_blocks} free blocks of 4 KiB, below the \
         {reserve_blocks} kept for writes (past a snapshot or clone, every write needs new \
         space); free space first: delete snapshots or volumes, or trim"
    )]
    NoRoom {
        what: &'static str,
        free_blocks: u64,
        reserve_blocks: u64,
    },

    #[error("checksum mismatch in volume {volume:?} at byte {offset} (pool block {pool_block}): the data on disk is corrupt")]
    Integrity {
        volume: String,
        offset: u64,
        pool_block: u64,
    },

    #[error("{op} failed at pool byte {offset}: {source}")]
    Io {
        op: &'static str,
        offset: u64,
        #[source]
        source: std::io::Error,
    },

    #[error("pool {path}: {source}")]
    PoolFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("pool {path} is in use by another process (its lock is held)")]
    PoolLocked { path: PathBuf },

    #[error("pool {path}: {reason}; nothing was changed")]
    BadPool { path: PathBuf, reason: String },

    #[error("metadata database: {0}")]
    Db(#[from] rocksdb::Error),

    #[error("metadata record {what} is corrupt: {detail}")]
    Corrupt { what: String, detail: String },

    #[error("{0}")]
    FailedPrecondition(String),

    #[error("the store is shutting down")]
    ShuttingDown,
}

impl StoreError {
    /// The errno an NBD reply should carry for this error.
    pub fn errno(&self) -> i32 {
        match self {
            StoreError::NoSpace { .. } | StoreError::NoRoom { .. } => libc::ENOSPC,
            StoreError::OutOfRange { .. } | StoreError::InvalidArgument(_) => libc::EINVAL,
            StoreError::ReadOnly { .. } => libc::EPERM,
            StoreError::NotFound { .. } => libc::ENOENT,
            StoreError::ShuttingDown => libc::ESHUTDOWN,
            _ => libc::EIO,
        }
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;
