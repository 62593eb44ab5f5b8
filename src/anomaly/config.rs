//! Thresholds, one struct per detector, every field with a documented default.

use super::event::Source;

/// The whole module's settings. Counts are per window (`window_ms`, default 1 s) unless
/// named otherwise.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// Names this replica in evidence and in exported top keys.
    pub replica: String,
    /// Length of a counting window; windows are aligned to multiples of it so replicas agree.
    pub window_ms: u64,
    /// From the first event, every decision is dry-run for this long while baselines learn.
    pub warmup_ms: u64,
    /// Report every decision without enforcing any.
    pub dry_run: bool,
    /// Which event source counts toward volume (Envoy reports one request to `Check`, to
    /// `ShouldRateLimit` and in the access log; counting all three would triple it). Outcomes
    /// (status codes, failing paths) always come from the access log.
    pub volume_from: Source,
    /// Count-Min sketch width per level (rounded up to a power of two) and depth.
    pub sketch_width: usize,
    pub sketch_depth: usize,
    /// Most keys with exact state. New keys are refused (not swapped in) when it is full.
    pub max_tracked: usize,
    /// Exact state is given to a key whose sketch count in the current window reaches
    /// `admit_count` *plus* the sketch's error bound (so a flood of one-shot keys, which
    /// inflates every estimate, raises the bar with it) ...
    pub admit_count: u32,
    /// ... or whose failures (401/403/404) over the slow window reach this plus the bound.
    pub admit_failures: u32,
    /// The slow window for failures and distinct paths (counted over the current and the
    /// previous slow epoch, i.e. between one and two of these).
    pub slow_window_ms: u64,
    /// Exact state with no traffic for this long, and no decision or history, is dropped.
    pub idle_evict_ms: u64,
    /// Keys sampled per level per window to estimate the population's rate quantiles.
    pub sample_capacity: usize,
    /// A key is a shared address (NAT, CDN edge) when this many distinct identities come
    /// from it; it is then judged per identity, never as a whole.
    pub shared_min_identities: u64,
    pub volumetric: Volumetric,
    pub self_anomaly: SelfAnomaly,
    pub failure_ratio: FailureRatio,
    pub path_spread: PathSpread,
    pub prefix: PrefixEscalation,
    pub population: PopulationShift,
    pub ttl: Ttl,
    /// After a manual unban, the key is not decided again for this long.
    pub unban_suppress_ms: u64,
    /// New key decisions per minute per replica; beyond it offenders only count toward their
    /// prefix (and, past the cap again, population throttling).
    pub max_decisions_per_minute: u32,
    pub merge: Merge,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            replica: "local".to_string(),
            window_ms: 1000,
            warmup_ms: 60_000,
            dry_run: false,
            volume_from: Source::Authz,
            sketch_width: 1 << 16,
            sketch_depth: 4,
            max_tracked: 32_768,
            admit_count: 8,
            admit_failures: 3,
            slow_window_ms: 60_000,
            idle_evict_ms: 300_000,
            sample_capacity: 4096,
            shared_min_identities: 20,
            volumetric: Volumetric::default(),
            self_anomaly: SelfAnomaly::default(),
            failure_ratio: FailureRatio::default(),
            path_spread: PathSpread::default(),
            prefix: PrefixEscalation::default(),
            population: PopulationShift::default(),
            ttl: Ttl::default(),
            unban_suppress_ms: 30 * 60_000,
            max_decisions_per_minute: 100,
            merge: Merge::default(),
        }
    }
}

/// Rate far above the population's p99 *and* above an absolute floor. Applies to identities,
/// IPs (unless shared) and IPv6 /64s (one subscriber); an IPv4 /24 or IPv6 /48 is only ever
/// decided by prefix escalation. A key with a learned baseline that is within its own normal
/// range is left to the self-anomaly detector (big steady clients are not abusers).
#[derive(Clone, Debug, PartialEq)]
pub struct Volumetric {
    pub dry_run: bool,
    /// Multiple of the population's (smoothed) per-window p99.
    pub p99_multiple: f64,
    /// Requests per window below which nobody is volumetric.
    pub floor: f64,
}

impl Default for Volumetric {
    fn default() -> Self {
        Volumetric {
            dry_run: false,
            p99_multiple: 10.0,
            floor: 50.0,
        }
    }
}

/// z-score of ln(1 + count) against the key's own EWMA mean and deviation, computed before
/// the window is folded in; the deviation is floored so a perfectly regular key is not
/// flagged for a tiny wobble.
#[derive(Clone, Debug, PartialEq)]
pub struct SelfAnomaly {
    pub dry_run: bool,
    pub z: f64,
    /// Floor on the deviation of ln(1 + count) (0.5 ≈ a factor 1.65).
    pub min_std: f64,
    /// Windows of history before the baseline is trusted.
    pub warm_windows: u32,
    /// EWMA weight of a new window (0.02 ≈ a 50-window memory).
    pub alpha: f64,
    /// Requests per window below which it never fires.
    pub floor: f64,
}

impl Default for SelfAnomaly {
    fn default() -> Self {
        SelfAnomaly {
            dry_run: false,
            z: 6.0,
            min_std: 0.5,
            warm_windows: 30,
            alpha: 0.02,
            floor: 30.0,
        }
    }
}

/// Many 401/403/404 responses over the slow window.
#[derive(Clone, Debug, PartialEq)]
pub struct FailureRatio {
    pub dry_run: bool,
    pub min_failures: u32,
    /// Failures / responses.
    pub ratio: f64,
}

impl Default for FailureRatio {
    fn default() -> Self {
        FailureRatio {
            dry_run: false,
            min_failures: 8,
            ratio: 0.6,
        }
    }
}

/// Many distinct paths answered 401/403/404 over the slow window (probing; legitimate clients
/// hit many paths too, but rarely many *failing* ones).
#[derive(Clone, Debug, PartialEq)]
pub struct PathSpread {
    pub dry_run: bool,
    pub min_paths: u64,
    /// Share of the key's responses that failed: a busy legitimate client touches many
    /// paths and fails on a few; a prober fails on most.
    pub min_failure_ratio: f64,
}

impl Default for PathSpread {
    fn default() -> Self {
        PathSpread {
            dry_run: false,
            min_paths: 30,
            min_failure_ratio: 0.5,
        }
    }
}

/// Several offending IPs in one /24 (IPv4) or /64 (IPv6), or offending /64s in one /48,
/// within `memory_ms` → the prefix.
#[derive(Clone, Debug, PartialEq)]
pub struct PrefixEscalation {
    pub dry_run: bool,
    pub min_offenders: usize,
    pub memory_ms: u64,
    /// Prefixes remembered at once.
    pub max_prefixes: usize,
}

impl Default for PrefixEscalation {
    fn default() -> Self {
        PrefixEscalation {
            dry_run: false,
            min_offenders: 3,
            memory_ms: 10 * 60_000,
            max_prefixes: 4096,
        }
    }
}

/// A sudden surge of new unauthenticated sources → throttle new and unauthenticated callers
/// and alert. Never a ban of anyone.
#[derive(Clone, Debug, PartialEq)]
pub struct PopulationShift {
    pub dry_run: bool,
    /// New unauthenticated sources per window, as a multiple of their usual number ...
    pub surge_multiple: f64,
    /// ... and at least this many.
    pub floor: f64,
    /// How long the throttle lasts; no second one is made while it does.
    pub ttl_ms: u64,
}

impl Default for PopulationShift {
    fn default() -> Self {
        PopulationShift {
            dry_run: false,
            surge_multiple: 50.0,
            floor: 5000.0,
            ttl_ms: 5 * 60_000,
        }
    }
}

/// TTLs: `base_ms` for a first offense, doubling per repeat within `memory_ms`, at most
/// `cap_ms`, each stretched by up to `jitter` (a fraction) chosen by a hash of the key, the
/// offense number and `seed` — deterministic, but not the same for every key.
#[derive(Clone, Debug, PartialEq)]
pub struct Ttl {
    pub base_ms: u64,
    pub cap_ms: u64,
    pub jitter: f64,
    pub seed: u64,
    /// Offenses older than this are forgotten.
    pub memory_ms: u64,
    /// Keys whose history is kept.
    pub max_history: usize,
}

impl Default for Ttl {
    fn default() -> Self {
        Ttl {
            base_ms: 10 * 60_000,
            cap_ms: 24 * 3_600_000,
            jitter: 0.1,
            seed: 0x5EED,
            memory_ms: 7 * 24 * 3_600_000,
            max_history: 65_536,
        }
    }
}

/// Cross-replica heavy hitters: each replica exports, per window, its top keys; merged
/// counts are judged by the volumetric detector.
#[derive(Clone, Debug, PartialEq)]
pub struct Merge {
    /// Keys exported per window.
    pub top_n: usize,
    /// Least count in the window for a key to be exported.
    pub min_count: u32,
    /// Remote keys held per window.
    pub max_keys: usize,
}

impl Default for Merge {
    fn default() -> Self {
        Merge {
            top_n: 256,
            min_count: 5,
            max_keys: 8192,
        }
    }
}
