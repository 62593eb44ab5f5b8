//! Stable digests: the same input hashes the same in every process and version, because
//! they name things that outlive a process (counters in Redis, config versions).
//!
//! Owns: `Fnv64`. Must not touch: anything else (a leaf).

/// FNV-1a: stable across processes and versions (unlike `DefaultHasher`), which matters
/// because fingerprints name counters that outlive a process in Redis.
pub struct Fnv64(u64);

impl Default for Fnv64 {
    fn default() -> Self {
        Fnv64::new()
    }
}

impl Fnv64 {
    pub fn new() -> Self {
        Fnv64(0xcbf2_9ce4_8422_2325)
    }
    pub fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= *b as u64;
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
    pub fn write_u64(&mut self, v: u64) {
        self.write(&v.to_le_bytes());
    }
    pub fn finish(&self) -> u64 {
        self.0
    }
}
