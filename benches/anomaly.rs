//! Anomaly detector throughput (events per second one core consumes) and memory at 10
//! million sources per minute. Fixed seeds; the traffic is precomputed so only `observe` is
//! timed.
// The engine's request future nests deeply (storage coalescing): rustc's default layout
// query depth is not enough for crates that await it.
#![recursion_limit = "256"]

use std::hint::black_box;
use std::time::Instant;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ratethrottle::anomaly::trace::{self, Background, Population};
use ratethrottle::anomaly::{Config, Detector, Event, TrustBook, TrustConfig};

const T0: u64 = 1_700_000_000_000;

fn events(name: &str, n: usize) -> Vec<Event> {
    match name {
        // steady Zipf traffic with access-log responses
        "zipf" => Background::new(
            Population {
                rate: 20_000.0,
                ..Population::default()
            },
            T0,
            u64::MAX,
        )
        .take(n)
        .collect(),
        // one-shot spoofed sources
        _ => trace::Flood::new(1, n as u64, 1_000_000.0, T0, 4).collect(),
    }
}

fn throughput(c: &mut Criterion) {
    let mut g = c.benchmark_group("anomaly_observe");
    for name in ["zipf", "flood"] {
        let evs = events(name, 200_000);
        g.throughput(Throughput::Elements(evs.len() as u64));
        g.bench_function(name, |b| {
            let mut d = Detector::new(Config::default());
            let mut shift = 0;
            b.iter(|| {
                for ev in &evs {
                    let mut ev = *ev;
                    ev.at_ms += shift;
                    d.observe(black_box(&ev));
                }
                shift += 200_000 / 20; // keep virtual time moving forward
                black_box(d.tick(evs.last().map_or(0, |e| e.at_ms) + shift));
            })
        });
    }
    // What the runtime's detector task does per event: the detector and the trust book.
    let evs = events("zipf", 200_000);
    g.throughput(Throughput::Elements(evs.len() as u64));
    g.bench_function("zipf_with_trust", |b| {
        let mut d = Detector::new(Config::default());
        let mut book = TrustBook::new(TrustConfig::default(), Config::default().volume_from);
        let mut shift = 0;
        b.iter(|| {
            for ev in &evs {
                let mut ev = *ev;
                ev.at_ms += shift;
                d.observe(black_box(&ev));
                book.observe(black_box(&ev));
            }
            shift += 200_000 / 20;
            let now = evs.last().map_or(0, |e| e.at_ms) + shift;
            black_box(d.tick(now));
            black_box(book.tick(now));
        })
    });
    g.finish();
}

/// The request path's cost of feeding the module: one `Sink::push` of a ready event into the
/// bounded queue (target ≤ 100 ns), with a consumer draining it as the runtime does.
fn push(c: &mut Criterion) {
    let (sink, drain) = ratethrottle::anomaly::queue(65_536);
    let ev = events("zipf", 1)[0];
    let mut g = c.benchmark_group("anomaly_push");
    g.throughput(Throughput::Elements(1));
    let mut n = 0u32;
    g.bench_function("sink_push", |b| {
        b.iter(|| {
            sink.push(black_box(ev));
            n += 1;
            if n == 4096 {
                n = 0;
                drain.drain(usize::MAX, |e| {
                    black_box(e);
                });
            }
        })
    });
    g.finish();
}

/// Not a criterion timing: one pass of 10 million one-shot sources in one virtual minute,
/// printing the module's memory against its bound.
fn memory_at_10m_sources_per_minute(_: &mut Criterion) {
    let mut d = Detector::new(Config::default());
    let start = Instant::now();
    for ev in trace::Flood::new(2, 10_000_000, 10_000_000.0 / 60.0, T0, 4) {
        d.observe(&ev);
    }
    let _ = d.tick(T0 + 61_000);
    println!(
        "anomaly memory at 10M sources/min: {:.1} MiB (bound {:.1} MiB), tracked keys {}, {:.2} M events/s",
        d.memory_bytes() as f64 / (1 << 20) as f64,
        d.memory_bound() as f64 / (1 << 20) as f64,
        d.tracked(),
        10.0 / start.elapsed().as_secs_f64()
    );
}

criterion_group!(benches, throughput, push, memory_at_10m_sources_per_minute);
criterion_main!(benches);
