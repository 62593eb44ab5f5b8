//! Replays the seeded traces of `ratethrottle::anomaly::trace` through the detector in
//! virtual time and asserts each one's expected outcome (issue 12's targets).

use std::net::IpAddr;

use ratethrottle::anomaly::trace::{self, Background, Constant, Population};
use ratethrottle::anomaly::{Action, Config, Decision, Detector, Event, Label, Scope, Target};

/// Virtual start: an arbitrary wall-clock-like epoch (ms).
const T0: u64 = 1_700_000_000_000;
/// Warm-up used by the tests (the default, 60 s).
const WARMUP: u64 = 60_000;

type Stream = Box<dyn Iterator<Item = Event> + Send>;

/// Feeds `events` to `d`, ticking every 100 ms of virtual time; returns every decision.
fn replay(d: &mut Detector, events: impl Iterator<Item = Event>) -> Vec<Decision> {
    let mut out = Vec::new();
    let mut next_tick = 0;
    let mut last = 0;
    for ev in events {
        if ev.at_ms >= next_tick {
            out.extend(d.tick(ev.at_ms));
            next_tick = ev.at_ms + 100;
        }
        d.observe(&ev);
        last = ev.at_ms;
    }
    out.extend(d.tick(last + 2000));
    out
}

fn config(replica: &str) -> Config {
    Config { replica: replica.to_string(), ..Config::default() }
}

fn pop(seed: u64) -> Population {
    Population { seed, ..Population::default() }
}

/// Decisions after warm-up (those in warm-up are dry-run by construction).
fn after_warmup(ds: &[Decision]) -> Vec<&Decision> {
    ds.iter().filter(|d| d.at_ms >= T0 + WARMUP).collect()
}

fn ip_of(d: &Decision) -> Option<IpAddr> {
    d.value.split('/').next().and_then(|s| s.parse().ok())
}

#[test]
fn steady_zipf_traffic_makes_no_decision() {
    let mut d = Detector::new(config("a"));
    let events = Background::new(pop(11), T0, T0 + WARMUP + 120_000);
    let ds = replay(&mut d, events);
    assert!(ds.iter().all(|d| d.dry_run), "enforced: {:?}", ds.iter().find(|d| !d.dry_run));
    assert_eq!(after_warmup(&ds).len(), 0, "{:?}", after_warmup(&ds));
    assert!(d.stats().events > 400_000);
}
