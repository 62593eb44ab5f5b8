//! Hot reload: watches the config file or directory and hands a new file configuration to
//! `LiveConfig` (which merges, compiles and swaps it in) when its content changes.
//!
//! Survives Kubernetes ConfigMap updates (the `..data` symlink swap is a rename in the
//! watched directory), editors that write a temp file and rename it, and bursts of events
//! (debounced). File events are a hint only: a periodic poll compares content versions, so a
//! missed event delays a reload, never loses it. A bad config keeps the last good one.
//!
//! Never limitless by accident: an empty file is a load error (`load`), a new configuration
//! without any domain while the one in force has some is refused unless the operator allowed
//! it (`--allow-empty-config`), and a change is put in force only once the files read the
//! same twice, `SETTLE` apart — a file caught mid-rewrite (`cat > f`) is never loaded.

use super::live::LiveConfig;
use crate::alerts::{AlertEvent, Alerts};
use crate::config::{Config, ConfigError, ConfigErrors, load};
use crate::telemetry::ServiceMetrics;
use notify::{RecursiveMode, Watcher};
use parking_lot::RwLock;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

/// What `/readyz` and `/v1/config` report about the configuration.
#[derive(Debug, Default, Clone)]
pub struct ReloadStatus {
    pub loaded: bool,
    pub version: String,
    pub loaded_at_unix: u64,
    pub source: Option<String>,
    /// The newest load failure, kept until a load succeeds.
    pub last_error: Option<String>,
    /// The effective configuration (files and resources merged), as JSON.
    pub config: serde_json::Value,
    /// The Kubernetes watcher's state, with `--kubernetes`.
    pub kubernetes: Option<crate::telemetry::KubernetesStatus>,
}

/// Loads a path into the live configuration, now and whenever it changes.
pub struct Reloader {
    path: PathBuf,
    live: Arc<LiveConfig>,
    metrics: Arc<ServiceMetrics>,
    status: Arc<RwLock<ReloadStatus>>,
    allow_empty: bool,
    alerts: Alerts,
}

/// How long a changed configuration must read the same before it is put in force.
const SETTLE: Duration = Duration::from_millis(100);

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloader")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Reloader {
    pub fn new(
        path: PathBuf,
        live: Arc<LiveConfig>,
        metrics: Arc<ServiceMetrics>,
        status: Arc<RwLock<ReloadStatus>>,
    ) -> Self {
        Reloader {
            path,
            live,
            metrics,
            status,
            allow_empty: false,
            alerts: Alerts::off(),
        }
    }

    /// Where reload failures are reported (`config_reload_failed` alerts).
    pub fn alerts(mut self, alerts: Alerts) -> Self {
        self.alerts = alerts;
        self
    }

    /// Whether a reload may remove every domain in force (`--allow-empty-config`).
    pub fn allow_empty(mut self, allow: bool) -> Self {
        self.allow_empty = allow;
        self
    }

    /// Publishes an already loaded config (the one `serve` validated before binding).
    pub fn install(&self, config: &Config) {
        self.live.set_file(config.clone());
        let mut st = self.status.write();
        st.loaded = true;
        st.source = Some(self.path.display().to_string());
        st.last_error = None;
    }

    /// Loads the path once. `Ok(true)` when a new version went into force, `Ok(false)` when
    /// nothing changed; on error the rules in force stay.
    pub fn reload(&self) -> Result<bool, ConfigErrors> {
        match self.load_change() {
            Ok(Some(config)) => {
                self.put_in_force(&config);
                Ok(true)
            }
            Ok(None) => Ok(false),
            Err(errors) => {
                self.record_error(&errors);
                Err(errors)
            }
        }
    }

    /// `reload`, acting only on what reads the same twice, `SETTLE` apart: a file caught
    /// between truncate and write, or half written, is neither loaded nor reported.
    pub async fn reload_settled(&self) {
        let first = self.load_change();
        if matches!(first, Ok(None)) {
            // The files read as the version in force again: a refused edit was undone.
            if self.status.read().last_error.is_some() {
                self.status.write().last_error = None;
            }
            return;
        }
        tokio::time::sleep(SETTLE).await;
        match (first, self.load_change()) {
            (Ok(Some(a)), Ok(Some(b))) if a.version == b.version => self.put_in_force(&b),
            (Err(a), Err(b)) if a.to_string() == b.to_string() => self.record_error(&b),
            _ => tracing::debug!("configuration still changing; retrying at the next tick"),
        }
    }

    /// The configuration at the path if it differs from the one in force and may replace it.
    fn load_change(&self) -> Result<Option<Config>, ConfigErrors> {
        let config = load(&self.path)?;
        if self.live.file_version().as_deref() == Some(config.version.as_str()) {
            return Ok(None);
        }
        let in_force = self.live.file_domains();
        if config.domains.is_empty() && !in_force.is_empty() && !self.allow_empty {
            let mut names = in_force
                .iter()
                .take(5)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ");
            if in_force.len() > 5 {
                names.push_str(", ...");
            }
            return Err(ConfigErrors(vec![ConfigError::file(
                &self.path,
                format!(
                    "this configuration defines no domain and would remove every domain in \
                     force ({} : {names}); refused. Start serve with --allow-empty-config \
                     (RATETHROTTLE_ALLOW_EMPTY_CONFIG=true) if that is meant",
                    in_force.len()
                ),
            )]));
        }
        Ok(Some(config))
    }

    fn put_in_force(&self, config: &Config) {
        self.install(config);
        tracing::info!(
            version = %config.version,
            domains = config.domains.len(),
            "configuration loaded"
        );
    }

    fn record_error(&self, errors: &ConfigErrors) {
        let text = errors.to_string();
        let mut st = self.status.write();
        // The poll retries every interval: count and log a bad config once per distinct
        // error, not once per poll.
        if st.last_error.as_deref() != Some(text.as_str()) {
            self.metrics.config_load_error.fetch_add(1, Relaxed);
            for e in errors.iter() {
                tracing::error!("config error, keeping version {:?}: {e}", st.version);
            }
            self.alerts.emit_with(|| AlertEvent::ReloadFailed {
                error: text.clone(),
            });
            st.last_error = Some(text);
        }
    }

    /// Watches and reloads until the task is dropped.
    pub async fn run(self, poll: Duration) {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
        let watcher = notify::recommended_watcher(move |_event| {
            // Full channel = a reload is already pending; dropping the hint is fine.
            let _ = tx.try_send(());
        });
        let _watcher = match watcher {
            Ok(mut w) => match w.watch(watch_root(&self.path), RecursiveMode::NonRecursive) {
                Ok(()) => Some(w),
                Err(e) => {
                    tracing::warn!("cannot watch {}: {e}; polling only", self.path.display());
                    None
                }
            },
            Err(e) => {
                tracing::warn!("file watcher unavailable: {e}; polling only");
                None
            }
        };
        let mut tick = tokio::time::interval(poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                Some(()) = rx.recv() => {
                    // Debounce: let a burst of events (an editor's save, a ConfigMap swap) settle.
                    tokio::time::sleep(Duration::from_millis(150)).await;
                    while rx.try_recv().is_ok() {}
                }
                _ = tick.tick() => {}
            }
            self.reload_settled().await;
        }
    }
}

/// A file is watched through its directory: renames replace the file's inode.
fn watch_root(path: &Path) -> &Path {
    if path.is_dir() {
        path
    } else {
        path.parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
    }
}
