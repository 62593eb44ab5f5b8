//! Rules that hold whatever the thresholds: own denials, allowlist, unban, TTL escalation,
//! warm-up dry-run, garbage input.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use proptest::prelude::*;

use super::*;

const T0: u64 = 1_000_000;

fn cfg() -> Config {
    Config {
        warmup_ms: 0,
        ..Config::default()
    }
}

/// `n` requests per second from `ip` for `secs` seconds starting at `from`.
fn burst(
    d: &mut Detector,
    ip: IpAddr,
    from: u64,
    secs: u64,
    n: u64,
    denied_by_us: bool,
) -> Vec<Decision> {
    let mut out = Vec::new();
    for s in 0..secs {
        for i in 0..n {
            let mut ev = Event::request(
                from + s * 1000 + i * 1000 / n,
                ip,
                Label::EMPTY,
                Label::new("/x"),
            );
            ev.denied_by_us = denied_by_us;
            d.observe(&ev);
        }
        out.extend(d.tick(from + (s + 1) * 1000));
    }
    out
}

const IP: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 9));

#[test]
fn a_burst_far_over_the_floor_is_denied_with_evidence() {
    let mut d = Detector::new(cfg());
    let ds = burst(&mut d, IP, T0, 2, 500, false);
    let dec = ds.iter().find(|d| d.scope == Scope::Ip).expect("decided");
    assert_eq!(
        (dec.action, dec.reason, dec.value.as_str()),
        (Action::Deny, "volumetric/v1", "198.18.0.9")
    );
    assert!(!dec.dry_run);
    assert!(dec.evidence.count as f64 > dec.evidence.threshold);
    assert!(
        dec.ttl_ms >= 600_000 && dec.ttl_ms <= 660_000,
        "{}",
        dec.ttl_ms
    );
    // the /24 is not decided for one offender
    assert!(ds.iter().all(|d| d.scope != Scope::Ipv4Slash24));
}

#[test]
fn own_denials_are_never_evidence() {
    let mut d = Detector::new(cfg());
    assert!(burst(&mut d, IP, T0, 3, 500, true).is_empty());
    assert_eq!(d.stats().own_denials, 1500);
}

#[test]
fn allowlisted_targets_are_never_decided() {
    let mut d = Detector::with_allowlist(
        cfg(),
        Box::new(|t| matches!(t, Target::Ip(ip) if *ip == IP)),
    );
    assert!(burst(&mut d, IP, T0, 3, 500, false).is_empty());
    assert!(d.stats().allowlisted > 0);
    assert!(d.explain(&Target::Ip(IP)).allowlisted);
}

#[test]
fn warmup_decisions_are_dry_run_and_dry_run_flags_apply() {
    let mut d = Detector::new(Config {
        warmup_ms: 60_000,
        ..Config::default()
    });
    let ds = burst(&mut d, IP, T0, 2, 500, false);
    assert!(!ds.is_empty() && ds.iter().all(|d| d.dry_run));
    let mut d = Detector::new(Config {
        volumetric: Volumetric {
            dry_run: true,
            ..Volumetric::default()
        },
        ..cfg()
    });
    let ds = burst(&mut d, IP, T0, 2, 500, false);
    assert!(!ds.is_empty() && ds.iter().all(|d| d.dry_run));
}

#[test]
fn unban_suppresses_redetection_then_repeats_escalate_the_ttl() {
    let mut d = Detector::new(cfg());
    let first = burst(&mut d, IP, T0, 2, 500, false);
    let ttl1 = first
        .iter()
        .find(|d| d.scope == Scope::Ip)
        .map(|d| d.ttl_ms)
        .expect("first");
    d.unban(&Target::Ip(IP), T0 + 3000);
    assert!(
        burst(&mut d, IP, T0 + 3000, 3, 500, false).is_empty(),
        "suppressed after unban"
    );
    assert!(d.explain(&Target::Ip(IP)).suppressed_until_ms.is_some());
    // suppression (30 min) over: a repeat is decided again, with a doubled TTL
    let later = T0 + 31 * 60_000;
    let again = burst(&mut d, IP, later, 2, 500, false);
    let dec = again
        .iter()
        .find(|d| d.scope == Scope::Ip)
        .expect("decided again");
    assert_eq!(dec.offense, 2);
    assert!(
        dec.ttl_ms >= 2 * 600_000 && dec.ttl_ms > ttl1,
        "{} vs {ttl1}",
        dec.ttl_ms
    );
}

#[test]
fn ttl_jitter_is_deterministic_per_seed() {
    let run = |seed| {
        let mut d = Detector::new(Config {
            ttl: Ttl {
                seed,
                ..Ttl::default()
            },
            ..cfg()
        });
        burst(&mut d, IP, T0, 2, 500, false)
            .first()
            .map(|d| d.ttl_ms)
    };
    assert_eq!(run(1), run(1));
    assert_ne!(run(1), run(2));
}

#[test]
fn decisions_per_minute_are_capped_and_offenders_escalate_to_their_prefix() {
    let mut d = Detector::new(Config {
        max_decisions_per_minute: 2,
        ..cfg()
    });
    let mut all = Vec::new();
    for host in 1..=6u8 {
        all.extend(burst(
            &mut d,
            IpAddr::V4(Ipv4Addr::new(198, 18, 5, host)),
            T0 + u64::from(host) * 2000,
            2,
            500,
            false,
        ));
    }
    let ips = all.iter().filter(|d| d.scope == Scope::Ip).count();
    assert!(ips <= 2, "{all:?}");
    let prefix = all
        .iter()
        .find(|d| d.scope == Scope::Ipv4Slash24)
        .expect("prefix");
    assert_eq!(prefix.value, "198.18.5.0/24");
    assert!(prefix.evidence.members.len() >= 3);
}

#[test]
fn labels_cut_at_a_char_boundary_and_hash_the_whole_text() {
    let long = "é".repeat(40); // 80 bytes of 2-byte chars
    let l = Label::new(&long);
    assert!(l.prefix().len() <= LABEL_BYTES && long.starts_with(l.prefix()));
    assert!(l.display().ends_with('…'));
    let other = format!("{}x", "é".repeat(40));
    assert_ne!(Label::new(&other).hash(), l.hash());
    assert!(Label::new("").is_empty());
}

#[test]
fn targets_parse_back_from_their_values() {
    for t in [
        Target::Ip(IP),
        Target::Prefix(mask(IP, 24), 24),
        Target::Prefix(
            IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 1, 0, 0, 0, 0)),
            64,
        ),
        Target::Identity(Label::new("alice")),
    ] {
        assert_eq!(Target::parse(t.scope(), &t.value()), Some(t));
    }
    assert_eq!(Target::parse(Scope::Ipv4Slash24, "1.2.3.4/64"), None);
    assert_eq!(Target::parse(Scope::Ip, "nope"), None);
}

fn any_event() -> impl Strategy<Value = Event> {
    (
        prop_oneof![Just(0u64), Just(u64::MAX), any::<u64>(), 0u64..10_000_000],
        any::<[u8; 16]>(),
        any::<bool>(),
        ".{0,80}",
        ".{0,80}",
        any::<u16>(),
        any::<bool>(),
    )
        .prop_map(|(at, ip, v4, id, path, status, denied)| {
            let ip = if v4 {
                IpAddr::V4(Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3]))
            } else {
                IpAddr::V6(Ipv6Addr::from(ip))
            };
            let mut ev = if status % 2 == 0 {
                Event::request(at, ip, Label::new(&id), Label::new(&path))
            } else {
                Event::response(at, ip, Label::new(&id), Label::new(&path), status)
            };
            ev.denied_by_us = denied;
            ev
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// Garbage (zero and huge times, time going backwards, empty or odd identities) never
    /// panics, and memory stays under the bound.
    #[test]
    fn garbage_events_never_panic(events in proptest::collection::vec(any_event(), 1..200), ticks in proptest::collection::vec(any::<u64>(), 0..5)) {
        let mut d = Detector::new(Config { sketch_width: 1 << 10, max_tracked: 64, sample_capacity: 64, ..Config::default() });
        for ev in &events {
            d.observe(ev);
        }
        for t in ticks {
            let _ = d.tick(t);
        }
        let _ = d.explain(&Target::Ip(events[0].ip));
        prop_assert!(d.memory_bytes() <= d.memory_bound());
    }
}
