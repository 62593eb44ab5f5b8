//! The settings file's `anomaly:` block: the detector's thresholds (`crate::anomaly::Config`)
//! plus what only the running server needs (the queue size, whether the block is on).
//! Present means on; absent means the module is off and costs the hot path one `Option`
//! check.

use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};

use crate::anomaly;

/// Events the hot path may queue before new ones are dropped (and counted).
pub const DEFAULT_QUEUE_SIZE: usize = 65_536;

/// `anomaly:` as loaded.
#[derive(Debug, Clone, PartialEq)]
pub struct AnomalySettings {
    /// `enabled: false` keeps the block but turns the module off.
    pub enabled: bool,
    /// The detector's settings. `replica` is the configured one, or empty: the server then
    /// uses the host name.
    pub detector: anomaly::Config,
    pub queue_size: usize,
    /// Per-caller trust for adaptive limits (`trust:`).
    pub trust: anomaly::TrustConfig,
}

impl Default for AnomalySettings {
    fn default() -> Self {
        AnomalySettings {
            enabled: true,
            detector: anomaly::Config {
                replica: String::new(),
                ..Default::default()
            },
            queue_size: DEFAULT_QUEUE_SIZE,
            trust: anomaly::TrustConfig::default(),
        }
    }
}

/// A short summary for `/v1/config` (the thresholds are in the README and `explain`).
impl Serialize for AnomalySettings {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let d = &self.detector;
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("enabled", &self.enabled)?;
        m.serialize_entry("dry_run", &d.dry_run)?;
        m.serialize_entry("warmup_ms", &d.warmup_ms)?;
        m.serialize_entry("replica", &d.replica)?;
        m.serialize_entry("queue_size", &self.queue_size)?;
        m.serialize_entry("window_ms", &d.window_ms)?;
        m.serialize_entry("volumetric_floor", &d.volumetric.floor)?;
        m.serialize_entry("volumetric_p99_multiple", &d.volumetric.p99_multiple)?;
        m.serialize_entry("trust_half_life_ms", &self.trust.half_life_ms)?;
        m.end()
    }
}
