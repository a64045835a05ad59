//! Helpers shared by the store's integration tests.

#![allow(dead_code)]

use berth_store::BLOCK_SIZE;

pub const BS: usize = BLOCK_SIZE as usize;

/// A 4 KiB block whose every 64 bytes name `tag` and their position: any
/// misplaced or mixed block shows.
pub fn block(tag: &str) -> Vec<u8> {
    let mut b = vec![0u8; BS];
    for (i, chunk) in b.chunks_mut(64).enumerate() {
        let s = format!("{tag}:{i:04}:");
        chunk[..s.len()].copy_from_slice(s.as_bytes());
    }
    b
}

/// Pool byte offset where `data` is stored (found by content).
pub fn find_in_pool(path: &std::path::Path, data: &[u8]) -> u64 {
    let pool = std::fs::read(path).expect("read pool");
    let pos = pool
        .chunks(BS)
        .position(|c| c == data)
        .expect("block is in the pool");
    (pos * BS) as u64
}
