//! Allow and block lists as the Check path reads them: immutable snapshots, built whenever an
//! entry changes and swapped in whole, so lookups take no lock.
//!
//! Owns: the entry model (`ListEntry`: an address, a CIDR or an identity, with a reason, an
//! optional public code and an optional expiry), and `CompiledList`: addresses and CIDRs in a
//! prefix trie (IPv4 and IPv6 in one), identities in a hash map keyed by their
//! [`identity_hash`] — a name entry matches only its own text; a digest entry
//! (`#xxh3:<hex>`, what the anomaly module writes for an identity longer than its events
//! carry) matches every identity with that hash. Lookups skip expired entries, so an entry
//! stops applying at its expiry even before the next rebuild.
//!
//! Also canonical entry text (`canonical_entry`: an address, a CIDR, or `<source>:<value>`
//! whose value may hold `/`), shared by the settings file, resources and the admin API.
//!
//! Must not touch: where entries come from or how they propagate (runtime::blocklist),
//! answers.

pub mod cidr;

use crate::digest::{IdentityDigest, identity_hash};
use cidr::{Addr, IpNet, PrefixTrie};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// The canonical text of a list entry: an address or CIDR printed canonically, or an
/// identity (`<source>:<value>`) as given.
pub fn canonical_entry(raw: &str) -> Result<String, String> {
    let raw = raw.trim();
    if raw.is_empty() || raw.len() > MAX_ENTRY_BYTES || raw.chars().any(char::is_control) {
        return Err(format!(
            "{} is neither an IP address, a CIDR, nor an identity like user:alice (at most \
             {MAX_ENTRY_BYTES} bytes, no control characters)",
            shorten(raw)
        ));
    }
    if let Ok(net) = IpNet::parse(raw) {
        return Ok(net.to_string());
    }
    if IdentityDigest::is_claimed_by(raw) {
        return IdentityDigest::parse(raw)
            .map(|d| d.to_string())
            .ok_or_else(|| {
                format!(
                    "{} is not an identity digest ({}<16 hex digits>, as the anomaly module \
                 writes for an identity longer than its events carry)",
                    shorten(raw),
                    IdentityDigest::PREFIX
                )
            });
    }
    // An identity is `<source name>:<value>`; only its value may hold `/` (SPIFFE IDs,
    // base64 keys, URL subjects). What looks like an address is one, so a CIDR with host bits
    // set stays an error instead of becoming an identity that never matches.
    if looks_like_ip(raw) {
        return IpNet::parse(raw)
            .map(|n| n.to_string())
            .map_err(|e| e.to_string());
    }
    if raw.contains('/')
        && !raw
            .split_once(':')
            .is_some_and(|(name, v)| !name.is_empty() && !name.contains('/') && !v.is_empty())
    {
        return Err(format!(
            "{} is neither an IP address, a CIDR, nor an identity like user:alice (a value \
             with `/` needs its source name: mtls:spiffe://...)",
            shorten(raw)
        ));
    }
    Ok(raw.to_string())
}

/// The longest list value accepted.
pub const MAX_ENTRY_BYTES: usize = 1024;

/// Digits, dots and one `/` (IPv4), or hex digits with `::` or several `:` (IPv6).
fn looks_like_ip(raw: &str) -> bool {
    let addr = raw.split_once('/').map_or(raw, |(a, _)| a);
    let v4 = addr.contains('.') && addr.bytes().all(|b| b.is_ascii_digit() || b == b'.');
    let v6 = (addr.contains("::") || addr.matches(':').count() >= 2)
        && addr
            .bytes()
            .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.');
    v4 || v6
}

/// A value for a message: quoted, at most 64 characters of it (a rejected 1 MB value is not
/// echoed back whole).
pub fn shorten(raw: &str) -> String {
    match raw.char_indices().nth(64) {
        Some((i, _)) => format!("{:?}... ({} bytes)", &raw[..i], raw.len()),
        None => format!("{raw:?}"),
    }
}

/// Which list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ListKind {
    Allow,
    Block,
}

impl ListKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ListKind::Allow => "allow",
            ListKind::Block => "block",
        }
    }

    pub fn parse(s: &str) -> Option<ListKind> {
        match s {
            "allow" | "allowlist" => Some(ListKind::Allow),
            "block" | "blocklist" => Some(ListKind::Block),
            _ => None,
        }
    }
}

/// Where an entry was defined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntrySource {
    /// The settings file (changes with it, not through the admin API).
    Config,
    /// The runtime store (admin API / `ratethrottle manage`).
    #[default]
    Runtime,
    /// An `AccessList` resource (changes with it, not through the admin API).
    Kubernetes,
}

/// One allow or block entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListEntry {
    /// Canonical text: `203.0.113.7`, `10.0.0.0/8`, `2001:db8::/32`, or an identity.
    pub value: String,
    /// Internal reason, for operators only.
    #[serde(default)]
    pub reason: String,
    /// Public reason code in the 403 body; a default per kind of entry when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// Unix milliseconds after which the entry no longer applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<u64>,
    #[serde(default)]
    pub added_at_ms: u64,
    #[serde(default)]
    pub source: EntrySource,
}

impl ListEntry {
    pub fn is_active(&self, now_ms: u64) -> bool {
        self.expires_at_ms.is_none_or(|t| now_ms < t)
    }

    /// The network this entry names, if it is an address or a CIDR.
    pub fn net(&self) -> Option<IpNet> {
        IpNet::parse(&self.value).ok()
    }

    /// The code a blocked caller sees.
    pub fn public_code(&self) -> &str {
        if let Some(c) = &self.code {
            return c;
        }
        match self.net() {
            Some(n) if n.unified_len() == 128 => "ip_blocked",
            Some(_) => "network_blocked",
            None => "identity_blocked",
        }
    }

    /// Whether this entry should win over `other` for the same value: it lasts longer.
    fn outlasts(&self, other: &ListEntry) -> bool {
        match (self.expires_at_ms, other.expires_at_ms) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(a), Some(b)) => a >= b,
        }
    }
}

/// One list, compiled for lookups.
#[derive(Debug, Default)]
pub struct CompiledList {
    trie: PrefixTrie<u32>,
    /// [`identity_hash`] of a name entry, or a digest entry's hash → index into `entries`.
    identities: HashMap<u64, u32, foldhash::fast::RandomState>,
    entries: Vec<ListEntry>,
}

impl CompiledList {
    /// Builds the list; of two entries with the same value the longer-lasting one is kept.
    pub fn build(entries: impl IntoIterator<Item = ListEntry>) -> CompiledList {
        let mut by_value: HashMap<String, ListEntry> = HashMap::new();
        for e in entries {
            match by_value.get(&e.value) {
                Some(old) if !e.outlasts(old) => {}
                _ => {
                    by_value.insert(e.value.clone(), e);
                }
            }
        }
        let mut entries: Vec<ListEntry> = by_value.into_values().collect();
        entries.sort_by(|a, b| a.value.cmp(&b.value));
        let mut list = CompiledList::default();
        for (i, e) in entries.iter().enumerate() {
            match e.net() {
                Some(net) => {
                    list.trie.insert(net, i as u32);
                }
                None => {
                    let hash = IdentityDigest::parse(&e.value)
                        .map_or_else(|| identity_hash(&e.value), |d| d.0);
                    // A name and a digest of the same identity: the longer-lasting one answers.
                    match list.identities.get(&hash) {
                        Some(&j) if !e.outlasts(&entries[j as usize]) => {}
                        _ => {
                            list.identities.insert(hash, i as u32);
                        }
                    }
                }
            }
        }
        list.entries = entries;
        list
    }

    /// The most specific active entry containing `a`.
    #[inline]
    pub fn match_addr(&self, a: Addr, now_ms: u64) -> Option<&ListEntry> {
        let mut best = None;
        self.trie.for_each_match(a, |&i| {
            if let Some(e) = self.entries.get(i as usize)
                && e.is_active(now_ms)
            {
                best = Some(e);
            }
        });
        best
    }

    /// The active entry naming `identity`: its name, or its digest. A name entry must equal
    /// the text (a crafted hash collision never matches an allow entry).
    #[inline]
    pub fn match_identity(&self, identity: &str, now_ms: u64) -> Option<&ListEntry> {
        if self.identities.is_empty() {
            return None;
        }
        let &i = self.identities.get(&identity_hash(identity))?;
        let e = self.entries.get(i as usize)?;
        let names_it = e.value == identity || IdentityDigest::is_claimed_by(&e.value);
        (names_it && e.is_active(now_ms)).then_some(e)
    }

    /// The active entry for an identity known only by its hash and first bytes (the anomaly
    /// module's view): a digest entry, or a name entry that hashes the same and starts so.
    pub fn match_identity_hash(&self, hash: u64, prefix: &str, now_ms: u64) -> Option<&ListEntry> {
        let &i = self.identities.get(&hash)?;
        let e = self.entries.get(i as usize)?;
        let names_it = e.value.starts_with(prefix) || IdentityDigest::is_claimed_by(&e.value);
        (names_it && e.is_active(now_ms)).then_some(e)
    }

    pub fn entries(&self) -> &[ListEntry] {
        &self.entries
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Both lists at one instant.
#[derive(Debug, Default)]
pub struct ListSet {
    pub allow: CompiledList,
    pub block: CompiledList,
}

impl ListSet {
    pub fn list(&self, kind: ListKind) -> &CompiledList {
        match kind {
            ListKind::Allow => &self.allow,
            ListKind::Block => &self.block,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lists::cidr::parse_addr;

    fn entry(value: &str, expires_at_ms: Option<u64>) -> ListEntry {
        ListEntry {
            value: value.into(),
            reason: format!("reason for {value}"),
            code: None,
            expires_at_ms,
            added_at_ms: 0,
            source: EntrySource::Runtime,
        }
    }

    #[test]
    fn most_specific_active_entry_wins() {
        let l = CompiledList::build([
            entry("10.0.0.0/8", None),
            entry("10.1.0.0/16", Some(1_000)),
            entry("10.1.2.3", None),
            entry("2001:db8::/32", None),
            entry("user:mallory", Some(5_000)),
        ]);
        let at = |ip: &str, now: u64| {
            l.match_addr(parse_addr(ip).unwrap(), now)
                .map(|e| e.value.as_str())
        };
        assert_eq!(at("10.1.2.3", 0), Some("10.1.2.3"));
        assert_eq!(at("10.1.9.9", 999), Some("10.1.0.0/16"));
        // Expired: the less specific network still applies.
        assert_eq!(at("10.1.9.9", 1_000), Some("10.0.0.0/8"));
        assert_eq!(at("11.0.0.1", 0), None);
        assert_eq!(at("2001:db8:1::1", 0), Some("2001:db8::/32"));
        assert_eq!(at("2001:db9::1", 0), None);
        assert!(l.match_identity("user:mallory", 4_999).is_some());
        assert!(l.match_identity("user:mallory", 5_000).is_none());
        assert!(l.match_identity("user:alice", 0).is_none());
    }

    #[test]
    fn duplicate_values_keep_the_longer_lasting_entry_and_codes_default_by_kind() {
        let l = CompiledList::build([entry("1.2.3.4", Some(10)), entry("1.2.3.4", None)]);
        assert_eq!(l.len(), 1);
        assert_eq!(l.entries()[0].expires_at_ms, None);
        assert_eq!(l.entries()[0].public_code(), "ip_blocked");
        assert_eq!(entry("10.0.0.0/8", None).public_code(), "network_blocked");
        assert_eq!(entry("user:x", None).public_code(), "identity_blocked");
        let mut coded = entry("user:x", None);
        coded.code = Some("abuse".into());
        assert_eq!(coded.public_code(), "abuse");
    }

    #[test]
    fn tens_of_thousands_of_networks_match_exactly() {
        // 50,000 /24s: 1.0.0.0/24 .. 1.195.79.0/24. (Lookup speed is measured in
        // `cargo bench`, not asserted here.)
        let entries: Vec<ListEntry> = (0..50_000u32)
            .map(|i| entry(&format!("1.{}.{}.0/24", i / 256, i % 256), None))
            .collect();
        let l = CompiledList::build(entries);
        for (addr, listed) in [
            ("1.0.0.1", true),
            ("1.0.200.77", true),
            ("1.195.79.255", true),
            ("1.195.80.1", false),
            ("1.196.0.1", false),
            ("2.0.0.1", false),
            ("0.255.255.255", false),
        ] {
            let probe = parse_addr(addr).unwrap();
            assert_eq!(l.match_addr(probe, 0).is_some(), listed, "{addr}");
        }
    }

    #[test]
    fn entries_are_canonical() {
        assert_eq!(canonical_entry("10.0.0.0/8").as_deref(), Ok("10.0.0.0/8"));
        assert_eq!(
            canonical_entry("2001:DB8::/32").as_deref(),
            Ok("2001:db8::/32")
        );
        assert_eq!(canonical_entry(" user:alice ").as_deref(), Ok("user:alice"));
        assert!(canonical_entry("10.0.0.1/8").is_err());
        assert!(canonical_entry("300.1.1.1").is_err());
        assert!(canonical_entry("a\nb").is_err());
    }

    #[test]
    fn a_digest_entry_matches_exactly_the_identity_it_hashes() {
        let long = "mtls:spiffe://cluster.local/ns/default/sa/frontend-with-a-long-name";
        let twin = "mtls:spiffe://cluster.local/ns/default/sa/frontend-with-a-long-nam3";
        let digest = IdentityDigest(identity_hash(long)).to_string();
        assert_eq!(canonical_entry(&digest).as_deref(), Ok(digest.as_str()));
        let l = CompiledList::build([entry(&digest, Some(1_000)), entry("user:bob", None)]);
        assert_eq!(
            l.match_identity(long, 0).map(|e| e.value.as_str()),
            Some(digest.as_str())
        );
        assert!(
            l.match_identity(twin, 0).is_none(),
            "same first bytes, other identity"
        );
        assert!(l.match_identity(long, 1_000).is_none(), "expired");
        assert_eq!(
            l.match_identity_hash(identity_hash(long), &long[..46], 0)
                .map(|e| e.value.as_str()),
            Some(digest.as_str())
        );
        // A name entry answers by hash only for its own text or the prefix it starts with.
        assert!(l.match_identity("user:bob", 0).is_some());
        assert!(
            l.match_identity_hash(identity_hash("user:bob"), "user:b", 0)
                .is_some()
        );
        assert!(
            l.match_identity_hash(identity_hash("user:bob"), "user:x", 0)
                .is_none()
        );
        // A name and a digest of one identity: the longer-lasting entry answers.
        let both = CompiledList::build([entry(&digest, Some(1_000)), entry(long, None)]);
        assert_eq!(
            both.match_identity(long, 5_000).map(|e| e.value.as_str()),
            Some(long)
        );
        // Malformed digests are refused with the form they should have, never stored as names.
        for bad in ["#xxh3:", "#xxh3:xyz", "#xxh3:0123456789abcdef00"] {
            let e = canonical_entry(bad).unwrap_err();
            assert!(e.contains("#xxh3:<16 hex digits>"), "{e}");
        }
        assert_eq!(
            canonical_entry("#XXH3:0123456789ABCDEF").ok(),
            Some("#XXH3:0123456789ABCDEF".to_string()),
            "only the lower-case prefix claims the form; anything else is a plain identity"
        );
    }

    #[test]
    fn identities_may_hold_slashes_but_addresses_stay_addresses() {
        for id in [
            "mtls:spiffe://cluster.local/ns/x/sa/y",
            "key:YWJj/ZGVm+Zw==",
            "user:https://idp.example/users/42",
            "user:zoë/東京",
            "add:bee",
        ] {
            assert_eq!(canonical_entry(id).as_deref(), Ok(id));
        }
        for bad in [
            "2001:db8::1/32",
            "fe80::1/10",
            "10.0.0.1/8",
            "1.2.3.4/33",
            "a/b",
            "/x",
            ":a/b",
            "user:a\r\nx",
        ] {
            assert!(canonical_entry(bad).is_err(), "{bad}");
        }
        let huge = format!("user:{}", "é".repeat(4096));
        let e = canonical_entry(&huge).unwrap_err();
        assert!(e.len() < 300, "{e}");
    }
}
