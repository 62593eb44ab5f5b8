//! Replays the seeded traces of `ratethrottle::anomaly::trace` through the detector in
//! virtual time and asserts each one's expected outcome (issue 12's targets).

use std::net::IpAddr;

use ratethrottle::anomaly::trace::{self, Background, Constant, Population};
use ratethrottle::anomaly::{
    Action, Config, Decision, Detector, Event, Label, Scope, Target, Volumetric,
};

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
    Config {
        replica: replica.to_string(),
        ..Config::default()
    }
}

fn pop(seed: u64) -> Population {
    Population {
        seed,
        ..Population::default()
    }
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
    assert!(
        ds.iter().all(|d| d.dry_run),
        "enforced: {:?}",
        ds.iter().find(|d| !d.dry_run)
    );
    assert_eq!(after_warmup(&ds).len(), 0, "{:?}", after_warmup(&ds));
    assert!(d.stats().events > 400_000);
}

/// p95 of `xs` (nearest rank).
fn p95(mut xs: Vec<u64>) -> u64 {
    xs.sort_unstable();
    let rank = (xs.len() * 95).div_ceil(100).max(1);
    xs[rank - 1]
}

fn abuser_ip(seed: u64) -> IpAddr {
    IpAddr::from([198, 19, 0, seed as u8 + 1])
}

/// First enforced decision covering `ip` (the IP or a prefix holding it), as ms after `from`.
fn denied_after(ds: &[Decision], ip: IpAddr, from: u64) -> Option<u64> {
    ds.iter()
        .filter(|d| !d.dry_run && d.action == Action::Deny)
        .filter(|d| covers(d, ip))
        .map(|d| d.at_ms.saturating_sub(from))
        .min()
}

fn covers(d: &Decision, ip: IpAddr) -> bool {
    match d.scope {
        Scope::Ip => ip_of(d) == Some(ip),
        Scope::Ipv4Slash24 => ip_of(d) == Some(ratethrottle::anomaly::mask(ip, 24)),
        Scope::Ipv6Slash64 => ip_of(d) == Some(ratethrottle::anomaly::mask(ip, 64)),
        Scope::Ipv6Slash48 => ip_of(d) == Some(ratethrottle::anomaly::mask(ip, 48)),
        _ => false,
    }
}

/// Decisions on anything legitimate (an address in the legitimate ranges or a `user-N`).
fn legit_hits(ds: &[Decision]) -> Vec<&Decision> {
    ds.iter()
        .filter(|d| match d.scope {
            Scope::Identity => d.value.starts_with("user-"),
            Scope::Population => false,
            _ => ip_of(d).is_some_and(trace::is_legit_ip),
        })
        .collect()
}

const ATTACK: u64 = T0 + WARMUP + 10_000;

#[test]
fn single_abuser_at_40x_the_p99_is_denied_within_2s_p95_over_seeds() {
    let p99 = trace::measured_p99(&pop(1), 20);
    let rate = 40.0 * p99;
    let mut latencies = Vec::new();
    for seed in 1..=5 {
        let quiet = Population {
            responses: false,
            ..pop(seed)
        };
        let ip = abuser_ip(seed);
        let streams: Vec<Stream> = vec![
            Box::new(Background::new(quiet, T0, ATTACK + 10_000)),
            Box::new(Constant::new(
                seed,
                ip,
                Label::new("abuser"),
                rate,
                ATTACK,
                ATTACK + 10_000,
            )),
        ];
        let mut d = Detector::new(config("a"));
        let ds = replay(&mut d, trace::merge(streams));
        let hit = denied_after(&ds, ip, ATTACK).unwrap_or(u64::MAX);
        let d0 = ds
            .iter()
            .find(|d| covers(d, ip) && !d.dry_run)
            .expect("abuser decided");
        assert_eq!(d0.reason, "volumetric/v1");
        assert!(d0.evidence.count as f64 > d0.evidence.threshold, "{d0:?}");
        assert!(legit_hits(&after_warmup(&ds).into_iter().cloned().collect::<Vec<_>>()).is_empty());
        latencies.push(hit);
    }
    let p = p95(latencies.clone());
    assert!(
        p <= 2000,
        "p95 {p} ms, all {latencies:?}, rate {rate}/s (p99 {p99})"
    );
}

/// Three replicas behind a load balancer; each one's share of the abuser stays under its own
/// threshold, so only the merged counts catch it.
fn split_run(seed: u64, exchange: bool) -> Vec<Decision> {
    let p99 = trace::measured_p99(&pop(1), 20);
    let quiet = Population {
        responses: false,
        ..pop(seed)
    };
    let ip = abuser_ip(seed);
    let streams: Vec<Stream> = vec![
        Box::new(Background::new(quiet, T0, ATTACK + 10_000)),
        Box::new(Constant::new(
            seed,
            ip,
            Label::new("abuser"),
            40.0 * p99,
            ATTACK,
            ATTACK + 10_000,
        )),
    ];
    // the floor sits between one replica's share (a third) and the whole rate, so each
    // replica alone stays under its threshold
    let floor = 0.5 * 40.0 * p99;
    let cfg = |r: &str| Config {
        volumetric: Volumetric {
            floor,
            ..Volumetric::default()
        },
        ..config(r)
    };
    let mut replicas: Vec<Detector> = ["a", "b", "c"]
        .iter()
        .map(|r| Detector::new(cfg(r)))
        .collect();
    let mut out = Vec::new();
    let mut next_tick = 0;
    let mut n = 0u64;
    let mut exchanged = 0;
    for ev in trace::merge(streams) {
        if ev.at_ms >= next_tick {
            next_tick = ev.at_ms + 100;
            for r in &mut replicas {
                out.extend(r.tick(ev.at_ms));
            }
            let epoch = replicas[0].export_top().map_or(0, |t| t.epoch);
            if exchange && epoch != exchanged {
                exchanged = epoch;
                let tops: Vec<_> = replicas.iter().filter_map(Detector::export_top).collect();
                for r in &mut replicas {
                    for t in &tops {
                        r.merge(t);
                    }
                    out.extend(r.tick(ev.at_ms));
                }
            }
        }
        n += 1;
        replicas[(n % 3) as usize].observe(&ev);
    }
    out
}

#[test]
fn abuser_split_over_3_replicas_is_caught_by_merging_top_keys_within_3s() {
    let ip = abuser_ip(2);
    let alone = split_run(2, false);
    assert_eq!(
        denied_after(&alone, ip, ATTACK),
        None,
        "each replica alone must stay under threshold"
    );
    let merged = split_run(2, true);
    let hit = denied_after(&merged, ip, ATTACK).expect("merged replicas deny the abuser");
    assert!(hit <= 3000, "{hit} ms");
    let d = merged
        .iter()
        .find(|d| covers(d, ip) && !d.dry_run)
        .expect("decision");
    assert!(d.evidence.replicas.len() >= 2, "{:?}", d.evidence);
    assert!(
        legit_hits(
            &after_warmup(&merged)
                .into_iter()
                .cloned()
                .collect::<Vec<_>>()
        )
        .is_empty()
    );
}

#[test]
fn nat_office_is_judged_per_identity_and_its_abuser_throttled_within_5s() {
    let p99 = trace::measured_p99(&pop(1), 20);
    let abuser = trace::office_user(77);
    let streams: Vec<Stream> = vec![
        Box::new(Background::new(
            Population {
                responses: false,
                ..pop(3)
            },
            T0,
            ATTACK + 10_000,
        )),
        Box::new(trace::office(3, 500, 0.5, T0, ATTACK + 10_000)),
        Box::new(Constant::new(
            3,
            trace::OFFICE_IP,
            abuser,
            40.0 * p99,
            ATTACK,
            ATTACK + 10_000,
        )),
    ];
    let mut d = Detector::new(config("a"));
    let ds = replay(&mut d, trace::merge(streams));
    assert!(
        ds.iter().all(|d| !covers(d, trace::OFFICE_IP)),
        "office IP decided: {ds:?}"
    );
    let throttled = ds
        .iter()
        .find(|d| d.scope == Scope::Identity && d.value == "office-77" && !d.dry_run)
        .expect("abusing user decided");
    assert_eq!(throttled.action, Action::Throttle);
    assert!(
        throttled.at_ms - ATTACK <= 5000,
        "{} ms",
        throttled.at_ms - ATTACK
    );
    let others: Vec<_> = after_warmup(&ds)
        .into_iter()
        .filter(|d| d.value != "office-77" && d.value != trace::OFFICE_IP.to_string())
        .collect();
    assert!(others.is_empty(), "{others:?}");
    let ex = d.explain(&Target::Ip(trace::OFFICE_IP));
    assert!(ex.shared && ex.distinct_identities >= 100, "{ex:?}");
}

#[test]
fn low_and_slow_stuffing_denies_19_of_20_prefixes_within_120s_and_no_legit_prefix() {
    let start = T0 + WARMUP;
    let streams: Vec<Stream> = vec![
        Box::new(Background::new(
            Population {
                rate: 1000.0,
                ..pop(4)
            },
            T0,
            start + 120_000,
        )),
        Box::new(trace::Stuffing::new(
            4,
            2000,
            0.2,
            0.9,
            start,
            start + 120_000,
        )),
    ];
    let mut d = Detector::new(config("a"));
    let ds = replay(&mut d, trace::merge(streams));
    let prefixes: std::collections::BTreeSet<_> = ds
        .iter()
        .filter(|d| d.scope == Scope::Ipv4Slash24 && !d.dry_run && d.at_ms <= start + 120_000)
        .filter(|d| ip_of(d).is_some_and(|ip| !trace::is_legit_ip(ip)))
        .map(|d| d.value.clone())
        .collect();
    assert!(
        prefixes.len() >= 19,
        "{} prefixes: {prefixes:?}",
        prefixes.len()
    );
    let enforced: Vec<Decision> = ds.iter().filter(|d| !d.dry_run).cloned().collect();
    assert!(
        legit_hits(&enforced).is_empty(),
        "{:?}",
        legit_hits(&enforced)
    );
    let p = ds
        .iter()
        .find(|d| d.detector == ratethrottle::anomaly::DetectorKind::PrefixEscalation)
        .expect("prefix");
    assert!(p.evidence.members.len() >= 3, "{p:?}");
}

#[test]
fn all_50_probers_are_denied_within_10s() {
    let start = T0 + WARMUP;
    let streams: Vec<Stream> = vec![
        Box::new(Background::new(
            Population {
                rate: 1000.0,
                ..pop(5)
            },
            T0,
            start + 15_000,
        )),
        Box::new(trace::Probing::new(5, 50, 300, 10.0, start, start + 15_000)),
    ];
    let mut d = Detector::new(config("a"));
    let ds = replay(&mut d, trace::merge(streams));
    for n in 0..50 {
        let ip = trace::prober_ip(n);
        let t = denied_after(&ds, ip, start).unwrap_or(u64::MAX);
        assert!(t <= 10_000, "prober {ip} after {t} ms");
    }
    let enforced: Vec<Decision> = ds.iter().filter(|d| !d.dry_run).cloned().collect();
    assert!(
        legit_hits(&enforced).is_empty(),
        "{:?}",
        legit_hits(&enforced)
    );
}

#[test]
fn flash_crowd_of_new_legit_users_makes_no_decision() {
    let base = Population {
        rate: 500.0,
        responses: false,
        ..pop(6)
    };
    // many new users, each at an ordinary rate (uniform, not a new Zipf head)
    let crowd = Population {
        identities: 20_000,
        zipf_s: 0.0,
        ..base.clone()
    };
    let ramp_from = T0 + WARMUP + 10_000;
    let end = ramp_from + 90_000;
    let shape = move |t: u64| (t.saturating_sub(ramp_from) as f64 / 60_000.0).min(1.0) * 19.0;
    let streams: Vec<Stream> = vec![
        Box::new(Background::new(base, T0, end)),
        Box::new(Background::shaped(
            crowd,
            ramp_from,
            end,
            19.0,
            Box::new(shape),
            1_000_000,
        )),
    ];
    let mut d = Detector::new(config("a"));
    let ds = replay(&mut d, trace::merge(streams));
    assert_eq!(after_warmup(&ds).len(), 0, "{:?}", after_warmup(&ds));
    assert!(ds.iter().all(|d| d.dry_run));
}

#[test]
fn diurnal_traffic_over_two_days_makes_no_decision() {
    let day = 86_400_000.0;
    let shape = move |t: u64| {
        1.0 + 0.8 * ((t.saturating_sub(T0) as f64 / day) * std::f64::consts::TAU).sin()
    };
    let p = Population {
        rate: 20.0,
        responses: false,
        ..pop(7)
    };
    let mut d = Detector::new(config("a"));
    let ds = replay(
        &mut d,
        Background::shaped(p, T0, T0 + 2 * 86_400_000, 1.8, Box::new(shape), 0),
    );
    assert_eq!(after_warmup(&ds).len(), 0, "{:?}", after_warmup(&ds));
}

#[test]
fn spoofed_flood_of_10_million_sources_stays_under_64_mib_and_its_64s_are_denied_within_5s() {
    let start = T0 + WARMUP;
    let streams: Vec<Stream> = vec![
        Box::new(Background::new(
            Population {
                rate: 500.0,
                responses: false,
                ..pop(8)
            },
            T0,
            start + 8_000,
        )),
        Box::new(trace::Flood::new(
            8,
            10_000_000,
            2_000_000.0,
            start + 1000,
            4,
        )),
    ];
    let mut d = Detector::new(config("a"));
    let mut peak = 0;
    let mut events = 0u64;
    let ds = replay(
        &mut d,
        trace::merge(streams).inspect(|_| {
            events += 1;
        }),
    );
    peak = peak.max(d.memory_bytes());
    assert!(events >= 10_000_000);
    assert!(
        d.memory_bound() <= 64 << 20,
        "bound {} MiB",
        d.memory_bound() >> 20
    );
    assert!(
        peak <= d.memory_bound(),
        "{peak} > bound {}",
        d.memory_bound()
    );
    for n in 0..4 {
        let net = IpAddr::V6(trace::flood_v6_net(n));
        let t = denied_after(&ds, net, start + 1000).unwrap_or(u64::MAX);
        assert!(t <= 5000, "/64 {net} after {t} ms");
    }
    let enforced: Vec<Decision> = ds.iter().filter(|d| !d.dry_run).cloned().collect();
    assert!(
        legit_hits(&enforced).is_empty(),
        "{:?}",
        legit_hits(&enforced)
    );
    assert!(
        ds.iter()
            .any(|d| d.scope == Scope::Population && d.action == Action::Throttle && !d.dry_run)
    );
}
