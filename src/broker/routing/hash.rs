//! The seeded hasher of the maps a route reads (exchange names, direct binding keys, topic words
//! and edges).
//!
//! Contract: pure computation, no state beyond a table's seed, usable on any thread. A seeded
//! finalizer over 8-byte chunks, several times cheaper than the standard SipHash on short keys.
//! Faults handled: the keys are clients' strings, so the seed is random per table (and kept by
//! its clones): without it nobody can aim keys at one bucket.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};

/// A map on the data path keyed by numbers or names a client chose (request ids, publish
/// sequences, delivery sequences, connections): the seeded hash, several times cheaper than
/// SipHash on short keys, and as safe against keys aimed at one bucket (the seed is random).
pub type FastMap<K, V> = std::collections::HashMap<K, V, Seeded>;

#[derive(Clone, Debug)]
pub struct Seeded {
    seed: u64,
}

impl Default for Seeded {
    fn default() -> Self {
        Seeded {
            seed: RandomState::new().hash_one(0x7765_6972_u64),
        }
    }
}

impl BuildHasher for Seeded {
    type Hasher = SeededHasher;
    fn build_hasher(&self) -> SeededHasher {
        SeededHasher { state: self.seed }
    }
}

pub struct SeededHasher {
    state: u64,
}

impl SeededHasher {
    #[inline]
    fn mix(&mut self, x: u64) {
        // MurmurHash3's fmix64: a bijection in which every input bit flips about half the output.
        let mut h = self.state ^ x;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        h ^= h >> 33;
        self.state = h;
    }
}

impl Hasher for SeededHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            self.mix(u64::from_le_bytes(chunk.try_into().expect("8 bytes")));
        }
        let tail = chunks.remainder();
        if !tail.is_empty() {
            // The tail's length in the byte it leaves free: "ab" and "ab\0" differ.
            let mut last = [0u8; 8];
            last[..tail.len()].copy_from_slice(tail);
            last[7] = tail.len() as u8;
            self.mix(u64::from_le_bytes(last));
        }
    }

    #[inline]
    fn write_u8(&mut self, x: u8) {
        self.write(&[x]);
    }

    #[inline]
    fn write_u32(&mut self, x: u32) {
        self.mix(u64::from(x));
    }

    #[inline]
    fn write_u64(&mut self, x: u64) {
        self.mix(x);
    }

    #[inline]
    fn write_usize(&mut self, x: usize) {
        self.mix(x as u64);
    }

    fn finish(&self) -> u64 {
        self.state
    }
}
