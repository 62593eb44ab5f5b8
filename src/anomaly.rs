//! Anomaly detection: turns the stream of requests the sidecar decides (and responses Envoy
//! reports) into **decisions** — deny or throttle a key (identity, IP, IPv4 /24, IPv6 /64 or
//! /48) for a TTL, with the detector, its version and the evidence — in bounded memory.
//!
//! Owns: the [`Event`] the hot path pushes, the sans-IO [`Detector`] (events in, decisions
//! out, time injected: deterministic, so traces replay in virtual time), its sketches, its
//! detectors' thresholds ([`Config`]), the cross-replica top-keys exchange as plain data
//! ([`TopKeys`]), per-caller trust for adaptive limits ([`TrustBook`], [`TrustTable`]), the
//! bounded queue from the hot path to the detector task ([`Sink`],
//! [`Drain`]) and the seeded attack-trace generator ([`trace`]).
//!
//! Must not touch: anything else in the crate (it imports nothing from it), I/O, clocks,
//! Redis or the blocklist. The services push events; the runtime reads decisions and writes
//! them to the lists, and carries `TopKeys` between replicas.
//!
//! Rules it keeps whatever the thresholds: the sidecar's own denials are never evidence;
//! allowlisted targets are never decided; an address many identities share is judged per
//! identity; baselines do not learn while their key is flagged; every decision is dry-run
//! during warm-up; a manual unban suppresses re-detection for a while; trust never becomes an
//! exemption (suppression and TTLs expire).

mod config;
mod decision;
mod detector;
mod event;
mod queue;
mod sketch;
pub mod trace;
mod trust;

#[cfg(test)]
mod tests;

pub use config::{
    Config, FailureRatio, Merge, PathSpread, PopulationShift, PrefixEscalation, SelfAnomaly, Ttl,
    Volumetric,
};
pub use decision::{Action, Decision, DetectorKind, Evidence, Key, Scope, Target, canonical, mask};
pub use detector::{Allowlist, Detector, Explanation, RemoteCount, Stats, TopKeys};
pub use event::{Event, LABEL_BYTES, Label, Method, Outcome, Source};
pub use queue::{Drain, Sink, queue};
pub use sketch::{CountMin, Distinct, RateSample};
pub use trust::{
    Adaptive, NEUTRAL, TrustBook, TrustConfig, TrustExplanation, TrustQ, TrustStats, TrustTable,
    subject,
};
