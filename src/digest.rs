//! Stable digests: the same input hashes the same in every process and version, because
//! they name things that outlive a process (counters in Redis, config versions).
//!
//! Owns: `Fnv64`; the identity hash (`identity_hash`) and its list-entry text
//! (`IdentityDigest`, `#xxh3:<16 hex>`), which name an identity too long for the anomaly
//! module's fixed-size events. Must not touch: anything else (a leaf).

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

/// The 64-bit hash that names an identity wherever its text is not carried whole (the
/// anomaly module's events keep 46 bytes of it; trust is keyed by it; a block entry for a
/// longer identity is written by it). xxh3, stable across processes. Never 0: 0 means "no
/// identity".
#[inline]
pub fn identity_hash(text: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(text.as_bytes()).max(1)
}

/// An identity named by its [`identity_hash`], as a list entry's text: `#xxh3:` and 16
/// lower-case hex digits. No identity a source yields starts with `#` (source names may not),
/// so the form cannot be mistaken for a name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IdentityDigest(pub u64);

impl IdentityDigest {
    pub const PREFIX: &'static str = "#xxh3:";

    /// `Some` for text in the digest form, `None` for anything else (a name).
    pub fn parse(text: &str) -> Option<IdentityDigest> {
        let hex = text.strip_prefix(Self::PREFIX)?;
        if hex.len() != 16 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        u64::from_str_radix(hex, 16).ok().map(IdentityDigest)
    }

    /// Whether `text` claims the digest form (well-formed or not).
    pub fn is_claimed_by(text: &str) -> bool {
        text.starts_with(Self::PREFIX)
    }
}

impl std::fmt::Display for IdentityDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}{:016x}", Self::PREFIX, self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_identity_digest_round_trips_and_refuses_what_is_not_one() {
        let d = IdentityDigest(identity_hash(
            "mtls:spiffe://cluster.local/ns/default/sa/frontend",
        ));
        let text = d.to_string();
        assert_eq!(text.len(), 6 + 16, "{text}");
        assert_eq!(IdentityDigest::parse(&text), Some(d));
        assert_eq!(
            IdentityDigest::parse(&text.to_uppercase().replace("#XXH3", "#xxh3")),
            Some(d)
        );
        for bad in [
            "#xxh3:",
            "#xxh3:0123",
            "#xxh3:0123456789abcdeg",
            "#xxh3:0123456789abcdef0",
            "xxh3:0123456789abcdef",
            "user:alice",
        ] {
            assert_eq!(IdentityDigest::parse(bad), None, "{bad}");
        }
        assert!(IdentityDigest::is_claimed_by("#xxh3:zz"));
        assert_ne!(identity_hash(""), 0);
        assert_ne!(identity_hash("a"), identity_hash("b"));
    }
}
