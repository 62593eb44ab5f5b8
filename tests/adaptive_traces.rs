//! Adaptive limits on the anomaly module's seeded traces, in virtual time: the trust book fed
//! the same events as the detector, throttle decisions applied as the runtime applies them,
//! and the factor a rule's `adaptive` range gives each caller at the end.

use ratethrottle::anomaly::trace::{self, Background, Constant, Population};
use ratethrottle::anomaly::{
    Action, Adaptive, Config, Decision, Detector, Event, Label, Scope, Target, TrustBook,
    TrustConfig,
};

const T0: u64 = 1_700_000_000_000;
const WARMUP: u64 = 60_000;
const ATTACK: u64 = T0 + WARMUP + 10_000;

const RANGE: Adaptive = Adaptive {
    min_factor: 0.25,
    initial_factor: 1.0,
    max_factor: 2.0,
};

type Stream = Box<dyn Iterator<Item = Event> + Send>;

/// Replays `events` through the detector and the trust book, ticking both every 100 ms and
/// applying throttle decisions to the book (as `runtime::anomaly` does). Returns the
/// decisions and the trust each key in `watch` has in the table at the end.
fn replay(
    d: &mut Detector,
    book: &mut TrustBook,
    events: impl Iterator<Item = Event>,
) -> (Vec<Decision>, u64) {
    let mut out = Vec::new();
    let mut next_tick = 0;
    let mut last = 0;
    for ev in events {
        if ev.at_ms >= next_tick {
            tick(d, book, ev.at_ms, &mut out);
            next_tick = ev.at_ms + 100;
        }
        d.observe(&ev);
        book.observe(&ev);
        last = ev.at_ms;
    }
    tick(d, book, last + 2000, &mut out);
    (out, last + 2000)
}

fn tick(d: &mut Detector, book: &mut TrustBook, now: u64, out: &mut Vec<Decision>) {
    for dec in d.tick(now) {
        if dec.action == Action::Throttle
            && !dec.dry_run
            && let Target::Identity(l) = dec.target
        {
            book.throttle(l.hash(), now, now + dec.ttl_ms);
        }
        out.push(dec);
    }
    book.tick(now);
}

fn factor(book: &TrustBook, who: Label, now: u64) -> f64 {
    let t = book.explain(who.hash(), now).trust;
    RANGE.factor(Some((t * 65535.0).round() as u16))
}

fn pop(seed: u64) -> Population {
    Population {
        seed,
        responses: false,
        ..Population::default()
    }
}

#[test]
fn nat_office_users_keep_their_limits_while_the_abusing_one_is_throttled_to_min() {
    let p99 = trace::measured_p99(&pop(1), 20);
    let abuser = trace::office_user(77);
    let end = ATTACK + 10_000;
    let streams: Vec<Stream> = vec![
        Box::new(Background::new(pop(3), T0, end)),
        Box::new(trace::office(3, 500, 0.5, T0, end)),
        Box::new(Constant::new(
            3,
            trace::OFFICE_IP,
            abuser,
            40.0 * p99,
            ATTACK,
            end,
        )),
    ];
    let mut d = Detector::new(Config::default());
    let mut book = TrustBook::new(TrustConfig::default(), Config::default().volume_from);
    let (ds, now) = replay(&mut d, &mut book, trace::merge(streams));
    assert!(
        ds.iter()
            .any(|d| d.scope == Scope::Identity && d.action == Action::Throttle && !d.dry_run),
        "no throttle decision: {ds:?}"
    );
    assert_eq!(factor(&book, abuser, now), RANGE.min_factor);
    let mut office = Vec::new();
    for i in (0..500).filter(|i| *i != 77) {
        office.push(factor(&book, trace::office_user(i), now));
    }
    let low = office.iter().filter(|f| **f < 1.0).count();
    assert_eq!(low, 0, "office users below their limit: {low} of 499");
    // The office's shared address itself is never throttled.
    assert!(
        ds.iter()
            .all(|d| d.value != trace::OFFICE_IP.to_string() || d.dry_run),
        "{ds:?}"
    );
}

#[test]
fn steady_callers_drift_toward_max_erratic_ones_below_initial() {
    let ip = |n| std::net::IpAddr::from([100, 64, 0, n]);
    let steady = Label::new("user:steady");
    let erratic = Label::new("user:erratic");
    let end = T0 + 20 * 60_000;
    let mut streams: Vec<Stream> = vec![
        // A quieter population than the default 2000/s: 20 virtual minutes stay quick.
        Box::new(Background::new(
            Population {
                rate: 200.0,
                ..pop(5)
            },
            T0,
            end,
        )),
        Box::new(Constant::new(1, ip(1), steady, 2.0, T0, end)),
        Box::new(Constant::new(2, ip(2), erratic, 2.0, T0, end)),
    ];
    // The erratic caller bursts to 100/s for 2 s every minute after the first five.
    for m in 5..20 {
        let from = T0 + m * 60_000;
        streams.push(Box::new(Constant::new(
            10 + m,
            ip(2),
            erratic,
            100.0,
            from,
            from + 2000,
        )));
    }
    let mut d = Detector::new(Config::default());
    let mut book = TrustBook::new(TrustConfig::default(), Config::default().volume_from);
    let (_, now) = replay(&mut d, &mut book, trace::merge(streams));
    let s = factor(&book, steady, now);
    let e = factor(&book, erratic, now);
    assert!(
        s > 1.5,
        "steady caller factor {s}: {:?}",
        book.explain(steady.hash(), now)
    );
    assert!(
        e < 1.0,
        "erratic caller factor {e}: {:?}",
        book.explain(erratic.hash(), now)
    );
}

#[test]
fn the_trust_book_changes_no_detector_decision() {
    let p99 = trace::measured_p99(&pop(1), 20);
    let abuser = Label::new("user:abuser");
    let streams = || -> Vec<Stream> {
        vec![
            Box::new(Background::new(pop(7), T0, ATTACK + 5_000)),
            Box::new(Constant::new(
                7,
                std::net::IpAddr::from([198, 19, 0, 9]),
                abuser,
                40.0 * p99,
                ATTACK,
                ATTACK + 5_000,
            )),
        ]
    };
    let mut alone = Detector::new(Config::default());
    let mut without = Vec::new();
    let mut next = 0;
    for ev in trace::merge(streams()) {
        if ev.at_ms >= next {
            without.extend(alone.tick(ev.at_ms));
            next = ev.at_ms + 100;
        }
        alone.observe(&ev);
    }
    let mut d = Detector::new(Config::default());
    let mut book = TrustBook::new(TrustConfig::default(), Config::default().volume_from);
    let (with, _) = replay(&mut d, &mut book, trace::merge(streams()));
    let key = |d: &Decision| (d.scope, d.value.clone(), d.action, d.at_ms, d.dry_run);
    let without: Vec<_> = without.iter().map(key).collect();
    let with: Vec<_> = with.iter().map(key).collect();
    assert!(!without.is_empty());
    assert_eq!(with[..without.len()], without[..]);
}
