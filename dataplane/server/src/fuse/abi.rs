//! The parts of the FUSE wire format (`include/uapi/linux/fuse.h`, protocol
//! 7.23 and later) that a one-file filesystem needs. Everything is
//! little-endian and read field by field from the request: a request is
//! hostile until its lengths are checked.

pub const IN_HEADER: usize = 40;
pub const OUT_HEADER: usize = 16;

pub const LOOKUP: u32 = 1;
pub const FORGET: u32 = 2;
pub const GETATTR: u32 = 3;
pub const SETATTR: u32 = 4;
pub const OPEN: u32 = 14;
pub const READ: u32 = 15;
pub const WRITE: u32 = 16;
pub const STATFS: u32 = 17;
pub const RELEASE: u32 = 18;
pub const FSYNC: u32 = 20;
pub const FLUSH: u32 = 25;
pub const INIT: u32 = 26;
pub const OPENDIR: u32 = 27;
pub const READDIR: u32 = 28;
pub const RELEASEDIR: u32 = 29;
pub const FSYNCDIR: u32 = 30;
pub const INTERRUPT: u32 = 36;
pub const DESTROY: u32 = 38;
pub const IOCTL: u32 = 39;
pub const BATCH_FORGET: u32 = 42;
pub const FALLOCATE: u32 = 43;
/// Requests that change the namespace: refused (the folder holds one file).
pub const NAMESPACE: [u32; 11] = [
    5,  // READLINK
    6,  // SYMLINK
    8,  // MKNOD
    9,  // MKDIR
    10, // UNLINK
    11, // RMDIR
    12, // RENAME
    13, // LINK
    35, // CREATE
    45, // RENAME2
    51, // TMPFILE
];

/// Oldest protocol minor served: every reply has its full size from 7.23 on.
pub const MIN_MINOR: u32 = 23;
/// The minor Berth speaks; the kernel uses the smaller of its own and this.
pub const MINOR: u32 = 31;

// FUSE_INIT flags.
pub const ASYNC_READ: u32 = 1 << 0;
pub const BIG_WRITES: u32 = 1 << 5;
pub const ASYNC_DIO: u32 = 1 << 15;
pub const MAX_PAGES: u32 = 1 << 22;

// FOPEN flags.
pub const FOPEN_DIRECT_IO: u32 = 1 << 0;
pub const FOPEN_PARALLEL_DIRECT_WRITES: u32 = 1 << 6;

/// FATTR_SIZE in a SETATTR's `valid`.
pub const FATTR_SIZE: u32 = 1 << 3;
/// The notification that asks the kernel to send again every request a
/// server read and did not answer (Linux 6.9).
pub const NOTIFY_RESEND: i32 = 7;

// fallocate(2) modes the loop device sends.
pub const FALLOC_FL_KEEP_SIZE: u32 = 0x01;
pub const FALLOC_FL_PUNCH_HOLE: u32 = 0x02;
pub const FALLOC_FL_ZERO_RANGE: u32 = 0x10;

pub const ROOT: u64 = 1;
pub const DISK: u64 = 2;

pub fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

pub fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

pub fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

#[derive(Debug, Clone, Copy)]
pub struct InHeader {
    pub len: u32,
    pub opcode: u32,
    pub unique: u64,
    pub nodeid: u64,
}

impl InHeader {
    /// `None` for fewer bytes than a whole header: whatever follows may
    /// then slice the body at [`IN_HEADER`].
    pub fn parse(b: &[u8]) -> Option<InHeader> {
        if b.len() < IN_HEADER {
            return None;
        }
        Some(InHeader {
            len: u32_at(b, 0)?,
            opcode: u32_at(b, 4)?,
            unique: u64_at(b, 8)?,
            nodeid: u64_at(b, 16)?,
        })
    }
}

/// A reply's header: `len` counts the header and everything after it;
/// `error` is 0 or a negated errno.
pub fn out_header(len: usize, error: i32, unique: u64) -> [u8; OUT_HEADER] {
    let mut h = [0u8; OUT_HEADER];
    h[0..4].copy_from_slice(&(len as u32).to_le_bytes());
    h[4..8].copy_from_slice(&error.to_le_bytes());
    h[8..16].copy_from_slice(&unique.to_le_bytes());
    h
}

/// What `struct fuse_attr` says of one of the two inodes.
#[derive(Debug, Clone, Copy)]
pub struct Attr {
    pub ino: u64,
    pub size: u64,
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub time: u64,
}

impl Attr {
    /// `struct fuse_attr`, 88 bytes.
    pub fn put(&self, out: &mut Vec<u8>) {
        for v in [
            self.ino,
            self.size,
            self.size.div_ceil(512),
            self.time,
            self.time,
            self.time,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        for v in [
            0u32, // atimensec
            0,    // mtimensec
            0,    // ctimensec
            self.mode, self.nlink, self.uid, self.gid, 0,    // rdev
            4096, // blksize
            0,    // flags
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }

    /// `struct fuse_attr_out`: never cached (a grown volume shows at once).
    pub fn attr_out(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&0u64.to_le_bytes()); // attr_valid
        out.extend_from_slice(&0u32.to_le_bytes()); // attr_valid_nsec
        out.extend_from_slice(&0u32.to_le_bytes()); // dummy
        self.put(out);
    }

    /// `struct fuse_entry_out`, uncached likewise.
    pub fn entry_out(&self, out: &mut Vec<u8>) {
        for v in [self.ino, 0u64, 0, 0] {
            // nodeid, generation, entry_valid, attr_valid
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&[0u8; 8]); // entry_valid_nsec, attr_valid_nsec
        self.put(out);
    }
}

/// `struct fuse_init_out` (64 bytes) for a kernel at `minor`.
pub fn init_out(minor: u32, max_write: u32, max_background: u16) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.extend_from_slice(&7u32.to_le_bytes());
    out.extend_from_slice(&minor.min(MINOR).to_le_bytes());
    out.extend_from_slice(&(128u32 << 10).to_le_bytes()); // max_readahead
    out.extend_from_slice(&(ASYNC_READ | BIG_WRITES | ASYNC_DIO | MAX_PAGES).to_le_bytes());
    out.extend_from_slice(&max_background.to_le_bytes());
    // Congestion at three quarters of the background requests.
    out.extend_from_slice(&(max_background / 4 * 3).to_le_bytes());
    out.extend_from_slice(&max_write.to_le_bytes());
    out.extend_from_slice(&1u32.to_le_bytes()); // time_gran
    out.extend_from_slice(&((max_write / 4096) as u16).to_le_bytes()); // max_pages
    out.extend_from_slice(&0u16.to_le_bytes()); // map_alignment
    out.extend_from_slice(&0u32.to_le_bytes()); // flags2
    out.extend_from_slice(&0u32.to_le_bytes()); // max_stack_depth
    out.resize(64, 0);
    out
}

/// One `struct fuse_dirent` (padded to 8 bytes); false when it does not fit
/// in `room` bytes.
pub fn put_dirent(
    out: &mut Vec<u8>,
    room: usize,
    ino: u64,
    off: u64,
    kind: u32,
    name: &str,
) -> bool {
    let len = (24 + name.len()).next_multiple_of(8);
    if out.len() + len > room {
        return false;
    }
    out.extend_from_slice(&ino.to_le_bytes());
    out.extend_from_slice(&off.to_le_bytes());
    out.extend_from_slice(&(name.len() as u32).to_le_bytes());
    out.extend_from_slice(&kind.to_le_bytes());
    out.extend_from_slice(name.as_bytes());
    out.resize(out.len() + len - 24 - name.len(), 0);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_have_the_kernels_sizes() {
        let a = Attr {
            ino: DISK,
            size: 4097,
            mode: 0o100600,
            nlink: 1,
            uid: 0,
            gid: 0,
            time: 1,
        };
        let mut v = Vec::new();
        a.put(&mut v);
        assert_eq!(v.len(), 88);
        assert_eq!(u64_at(&v, 16), Some(9), "blocks of 512 bytes, rounded up");
        v.clear();
        a.attr_out(&mut v);
        assert_eq!(v.len(), 104);
        v.clear();
        a.entry_out(&mut v);
        assert_eq!(v.len(), 128);
        assert_eq!(u64_at(&v, 0), Some(DISK));
        let i = init_out(40, 1 << 20, 128);
        assert_eq!(i.len(), 64);
        assert_eq!(u32_at(&i, 4), Some(MINOR));
        assert_eq!(u16_at(&i, 16), Some(128));
        assert_eq!(u16_at(&i, 18), Some(96));
        assert_eq!(u32_at(&i, 20), Some(1 << 20));
        assert_eq!(u16_at(&i, 28), Some(256));
        let mut d = Vec::new();
        assert!(put_dirent(&mut d, 64, DISK, 3, 8, "disk"));
        assert_eq!(d.len(), 32);
        assert!(!put_dirent(&mut d, 64, DISK, 4, 8, "disk-number-two"));
        assert_eq!(out_header(16, -2, 7)[4..8], (-2i32).to_le_bytes());
        assert!(InHeader::parse(&[0u8; 39]).is_none());
    }
}
