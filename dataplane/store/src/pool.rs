//! The pool: a raw block device or a preallocated file holding volume data in
//! 4 KiB blocks after a one-block superblock.
//!
//! ```text
//! byte 0      superblock (4 KiB): magic, format version, block size, pool UUID,
//!             data offset, block count, creation time, CRC32 of the rest
//! 1 MiB       block 0, block 1, ... (data_offset + n * 4096)
//! ```
//!
//! Opening takes an exclusive `flock`: a second process (or a second open in the
//! same process) is refused. A wrong magic, version or checksum is refused and
//! nothing is written.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use berth_io::{IoBuf, PAGE};

use crate::error::{Result, StoreError};

pub const BLOCK_SIZE: u64 = 4096;
pub const FORMAT_VERSION: u32 = 1;
const MAGIC: &[u8; 16] = b"BERTH-POOL\0\0\0\0\0\0";
/// Data starts at 1 MiB: aligned for every device and room for a future journal.
/// Where data blocks start: the superblock and room for the format to grow.
/// A pool file is this much larger than the size asked for; a device's data
/// area is its size minus this.
pub const DATA_OFFSET: u64 = 1 << 20;
/// The largest data area of a pool file (2^60 bytes, as volumes).
const MAX_FILE_DATA: u64 = 1 << 60;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    pub version: u32,
    pub block_size: u32,
    pub uuid: uuid::Uuid,
    pub data_offset: u64,
    pub blocks: u64,
    pub created_unix: u64,
}

impl Superblock {
    fn encode(&self, out: &mut [u8]) {
        out[..PAGE].fill(0);
        out[0..16].copy_from_slice(MAGIC);
        out[16..20].copy_from_slice(&self.version.to_le_bytes());
        out[20..24].copy_from_slice(&self.block_size.to_le_bytes());
        out[24..40].copy_from_slice(self.uuid.as_bytes());
        out[40..48].copy_from_slice(&self.data_offset.to_le_bytes());
        out[48..56].copy_from_slice(&self.blocks.to_le_bytes());
        out[56..64].copy_from_slice(&self.created_unix.to_le_bytes());
        let crc = crc32fast::hash(&out[..PAGE - 4]);
        out[PAGE - 4..PAGE].copy_from_slice(&crc.to_le_bytes());
    }

    fn decode(b: &[u8]) -> std::result::Result<Self, String> {
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(x)
        };
        if &b[0..16] != MAGIC {
            return Err("not a Berth pool (wrong magic)".into());
        }
        let version = u32_at(16);
        if version != FORMAT_VERSION {
            return Err(format!(
                "pool format version {version}; this build reads version {FORMAT_VERSION}"
            ));
        }
        if crc32fast::hash(&b[..PAGE - 4]) != u32_at(PAGE - 4) {
            return Err("superblock checksum mismatch".into());
        }
        let mut id = [0u8; 16];
        id.copy_from_slice(&b[24..40]);
        let sb = Superblock {
            version,
            block_size: u32_at(20),
            uuid: uuid::Uuid::from_bytes(id),
            data_offset: u64_at(40),
            blocks: u64_at(48),
            created_unix: u64_at(56),
        };
        if u64::from(sb.block_size) != BLOCK_SIZE || !sb.data_offset.is_multiple_of(BLOCK_SIZE) {
            return Err(format!(
                "unsupported geometry: block size {}, data offset {}",
                sb.block_size, sb.data_offset
            ));
        }
        Ok(sb)
    }
}

/// An open, locked pool.
#[derive(Debug)]
pub struct Pool {
    pub path: PathBuf,
    pub file: File,
    pub sb: Superblock,
}

fn pool_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::PoolFile {
        path: path.to_path_buf(),
        source,
    }
}

/// Takes the pool's exclusive lock, waiting up to `wait` for a previous owner.
///
/// The lock lives on the descriptor the ring registers, so after a crash it is
/// released only when the kernel has finished (or cancelled) the dead process's
/// in-flight I/O: waiting for it guarantees no stale write lands after we start.
fn lock(path: &Path, file: &File, wait: std::time::Duration) -> Result<()> {
    let start = std::time::Instant::now();
    let mut logged = false;
    loop {
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(pool_err(path)(e));
        }
        if start.elapsed() >= wait {
            return Err(StoreError::PoolLocked {
                path: path.to_path_buf(),
            });
        }
        if !logged {
            tracing::info!(path = %path.display(), "pool is locked; waiting for its previous owner's I/O to drain");
            logged = true;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Reserves `len` bytes and writes zeros over them once.
///
/// `fallocate` alone leaves *unwritten* extents: every first write to a block
/// would then convert its extent in a filesystem journal transaction, which
/// costs more than the write. Zeroing at creation makes the file behave like a
/// block device from the first I/O on.
fn preallocate(file: &File, len: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    // SAFETY: fallocate on our descriptor with checked arguments.
    if unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, len as libc::off_t) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let chunk = IoBuf::heap(8 << 20);
    let mut off = 0;
    while off < len {
        let n = chunk.len().min((len - off) as usize);
        file.write_all_at(&chunk.as_slice()[..n], off)?;
        off += n as u64;
    }
    Ok(())
}

fn read_exact_at(file: &File, buf: &mut IoBuf, offset: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    file.read_exact_at(buf.as_mut_slice(), offset)
}

impl Pool {
    /// Formats a new pool. A path that does not exist becomes a file holding
    /// `size_bytes` of data blocks, plus [`DATA_OFFSET`] for the header
    /// (allocated up front, so the filesystem cannot run out under a volume); a
    /// block device is used whole. Anything already holding a Berth
    /// superblock, or a non-empty regular file, is refused.
    pub fn create(
        path: &Path,
        size_bytes: Option<u64>,
        lock_wait: std::time::Duration,
    ) -> Result<Pool> {
        let existing = std::fs::metadata(path).ok();
        let is_dev = existing
            .as_ref()
            .is_some_and(|m| m.file_type().is_block_device());
        if let Some(m) = &existing {
            if m.is_file() && m.len() > 0 {
                return Err(StoreError::BadPool {
                    path: path.to_path_buf(),
                    reason: "file exists and is not empty; refusing to format it".into(),
                });
            }
        }
        let min_bytes = DATA_OFFSET + 16 * BLOCK_SIZE;
        if !is_dev {
            // Checked before anything is created: a size of 0 used to reach
            // fallocate and come back as "Invalid argument (os error 22)".
            let asked = size_bytes
                .ok_or_else(|| StoreError::InvalidArgument("a pool file needs a size".into()))?;
            if !(16 * BLOCK_SIZE..=MAX_FILE_DATA).contains(&asked) {
                return Err(StoreError::InvalidArgument(format!(
                    "a pool of {asked} bytes: a pool file holds between {} and {MAX_FILE_DATA} bytes (for example --pool-size 1G)",
                    16 * BLOCK_SIZE
                )));
            }
        }
        let mut file = berth_io::open_direct(path, !is_dev).map_err(pool_err(path))?;
        berth_io::private::file(path).map_err(pool_err(path))?;
        lock(path, &file, lock_wait)?;
        let len = if is_dev {
            let len = file.seek(SeekFrom::End(0)).map_err(pool_err(path))?;
            let mut head = IoBuf::heap(PAGE);
            read_exact_at(&file, &mut head, 0).map_err(pool_err(path))?;
            if &head.as_slice()[0..16] == MAGIC {
                return Err(StoreError::BadPool {
                    path: path.to_path_buf(),
                    reason: "device already holds a Berth pool".into(),
                });
            }
            len
        } else {
            let len = size_bytes
                .ok_or_else(|| StoreError::InvalidArgument("a pool file needs a size".into()))?;
            // The size asked for is what volumes get: the header area comes on
            // top (a --pool-size 4G file holds four 1 GiB volumes). Rounded
            // down to whole blocks.
            let len = DATA_OFFSET + len / BLOCK_SIZE * BLOCK_SIZE;
            if let Err(e) = preallocate(&file, len) {
                let _ = std::fs::remove_file(path);
                return Err(pool_err(path)(e));
            }
            len
        };
        if len < min_bytes {
            return Err(StoreError::BadPool {
                path: path.to_path_buf(),
                reason: format!("{len} bytes is too small for a pool"),
            });
        }
        let sb = Superblock {
            version: FORMAT_VERSION,
            block_size: BLOCK_SIZE as u32,
            uuid: uuid::Uuid::new_v4(),
            data_offset: DATA_OFFSET,
            blocks: (len - DATA_OFFSET) / BLOCK_SIZE,
            created_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        };
        let mut buf = IoBuf::heap(PAGE);
        sb.encode(buf.as_mut_slice());
        {
            use std::os::unix::fs::FileExt;
            file.write_all_at(buf.as_slice(), 0)
                .map_err(pool_err(path))?;
        }
        file.sync_all().map_err(pool_err(path))?;
        Ok(Pool {
            path: path.to_path_buf(),
            file,
            sb,
        })
    }

    /// Opens and locks an existing pool, checking its superblock.
    pub fn open(path: &Path, lock_wait: std::time::Duration) -> Result<Pool> {
        if !path.exists() {
            return Err(pool_err(path)(std::io::Error::from_raw_os_error(
                libc::ENOENT,
            )));
        }
        let file = berth_io::open_direct(path, false).map_err(pool_err(path))?;
        berth_io::private::file(path).map_err(pool_err(path))?;
        lock(path, &file, lock_wait)?;
        let mut buf = IoBuf::heap(PAGE);
        read_exact_at(&file, &mut buf, 0).map_err(|e| StoreError::BadPool {
            path: path.to_path_buf(),
            reason: format!("cannot read the superblock: {e}"),
        })?;
        let sb = Superblock::decode(buf.as_slice()).map_err(|reason| StoreError::BadPool {
            path: path.to_path_buf(),
            reason,
        })?;
        Ok(Pool {
            path: path.to_path_buf(),
            file,
            sb,
        })
    }

    /// Byte offset of a pool block.
    pub fn block_offset(&self, block: u64) -> u64 {
        self.sb.data_offset + block * BLOCK_SIZE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NO_WAIT: std::time::Duration = std::time::Duration::ZERO;

    #[test]
    fn superblock_round_trips_and_rejects_damage() {
        let sb = Superblock {
            version: FORMAT_VERSION,
            block_size: 4096,
            uuid: uuid::Uuid::new_v4(),
            data_offset: DATA_OFFSET,
            blocks: 1234,
            created_unix: 42,
        };
        let mut b = vec![0u8; PAGE];
        sb.encode(&mut b);
        assert_eq!(Superblock::decode(&b), Ok(sb.clone()));
        let mut bad = b.clone();
        bad[0] ^= 1;
        assert!(Superblock::decode(&bad)
            .expect_err("damaged superblock")
            .contains("magic"));
        let mut bad = b.clone();
        bad[16] = 9;
        assert!(Superblock::decode(&bad)
            .expect_err("damaged superblock")
            .contains("version 9"));
        let mut bad = b;
        bad[50] ^= 1;
        assert!(Superblock::decode(&bad)
            .expect_err("damaged superblock")
            .contains("checksum"));
    }

    #[test]
    fn a_pool_file_holds_exactly_the_size_asked_for() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("pool.img");
        let pool = Pool::create(&path, Some(4 << 20), NO_WAIT).expect("create");
        assert_eq!(pool.sb.blocks * BLOCK_SIZE, 4 << 20);
        let file_len = std::fs::metadata(&path).expect("stat").len();
        assert_eq!(file_len, DATA_OFFSET + (4 << 20));
        drop(pool);
        // Too small or absurd sizes are refused before anything is created.
        for bad in [0, 16 * BLOCK_SIZE - 1, (1 << 60) + 1] {
            let p = dir.path().join(format!("bad-{bad}.img"));
            let e = Pool::create(&p, Some(bad), NO_WAIT).expect_err("refused");
            assert!(e.to_string().contains("pool file holds between"), "{e}");
            assert!(!p.exists());
        }
    }

    #[test]
    fn second_opener_and_foreign_files_are_refused_without_writes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("pool.img");
        let pool = Pool::create(&path, Some(8 << 20), NO_WAIT).expect("create");
        assert!(matches!(
            Pool::open(&path, NO_WAIT),
            Err(StoreError::PoolLocked { .. })
        ));
        drop(pool);
        let pool = Pool::open(&path, NO_WAIT).expect("reopen after close");
        assert_eq!(pool.sb.blocks, (8 << 20) / 4096);
        drop(pool);
        // Formatting over an existing pool is refused.
        assert!(matches!(
            Pool::create(&path, Some(8 << 20), NO_WAIT),
            Err(StoreError::BadPool { .. })
        ));

        let foreign = dir.path().join("foreign.img");
        std::fs::write(&foreign, vec![0xabu8; 1 << 20]).expect("write");
        let before = std::fs::read(&foreign).expect("read");
        match Pool::open(&foreign, NO_WAIT) {
            Err(StoreError::BadPool { reason, .. }) => {
                assert!(reason.contains("magic"), "{reason}")
            }
            other => panic!("expected BadPool, got {other:?}"),
        }
        assert_eq!(std::fs::read(&foreign).expect("read"), before);
        assert!(matches!(
            Pool::open(&dir.path().join("missing.img"), NO_WAIT),
            Err(StoreError::PoolFile { .. })
        ));
    }
}
