//! The NBD wire format (the NetworkBlockDevice project's `doc/proto.md`): fixed
//! newstyle handshake, option haggling, requests and replies.
//!
//! Pure functions over byte slices, so every parser is fuzzed without sockets
//! (berth-volume's `tests/nbd_fuzz.rs`). All numbers are big-endian on the wire.

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

// Option replies.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
const REP_ERR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_ERR + 1;
pub const REP_ERR_POLICY: u32 = REP_ERR + 2;
pub const REP_ERR_INVALID: u32 = REP_ERR + 3;
pub const REP_ERR_TLS_REQD: u32 = REP_ERR + 5;
pub const REP_ERR_UNKNOWN: u32 = REP_ERR + 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_ERR + 7;
pub const REP_ERR_TOO_BIG: u32 = REP_ERR + 9;

// NBD_INFO_* in REP_INFO.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags.
pub const TF_HAS_FLAGS: u16 = 1 << 0;
pub const TF_READ_ONLY: u16 = 1 << 1;
pub const TF_SEND_FLUSH: u16 = 1 << 2;
pub const TF_SEND_FUA: u16 = 1 << 3;
pub const TF_SEND_TRIM: u16 = 1 << 5;
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TF_SEND_FAST_ZERO: u16 = 1 << 11;

// Commands and their flags.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

// Structured replies.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

// base:allocation extent flags.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

// Errors carried in replies.
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// The one metadata context served, and its id.
pub const BASE_ALLOCATION: &str = "base:allocation";
pub const BASE_ALLOCATION_ID: u32 = 1;

/// Largest option payload accepted during the handshake; anything longer is
/// refused with REP_ERR_TOO_BIG and its bytes skipped (or the connection closed).
pub const MAX_OPTION_BYTES: u32 = 16 << 10;
/// Longest string (export name, query) the spec allows.
pub const MAX_STRING_BYTES: usize = 4096;

/// Maps a store errno to the NBD error a reply carries.
pub fn nbd_errno(errno: i32) -> u32 {
    match errno {
        libc::EPERM | libc::EROFS => EPERM,
        libc::ENOMEM => ENOMEM,
        libc::EINVAL => EINVAL,
        libc::ENOSPC => ENOSPC,
        libc::EOVERFLOW => EOVERFLOW,
        libc::ENOTSUP => ENOTSUP,
        libc::ESHUTDOWN => ESHUTDOWN,
        _ => EIO,
    }
}

/// Why a byte sequence is not a valid message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("bad magic {0:#x}")]
    BadMagic(u64),
    #[error("message truncated: {0}")]
    Truncated(&'static str),
    #[error("invalid: {0}")]
    Invalid(String),
}

fn be_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn be_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn be_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// The 16-byte header of a client option: `IHAVEOPT, option, length`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub len: u32,
}

pub fn parse_option_header(b: &[u8; 16]) -> Result<OptionHeader, WireError> {
    let magic = be_u64(b, 0).unwrap_or(0);
    if magic != IHAVEOPT {
        return Err(WireError::BadMagic(magic));
    }
    Ok(OptionHeader {
        option: be_u32(b, 8).unwrap_or(0),
        len: be_u32(b, 12).unwrap_or(0),
    })
}

fn string(b: &[u8], what: &'static str) -> Result<String, WireError> {
    if b.len() > MAX_STRING_BYTES {
        return Err(WireError::Invalid(format!("{what} longer than 4096 bytes")));
    }
    let s =
        std::str::from_utf8(b).map_err(|_| WireError::Invalid(format!("{what} is not UTF-8")))?;
    if s.contains('\0') {
        return Err(WireError::Invalid(format!("{what} contains NUL")));
    }
    Ok(s.to_string())
}

/// The payload of NBD_OPT_INFO / NBD_OPT_GO: an export name and the NBD_INFO
/// items the client asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub requests: Vec<u16>,
}

pub fn parse_info_request(b: &[u8]) -> Result<InfoRequest, WireError> {
    let n = be_u32(b, 0).ok_or(WireError::Truncated("export name length"))? as usize;
    let name = b
        .get(4..4usize.saturating_add(n))
        .ok_or(WireError::Truncated("export name"))?;
    let name = string(name, "export name")?;
    let at = 4 + n;
    let count = be_u16(b, at).ok_or(WireError::Truncated("information request count"))? as usize;
    if b.len() != at + 2 + 2 * count {
        return Err(WireError::Invalid(format!(
            "{} bytes do not hold {count} information requests",
            b.len() - at - 2
        )));
    }
    let requests = (0..count)
        .map(|i| be_u16(b, at + 2 + 2 * i).unwrap_or(0))
        .collect();
    Ok(InfoRequest { name, requests })
}

/// The payload of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    pub name: String,
    pub queries: Vec<String>,
}

pub fn parse_meta_context_request(b: &[u8]) -> Result<MetaContextRequest, WireError> {
    let n = be_u32(b, 0).ok_or(WireError::Truncated("export name length"))? as usize;
    let name = b
        .get(4..4usize.saturating_add(n))
        .ok_or(WireError::Truncated("export name"))?;
    let name = string(name, "export name")?;
    let mut at = 4 + n;
    let count = be_u32(b, at).ok_or(WireError::Truncated("query count"))? as usize;
    at += 4;
    let mut queries = Vec::new();
    for _ in 0..count {
        let len = be_u32(b, at).ok_or(WireError::Truncated("query length"))? as usize;
        at += 4;
        let q = b
            .get(at..at.saturating_add(len))
            .ok_or(WireError::Truncated("query"))?;
        queries.push(string(q, "query")?);
        at += len;
    }
    if at != b.len() {
        return Err(WireError::Invalid(format!(
            "{} trailing bytes after the queries",
            b.len() - at
        )));
    }
    Ok(MetaContextRequest { name, queries })
}

/// One transmission-phase request header (28 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: u16,
    pub handle: u64,
    pub offset: u64,
    pub len: u32,
}

pub const REQUEST_BYTES: usize = 28;

pub fn parse_request(b: &[u8; REQUEST_BYTES]) -> Result<Request, WireError> {
    let magic = be_u32(b, 0).unwrap_or(0);
    if magic != REQUEST_MAGIC {
        return Err(WireError::BadMagic(magic as u64));
    }
    Ok(Request {
        flags: be_u16(b, 4).unwrap_or(0),
        command: be_u16(b, 6).unwrap_or(0),
        handle: be_u64(b, 8).unwrap_or(0),
        offset: be_u64(b, 16).unwrap_or(0),
        len: be_u32(b, 24).unwrap_or(0),
    })
}

pub fn encode_request(r: &Request) -> [u8; REQUEST_BYTES] {
    let mut b = [0u8; REQUEST_BYTES];
    b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&r.flags.to_be_bytes());
    b[6..8].copy_from_slice(&r.command.to_be_bytes());
    b[8..16].copy_from_slice(&r.handle.to_be_bytes());
    b[16..24].copy_from_slice(&r.offset.to_be_bytes());
    b[24..28].copy_from_slice(&r.len.to_be_bytes());
    b
}

// ---- encoders (server to client) ------------------------------------------

pub fn put_option_reply(out: &mut Vec<u8>, option: u32, reply: u32, data: &[u8]) {
    out.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

pub fn info_export(size_bytes: u64, flags: u16) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[0..2].copy_from_slice(&INFO_EXPORT.to_be_bytes());
    b[2..10].copy_from_slice(&size_bytes.to_be_bytes());
    b[10..12].copy_from_slice(&flags.to_be_bytes());
    b
}

pub fn info_block_size(min: u32, preferred: u32, max: u32) -> [u8; 14] {
    let mut b = [0u8; 14];
    b[0..2].copy_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    b[2..6].copy_from_slice(&min.to_be_bytes());
    b[6..10].copy_from_slice(&preferred.to_be_bytes());
    b[10..14].copy_from_slice(&max.to_be_bytes());
    b
}

pub fn put_simple_reply(out: &mut Vec<u8>, error: u32, handle: u64) {
    out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&handle.to_be_bytes());
}

/// A structured reply chunk header; `len` counts the payload that follows.
pub fn put_chunk_header(out: &mut Vec<u8>, flags: u16, kind: u16, handle: u64, len: u32) {
    out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&handle.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

/// A final NBD_REPLY_TYPE_ERROR chunk with a message for people.
pub fn put_error_chunk(out: &mut Vec<u8>, handle: u64, error: u32, message: &str) {
    // At most 4096 bytes, cut on a character boundary.
    let mut end = message.len().min(MAX_STRING_BYTES);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let msg = &message.as_bytes()[..end];
    put_chunk_header(
        out,
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        handle,
        6 + msg.len() as u32,
    );
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info_payload(name: &str, reqs: &[u16]) -> Vec<u8> {
        let mut b = (name.len() as u32).to_be_bytes().to_vec();
        b.extend_from_slice(name.as_bytes());
        b.extend_from_slice(&(reqs.len() as u16).to_be_bytes());
        for r in reqs {
            b.extend_from_slice(&r.to_be_bytes());
        }
        b
    }

    #[test]
    fn info_requests_parse_and_reject_bad_lengths() {
        let b = info_payload("vol@abc", &[INFO_BLOCK_SIZE, INFO_NAME]);
        assert_eq!(
            parse_info_request(&b),
            Ok(InfoRequest {
                name: "vol@abc".into(),
                requests: vec![INFO_BLOCK_SIZE, INFO_NAME]
            })
        );
        assert!(parse_info_request(&b[..b.len() - 1]).is_err());
        let mut long = b.clone();
        long.push(0);
        assert!(parse_info_request(&long).is_err());
        let mut huge = b;
        huge[0..4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(
            parse_info_request(&huge),
            Err(WireError::Truncated("export name"))
        );
    }

    #[test]
    fn meta_context_requests_parse() {
        let mut b = 3u32.to_be_bytes().to_vec();
        b.extend_from_slice(b"vol");
        b.extend_from_slice(&2u32.to_be_bytes());
        for q in ["base:allocation", "qemu:dirty-bitmap:x"] {
            b.extend_from_slice(&(q.len() as u32).to_be_bytes());
            b.extend_from_slice(q.as_bytes());
        }
        let r = parse_meta_context_request(&b).expect("valid");
        assert_eq!(r.name, "vol");
        assert_eq!(r.queries, vec!["base:allocation", "qemu:dirty-bitmap:x"]);
        b.push(1);
        assert!(parse_meta_context_request(&b).is_err());
    }

    #[test]
    fn requests_round_trip_and_bad_magic_is_refused() {
        let r = Request {
            flags: CMD_FLAG_FUA,
            command: CMD_WRITE,
            handle: 0xdead_beef_0000_0001,
            offset: 4096,
            len: 512,
        };
        let b = encode_request(&r);
        assert_eq!(parse_request(&b), Ok(r));
        let mut bad = b;
        bad[0] ^= 1;
        assert!(matches!(parse_request(&bad), Err(WireError::BadMagic(_))));
    }

    #[test]
    fn option_reply_and_chunks_have_the_documented_layout() {
        let mut out = Vec::new();
        put_option_reply(&mut out, OPT_GO, REP_ACK, &[]);
        assert_eq!(out.len(), 20);
        assert_eq!(&out[0..8], &OPT_REPLY_MAGIC.to_be_bytes());
        out.clear();
        put_error_chunk(&mut out, 7, EIO, "bad block");
        assert_eq!(out.len(), 20 + 6 + 9);
        assert_eq!(&out[4..6], &REPLY_FLAG_DONE.to_be_bytes());
        assert_eq!(&out[6..8], &REPLY_TYPE_ERROR.to_be_bytes());
        assert_eq!(&out[16..20], &15u32.to_be_bytes());
    }
}
