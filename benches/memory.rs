//! Memory per tracked key of the in-memory store: for each algorithm, fills a `MemoryStore`
//! with 1M and 5M distinct keys (one admitted hit each, through the public store API) and
//! reports the growth of the process's resident set (VmRSS) divided by the keys held.
//!
//! Each case runs in a fresh child process (this program re-executes itself), so one case's
//! freed tables and allocator state never count in another's. Two figures per case:
//!   * `bytes/key`: `max_keys` = 2 × keys, so every key is held (nothing evicted);
//!   * `bytes/max_key`: a store at its bound, `max_keys` = keys with 2 × keys distinct keys
//!     offered (evicting), RSS growth / `max_keys`: what to multiply `max_keys` by to size RAM.
//!
//! `cargo bench --locked --bench memory` (or `BENCH_ONLY=memory bash scripts/bench.sh`);
//! `MEMORY_BENCH_KEYS=1000000,5000000` picks the sizes. Linux only (reads /proc/self/status).
#![allow(
    clippy::disallowed_methods,
    reason = "test harness: where the tools are (env) and wall-clock stamps"
)]

use ratethrottle::limiter::{Algorithm, Limit, NANOS_PER_SECOND, RejectedHits, Unit};
use ratethrottle::storage::MemoryStore;
use std::hint::black_box;
use std::process::Command;

const ALGORITHMS: [Algorithm; 6] = Algorithm::ALL;
const NOW: u64 = 1_800_000_000 * NANOS_PER_SECOND;
const CASE_VAR: &str = "RATETHROTTLE_MEMORY_BENCH_CASE";

/// Resident set size of this process, in bytes.
fn rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS");
    kb * 1024
}

/// Keys as the engine makes them: xxh3-128 digests, here of a counter.
fn key(i: u64) -> u128 {
    xxhash_rust::xxh3::xxh3_128(&i.to_le_bytes())
}

/// One case, in this (child) process: prints `keys_held rss_growth_bytes`.
fn run_case(algorithm: Algorithm, max_keys: usize, offered: u64) {
    let limit = Limit {
        algorithm,
        requests_per_unit: 1_000,
        unit: Unit::Hour,
        burst: algorithm.default_burst(1_000).max(1),
        block_duration: 0,
    };
    let before = rss();
    let store = MemoryStore::new(max_keys);
    for i in 0..offered {
        // Distinct instants, as real traffic has (the log keeps one entry per instant).
        black_box(store.apply(key(i), &limit, NOW + i, 1, RejectedHits::Free));
    }
    let after = rss();
    println!("{} {}", store.len(), after.saturating_sub(before));
    drop(black_box(store));
}

/// Runs one case in a child process; returns (keys held, RSS growth).
fn child(algorithm: Algorithm, max_keys: usize, offered: u64) -> (u64, u64) {
    let exe = std::env::current_exe().expect("current exe");
    let out = Command::new(exe)
        .env(
            CASE_VAR,
            format!("{} {max_keys} {offered}", algorithm.as_str()),
        )
        .output()
        .expect("run case");
    assert!(out.status.success(), "case failed: {out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut it = text
        .split_whitespace()
        .map(|v| v.parse::<u64>().expect("number"));
    (it.next().expect("held"), it.next().expect("rss"))
}

fn main() {
    if let Ok(case) = std::env::var(CASE_VAR) {
        let parts: Vec<&str> = case.split_whitespace().collect();
        let algorithm = Algorithm::parse(parts[0]).expect("algorithm");
        run_case(
            algorithm,
            parts[1].parse().expect("max_keys"),
            parts[2].parse().expect("offered"),
        );
        return;
    }
    // `cargo bench` passes `--bench`; a filter argument (an algorithm name) narrows the run.
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    // `cargo test --all-targets` runs this too, without `--bench`: a small smoke run there
    // (every case still runs and is checked), the measurement under `cargo bench`.
    let measuring = std::env::args().any(|a| a == "--bench");
    let default_sizes = if measuring {
        "1000000,5000000"
    } else {
        "20000"
    };
    let sizes: Vec<u64> = std::env::var("MEMORY_BENCH_KEYS")
        .unwrap_or_else(|_| default_sizes.into())
        .split(',')
        .map(|s| s.trim().parse().expect("MEMORY_BENCH_KEYS"))
        .collect();
    println!(
        "memory store: RSS growth per key (fresh process per case; bytes/key: all keys held, \
         max_keys = 2 x keys; bytes/max_key: store at its bound, max_keys = keys, 2 x keys offered)"
    );
    println!(
        "| {:<24} | {:>10} | {:>10} | {:>13} |",
        "algorithm", "keys", "bytes/key", "bytes/max_key"
    );
    println!("|{:-<26}|{:->12}|{:->12}|{:->15}|", "", "", "", "");
    for algorithm in ALGORITHMS {
        if filter
            .as_deref()
            .is_some_and(|f| !algorithm.as_str().contains(f))
        {
            continue;
        }
        for &n in &sizes {
            let (held, grown) = child(algorithm, 2 * n as usize, n);
            assert_eq!(held, n, "every key held");
            let (_, grown_full) = child(algorithm, n as usize, 2 * n);
            println!(
                "| {:<24} | {:>10} | {:>10.1} | {:>13.1} |",
                algorithm.as_str(),
                n,
                grown as f64 / held as f64,
                grown_full as f64 / n as f64
            );
        }
    }
}
