//! The sans-IO core: events in, decisions out, time injected. Deterministic: the same events
//! and ticks give the same decisions.

use std::collections::HashMap;
use std::net::IpAddr;

use foldhash::fast::FixedState;
use xxhash_rust::xxh3::xxh3_64_with_seed;

use super::config::Config;
use super::decision::{
    Action, Decision, DetectorKind, Evidence, Key, Scope, Target, canonical, hash_ip, mask,
};
use super::event::{Event, Label};
use super::sketch::{CountMin, Distinct, RateSample};

/// Answers "is this target allowlisted?" (manual allowlist entries always win; for a prefix,
/// true if any allowlisted address lies inside it).
pub type Allowlist = Box<dyn Fn(&Target) -> bool + Send>;

const LEVELS: usize = 5;
const SAMPLE_PATHS: usize = 3;
/// Bits in each generation of the "seen source" filter used to count new sources.
const SEEN_BITS: usize = 1 << 23;
/// Generations of the seen filter rotate this often.
const SEEN_ROTATE_MS: u64 = 10 * 60_000;

/// Exact state for one tracked key.
#[derive(Clone, Debug)]
struct Entry {
    target: Target,
    /// Requests in the current window, and in the last closed one (and which one that was).
    cur: u32,
    last: u32,
    last_epoch: u64,
    /// Overestimate carried in from the sketch at admission (0 once a full window passed).
    seeded_bound: u32,
    /// Responses and failures in the current and previous slow epoch.
    resp: [u32; 2],
    fail: [u32; 2],
    slow_epoch: u64,
    /// Distinct failing paths in the current slow epoch (linear counting, 512 bits).
    failing_paths: Distinct<8>,
    /// Distinct identities seen from this address (IP levels only).
    identities: Distinct<4>,
    sample_paths: [Label; SAMPLE_PATHS],
    /// EWMA of ln(1 + count) and of its squared deviation; windows learned.
    mean: f64,
    var: f64,
    learned: u32,
    last_seen_ms: u64,
}

impl Entry {
    fn new(target: Target, epoch: u64, slow_epoch: u64, now: u64) -> Entry {
        Entry {
            target,
            cur: 0,
            last: 0,
            last_epoch: epoch.saturating_sub(1),
            seeded_bound: 0,
            resp: [0; 2],
            fail: [0; 2],
            slow_epoch,
            failing_paths: Distinct::default(),
            identities: Distinct::default(),
            sample_paths: [Label::EMPTY; SAMPLE_PATHS],
            mean: 0.0,
            var: 0.0,
            learned: 0,
            last_seen_ms: now,
        }
    }

    fn roll_slow(&mut self, slow_epoch: u64) {
        if slow_epoch == self.slow_epoch {
            return;
        }
        if slow_epoch == self.slow_epoch + 1 {
            self.resp = [0, self.resp[0]];
            self.fail = [0, self.fail[0]];
        } else {
            self.resp = [0; 2];
            self.fail = [0; 2];
        }
        self.failing_paths.clear();
        self.slow_epoch = slow_epoch;
    }

    fn std(&self) -> f64 {
        self.var.max(0.0).sqrt()
    }

    fn sample_paths(&self) -> Vec<String> {
        self.sample_paths
            .iter()
            .filter(|l| !l.is_empty())
            .map(Label::display)
            .collect()
    }
}

/// What the detector remembers about a key's decisions (kept apart from the exact state so
/// it survives eviction, bounded by `ttl.max_history`).
#[derive(Clone, Copy, Debug, Default)]
struct History {
    offenses: u32,
    last_offense_ms: u64,
    active_until_ms: u64,
    /// The active decision was made after warm-up: the key's baseline must not learn.
    flagged: bool,
    suppressed_until_ms: u64,
}

#[derive(Clone, Debug)]
struct PrefixOffenders {
    members: Vec<(u64, String)>,
    last_ms: u64,
}

/// One key in another replica's (or this one's) export.
#[derive(Clone, Debug, PartialEq)]
pub struct RemoteCount {
    pub scope: Scope,
    /// The key's hash (identities are hashed over their full text, which `value` may cut).
    pub hash: u64,
    pub value: String,
    pub count: u32,
    pub error_bound: u32,
    /// The exporter judged the key exempt (a shared address, or within its own baseline).
    pub exempt: bool,
}

/// A replica's heavy hitters for one window: pure data, to carry between replicas (the
/// runtime puts it in a Redis sorted set per epoch).
#[derive(Clone, Debug, PartialEq)]
pub struct TopKeys {
    pub replica: String,
    /// Window index (`time / window_ms`), the same on every replica.
    pub epoch: u64,
    pub keys: Vec<RemoteCount>,
}

#[derive(Clone, Debug)]
struct Remote {
    epoch: u64,
    count: u64,
    bound: u64,
    exempt: bool,
    replicas: Vec<String>,
    decided: bool,
}

/// Counters for metrics and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub events: u64,
    /// Events that were ratethrottle's own denials (counted, never evidence).
    pub own_denials: u64,
    pub admitted: u64,
    /// Admissions refused because exact state was full.
    pub admission_refused: u64,
    pub evicted: u64,
    pub decisions: u64,
    /// Offenses not decided because the per-minute cap was reached.
    pub capped: u64,
    pub allowlisted: u64,
    pub suppressed: u64,
}

/// Why a key is or isn't flagged.
#[derive(Clone, Debug, PartialEq)]
pub struct Explanation {
    pub scope: Scope,
    pub value: String,
    pub tracked: bool,
    /// Sketch count in the current window and its error bound.
    pub sketch_count: u32,
    pub sketch_error_bound: u64,
    pub window_count: u32,
    pub last_window_count: u32,
    pub slow_responses: u32,
    pub slow_failures: u32,
    pub failing_paths: u64,
    pub distinct_identities: u64,
    pub shared: bool,
    /// Baseline of ln(1 + count): mean, deviation, windows learned.
    pub baseline_mean: f64,
    pub baseline_std: f64,
    pub baseline_windows: u32,
    pub population_p99: Option<f64>,
    pub volumetric_threshold: f64,
    pub self_anomaly_z: f64,
    pub failure_min: u32,
    pub failure_ratio: f64,
    pub path_spread_min: u64,
    pub offenses: u32,
    pub active_until_ms: Option<u64>,
    pub suppressed_until_ms: Option<u64>,
    pub allowlisted: bool,
}

/// The detector. Feed it events with [`Detector::observe`], call [`Detector::tick`] at least
/// once per window, and apply the decisions it returns.
pub struct Detector {
    cfg: Config,
    allow: Allowlist,
    start_ms: Option<u64>,
    now_ms: u64,
    epoch: u64,
    slow_epoch: u64,
    rate: Vec<CountMin>,
    /// Failure sketches (identity, IP) for the current and previous slow epoch.
    fail: [Vec<CountMin>; 2],
    samples: Vec<RateSample>,
    p99: [Option<f64>; LEVELS],
    seen: [Vec<u64>; 2],
    seen_epoch: u64,
    new_sources: u64,
    new_baseline: Option<f64>,
    population_until_ms: u64,
    entries: HashMap<Key, Entry, FixedState>,
    history: HashMap<Key, History, FixedState>,
    prefixes: HashMap<Key, PrefixOffenders, FixedState>,
    remote: HashMap<Key, Remote, FixedState>,
    export: Option<TopKeys>,
    pending: Vec<Decision>,
    minute: u64,
    decisions_this_minute: u32,
    capped_this_minute: u32,
    stats: Stats,
}

impl Detector {
    /// A detector with nothing allowlisted.
    pub fn new(cfg: Config) -> Detector {
        Detector::with_allowlist(cfg, Box::new(|_| false))
    }

    pub fn with_allowlist(mut cfg: Config, allow: Allowlist) -> Detector {
        cfg.window_ms = cfg.window_ms.max(10);
        cfg.slow_window_ms = cfg.slow_window_ms.max(cfg.window_ms);
        cfg.max_tracked = cfg.max_tracked.max(16);
        let sketch = |n| {
            (0..n)
                .map(|_| CountMin::new(cfg.sketch_width, cfg.sketch_depth))
                .collect()
        };
        let hasher = || FixedState::with_seed(0xA11);
        Detector {
            rate: sketch(LEVELS),
            fail: [sketch(2), sketch(2)],
            samples: (0..LEVELS)
                .map(|_| RateSample::new(cfg.sample_capacity))
                .collect(),
            p99: [None; LEVELS],
            seen: [vec![0; SEEN_BITS / 64], vec![0; SEEN_BITS / 64]],
            seen_epoch: 0,
            new_sources: 0,
            new_baseline: None,
            population_until_ms: 0,
            entries: HashMap::with_capacity_and_hasher(cfg.max_tracked, hasher()),
            history: HashMap::with_hasher(hasher()),
            prefixes: HashMap::with_hasher(hasher()),
            remote: HashMap::with_hasher(hasher()),
            export: None,
            pending: Vec::new(),
            minute: 0,
            decisions_this_minute: 0,
            capped_this_minute: 0,
            stats: Stats::default(),
            start_ms: None,
            now_ms: 0,
            epoch: 0,
            slow_epoch: 0,
            allow,
            cfg,
        }
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Takes new thresholds on a reload, keeping what sizes the detector's memory and its
    /// windows (`window_ms`, `slow_window_ms`, sketch width and depth, `max_tracked`,
    /// `sample_capacity`, `replica`, `volume_from`: those need a restart) and every count,
    /// baseline and decision. Returns whether anything changed, and the names of the kept
    /// keys whose new value differed.
    pub fn reconfigure(&mut self, new: Config) -> (bool, Vec<&'static str>) {
        let old = &self.cfg;
        let mut kept = Vec::new();
        for (name, differs) in [
            ("window", new.window_ms != old.window_ms),
            ("slow_window", new.slow_window_ms != old.slow_window_ms),
            ("max_tracked", new.max_tracked.max(16) != old.max_tracked),
            (
                "replica",
                !new.replica.is_empty() && new.replica != old.replica,
            ),
            ("volume_from", new.volume_from != old.volume_from),
        ] {
            if differs {
                kept.push(name);
            }
        }
        let merged = Config {
            replica: old.replica.clone(),
            window_ms: old.window_ms,
            slow_window_ms: old.slow_window_ms,
            sketch_width: old.sketch_width,
            sketch_depth: old.sketch_depth,
            max_tracked: old.max_tracked,
            sample_capacity: old.sample_capacity,
            volume_from: old.volume_from,
            ..new
        };
        let changed = merged != self.cfg || !kept.is_empty();
        self.cfg = merged;
        (changed, kept)
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Takes one event. Never panics, never allocates on the common path (an event for an
    /// untracked key below admission touches only fixed arrays).
    pub fn observe(&mut self, ev: &Event) {
        self.advance(ev.at_ms);
        self.stats.events += 1;
        if ev.denied_by_us {
            self.stats.own_denials += 1;
            return;
        }
        let now = self.now_ms;
        let counts_volume = ev.source == self.cfg.volume_from;
        let is_response = matches!(ev.outcome, super::event::Outcome::Response { .. });
        let failure = ev.is_failure();
        let ip = canonical(ev.ip);
        let ip_hash = hash_ip(ip, 0);
        if counts_volume && ev.identity.is_empty() {
            self.count_new_source(ip_hash);
        }
        for target in targets(ev, ip) {
            let key = target.key();
            let level = key.scope.index();
            if counts_volume {
                let est = self.rate[level].add(key.hash);
                self.samples[level].add(key.hash);
                if !self.entries.contains_key(&key) {
                    let bound = self.rate[level].error_bound();
                    if u64::from(est) >= u64::from(self.cfg.admit_count) + bound {
                        let seeded = est.saturating_sub(bound.min(u64::from(u32::MAX)) as u32);
                        self.admit(key, target, seeded, bound as u32);
                    }
                }
            }
            if failure && level <= 1 {
                let est =
                    self.fail[0][level].add(key.hash) + self.fail[1][level].estimate(key.hash);
                if !self.entries.contains_key(&key) {
                    let bound =
                        self.fail[0][level].error_bound() + self.fail[1][level].error_bound();
                    if u64::from(est) >= u64::from(self.cfg.admit_failures) + bound {
                        self.admit(key, target, 0, 0);
                        if let Some(e) = self.entries.get_mut(&key) {
                            let lower = est.saturating_sub(bound.min(u64::from(u32::MAX)) as u32);
                            e.fail[0] = lower.saturating_sub(1);
                            e.resp[0] = lower.saturating_sub(1);
                        }
                    }
                }
            }
            let Some(e) = self.entries.get_mut(&key) else {
                continue;
            };
            e.last_seen_ms = now;
            if key.scope == Scope::Ip && !ev.identity.is_empty() {
                e.identities.insert(ev.identity.hash());
            }
            if is_response {
                e.roll_slow(self.slow_epoch);
                e.resp[0] = e.resp[0].saturating_add(1);
                if failure {
                    e.fail[0] = e.fail[0].saturating_add(1);
                    e.failing_paths.insert(ev.path.hash());
                }
                let slot = e
                    .sample_paths
                    .iter()
                    .position(|p| p.is_empty() || *p == ev.path);
                if let Some(i) = slot
                    && e.sample_paths[i].is_empty()
                    && (failure || i + 1 < SAMPLE_PATHS)
                {
                    e.sample_paths[i] = ev.path;
                }
            }
            if counts_volume {
                e.cur = e.cur.saturating_add(1);
                if f64::from(e.cur) > self.volumetric_threshold(level)
                    && volumetric_level(key.scope)
                {
                    self.check_volumetric(key);
                }
            }
        }
    }

    /// Advances the clock to `now`, closes finished windows, and returns the decisions made
    /// since the last call.
    pub fn tick(&mut self, now_ms: u64) -> Vec<Decision> {
        self.advance(now_ms);
        std::mem::take(&mut self.pending)
    }

    /// This replica's top keys for the last closed window (for the other replicas).
    pub fn export_top(&self) -> Option<TopKeys> {
        self.export.clone()
    }

    /// Merges another replica's top keys for the last closed window; keys whose merged count
    /// crosses the volumetric threshold are decided (returned by the next `tick`). Stale or
    /// future epochs and this replica's own export are ignored.
    pub fn merge(&mut self, other: &TopKeys) {
        if other.replica == self.cfg.replica || other.epoch + 1 != self.epoch {
            return;
        }
        for rc in other.keys.iter().take(self.cfg.merge.top_n) {
            let Some(mut target) = Target::parse(rc.scope, &rc.value) else {
                continue;
            };
            if matches!(target, Target::Population) {
                continue;
            }
            let key = Key {
                scope: rc.scope,
                hash: rc.hash,
            };
            if let Target::Identity(_) = target {
                // keep the exporter's full-text hash; the label only names it
                if key.hash == 0 {
                    continue;
                }
            } else if target.key() != key {
                continue;
            }
            let epoch = other.epoch;
            let local = self.entries.get(&key).filter(|e| e.last_epoch == epoch);
            let local_exempt = local.is_some_and(|e| self.exempt(key.scope, e, e.last));
            if let Some(e) = self.entries.get(&key) {
                target = e.target;
            }
            let replica = self.cfg.replica.clone();
            if !self.remote.contains_key(&key) && self.remote.len() >= self.cfg.merge.max_keys {
                continue;
            }
            let level = key.scope.index();
            let threshold = self.volumetric_threshold(level);
            let r = self.remote.entry(key).or_insert_with(|| Remote {
                epoch,
                count: local.map_or(0, |e| u64::from(e.last)),
                bound: local.map_or(0, |e| u64::from(e.seeded_bound)),
                exempt: local_exempt,
                replicas: vec![replica],
                decided: false,
            });
            if r.epoch != epoch {
                continue;
            }
            if r.replicas.contains(&other.replica) {
                continue;
            }
            r.count += u64::from(rc.count);
            r.bound += u64::from(rc.error_bound);
            r.exempt |= rc.exempt;
            r.replicas.push(other.replica.clone());
            let (count, bound, exempt, decided) = (r.count, r.bound, r.exempt, r.decided);
            if !decided && !exempt && volumetric_level(key.scope) && count as f64 > threshold {
                let replicas = r.replicas.clone();
                r.decided = true;
                let evidence = Evidence {
                    count,
                    error_bound: bound,
                    threshold,
                    window_ms: self.cfg.window_ms,
                    figures: vec![("p99", self.p99[level].unwrap_or(0.0)), ("merged", 1.0)],
                    sample_paths: self
                        .entries
                        .get(&key)
                        .map(Entry::sample_paths)
                        .unwrap_or_default(),
                    members: Vec::new(),
                    replicas,
                };
                self.offend(key, target, DetectorKind::Volumetric, evidence);
            }
        }
    }

    /// A manual unban: forgets the active decision and suppresses re-detection of the key for
    /// `unban_suppress_ms`. (Its offense count is kept: a repeat after the suppression still
    /// escalates.)
    pub fn unban(&mut self, target: &Target, now_ms: u64) {
        self.advance(now_ms);
        let key = target.key();
        let until = self.now_ms.saturating_add(self.cfg.unban_suppress_ms);
        let h = self.history.entry(key).or_default();
        h.active_until_ms = 0;
        h.flagged = false;
        h.suppressed_until_ms = until;
    }

    /// Why `target` is or isn't flagged: its counts, baseline and the thresholds.
    pub fn explain(&self, target: &Target) -> Explanation {
        let key = target.key();
        let level = key.scope.index().min(LEVELS - 1);
        let e = self.entries.get(&key);
        let h = self.history.get(&key).copied().unwrap_or_default();
        let now = self.now_ms;
        Explanation {
            scope: key.scope,
            value: e.map_or_else(|| target.value(), |e| e.target.value()),
            tracked: e.is_some(),
            sketch_count: if key.scope == Scope::Population {
                0
            } else {
                self.rate[level].estimate(key.hash)
            },
            sketch_error_bound: self.rate[level].error_bound(),
            window_count: e.map_or(0, |e| e.cur),
            last_window_count: e.map_or(0, |e| e.last),
            slow_responses: e.map_or(0, |e| e.resp[0] + e.resp[1]),
            slow_failures: e.map_or(0, |e| e.fail[0] + e.fail[1]),
            failing_paths: e.map_or(0, |e| e.failing_paths.estimate()),
            distinct_identities: e.map_or(0, |e| e.identities.estimate()),
            shared: e.is_some_and(|e| self.is_shared(key.scope, e)),
            baseline_mean: e.map_or(0.0, |e| e.mean),
            baseline_std: e.map_or(0.0, Entry::std),
            baseline_windows: e.map_or(0, |e| e.learned),
            population_p99: self.p99[level],
            volumetric_threshold: self.volumetric_threshold(level),
            self_anomaly_z: self.cfg.self_anomaly.z,
            failure_min: self.cfg.failure_ratio.min_failures,
            failure_ratio: self.cfg.failure_ratio.ratio,
            path_spread_min: self.cfg.path_spread.min_paths,
            offenses: h.offenses,
            active_until_ms: (h.active_until_ms > now).then_some(h.active_until_ms),
            suppressed_until_ms: (h.suppressed_until_ms > now).then_some(h.suppressed_until_ms),
            allowlisted: (self.allow)(target),
        }
    }

    /// Bytes the module holds now (sketches, samples, filters, maps at their capacity).
    pub fn memory_bytes(&self) -> usize {
        let cms: usize = self
            .rate
            .iter()
            .chain(self.fail.iter().flatten())
            .map(CountMin::memory_bytes)
            .sum();
        let samples: usize = self.samples.iter().map(RateSample::memory_bytes).sum();
        let seen = self.seen.iter().map(|s| s.capacity() * 8).sum::<usize>();
        let slot = |k: usize, v: usize| k + v + 1;
        let maps = self.entries.capacity() * slot(16, std::mem::size_of::<Entry>())
            + self.history.capacity() * slot(16, std::mem::size_of::<History>())
            + self.prefixes.capacity()
                * (slot(16, std::mem::size_of::<PrefixOffenders>()) + 8 * 64)
            + self.remote.capacity() * (slot(16, std::mem::size_of::<Remote>()) + 4 * 32)
            + self.pending.capacity() * (std::mem::size_of::<Decision>() + 256);
        cms + samples + seen + maps + std::mem::size_of::<Self>()
    }

    /// The most [`Detector::memory_bytes`] can reach with this config: sketches, samples and
    /// filters are fixed; exact state, history, prefixes and remote keys are capped.
    pub fn memory_bound(&self) -> usize {
        let cms: usize = self
            .rate
            .iter()
            .chain(self.fail.iter().flatten())
            .map(CountMin::memory_bytes)
            .sum();
        let samples: usize = self.samples.iter().map(RateSample::memory_bytes).sum();
        let seen = 2 * SEEN_BITS / 8;
        // hashbrown keeps at most 8/7 × capacity buckets, rounded to a power of two.
        let buckets = |n: usize| (n * 8 / 7 + 1).next_power_of_two();
        let slot = |k: usize, v: usize| k + v + 1;
        let c = &self.cfg;
        let decisions = c.max_decisions_per_minute as usize + c.prefix.max_prefixes + 2;
        cms + samples
            + seen
            + buckets(c.max_tracked) * slot(16, std::mem::size_of::<Entry>())
            + buckets(c.ttl.max_history) * slot(16, std::mem::size_of::<History>())
            + buckets(c.prefix.max_prefixes)
                * (slot(16, std::mem::size_of::<PrefixOffenders>()) + 8 * 64)
            + buckets(c.merge.max_keys) * (slot(16, std::mem::size_of::<Remote>()) + 4 * 32)
            + decisions * (std::mem::size_of::<Decision>() + 256)
            + std::mem::size_of::<Self>()
    }

    /// Keys with exact state now.
    pub fn tracked(&self) -> usize {
        self.entries.len()
    }

    // ---- time ----

    fn advance(&mut self, at_ms: u64) {
        self.start_ms.get_or_insert(at_ms);
        if at_ms <= self.now_ms && self.epoch != 0 {
            return; // time never goes backwards; late events count in the current window
        }
        self.now_ms = self.now_ms.max(at_ms);
        let target = self.now_ms / self.cfg.window_ms;
        if self.epoch == 0 {
            self.epoch = target.max(1);
            self.slow_epoch = self.now_ms / self.cfg.slow_window_ms;
            self.minute = self.now_ms / 60_000;
            self.seen_epoch = self.now_ms / SEEN_ROTATE_MS;
            return;
        }
        let mut steps = 0;
        while self.epoch < target {
            self.close_window();
            self.epoch += 1;
            steps += 1;
            if steps >= 3 && self.epoch < target {
                // a long gap: nothing happened in the skipped windows
                self.epoch = target;
            }
        }
        let slow = self.now_ms / self.cfg.slow_window_ms;
        if slow != self.slow_epoch {
            let skipped = slow > self.slow_epoch + 1;
            self.fail.swap(0, 1);
            for cm in &mut self.fail[0] {
                cm.clear();
            }
            if skipped {
                for cm in &mut self.fail[1] {
                    cm.clear();
                }
            }
            self.slow_epoch = slow;
        }
        let minute = self.now_ms / 60_000;
        if minute != self.minute {
            self.minute = minute;
            self.decisions_this_minute = 0;
            self.capped_this_minute = 0;
            self.prune();
        }
        let seen_epoch = self.now_ms / SEEN_ROTATE_MS;
        if seen_epoch != self.seen_epoch {
            self.seen.swap(0, 1);
            self.seen[0].fill(0);
            self.seen_epoch = seen_epoch;
        }
    }

    fn warmup_end(&self) -> u64 {
        self.start_ms
            .map_or(0, |s| s.saturating_add(self.cfg.warmup_ms))
    }

    fn in_warmup(&self) -> bool {
        self.start_ms
            .is_none_or(|s| self.now_ms < s.saturating_add(self.cfg.warmup_ms))
    }

    /// Closes window `self.epoch`: per-window detectors, baselines, population, export.
    fn close_window(&mut self) {
        let epoch = self.epoch;
        // population p99 per level, smoothed; it does not learn during a population surge
        let surge = self.population_until_ms > self.now_ms;
        for level in 0..LEVELS {
            if let Some(q) = self.samples[level].quantile(0.99)
                && !surge
            {
                self.p99[level] = Some(match self.p99[level] {
                    Some(p) => p + 0.05 * (q - p),
                    None => q,
                });
            }
            self.samples[level].reset();
            self.rate[level].clear();
        }
        self.population_check();
        let warm = self.in_warmup();
        let sa = self.cfg.self_anomaly.clone();
        let mut offenses: Vec<(Key, DetectorKind, Evidence)> = Vec::new();
        let mut export: Vec<RemoteCount> = Vec::new();
        let slow_epoch = self.slow_epoch;
        let now = self.now_ms;
        let fr = self.cfg.failure_ratio.clone();
        let ps = self.cfg.path_spread.clone();
        for (key, e) in &mut self.entries {
            let count = e.cur;
            e.roll_slow(slow_epoch);
            let flagged = self
                .history
                .get(key)
                .is_some_and(|h| h.flagged && h.active_until_ms > now);
            // self-anomaly: z of this window against the baseline *before* it learns it
            let x = f64::from(count).ln_1p();
            let std = e.std().max(sa.min_std);
            let z = (x - e.mean) / std;
            if e.learned >= sa.warm_windows && z >= sa.z && f64::from(count) >= sa.floor && !flagged
            {
                offenses.push((
                    *key,
                    DetectorKind::SelfAnomaly,
                    Evidence {
                        count: u64::from(count),
                        error_bound: 0,
                        threshold: (e.mean + sa.z * std).exp() - 1.0,
                        window_ms: 0,
                        figures: vec![
                            ("z", z),
                            ("baseline_mean_ln", e.mean),
                            ("baseline_std_ln", e.std()),
                        ],
                        sample_paths: e.sample_paths(),
                        members: Vec::new(),
                        replicas: Vec::new(),
                    },
                ));
            } else if !flagged || warm {
                // baselines never learn while the key is flagged (after warm-up)
                if e.learned == 0 {
                    e.mean = x;
                } else {
                    let d = x - e.mean;
                    e.mean += sa.alpha * d;
                    e.var = (1.0 - sa.alpha) * (e.var + sa.alpha * d * d);
                }
                e.learned = e.learned.saturating_add(1);
            }
            // failure ratio and path spread over the slow window
            let (resp, fail) = (e.resp[0] + e.resp[1], e.fail[0] + e.fail[1]);
            if key.scope.index() <= 1 && !flagged {
                let ratio = f64::from(fail) / f64::from(resp.max(1));
                if fail >= fr.min_failures && ratio >= fr.ratio {
                    offenses.push((
                        *key,
                        DetectorKind::FailureRatio,
                        Evidence {
                            count: u64::from(fail),
                            error_bound: 0,
                            threshold: f64::from(fr.min_failures),
                            window_ms: 0,
                            figures: vec![
                                ("ratio", ratio),
                                ("ratio_threshold", fr.ratio),
                                ("responses", f64::from(resp)),
                            ],
                            sample_paths: e.sample_paths(),
                            members: Vec::new(),
                            replicas: Vec::new(),
                        },
                    ));
                }
                let paths = e.failing_paths.estimate();
                if paths >= ps.min_paths && ratio >= ps.min_failure_ratio {
                    offenses.push((
                        *key,
                        DetectorKind::PathSpread,
                        Evidence {
                            count: paths,
                            error_bound: (paths / 20).max(1),
                            threshold: ps.min_paths as f64,
                            window_ms: 0,
                            figures: vec![
                                ("failures", f64::from(fail)),
                                ("failure_ratio", ratio),
                                ("ratio_threshold", ps.min_failure_ratio),
                            ],
                            sample_paths: e.sample_paths(),
                            members: Vec::new(),
                            replicas: Vec::new(),
                        },
                    ));
                }
            }
            if count >= self.cfg.merge.min_count {
                export.push(RemoteCount {
                    scope: key.scope,
                    hash: key.hash,
                    value: e.target.value(),
                    count,
                    error_bound: e.seeded_bound,
                    exempt: false,
                });
            }
            e.last = count;
            e.last_epoch = epoch;
            e.cur = 0;
            e.seeded_bound = 0;
        }
        // exempt flags need &self; the export is small
        for rc in &mut export {
            let key = Key {
                scope: rc.scope,
                hash: rc.hash,
            };
            if let Some(e) = self.entries.get(&key) {
                rc.exempt = self.exempt(key.scope, e, e.last);
            }
        }
        export.sort_by(|a, b| b.count.cmp(&a.count).then(a.hash.cmp(&b.hash)));
        export.truncate(self.cfg.merge.top_n);
        self.export = Some(TopKeys {
            replica: self.cfg.replica.clone(),
            epoch,
            keys: export,
        });
        self.remote.retain(|_, r| r.epoch > epoch);
        let window_ms = self.cfg.window_ms;
        let slow_ms = self.cfg.slow_window_ms;
        for (key, kind, mut ev) in offenses {
            ev.window_ms = if kind == DetectorKind::SelfAnomaly {
                window_ms
            } else {
                slow_ms
            };
            if let Some(target) = self.entries.get(&key).map(|e| e.target) {
                self.offend(key, target, kind, ev);
            }
        }
        // evict idle keys without a decision or suppression
        let idle = self.cfg.idle_evict_ms;
        if epoch.is_multiple_of(16) {
            let history = &self.history;
            let before = self.entries.len();
            self.entries.retain(|k, e| {
                now.saturating_sub(e.last_seen_ms) < idle
                    || history
                        .get(k)
                        .is_some_and(|h| h.active_until_ms > now || h.suppressed_until_ms > now)
            });
            self.stats.evicted += (before - self.entries.len()) as u64;
        }
    }

    fn population_check(&mut self) {
        let new = self.new_sources as f64;
        self.new_sources = 0;
        let pop = self.cfg.population.clone();
        let now = self.now_ms;
        let baseline = self.new_baseline;
        let surging =
            baseline.is_some_and(|b| new >= pop.floor && new >= pop.surge_multiple * b.max(1.0));
        if surging && self.population_until_ms <= now {
            self.population_until_ms = now + pop.ttl_ms;
            let evidence = Evidence {
                count: new as u64,
                error_bound: 0,
                threshold: pop.floor.max(pop.surge_multiple * baseline.unwrap_or(0.0)),
                window_ms: self.cfg.window_ms,
                figures: vec![("baseline_new_sources", baseline.unwrap_or(0.0))],
                sample_paths: Vec::new(),
                members: Vec::new(),
                replicas: vec![self.cfg.replica.clone()],
            };
            self.population_decision(evidence);
        } else if !surging && self.population_until_ms <= now {
            self.new_baseline = Some(match baseline {
                Some(b) => b + 0.02 * (new - b),
                None => new,
            });
        }
    }

    fn population_decision(&mut self, evidence: Evidence) {
        let dry = self.cfg.dry_run || self.cfg.population.dry_run || self.in_warmup();
        for action in [Action::Throttle, Action::Alert] {
            self.stats.decisions += 1;
            self.pending.push(Decision {
                scope: Scope::Population,
                value: Target::Population.value(),
                target: Target::Population,
                action,
                ttl_ms: self.cfg.population.ttl_ms,
                reason: DetectorKind::PopulationShift.reason(),
                detector: DetectorKind::PopulationShift,
                evidence: evidence.clone(),
                dry_run: dry,
                at_ms: self.now_ms,
                replica: self.cfg.replica.clone(),
                offense: 1,
            });
        }
    }

    fn count_new_source(&mut self, ip_hash: u64) {
        let bit = (ip_hash.wrapping_mul(0xC2B2_AE3D_27D4_EB4F) >> 17) as usize % SEEN_BITS;
        let (w, b) = (bit / 64, 1u64 << (bit % 64));
        let known = self.seen[0][w] & b != 0 || self.seen[1][w] & b != 0;
        if !known {
            self.seen[0][w] |= b;
            self.new_sources += 1;
        } else if self.seen[0][w] & b == 0 {
            self.seen[0][w] |= b;
        }
    }

    // ---- exact state ----

    fn admit(&mut self, key: Key, target: Target, seeded: u32, bound: u32) {
        if self.entries.len() >= self.cfg.max_tracked {
            // incumbents win: a flood of new keys cannot evict tracked ones
            self.stats.admission_refused += 1;
            return;
        }
        let mut e = Entry::new(target, self.epoch, self.slow_epoch, self.now_ms);
        // the event being counted adds one after admission
        e.cur = seeded.saturating_sub(1);
        e.seeded_bound = bound;
        self.entries.insert(key, e);
        self.stats.admitted += 1;
    }

    fn volumetric_threshold(&self, level: usize) -> f64 {
        let v = &self.cfg.volumetric;
        let p99 = self.p99.get(level).copied().flatten().unwrap_or(0.0);
        v.floor.max(v.p99_multiple * p99)
    }

    fn is_shared(&self, scope: Scope, e: &Entry) -> bool {
        scope == Scope::Ip && e.identities.estimate() >= self.cfg.shared_min_identities
    }

    /// A shared address, or a key with a warm baseline for which `count` is normal.
    fn exempt(&self, scope: Scope, e: &Entry, count: u32) -> bool {
        if self.is_shared(scope, e) {
            return true;
        }
        let sa = &self.cfg.self_anomaly;
        if e.learned >= sa.warm_windows {
            let z = (f64::from(count).ln_1p() - e.mean) / e.std().max(sa.min_std);
            return z < sa.z;
        }
        false
    }

    fn check_volumetric(&mut self, key: Key) {
        let now = self.now_ms;
        if self
            .history
            .get(&key)
            .is_some_and(|h| h.active_until_ms > now)
        {
            return;
        }
        let Some(e) = self.entries.get(&key) else {
            return;
        };
        if self.exempt(key.scope, e, e.cur) {
            return;
        }
        let level = key.scope.index();
        let evidence = Evidence {
            count: u64::from(e.cur),
            error_bound: u64::from(e.seeded_bound),
            threshold: self.volumetric_threshold(level),
            window_ms: self.cfg.window_ms,
            figures: vec![
                ("p99", self.p99[level].unwrap_or(0.0)),
                ("p99_multiple", self.cfg.volumetric.p99_multiple),
            ],
            sample_paths: e.sample_paths(),
            members: Vec::new(),
            replicas: vec![self.cfg.replica.clone()],
        };
        let target = e.target;
        self.offend(key, target, DetectorKind::Volumetric, evidence);
    }

    // ---- decisions ----

    fn offend(&mut self, key: Key, target: Target, kind: DetectorKind, mut evidence: Evidence) {
        let now = self.now_ms;
        let h = self.history.get(&key).copied().unwrap_or_default();
        if h.active_until_ms > now {
            return;
        }
        if h.suppressed_until_ms > now {
            self.stats.suppressed += 1;
            return;
        }
        if (self.allow)(&target) {
            self.stats.allowlisted += 1;
            return;
        }
        if let Some(prefix) = parent_prefix(&target)
            && self
                .history
                .get(&prefix.key())
                .is_some_and(|h| h.active_until_ms > now)
        {
            return; // its prefix is already decided
        }
        let is_prefix = key.scope.is_prefix() && kind == DetectorKind::PrefixEscalation;
        if !is_prefix && self.decisions_this_minute >= self.cfg.max_decisions_per_minute {
            self.stats.capped += 1;
            self.capped_this_minute += 1;
            self.note_offender(&target);
            if self.capped_this_minute == self.cfg.max_decisions_per_minute
                && self.population_until_ms <= now
            {
                self.population_until_ms = now + self.cfg.population.ttl_ms;
                let ev = Evidence {
                    count: u64::from(self.capped_this_minute),
                    error_bound: 0,
                    threshold: f64::from(self.cfg.max_decisions_per_minute),
                    window_ms: 60_000,
                    figures: vec![("capped_offenders", f64::from(self.capped_this_minute))],
                    sample_paths: Vec::new(),
                    members: Vec::new(),
                    replicas: vec![self.cfg.replica.clone()],
                };
                self.population_decision(ev);
            }
            return;
        }
        if !self.history.contains_key(&key) && self.history.len() >= self.cfg.ttl.max_history {
            return; // history is bounded: a new key is not decided while it is full
        }
        let offense =
            if now.saturating_sub(h.last_offense_ms) < self.cfg.ttl.memory_ms && h.offenses > 0 {
                h.offenses.saturating_add(1)
            } else {
                1
            };
        let ttl_ms = self.ttl(key, offense);
        let action = match key.scope {
            Scope::Identity if offense < 2 => Action::Throttle,
            _ => Action::Deny,
        };
        let warm = self.in_warmup();
        let dry = self.cfg.dry_run || warm || self.detector_dry(kind);
        if evidence.replicas.is_empty() {
            evidence.replicas.push(self.cfg.replica.clone());
        }
        self.history.insert(
            key,
            History {
                offenses: offense,
                last_offense_ms: now,
                // a warm-up (dry-run) decision lapses when warm-up ends, so the key can be
                // decided for real right after
                active_until_ms: if warm {
                    now.saturating_add(ttl_ms).min(self.warmup_end())
                } else {
                    now.saturating_add(ttl_ms)
                },
                flagged: !warm,
                suppressed_until_ms: 0,
            },
        );
        if !is_prefix {
            self.decisions_this_minute += 1;
        }
        self.stats.decisions += 1;
        self.pending.push(Decision {
            scope: key.scope,
            value: target.value(),
            target,
            action,
            ttl_ms,
            reason: kind.reason(),
            detector: kind,
            evidence,
            dry_run: dry,
            at_ms: now,
            replica: self.cfg.replica.clone(),
            offense,
        });
        self.note_offender(&target);
    }

    fn detector_dry(&self, kind: DetectorKind) -> bool {
        let c = &self.cfg;
        match kind {
            DetectorKind::Volumetric => c.volumetric.dry_run,
            DetectorKind::SelfAnomaly => c.self_anomaly.dry_run,
            DetectorKind::FailureRatio => c.failure_ratio.dry_run,
            DetectorKind::PathSpread => c.path_spread.dry_run,
            DetectorKind::PrefixEscalation => c.prefix.dry_run,
            DetectorKind::PopulationShift => c.population.dry_run,
        }
    }

    /// 10 min × 2^(offense−1), capped, stretched by a seeded per-key jitter.
    fn ttl(&self, key: Key, offense: u32) -> u64 {
        let t = &self.cfg.ttl;
        let base = t
            .base_ms
            .saturating_mul(1u64 << offense.saturating_sub(1).min(40))
            .min(t.cap_ms);
        let mut seed_bytes = [0u8; 12];
        seed_bytes[..8].copy_from_slice(&key.hash.to_le_bytes());
        seed_bytes[8..].copy_from_slice(&offense.to_le_bytes());
        let u = (xxh3_64_with_seed(&seed_bytes, t.seed) >> 11) as f64 / (1u64 << 53) as f64;
        base + (base as f64 * t.jitter.clamp(0.0, 1.0) * u) as u64
    }

    /// Records an offending IP (or /64) against its prefix; enough distinct offenders → the
    /// prefix is decided.
    fn note_offender(&mut self, target: &Target) {
        let Some(prefix) = parent_prefix(target) else {
            return;
        };
        let key = prefix.key();
        let now = self.now_ms;
        let pe = self.cfg.prefix.clone();
        if !self.prefixes.contains_key(&key) && self.prefixes.len() >= pe.max_prefixes {
            return;
        }
        let member = target.key().hash;
        let p = self.prefixes.entry(key).or_insert_with(|| PrefixOffenders {
            members: Vec::new(),
            last_ms: now,
        });
        if now.saturating_sub(p.last_ms) > pe.memory_ms {
            p.members.clear();
        }
        p.last_ms = now;
        if p.members.iter().all(|(h, _)| *h != member) && p.members.len() < 64 {
            p.members.push((member, target.value()));
        }
        if p.members.len() >= pe.min_offenders {
            let members: Vec<String> = p.members.iter().map(|(_, v)| v.clone()).collect();
            let evidence = Evidence {
                count: members.len() as u64,
                error_bound: 0,
                threshold: pe.min_offenders as f64,
                window_ms: pe.memory_ms,
                figures: Vec::new(),
                sample_paths: Vec::new(),
                members,
                replicas: vec![self.cfg.replica.clone()],
            };
            self.offend(key, prefix, DetectorKind::PrefixEscalation, evidence);
        }
    }

    fn prune(&mut self) {
        let now = self.now_ms;
        let memory = self.cfg.prefix.memory_ms;
        self.prefixes
            .retain(|_, p| now.saturating_sub(p.last_ms) <= memory);
        let ttl_memory = self.cfg.ttl.memory_ms;
        self.history.retain(|_, h| {
            h.active_until_ms > now
                || h.suppressed_until_ms > now
                || now.saturating_sub(h.last_offense_ms) < ttl_memory
        });
    }
}

fn volumetric_level(scope: Scope) -> bool {
    matches!(scope, Scope::Identity | Scope::Ip | Scope::Ipv6Slash64)
}

/// The levels an event counts at: identity (if any), IP, and its prefixes.
fn targets(ev: &Event, ip: IpAddr) -> impl Iterator<Item = Target> {
    let identity = (!ev.identity.is_empty()).then_some(Target::Identity(ev.identity));
    let (a, b) = match ip {
        IpAddr::V4(_) => (Some(Target::Prefix(mask(ip, 24), 24)), None),
        IpAddr::V6(_) => (
            Some(Target::Prefix(mask(ip, 64), 64)),
            Some(Target::Prefix(mask(ip, 48), 48)),
        ),
    };
    identity
        .into_iter()
        .chain(std::iter::once(Target::Ip(ip)))
        .chain(a)
        .chain(b)
}

/// The prefix an offender escalates into: IP → /24 or /64; /64 → /48.
fn parent_prefix(target: &Target) -> Option<Target> {
    match *target {
        Target::Ip(ip @ IpAddr::V4(_)) => Some(Target::Prefix(mask(ip, 24), 24)),
        Target::Ip(ip @ IpAddr::V6(_)) => Some(Target::Prefix(mask(ip, 64), 64)),
        Target::Prefix(ip @ IpAddr::V6(_), 64) => Some(Target::Prefix(mask(ip, 48), 48)),
        _ => None,
    }
}
