//! Trust: a score in [0, 1] per caller, learned from its own history, that adaptive limits map
//! to a factor on a rule's limit — and the table the request path reads it from.
//!
//! The score (documented in the README, "Adaptive limits"):
//!
//! ```text
//! n, bad   requests and bad requests (limited, blocked, or answered 401/403/404), both
//!          decayed with half-life `half_life_ms` (no traffic: both shrink, trust drifts back)
//! h        = n / (n + history_requests)                  how established the caller is
//! b        = bad / n                                      its share of bad requests
//! e        = max(clamp((z − erratic_z) / erratic_z, 0, 1), 0.95 · e of the last window), z
//!            the window's ln(1 + requests) deviation from the caller's own baseline (after
//!            3 windows; an erratic window is learned at a tenth of the usual weight)
//! q        = clamp(1 − 2·min(1, b / bad_share) − 2·e, −1, 1)
//! trust    = 0.5 + 0.5 · h · q          (a new caller: 0.5; a throttle decision: 0)
//! ```
//!
//! A rule's `adaptive: {min_factor, initial_factor, max_factor}` maps trust 0 → min, 0.5 →
//! initial, 1 → max, linearly between ([`Adaptive::factor`]). Nothing here ever exempts a
//! caller from anything: the factor only scales limits, a deny or a manual block is decided
//! elsewhere before any limit, and trust decays without traffic.
//!
//! Sans-IO like the detector: [`TrustBook`] takes events and time and returns the changes to
//! publish; the runtime writes them to a [`TrustTable`] (or to Redis, whose values every
//! replica then writes to its table), which the engine reads on the request path.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use foldhash::fast::FixedState;

use super::decision::{canonical, hash_ip};
use super::event::{Event, Label, Outcome, Source};

/// Trust as stored: `trust × 65535`.
pub type TrustQ = u16;
/// Trust 0.5: a caller with no history.
pub const NEUTRAL: TrustQ = 32_768;

/// The learning and table settings (`anomaly.trust` in the settings file).
#[derive(Clone, Debug, PartialEq)]
pub struct TrustConfig {
    /// Requests and bad requests lose half their weight after this long.
    pub half_life_ms: u64,
    /// Decayed requests at which a caller's history counts half (`h` = 0.5).
    pub history_requests: f64,
    /// Share of bad requests that takes quality to its lowest.
    pub bad_share: f64,
    /// Length of a window of the caller's own rate baseline.
    pub window_ms: u64,
    /// Deviations (in σ of ln(1 + requests per window)) below which a window is not erratic.
    pub erratic_z: f64,
    /// Floor of the baseline's σ, so a perfectly steady caller is not erratic at +1.
    pub min_std: f64,
    /// Callers with state; new ones beyond it keep the initial factor (counted).
    pub max_identities: usize,
    /// Slots of the request path's table (a power of two; 8 bytes each).
    pub table_slots: usize,
}

impl Default for TrustConfig {
    fn default() -> Self {
        TrustConfig {
            half_life_ms: 3_600_000,
            history_requests: 1000.0,
            bad_share: 0.1,
            window_ms: 10_000,
            erratic_z: 3.0,
            min_std: 0.25,
            max_identities: 100_000,
            table_slots: 1 << 18,
        }
    }
}

/// A rule's adaptive range: trust 0 → `min_factor`, 0.5 (new) → `initial_factor`, 1 →
/// `max_factor`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Adaptive {
    pub min_factor: f64,
    pub initial_factor: f64,
    pub max_factor: f64,
}

impl Adaptive {
    /// The factor for `trust` (`None`: a caller the table doesn't hold → the initial factor).
    #[inline]
    pub fn factor(&self, trust: Option<TrustQ>) -> f64 {
        let Some(q) = trust else {
            return self.initial_factor;
        };
        let t = f64::from(q) / 65535.0;
        if t >= 0.5 {
            self.initial_factor + (t - 0.5) * 2.0 * (self.max_factor - self.initial_factor)
        } else {
            self.initial_factor - (0.5 - t) * 2.0 * (self.initial_factor - self.min_factor)
        }
    }

    /// `base` scaled by `factor`, rounded, at least 1 unless `base` is 0 (deny all stays so).
    #[inline]
    pub fn scale(base: u32, factor: f64) -> u32 {
        if base == 0 {
            return 0;
        }
        ((f64::from(base) * factor)
            .round()
            .clamp(1.0, f64::from(u32::MAX))) as u32
    }
}

/// The key a caller's trust lives under: its identity when it has one, else its address.
/// The request path computes it from descriptor entries, the detector from events: both
/// must agree, hence one function each side calls.
#[inline]
pub fn subject(identity: &str, ip: Option<IpAddr>) -> Option<u64> {
    if !identity.is_empty() {
        return Some(Label::hash_of(identity));
    }
    ip.map(|ip| hash_ip(canonical(ip), 0))
}

/// What the book knows of one caller.
#[derive(Clone, Copy, Debug, Default)]
struct State {
    n: f64,
    bad: f64,
    last_ms: u64,
    window: u64,
    cur: u32,
    mean: f64,
    var: f64,
    learned: u32,
    erratic: f64,
    throttled_until_ms: u64,
    /// What was last published (`NEUTRAL` = nothing in the table).
    published: TrustQ,
    dirty: bool,
    /// The last publish failed: publish whatever the score is.
    republish: bool,
}

/// Why a caller's trust is what it is (`/v1/anomaly/explain`).
#[derive(Clone, Debug, PartialEq)]
pub struct TrustExplanation {
    pub known: bool,
    pub trust: f64,
    pub requests: f64,
    pub bad_requests: f64,
    pub history: f64,
    pub bad_share: f64,
    pub erratic: f64,
    pub baseline_windows: u32,
    pub throttled_until_ms: Option<u64>,
}

/// Counters for metrics and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrustStats {
    pub identities: usize,
    /// New callers not given state because the book was full.
    pub refused: u64,
    pub published: u64,
}

/// Per-caller trust state, bounded by `max_identities`.
pub struct TrustBook {
    cfg: TrustConfig,
    volume_from: Source,
    states: HashMap<u64, State, FixedState>,
    dirty: Vec<u64>,
    last_sweep_ms: u64,
    stats: TrustStats,
}

/// How much of its erratic score a caller keeps per calm window (a spike fades in ~45).
const ERRATIC_DECAY: f64 = 0.95;
/// Publish a change only when trust moved by more than this (in `TrustQ` units, ~0.4 %).
const PUBLISH_STEP: u32 = 256;
/// Every state is re-scored (decay without traffic) and forgotten ones dropped this often.
const SWEEP_MS: u64 = 60_000;

impl TrustBook {
    /// `volume_from` as in the detector: only one event source counts requests.
    pub fn new(cfg: TrustConfig, volume_from: Source) -> TrustBook {
        TrustBook {
            cfg,
            volume_from,
            states: HashMap::with_hasher(FixedState::with_seed(0x7275)),
            dirty: Vec::new(),
            last_sweep_ms: 0,
            stats: TrustStats::default(),
        }
    }

    pub fn config(&self) -> &TrustConfig {
        &self.cfg
    }

    /// New settings on a reload; `table_slots` (the request path's table) needs a restart.
    pub fn reconfigure(&mut self, new: TrustConfig) -> bool {
        let merged = TrustConfig {
            table_slots: self.cfg.table_slots,
            ..new
        };
        let changed = merged != self.cfg;
        self.cfg = merged;
        changed
    }

    pub fn stats(&self) -> TrustStats {
        TrustStats {
            identities: self.states.len(),
            ..self.stats
        }
    }

    /// Takes one event (its `at_ms` is now).
    pub fn observe(&mut self, ev: &Event) {
        let ip = Some(ev.ip);
        let Some(key) = subject_of_label(&ev.identity, ip) else {
            return;
        };
        let (request, bad) = match ev.outcome {
            Outcome::Request { limited, blocked } => {
                (ev.source == self.volume_from, limited || blocked)
            }
            Outcome::Response { .. } => (false, ev.is_failure()),
        };
        if !request && !bad {
            return;
        }
        let Some(st) = self.state(key, ev.at_ms) else {
            return;
        };
        if request {
            st.n += 1.0;
            st.cur = st.cur.saturating_add(1);
        }
        if bad {
            st.bad += 1.0;
        }
        if !st.dirty {
            st.dirty = true;
            self.dirty.push(key);
        }
    }

    /// A `throttle` decision on `key` until `until_ms`: trust 0 (the rule's min_factor).
    pub fn throttle(&mut self, key: u64, now_ms: u64, until_ms: u64) {
        let Some(st) = self.state(key, now_ms) else {
            return;
        };
        st.throttled_until_ms = st.throttled_until_ms.max(until_ms);
        if !st.dirty {
            st.dirty = true;
            self.dirty.push(key);
        }
    }

    /// Publishes `key` again at the next tick (its last publish failed).
    pub fn republish(&mut self, key: u64) {
        if let Some(st) = self.states.get_mut(&key) {
            st.republish = true;
            if !st.dirty {
                st.dirty = true;
                self.dirty.push(key);
            }
        }
    }

    /// Ends a throttle early (a manual unban).
    pub fn unthrottle(&mut self, key: u64) {
        if let Some(st) = self.states.get_mut(&key) {
            st.throttled_until_ms = 0;
            if !st.dirty {
                st.dirty = true;
                self.dirty.push(key);
            }
        }
    }

    /// Re-scores what changed since the last call (and, once a minute, everything: decay
    /// and expired throttles) and returns the changes to publish: `(key, Some(trust),
    /// requests)`, or `(key, None, requests)` when the caller is back to neutral and leaves
    /// the table. `requests` (decayed) is the evidence behind the value.
    pub fn tick(&mut self, now_ms: u64) -> Vec<(u64, Option<TrustQ>, f64)> {
        let sweep = now_ms >= self.last_sweep_ms + SWEEP_MS;
        let keys: Vec<u64> = if sweep {
            self.last_sweep_ms = now_ms;
            self.dirty.clear();
            self.states.keys().copied().collect()
        } else {
            std::mem::take(&mut self.dirty)
        };
        let mut out = Vec::new();
        for key in keys {
            let cfg = &self.cfg;
            let Some(st) = self.states.get_mut(&key) else {
                continue;
            };
            st.dirty = false;
            roll(cfg, st, now_ms);
            let q = score(cfg, st, now_ms);
            let q = if near_neutral(q) { NEUTRAL } else { q };
            if u32::from(q.abs_diff(st.published)) >= PUBLISH_STEP
                || (q == NEUTRAL) != (st.published == NEUTRAL)
                || std::mem::take(&mut st.republish)
            {
                st.published = q;
                out.push((key, (q != NEUTRAL).then_some(q), st.n));
            }
            if sweep && st.n < 0.5 && st.throttled_until_ms <= now_ms && st.published == NEUTRAL {
                self.states.remove(&key);
            }
        }
        self.stats.published += out.len() as u64;
        out
    }

    /// Why `key` has the trust it has now.
    pub fn explain(&self, key: u64, now_ms: u64) -> TrustExplanation {
        let Some(mut st) = self.states.get(&key).copied() else {
            return TrustExplanation {
                known: false,
                trust: 0.5,
                requests: 0.0,
                bad_requests: 0.0,
                history: 0.0,
                bad_share: 0.0,
                erratic: 0.0,
                baseline_windows: 0,
                throttled_until_ms: None,
            };
        };
        decay(&self.cfg, &mut st, now_ms);
        TrustExplanation {
            known: true,
            trust: f64::from(score(&self.cfg, &st, now_ms)) / 65535.0,
            requests: st.n,
            bad_requests: st.bad,
            history: history(&self.cfg, &st),
            bad_share: if st.n > 0.0 { st.bad / st.n } else { 0.0 },
            erratic: st.erratic,
            baseline_windows: st.learned,
            throttled_until_ms: (st.throttled_until_ms > now_ms).then_some(st.throttled_until_ms),
        }
    }

    /// The state of `key` brought up to `now` (decayed, windows closed), created if there
    /// is room.
    fn state(&mut self, key: u64, now_ms: u64) -> Option<&mut State> {
        if !self.states.contains_key(&key) && self.states.len() >= self.cfg.max_identities {
            self.stats.refused += 1;
            return None;
        }
        let cfg = &self.cfg;
        let st = self.states.entry(key).or_insert_with(|| State {
            last_ms: now_ms,
            window: now_ms / cfg.window_ms.max(1),
            published: NEUTRAL,
            ..State::default()
        });
        roll(cfg, st, now_ms);
        Some(st)
    }
}

fn subject_of_label(identity: &Label, ip: Option<IpAddr>) -> Option<u64> {
    if identity.is_empty() {
        ip.map(|ip| hash_ip(canonical(ip), 0))
    } else {
        Some(identity.hash())
    }
}

fn near_neutral(q: TrustQ) -> bool {
    u32::from(q.abs_diff(NEUTRAL)) < PUBLISH_STEP
}

fn decay(cfg: &TrustConfig, st: &mut State, now_ms: u64) {
    let dt = now_ms.saturating_sub(st.last_ms);
    if dt > 0 {
        let f = 0.5f64.powf(dt as f64 / cfg.half_life_ms.max(1) as f64);
        st.n *= f;
        st.bad *= f;
        st.last_ms = now_ms;
    }
}

/// Decays the counts and closes the rate window if `now` is past it: the closed window's
/// deviation from the baseline feeds `erratic`, then (unless throttled: no poisoning) the
/// baseline learns it. Idle windows are not learned: a caller that pauses is not erratic.
fn roll(cfg: &TrustConfig, st: &mut State, now_ms: u64) {
    decay(cfg, st, now_ms);
    let window = now_ms / cfg.window_ms.max(1);
    if window == st.window {
        return;
    }
    st.window = window;
    let c = std::mem::take(&mut st.cur);
    if c == 0 {
        return;
    }
    let x = f64::from(c).ln_1p();
    let mut slow = 1.0;
    if st.learned >= 3 {
        let z = (x - st.mean) / st.var.sqrt().max(cfg.min_std);
        let e = ((z - cfg.erratic_z) / cfg.erratic_z).clamp(0.0, 1.0);
        st.erratic = e.max(ERRATIC_DECAY * st.erratic);
        if e > 0.0 {
            // An erratic window teaches the baseline a tenth as much: spikes stay spikes,
            // while a caller that really grew is learned within a few dozen windows.
            slow = 0.1;
        }
    }
    if st.throttled_until_ms > now_ms {
        return;
    }
    if st.learned == 0 {
        st.mean = x;
        st.var = 0.0;
    } else {
        let alpha = slow * (1.0 / f64::from(st.learned + 1)).max(0.1);
        let d = x - st.mean;
        st.mean += alpha * d;
        st.var = (1.0 - alpha) * (st.var + alpha * d * d);
    }
    st.learned = st.learned.saturating_add(1);
}

fn history(cfg: &TrustConfig, st: &State) -> f64 {
    st.n / (st.n + cfg.history_requests.max(1.0))
}

fn score(cfg: &TrustConfig, st: &State, now_ms: u64) -> TrustQ {
    if st.throttled_until_ms > now_ms {
        return 0;
    }
    let b = if st.n > 0.0 {
        (st.bad / st.n).min(1.0)
    } else if st.bad > 0.0 {
        1.0
    } else {
        0.0
    };
    // A caller with only bad outcomes and no counted requests is fully established as bad.
    let h = if st.n > 0.0 {
        history(cfg, st)
    } else {
        st.bad / (st.bad + cfg.history_requests.max(1.0))
    };
    let q =
        (1.0 - 2.0 * (b / cfg.bad_share.max(1e-6)).min(1.0) - 2.0 * st.erratic).clamp(-1.0, 1.0);
    let t = 0.5 + 0.5 * h * q;
    (t.clamp(0.0, 1.0) * 65535.0).round() as TrustQ
}

/// Ways per bucket of [`TrustTable`].
const WAYS: usize = 4;

/// The request path's view of trust: a fixed-size, 4-way set-associative table of
/// `(48-bit key tag, trust)` packed in one `AtomicU64` per slot. A lookup is at most four
/// relaxed loads in one cache line, with no lock, no allocation and no hashing beyond the key
/// the caller already has — a concurrent map (`dashmap`'s sharded locks, `papaya`'s epoch
/// guards) costs more per read, and reads are per request while writes are per second.
/// One writer at a time (the anomaly task). A full bucket evicts its most neutral entry, so a
/// throttled caller is the last to go; an evicted caller reads as new (initial factor).
pub struct TrustTable {
    slots: Box<[AtomicU64]>,
    mask: usize,
    /// Until this Unix ms a population surge is on: callers the table doesn't hold read as
    /// trust 0 (new callers get the rule's min_factor).
    population_until_ms: AtomicU64,
}

impl std::fmt::Debug for TrustTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrustTable")
            .field("slots", &self.slots.len())
            .finish_non_exhaustive()
    }
}

impl Default for TrustTable {
    /// A tiny empty table (adaptive limits unused: every lookup misses).
    fn default() -> Self {
        TrustTable::new(WAYS)
    }
}

impl TrustTable {
    /// A table of at least `slots` slots (rounded up to a power of two, at least 4).
    pub fn new(slots: usize) -> TrustTable {
        let n = slots.max(WAYS).next_power_of_two();
        TrustTable {
            slots: (0..n).map(|_| AtomicU64::new(0)).collect(),
            mask: n - 1,
            population_until_ms: AtomicU64::new(0),
        }
    }

    fn tag(key: u64) -> u64 {
        (key >> 16) | 1
    }

    fn bucket(&self, key: u64) -> &[AtomicU64] {
        let start = (key as usize & self.mask) & !(WAYS - 1);
        &self.slots[start..start + WAYS]
    }

    /// The trust of `key`, `None` when the table doesn't hold it (new, neutral or evicted)
    /// — or trust 0 for such a caller while a population surge is on.
    #[inline]
    pub fn get(&self, key: u64, now_ms: u64) -> Option<TrustQ> {
        let tag = TrustTable::tag(key);
        for slot in self.bucket(key) {
            let v = slot.load(Relaxed);
            if v >> 16 == tag {
                return Some(v as TrustQ);
            }
        }
        (self.population_until_ms.load(Relaxed) > now_ms).then_some(0)
    }

    /// Sets (or with `None` removes) the trust of `key`.
    pub fn set(&self, key: u64, trust: Option<TrustQ>) {
        let tag = TrustTable::tag(key);
        let bucket = self.bucket(key);
        let existing = bucket.iter().find(|s| s.load(Relaxed) >> 16 == tag);
        let Some(q) = trust else {
            if let Some(s) = existing {
                s.store(0, Relaxed);
            }
            return;
        };
        let packed = (tag << 16) | u64::from(q);
        let slot = existing
            .or_else(|| bucket.iter().find(|s| s.load(Relaxed) == 0))
            .or_else(|| {
                bucket
                    .iter()
                    .min_by_key(|s| (s.load(Relaxed) as TrustQ).abs_diff(NEUTRAL))
                    .filter(|s| (s.load(Relaxed) as TrustQ).abs_diff(NEUTRAL) < q.abs_diff(NEUTRAL))
            });
        if let Some(s) = slot {
            s.store(packed, Relaxed);
        }
    }

    /// Callers the table doesn't hold read as trust 0 until `until_ms`.
    pub fn set_population_surge(&self, until_ms: u64) {
        self.population_until_ms.fetch_max(until_ms, Relaxed);
    }

    /// Entries held (a scan: for metrics and tests, not the request path).
    pub fn len(&self) -> usize {
        self.slots.iter().filter(|s| s.load(Relaxed) != 0).count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn memory_bytes(&self) -> usize {
        self.slots.len() * 8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RANGE: Adaptive = Adaptive {
        min_factor: 0.25,
        initial_factor: 1.0,
        max_factor: 2.0,
    };

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn req(at: u64, who: &str, limited: bool) -> Event {
        let mut ev = Event::request(at, ip("10.0.0.1"), Label::new(who), Label::new("/"));
        ev.outcome = Outcome::Request {
            limited,
            blocked: false,
        };
        ev
    }

    #[test]
    fn factor_maps_trust_linearly_around_initial() {
        assert_eq!(RANGE.factor(None), 1.0);
        assert_eq!(RANGE.factor(Some(0)), 0.25);
        assert_eq!(RANGE.factor(Some(u16::MAX)), 2.0);
        assert!((RANGE.factor(Some(NEUTRAL)) - 1.0).abs() < 1e-3);
        assert!((RANGE.factor(Some(16_384)) - 0.625).abs() < 1e-3);
        assert_eq!(Adaptive::scale(100, 0.25), 25);
        assert_eq!(Adaptive::scale(1, 0.25), 1, "a limit never scales to 0");
        assert_eq!(Adaptive::scale(0, 2.0), 0, "deny-all stays deny-all");
        assert_eq!(Adaptive::scale(u32::MAX, 2.0), u32::MAX);
    }

    #[test]
    fn subject_is_identity_else_address_and_matches_events() {
        let a = subject("user:alice", Some(ip("10.0.0.1"))).unwrap();
        assert_eq!(a, Label::new("user:alice").hash());
        assert_eq!(
            subject("", Some(ip("::ffff:10.0.0.1"))),
            subject("", Some(ip("10.0.0.1")))
        );
        assert_ne!(subject("", Some(ip("10.0.0.1"))), Some(a));
        assert_eq!(subject("", None), None);
        // Identities longer than an event's label still hash over their whole text.
        let long = "user:".to_string() + &"é".repeat(40);
        assert_eq!(subject(&long, None), Some(Label::new(&long).hash()));
    }

    #[test]
    fn steady_clean_caller_gains_trust_bad_one_loses_it_idle_one_drifts_back() {
        let cfg = TrustConfig {
            history_requests: 100.0,
            ..TrustConfig::default()
        };
        let mut book = TrustBook::new(cfg, Source::Authz);
        let good = Label::new("user:good").hash();
        let bad = Label::new("user:bad").hash();
        let mut now = 0;
        for _ in 0..600 {
            now += 1000;
            for _ in 0..2 {
                book.observe(&req(now, "user:good", false));
            }
            book.observe(&req(now, "user:bad", false));
            book.observe(&req(now, "user:bad", true));
            book.tick(now);
        }
        let g = book.explain(good, now);
        let b = book.explain(bad, now);
        assert!(g.trust > 0.9, "{g:?}");
        assert!(b.trust < 0.1, "{b:?}");
        assert!(RANGE.factor(Some((g.trust * 65535.0) as u16)) > 1.8);
        // Six hours without traffic: both drift back toward neutral.
        let later = now + 6 * 3_600_000;
        book.tick(later);
        let g2 = book.explain(good, later);
        let b2 = book.explain(bad, later);
        assert!((g2.trust - 0.5).abs() < 0.1, "{g2:?}");
        assert!((b2.trust - 0.5).abs() < 0.1, "{b2:?}");
    }

    #[test]
    fn erratic_caller_loses_trust_against_its_own_baseline() {
        let cfg = TrustConfig {
            history_requests: 50.0,
            window_ms: 1000,
            ..TrustConfig::default()
        };
        let mut book = TrustBook::new(cfg, Source::Authz);
        let key = Label::new("user:spiky").hash();
        let mut now = 0;
        for i in 0..120u64 {
            now += 1000;
            let n = if i > 60 && i % 5 == 0 { 300 } else { 3 };
            for _ in 0..n {
                book.observe(&req(now, "user:spiky", false));
            }
            book.tick(now);
        }
        let e = book.explain(key, now);
        assert!(e.erratic > 0.3, "{e:?}");
        assert!(e.trust < 0.5, "{e:?}");
    }

    #[test]
    fn throttle_forces_zero_until_it_expires_and_publishes_both_changes() {
        let mut book = TrustBook::new(TrustConfig::default(), Source::Authz);
        let key = Label::new("user:x").hash();
        book.throttle(key, 1000, 61_000);
        assert_eq!(book.tick(1000), vec![(key, Some(0), 0.0)]);
        assert_eq!(book.explain(key, 2000).trust, 0.0);
        // After the TTL the minute sweep re-scores it: back to neutral, out of the table.
        assert_eq!(book.tick(62_000), vec![(key, None, 0.0)]);
        assert!(book.explain(key, 62_000).throttled_until_ms.is_none());
    }

    #[test]
    fn own_denials_and_other_sources_count_as_bad_not_volume() {
        let mut book = TrustBook::new(TrustConfig::default(), Source::Authz);
        let mut ev = req(1000, "user:y", true);
        ev.source = Source::RateLimit;
        book.observe(&ev);
        let e = book.explain(Label::new("user:y").hash(), 1000);
        assert_eq!(e.requests, 0.0);
        assert_eq!(e.bad_requests, 1.0);
    }

    #[test]
    fn book_is_bounded() {
        let cfg = TrustConfig {
            max_identities: 10,
            ..TrustConfig::default()
        };
        let mut book = TrustBook::new(cfg, Source::Authz);
        for i in 0..100 {
            book.observe(&req(1000, &format!("user:{i}"), false));
        }
        assert_eq!(book.stats().identities, 10);
        assert_eq!(book.stats().refused, 90);
    }

    #[test]
    fn table_holds_reads_evicts_most_neutral_and_surges() {
        let t = TrustTable::new(8);
        assert_eq!(t.get(42, 0), None);
        t.set(42, Some(100));
        assert_eq!(t.get(42, 0), Some(100));
        t.set(42, Some(200));
        assert_eq!(t.get(42, 0), Some(200));
        assert_eq!(t.len(), 1);
        t.set(42, None);
        assert_eq!(t.get(42, 0), None);
        // Five keys into one 4-way bucket (same low bits): the most neutral one goes.
        let keys: Vec<u64> = (1..=5u64).map(|i| (i << 20) | 3).collect();
        let trust = [0, 60_000, 33_000, 10, 5];
        for (k, q) in keys.iter().zip(trust) {
            t.set(*k, Some(q));
        }
        assert_eq!(t.get(keys[2], 0), None, "33000 was the most neutral");
        assert_eq!(t.get(keys[0], 0), Some(0));
        assert_eq!(t.get(keys[4], 0), Some(5));
        // A surge: unknown callers read as trust 0 until it ends.
        t.set_population_surge(5_000);
        assert_eq!(t.get(7, 4_999), Some(0));
        assert_eq!(t.get(7, 5_000), None);
        assert_eq!(t.get(keys[1], 4_999), Some(60_000));
    }
}
