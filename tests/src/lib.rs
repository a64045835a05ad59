//! Shared pieces of Berth's end-to-end tests.
//!
//! The crash harness stamps every 4 KiB block it writes with its LBA and a
//! generation, repeated across the block, so that after a crash a reader can tell
//! exactly which write a block holds, or that it is torn or misplaced.

pub mod csi;
pub mod meta;
pub mod server;
pub mod standalone;

pub const BLOCK: usize = 4096;
const STAMP: usize = 32;
const MAGIC: u64 = 0xbe27_c7a5_4b10_c4ed;

/// A block stamped with (lba, generation).
pub fn stamp(lba: u64, gen: u64, out: &mut [u8]) {
    let mut s = [0u8; STAMP];
    s[0..8].copy_from_slice(&MAGIC.to_le_bytes());
    s[8..16].copy_from_slice(&lba.to_le_bytes());
    s[16..24].copy_from_slice(&gen.to_le_bytes());
    s[24..32].copy_from_slice(&(lba ^ gen.rotate_left(17) ^ MAGIC).to_le_bytes());
    for c in out.chunks_mut(STAMP) {
        c.copy_from_slice(&s[..c.len()]);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    Zero,
    Stamp { lba: u64, gen: u64 },
}

/// Decodes a block: all zeros, one consistent stamp, or an error saying why not.
pub fn decode(block: &[u8]) -> Result<Seen, String> {
    if block.iter().all(|&b| b == 0) {
        return Ok(Seen::Zero);
    }
    let first = &block[..STAMP];
    if block.chunks(STAMP).any(|c| c != first) {
        return Err("torn or mixed block: stamps differ".into());
    }
    let u = |o: usize| {
        let mut x = [0u8; 8];
        x.copy_from_slice(&first[o..o + 8]);
        u64::from_le_bytes(x)
    };
    if u(0) != MAGIC || u(24) != u(8) ^ u(16).rotate_left(17) ^ MAGIC {
        return Err("garbage: not a stamp".into());
    }
    Ok(Seen::Stamp {
        lba: u(8),
        gen: u(16),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_round_trip_and_damage_is_seen() {
        let mut b = vec![0u8; BLOCK];
        assert_eq!(decode(&b), Ok(Seen::Zero));
        stamp(7, 99, &mut b);
        assert_eq!(decode(&b), Ok(Seen::Stamp { lba: 7, gen: 99 }));
        let mut torn = b.clone();
        stamp(7, 100, &mut torn[2048..]);
        assert!(decode(&torn).is_err());
        b[5] ^= 1;
        assert!(decode(&b).is_err());
    }
}
