//! The six rate limit algorithms, as pure functions over a counter state.
//!
//! Owns: the meaning of a limit (`Limit`), the per-key state each algorithm keeps
//! (`CounterState`) and the decision (`Outcome`). Time is always passed in (`Nanos` since the
//! Unix epoch) so every algorithm is deterministic and tested without sleeping.
//!
//! Must not touch: storage (where states live, locking, eviction), configuration parsing,
//! descriptors or gRPC. A storage backend calls `Limit::check_and_update` while it holds the
//! state exclusively; that exclusivity is what makes the decision exact under concurrency.

mod clock;
mod fixed_window;
mod gcra;
mod leaky_bucket;
mod sliding_window_counter;
mod sliding_window_log;
mod token_bucket;

#[cfg(test)]
mod tests;

pub use clock::{Clock, ManualClock, SystemClock};
/// The fixed window's state: storage may keep its two numbers in a compact layout.
pub use fixed_window::State as FixedWindowState;

/// Nanoseconds since the Unix epoch. Windows are aligned to the epoch, as envoyproxy/ratelimit does.
pub type Nanos = u64;

pub const NANOS_PER_SECOND: u64 = 1_000_000_000;

/// The time unit of a limit, with the reference's lengths (a month is 30 days, a year 365).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Unit {
    Second,
    Minute,
    Hour,
    Day,
    Week,
    Month,
    Year,
}

impl Unit {
    pub const fn seconds(self) -> u64 {
        match self {
            Unit::Second => 1,
            Unit::Minute => 60,
            Unit::Hour => 3_600,
            Unit::Day => 86_400,
            Unit::Week => 604_800,
            Unit::Month => 2_592_000,
            Unit::Year => 31_536_000,
        }
    }

    pub const fn nanos(self) -> u64 {
        self.seconds() * NANOS_PER_SECOND
    }

    /// How many bucket units one `SCALE`d token refills per nanosecond per request of rate, i.e.
    /// `SCALE / nanos()`. Exact because `SCALE` is a common multiple of every unit's length,
    /// which is what lets the bucket algorithms keep a level that means the same in every unit.
    const fn scale_per_nano(self) -> u128 {
        SCALE / self.nanos() as u128
    }

    /// Every unit, shortest first.
    pub const ALL: [Unit; 7] = [
        Unit::Second,
        Unit::Minute,
        Unit::Hour,
        Unit::Day,
        Unit::Week,
        Unit::Month,
        Unit::Year,
    ];

    /// The reference's unit names, in the order of [`Unit::ALL`].
    pub const NAMES: [&'static str; 7] = {
        let mut names = [""; 7];
        let mut i = 0;
        while i < 7 {
            names[i] = Unit::ALL[i].as_str();
            i += 1;
        }
        names
    };

    /// Parses the reference's unit names, case-insensitively.
    pub fn parse(s: &str) -> Option<Unit> {
        Unit::ALL
            .into_iter()
            .find(|u| u.as_str().eq_ignore_ascii_case(s))
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Unit::Second => "second",
            Unit::Minute => "minute",
            Unit::Hour => "hour",
            Unit::Day => "day",
            Unit::Week => "week",
            Unit::Month => "month",
            Unit::Year => "year",
        }
    }
}

/// Which algorithm decides a limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Algorithm {
    /// Epoch-aligned fixed window: the reference's algorithm, and the default.
    #[default]
    FixedWindow,
    /// Exact sliding window: remembers every admitted request in the last window.
    SlidingWindowLog,
    /// Weighted previous + current window estimate (two counters per key).
    SlidingWindowCounter,
    /// Bucket of `burst` tokens refilled at the rate; allows bursts up to `burst`.
    TokenBucket,
    /// Meter whose level drains at the rate, capacity `burst` (default 1): smooths traffic.
    LeakyBucket,
    /// Generic cell rate algorithm: token bucket semantics from one timestamp.
    Gcra,
}

impl Algorithm {
    /// Every algorithm: the one list tests, benchmarks and names are made from.
    pub const ALL: [Algorithm; 6] = [
        Algorithm::FixedWindow,
        Algorithm::SlidingWindowLog,
        Algorithm::SlidingWindowCounter,
        Algorithm::TokenBucket,
        Algorithm::LeakyBucket,
        Algorithm::Gcra,
    ];

    /// The seed library's names, accepted in configuration.
    const ALIASES: [(&'static str, Algorithm); 2] = [
        ("sliding_window", Algorithm::SlidingWindowLog),
        ("sliding_counter", Algorithm::SlidingWindowCounter),
    ];

    /// Every accepted name: [`Algorithm::ALL`]'s, then the aliases.
    pub const NAMES: [&'static str; 8] = {
        let mut names = [""; 8];
        let mut i = 0;
        while i < 6 {
            names[i] = Algorithm::ALL[i].as_str();
            i += 1;
        }
        while i < 8 {
            names[i] = Algorithm::ALIASES[i - 6].0;
            i += 1;
        }
        names
    };

    /// Parses the configuration names, case-insensitively, including the seed library's
    /// aliases.
    pub fn parse(s: &str) -> Option<Algorithm> {
        let named = |(name, a): (&str, Algorithm)| name.eq_ignore_ascii_case(s).then_some(a);
        Algorithm::ALL
            .into_iter()
            .map(|a| (a.as_str(), a))
            .chain(Algorithm::ALIASES)
            .find_map(named)
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Algorithm::FixedWindow => "fixed_window",
            Algorithm::SlidingWindowLog => "sliding_window_log",
            Algorithm::SlidingWindowCounter => "sliding_window_counter",
            Algorithm::TokenBucket => "token_bucket",
            Algorithm::LeakyBucket => "leaky_bucket",
            Algorithm::Gcra => "gcra",
        }
    }

    /// The capacity used when a rule names no `burst`.
    pub const fn default_burst(self, requests_per_unit: u32) -> u32 {
        match self {
            Algorithm::LeakyBucket => 1,
            _ => requests_per_unit,
        }
    }
}

/// A validated limit: `requests_per_unit > 0`, `burst > 0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Limit {
    pub algorithm: Algorithm,
    pub requests_per_unit: u32,
    pub unit: Unit,
    /// Capacity of the bucket algorithms; ignored by the window algorithms.
    pub burst: u32,
    /// After a rejected request the key stays over limit this long (0 = off).
    pub block_duration: Nanos,
}

/// How hits that are rejected are treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RejectedHits {
    /// A rejected request consumes nothing (default).
    #[default]
    Free,
    /// A rejected request is recorded like an admitted one (envoyproxy/ratelimit's behaviour).
    Counted,
}

/// The answer of one `check_and_update`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub allowed: bool,
    /// Requests (of one hit) still admissible right now, after this decision.
    pub remaining: u32,
    /// Windows: time until the current window ends (fixed), or until the remaining count
    /// next grows (sliding). Buckets: time until one more hit would be admitted; 0 when
    /// `remaining > 0`. While blocked: time until the block ends.
    pub reset_after: Nanos,
    /// From this instant on the state is equivalent to a fresh one and may be dropped.
    pub expires_at: Nanos,
}

/// Per-key state. Storage keeps one per counter key, `Default` is a never-used key.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CounterState {
    pub blocked_until: Nanos,
    pub algo: AlgoState,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub enum AlgoState {
    #[default]
    Fresh,
    FixedWindow(fixed_window::State),
    SlidingWindowLog(sliding_window_log::State),
    SlidingWindowCounter(sliding_window_counter::State),
    TokenBucket(token_bucket::State),
    LeakyBucket(leaky_bucket::State),
    Gcra(gcra::State),
}

/// Buckets hold their level in tokens × `SCALE`: the least common multiple of every unit's
/// length in nanoseconds (15 330 days). With it a rate of L per unit refills exactly
/// `L × SCALE / W` (an integer) per nanosecond, so levels stay exact integers, and a rule whose
/// rate or unit changes keeps its bucket level meaningful.
const SCALE: u128 = 1_324_512_000 * NANOS_PER_SECOND as u128;

/// Clamps an intermediate back into the `u64` domain: a time this far away is "never".
fn sat_u64(x: u128) -> u64 {
    u64::try_from(x).unwrap_or(u64::MAX)
}

/// Clamps a count into the `u32` of `Outcome::remaining`.
fn sat_u32(x: u128) -> u32 {
    u32::try_from(x).unwrap_or(u32::MAX)
}

/// Runs one algorithm's `check` on its state inside `$slot`, or on a fresh one when the slot
/// holds no state or another algorithm's (the rule changed algorithm). The fresh state is stored
/// only if the check changed it, so looks and free rejections leave a foreign state as it was.
macro_rules! check_on {
    ($limit:expr, $slot:expr, $variant:ident, $module:ident, $($arg:expr),*) => {
        match $slot {
            AlgoState::$variant(state) => $module::check($limit, state, $($arg),*),
            slot => {
                let mut fresh = $module::State::default();
                let outcome = $module::check($limit, &mut fresh, $($arg),*);
                if fresh != $module::State::default() {
                    *slot = AlgoState::$variant(fresh);
                }
                outcome
            }
        }
    };
}

impl Limit {
    /// Decide `hits` more hits on this key at `now`, updating `state` (storage holds it
    /// exclusively).
    ///
    /// `hits == 0` only looks: it never changes `state` and is allowed unless the key is
    /// blocked or its usage is already over the limit (possible with `RejectedHits::Counted`).
    /// A limit that can admit nothing (`requests_per_unit == 0`, or `burst == 0` for the bucket
    /// algorithms) rejects every hit without recording anything, with `reset_after` the rest
    /// of the aligned window (fixed and sliding counter) or one unit (the others).
    pub fn check_and_update(
        &self,
        state: &mut CounterState,
        now: Nanos,
        hits: u32,
        rejected: RejectedHits,
    ) -> Outcome {
        if now < state.blocked_until {
            return Outcome {
                allowed: false,
                remaining: 0,
                reset_after: state.blocked_until - now,
                expires_at: self.algo_expires_at(state, now).max(state.blocked_until),
            };
        }
        let mut outcome = if self.admits_nothing() {
            self.reject_everything(state, now, hits)
        } else {
            let slot = &mut state.algo;
            match self.algorithm {
                Algorithm::FixedWindow => {
                    check_on!(self, slot, FixedWindow, fixed_window, now, hits, rejected)
                }
                Algorithm::SlidingWindowLog => check_on!(
                    self,
                    slot,
                    SlidingWindowLog,
                    sliding_window_log,
                    now,
                    hits,
                    rejected
                ),
                Algorithm::SlidingWindowCounter => check_on!(
                    self,
                    slot,
                    SlidingWindowCounter,
                    sliding_window_counter,
                    now,
                    hits,
                    rejected
                ),
                Algorithm::TokenBucket => {
                    check_on!(self, slot, TokenBucket, token_bucket, now, hits, rejected)
                }
                Algorithm::LeakyBucket => {
                    check_on!(self, slot, LeakyBucket, leaky_bucket, now, hits, rejected)
                }
                Algorithm::Gcra => check_on!(self, slot, Gcra, gcra, now, hits, rejected),
            }
        };
        if !outcome.allowed && hits > 0 && self.block_duration > 0 {
            state.blocked_until = now.saturating_add(self.block_duration);
            outcome.remaining = 0;
            outcome.reset_after = outcome.reset_after.max(self.block_duration);
            outcome.expires_at = outcome.expires_at.max(state.blocked_until);
        }
        outcome
    }

    /// Undo `hits` that an earlier `check_and_update` admitted on this state (used when another
    /// limit of the same request rejected it, so the request consumes nothing anywhere). Best
    /// effort, never makes the state admit more than a fresh state would. A state of another
    /// algorithm, or a block, is left alone.
    pub fn refund(&self, state: &mut CounterState, now: Nanos, hits: u32) {
        if hits == 0 || self.admits_nothing() {
            return;
        }
        match (self.algorithm, &mut state.algo) {
            (Algorithm::FixedWindow, AlgoState::FixedWindow(s)) => {
                fixed_window::refund(self, s, now, hits)
            }
            (Algorithm::SlidingWindowLog, AlgoState::SlidingWindowLog(s)) => {
                sliding_window_log::refund(self, s, now, hits)
            }
            (Algorithm::SlidingWindowCounter, AlgoState::SlidingWindowCounter(s)) => {
                sliding_window_counter::refund(self, s, now, hits)
            }
            (Algorithm::TokenBucket, AlgoState::TokenBucket(s)) => {
                token_bucket::refund(self, s, now, hits)
            }
            (Algorithm::LeakyBucket, AlgoState::LeakyBucket(s)) => {
                leaky_bucket::refund(self, s, now, hits)
            }
            (Algorithm::Gcra, AlgoState::Gcra(s)) => gcra::refund(self, s, now, hits),
            _ => {}
        }
    }

    /// True when no hit can ever be admitted, whatever the state: the algorithms' arithmetic
    /// assumes a positive rate (and a positive capacity for the buckets).
    fn admits_nothing(&self) -> bool {
        self.requests_per_unit == 0
            || (self.burst == 0
                && matches!(
                    self.algorithm,
                    Algorithm::TokenBucket | Algorithm::LeakyBucket | Algorithm::Gcra
                ))
    }

    /// The decision of a limit that admits nothing. Nothing is recorded even with
    /// `RejectedHits::Counted`: under such a limit every state behaves like a fresh one.
    fn reject_everything(&self, state: &CounterState, now: Nanos, hits: u32) -> Outcome {
        let w = self.unit.nanos();
        let reset_after = match self.algorithm {
            Algorithm::FixedWindow | Algorithm::SlidingWindowCounter => w - now % w,
            _ => w,
        };
        Outcome {
            allowed: hits == 0,
            remaining: 0,
            reset_after,
            expires_at: self.algo_expires_at(state, now),
        }
    }

    /// When the algorithm part of `state` becomes equivalent to a fresh one (never before
    /// `now`), for outcomes that do not run the algorithm.
    fn algo_expires_at(&self, state: &CounterState, now: Nanos) -> Nanos {
        if self.admits_nothing() {
            return now;
        }
        match (self.algorithm, &state.algo) {
            (Algorithm::FixedWindow, AlgoState::FixedWindow(s)) => {
                fixed_window::expires_at(self, s, now)
            }
            (Algorithm::FixedWindow, _) => fixed_window::expires_at(self, &Default::default(), now),
            (Algorithm::SlidingWindowLog, AlgoState::SlidingWindowLog(s)) => {
                sliding_window_log::expires_at(self, s, now)
            }
            (Algorithm::SlidingWindowCounter, AlgoState::SlidingWindowCounter(s)) => {
                sliding_window_counter::expires_at(self, s, now)
            }
            (Algorithm::SlidingWindowCounter, _) => {
                sliding_window_counter::expires_at(self, &Default::default(), now)
            }
            (Algorithm::TokenBucket, AlgoState::TokenBucket(s)) => {
                token_bucket::expires_at(self, s, now)
            }
            (Algorithm::LeakyBucket, AlgoState::LeakyBucket(s)) => {
                leaky_bucket::expires_at(self, s, now)
            }
            (Algorithm::Gcra, AlgoState::Gcra(s)) => gcra::expires_at(self, s, now),
            // A fresh log or bucket is equivalent to `Fresh` right away.
            _ => now,
        }
    }
}
