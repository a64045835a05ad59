//! Berth's block store: thin volumes on a pool, O(1) snapshots and clones,
//! per-block checksums, and block maps in RocksDB that survive crashes.
//!
//! # Fault model
//!
//! What the store assumes of the world, and what it promises in return.
//!
//! **Process crash (kill -9, panic, OOM kill)** at any moment:
//! - Data reaches the pool before the map that points at it: a write allocates
//!   fresh pool blocks (redirect-on-write, never in place), writes them with
//!   `O_DIRECT`, and only after that I/O completes commits the new mappings in one
//!   RocksDB batch through its write-ahead log. A crash before the commit leaves
//!   the old mapping and the old data untouched; the fresh blocks were never
//!   referenced and are free again at open (the allocator is rebuilt from the maps).
//! - A block freed by a commit is not reused until that commit is durable and no
//!   read that could still see it is in flight, so a map can never point at a
//!   block that was overwritten with other data.
//! - The WAL is written (not synced) at every group commit, so every
//!   *acknowledged* write survives a process crash; a FLUSH (or a FUA write) also
//!   survives a power loss.
//! - Therefore every block reads as its last flushed content or a later
//!   acknowledged write: never a checksum error, never another volume's data.
//!
//! **Power loss / kernel crash**: FLUSH = `fdatasync` of the pool and a synced
//! WAL, run at the same time (the pool's on the I/O ring, the WAL's on the
//! `berth-walsync` thread); the reply waits for both, and after it returns
//! everything acknowledged before it survives. Their order does not matter:
//! every write a flush covers already had its data written and its map in the
//! WAL before it was acknowledged, and the WAL's unsynced pages can reach the
//! disk before the pool's data at any time anyway (kernel writeback). Writes
//! acknowledged after the last FLUSH may be lost. If the device lost data it had
//! acknowledged without the map commit being lost, that block fails its checksum
//! (EIO), never returns wrong bytes. (kill -9 tests cannot tell a synced WAL
//! from an unsynced one: the page cache survives a process crash. This part of
//! the model rests on the argument above, not on a test.)
//!
//! **Torn writes**: a 4 KiB block written partially by a crash is never mapped
//! (fresh space), so it cannot be read.
//!
//! **Misdirected writes and reads, bit rot, latent sector errors**: every 4 KiB
//! block has a CRC32 seeded with its pool block number, stored in its map entry
//! and verified on every read and by [`Store::scrub`]. A mismatch is an
//! [`StoreError::Integrity`] error (EIO on the wire), a log line and a counter.
//!
//! **Metadata corruption** (RocksDB checks its own blocks): a record that does not
//! decode, or two map entries claiming one pool block, stop the open with
//! [`StoreError::Corrupt`] rather than serving wrong data.
//!
//! **Foreign or shared pools**: a wrong magic, version or superblock checksum, a
//! pool UUID that is not the one the metadata belongs to, or another process
//! holding the pool's lock refuse the open and change nothing.

mod alloc;
mod changes;
pub mod error;
mod gc;
mod io_loop;
mod map;
mod meta;
pub mod pool;
mod store;

pub use berth_io::depth::ReadDepthMode;
pub use berth_io::fault::{Effect, Fault, FaultPlan};
pub use berth_io::{AbortOnPanic, EngineChoice};
pub use error::{Result, StoreError};
pub use gc::Pauses;
pub use io_loop::{Op, Outcome, ReadDone, Reply, Shallow, Zeroing, MAX_REQUEST_BYTES};
pub use pool::BLOCK_SIZE;
pub use store::{
    block_crc, map_cache_entries_for, validate_name, Changes, Counters, Extent, PoolStats,
    ScrubError, ScrubReport, SnapshotInfo, Store, StoreConfig, Submitter, Target, VolumeInfo,
    BLOCK_STATUS_MAX_BLOCKS, DEFAULT_DEFER_MAX_BYTES, DEFAULT_MAP_CACHE_BYTES, DEFAULT_POLL,
    MAX_NAME_BYTES, MAX_VOLUME_BYTES,
};
