//! `ratethrottle monitor` driven under a real tmux against a real server under load: the
//! live views, key handling, quitting, and an unreachable server.
//!
//! Needs tmux: `bash scripts/test.sh` installs it (scripts/observability-tools.sh) and exports
//! RATETHROTTLE_TEST_TMUX.
#![allow(
    clippy::disallowed_methods,
    reason = "test harness: where the tools are (env) and wall-clock stamps"
)]

mod support;

use std::process::Command;
use std::time::{Duration, Instant};
use support::check::Check;
use support::{BIN, Sidecar, request};

const CONFIG: &str = r#"
settings:
  admin_token: mon-t0ken
authz:
  domain: gate
  identity:
    sources: [client_ip]
  lists:
    block: [203.0.113.0/24]
domains:
  - domain: edge
    descriptors:
      - key: api_key
        rate_limit: {unit: second, requests_per_unit: 5, name: per_key}
"#;

/// A tmux server of our own (its own socket), killed on drop.
struct Tmux {
    bin: std::path::PathBuf,
    socket: String,
}

impl Tmux {
    fn new(name: &str) -> Tmux {
        let bin = std::env::var_os("RATETHROTTLE_TEST_TMUX")
            .map(Into::into)
            .unwrap_or_else(|| {
                panic!(
                    "RATETHROTTLE_TEST_TMUX is not set: run the tests with `bash scripts/test.sh` \
                     (e.g. `bash scripts/test.sh cargo test --test monitor`), which installs tmux \
                     (scripts/observability-tools.sh)"
                )
            });
        Tmux {
            bin,
            socket: format!("rt-monitor-{}-{name}", std::process::id()),
        }
    }

    fn run(&self, args: &[&str]) -> std::process::Output {
        Command::new(&self.bin)
            .args(["-L", &self.socket])
            .args(args)
            .output()
            .expect("run tmux")
    }

    /// Starts `command` in a detached 120x40 session named `session`.
    fn start(&self, session: &str, command: &str) {
        let out = self.run(&[
            "new-session",
            "-d",
            "-s",
            session,
            "-x",
            "120",
            "-y",
            "40",
            command,
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn capture(&self, session: &str) -> String {
        String::from_utf8_lossy(&self.run(&["capture-pane", "-p", "-t", session]).stdout)
            .to_string()
    }

    fn keys(&self, session: &str, keys: &str) {
        assert!(
            self.run(&["send-keys", "-t", session, keys])
                .status
                .success()
        );
    }

    fn alive(&self, session: &str) -> bool {
        self.run(&["has-session", "-t", session]).status.success()
    }

    /// Waits (bounded) until the screen satisfies `cond`; returns it.
    fn wait_for(&self, session: &str, what: &str, cond: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let screen = self.capture(session);
            if cond(&screen) {
                return screen;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; screen:\n{screen}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn wait_gone(&self, session: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.alive(session) {
            assert!(
                Instant::now() < deadline,
                "{session} did not quit:\n{}",
                self.capture(session)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

/// The number after `label` on the screen (`over-limit/s 12.5`).
fn number_after(screen: &str, label: &str) -> Option<f64> {
    let i = screen.find(label)? + label.len();
    screen[i..].split_whitespace().next()?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monitor_shows_live_load_switches_views_and_quits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("ratethrottle.yaml");
    std::fs::write(&file, CONFIG).expect("write");
    let sc = Sidecar::start(Some(&file), &[]);

    // Load: ShouldRateLimit well over 5/s, and blocked Checks, until the test ends.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut rl = sc.client().await;
    let mut authz = sc.authz().await;
    let stop2 = stop.clone();
    let load = tokio::spawn(async move {
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            for _ in 0..20 {
                let _ = rl
                    .should_rate_limit(request("edge", &[&[("api_key", "k")]]))
                    .await;
            }
            let _ = authz.check(Check::new("203.0.113.5").build()).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });

    let tmux = Tmux::new("live");
    let cmd = format!(
        "{BIN} monitor --admin-addr {} --token mon-t0ken --interval-ms 200",
        sc.admin
    );
    let screen = tokio::task::block_in_place(|| {
        tmux.start("live", &cmd);
        tmux.wait_for(
            "live",
            "live over-limit rates and the top descriptor",
            |s| {
                s.contains(" live")
                    && number_after(s, "over-limit/s").is_some_and(|r| r > 0.0)
                    && number_after(s, "requests/s").is_some_and(|r| r > 0.0)
                    && s.contains("edge.api_key")
            },
        )
    });
    assert!(screen.contains("storage memory ok"), "{screen}");
    assert!(screen.contains("1 Overview"), "{screen}");

    tokio::task::block_in_place(|| {
        tmux.keys("live", "2");
        tmux.wait_for("live", "the domains view", |s| {
            s.contains("┌domains") && s.contains("edge")
        });
        tmux.keys("live", "3");
        let s = tmux.wait_for("live", "the blocked identity", |s| {
            s.contains("203.0.113.5")
        });
        assert!(s.contains("blocked identities"), "{s}");
        tmux.keys("live", "4");
        // No anomaly block in this config: the view says so rather than showing an empty list.
        tmux.wait_for("live", "the decisions view", |s| {
            s.contains("┌anomaly decisions") && s.contains("anomaly detection is off")
        });
        tmux.keys("live", "q");
        tmux.wait_gone("live");
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    load.await.expect("load task");
}

#[test]
fn monitor_says_so_when_the_server_is_unreachable_and_still_quits() {
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr");
    let tmux = Tmux::new("down");
    tmux.start("down", &format!("{BIN} monitor --admin-addr {free}"));
    let s = tmux.wait_for("down", "the unreachable message", |s| {
        s.contains("server unreachable") && s.contains("UNREACHABLE")
    });
    assert!(s.contains("cannot reach the admin API"), "{s}");
    assert!(s.contains("refused"), "the cause is named: {s}");
    tmux.keys("down", "q");
    tmux.wait_gone("down");
}
