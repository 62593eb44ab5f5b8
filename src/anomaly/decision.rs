//! Decisions are data (CrowdSec style): what to do to which scope, for how long, and why.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use xxhash_rust::xxh3::xxh3_64_with_seed;

use super::event::Label;

/// The level a key lives at. Each request counts at every level it has: its identity (if any),
/// its IP, and the IP's prefixes (/24 for IPv4; /64 and /48 for IPv6).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    Identity,
    Ip,
    Ipv4Slash24,
    Ipv6Slash64,
    Ipv6Slash48,
    /// Everyone matching a class (new and unauthenticated callers): population shift only.
    Population,
}

impl Scope {
    /// Key levels, in the order of [`Scope::index`].
    pub const LEVELS: [Scope; 5] = [
        Scope::Identity,
        Scope::Ip,
        Scope::Ipv4Slash24,
        Scope::Ipv6Slash64,
        Scope::Ipv6Slash48,
    ];

    /// Index into per-level arrays (`Population` has none and maps past the end).
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn name(self) -> &'static str {
        match self {
            Scope::Identity => "identity",
            Scope::Ip => "ip",
            Scope::Ipv4Slash24 => "ipv4_24",
            Scope::Ipv6Slash64 => "ipv6_64",
            Scope::Ipv6Slash48 => "ipv6_48",
            Scope::Population => "population",
        }
    }

    pub fn is_prefix(self) -> bool {
        matches!(
            self,
            Scope::Ipv4Slash24 | Scope::Ipv6Slash64 | Scope::Ipv6Slash48
        )
    }
}

/// A key: a level and the 64-bit hash of its value. The text travels separately (in the
/// exact-state entry or a decision), so the key itself is 16 bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    pub scope: Scope,
    pub hash: u64,
}

/// What a key is in words and, for address scopes, as an address: enough to name it in a
/// decision and to ask the allowlist about it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Identity(Label),
    Ip(IpAddr),
    /// A network address (host bits zero) and its prefix length.
    Prefix(IpAddr, u8),
    Population,
}

impl Target {
    pub fn scope(&self) -> Scope {
        match self {
            Target::Identity(_) => Scope::Identity,
            Target::Ip(_) => Scope::Ip,
            Target::Prefix(IpAddr::V4(_), _) => Scope::Ipv4Slash24,
            Target::Prefix(IpAddr::V6(_), 64) => Scope::Ipv6Slash64,
            Target::Prefix(IpAddr::V6(_), _) => Scope::Ipv6Slash48,
            Target::Population => Scope::Population,
        }
    }

    /// The key this target counts under.
    pub fn key(&self) -> Key {
        let scope = self.scope();
        let hash = match self {
            Target::Identity(l) => l.hash(),
            Target::Ip(ip) => hash_ip(*ip, 0),
            Target::Prefix(ip, len) => hash_ip(*ip, *len),
            Target::Population => 0,
        };
        Key { scope, hash }
    }

    /// The value as lists name it: the identity (its `#xxh3:<hex>` digest when longer than
    /// an event carries), `1.2.3.4`, `1.2.3.0/24`, `2001:db8::/64`.
    pub fn value(&self) -> String {
        match self {
            Target::Identity(l) => l.list_value(),
            Target::Ip(ip) => ip.to_string(),
            Target::Prefix(ip, len) => format!("{ip}/{len}"),
            Target::Population => "new-and-unauthenticated".to_string(),
        }
    }

    /// Parses a decision's scope and value back into a target (for `unban` and `explain`
    /// called with what an operator typed). `None` if the value does not fit the scope.
    pub fn parse(scope: Scope, value: &str) -> Option<Target> {
        match scope {
            Scope::Identity => match crate::digest::IdentityDigest::parse(value) {
                Some(d) => Some(Target::Identity(Label::from_hash(d.0))),
                None => (!value.is_empty()).then(|| Target::Identity(Label::new(value))),
            },
            Scope::Ip => value.parse().ok().map(Target::Ip),
            Scope::Ipv4Slash24 | Scope::Ipv6Slash64 | Scope::Ipv6Slash48 => {
                let (addr, len) = value.split_once('/')?;
                let ip: IpAddr = addr.parse().ok()?;
                let len: u8 = len.parse().ok()?;
                let t = Target::Prefix(mask(ip, len), len);
                let fits = matches!((ip, len), (IpAddr::V4(_), 24) | (IpAddr::V6(_), 48 | 64));
                (fits && t.scope() == scope).then_some(t)
            }
            Scope::Population => Some(Target::Population),
        }
    }
}

/// `ip` with all but the first `len` bits cleared.
pub fn mask(ip: IpAddr, len: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let bits = u32::from(v4);
            let m = if len == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(len.min(32)))
            };
            IpAddr::V4(Ipv4Addr::from(bits & m))
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let m = if len == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(len.min(128)))
            };
            IpAddr::V6(Ipv6Addr::from(bits & m))
        }
    }
}

/// The hash of an address (`len` 0) or of a network (`len` = prefix length, seeds apart so a
/// /24 never collides with the host `a.b.c.0`). IPv4-mapped IPv6 addresses count as IPv4.
pub fn hash_ip(ip: IpAddr, len: u8) -> u64 {
    match canonical(ip) {
        IpAddr::V4(v4) => xxh3_64_with_seed(&v4.octets(), 4 + u64::from(len)),
        IpAddr::V6(v6) => xxh3_64_with_seed(&v6.octets(), 6 + u64::from(len)),
    }
}

/// IPv4-mapped IPv6 (`::ffff:1.2.3.4`) as the IPv4 address it is.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// What to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// Scale the key's limits down (identity scope, or new callers for population shift).
    Throttle,
    /// Blocklist the key.
    Deny,
    /// Tell a human; nothing is enforced.
    Alert,
}

impl Action {
    pub fn name(self) -> &'static str {
        match self {
            Action::Throttle => "throttle",
            Action::Deny => "deny",
            Action::Alert => "alert",
        }
    }
}

/// The named, versioned detectors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DetectorKind {
    Volumetric,
    SelfAnomaly,
    FailureRatio,
    PathSpread,
    PrefixEscalation,
    PopulationShift,
}

impl DetectorKind {
    pub const ALL: [DetectorKind; 6] = [
        DetectorKind::Volumetric,
        DetectorKind::SelfAnomaly,
        DetectorKind::FailureRatio,
        DetectorKind::PathSpread,
        DetectorKind::PrefixEscalation,
        DetectorKind::PopulationShift,
    ];

    /// `name/version`, the decision's reason. Bump the version when a detector's logic (not
    /// just a threshold) changes, so old and new decisions can be told apart.
    pub fn reason(self) -> &'static str {
        match self {
            DetectorKind::Volumetric => "volumetric/v1",
            DetectorKind::SelfAnomaly => "self_anomaly/v1",
            DetectorKind::FailureRatio => "failure_ratio/v1",
            DetectorKind::PathSpread => "path_spread/v1",
            DetectorKind::PrefixEscalation => "prefix_escalation/v1",
            DetectorKind::PopulationShift => "population_shift/v1",
        }
    }
}

/// Why a decision exists: the numbers that crossed, with their error bound.
#[derive(Clone, Debug, PartialEq)]
pub struct Evidence {
    /// The observed count (requests, failures, distinct paths or offenders, by detector).
    pub count: u64,
    /// How far `count` may be above the truth (sketch overestimate; 0 when exact). For merged
    /// counts, the sum of every replica's bound.
    pub error_bound: u64,
    /// The threshold `count` crossed.
    pub threshold: f64,
    /// The window the count is over.
    pub window_ms: u64,
    /// Detector-specific figures, e.g. `("z", 7.1)`, `("p99", 3.0)`, `("ratio", 0.93)`.
    pub figures: Vec<(&'static str, f64)>,
    /// A few paths the key requested (failing ones first for failure detectors).
    pub sample_paths: Vec<String>,
    /// Other keys involved (offending IPs for a prefix decision).
    pub members: Vec<String>,
    /// Replicas whose counts contributed (this one first).
    pub replicas: Vec<String>,
}

/// A decision: data for the runtime lists (deny → blocklist; throttle → scaled limits;
/// alert → a human). The same `(scope, value)` from two replicas is one entry.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    pub scope: Scope,
    pub value: String,
    /// What was decided on, with its full-text hash (`value` may be cut for display).
    pub target: Target,
    pub action: Action,
    pub ttl_ms: u64,
    /// `detector/version`.
    pub reason: &'static str,
    pub detector: DetectorKind,
    pub evidence: Evidence,
    /// Computed and reported, not to be enforced (global, per-detector, or warm-up).
    pub dry_run: bool,
    /// When it was made (the detector's clock).
    pub at_ms: u64,
    /// The replica that made it.
    pub replica: String,
    /// 1 for a first offense; TTLs double with each repeat.
    pub offense: u32,
}

impl Decision {
    /// The identity of the entry this decision writes: replicas deciding the same key at once
    /// write the same entry.
    pub fn entry_key(&self) -> (Scope, &str) {
        (self.scope, &self.value)
    }
}
