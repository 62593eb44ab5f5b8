//! Sources that are states or rings rather than calls: the storage's health (degraded and
//! recovered are its transitions) and the violation ring (over-limit and blocked answers per
//! domain). Each is a loop the server runs beside the others while alerts are on; neither
//! touches the request path.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use super::{AlertEvent, Alerts};
use crate::storage::Storage;
use crate::telemetry::ServiceMetrics;

/// How often storage health is looked at.
pub const STORAGE_POLL: Duration = Duration::from_millis(250);
/// How often the violation ring is read.
pub const VIOLATIONS_POLL: Duration = Duration::from_secs(1);

/// Emits `StorageDegraded` when the storage turns degraded and `StorageRecovered` when it
/// answers again. Pending forever for a storage without health (memory).
pub async fn storage(storage: Arc<Storage>, alerts: Alerts) {
    if storage.health().is_none() {
        return std::future::pending().await;
    }
    let mut was = false;
    let mut tick = tokio::time::interval(STORAGE_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(h) = storage.health() else {
            continue;
        };
        let now = h.is_degraded();
        if now && !was {
            let reason = h.last_error().unwrap_or_else(|| "unknown error".into());
            alerts.emit(AlertEvent::StorageDegraded { reason });
        } else if was && !now {
            alerts.emit(AlertEvent::StorageRecovered);
        }
        was = now;
    }
}

/// Reads the violation ring every second and emits the count per domain. The ring samples
/// floods (at most `telemetry::violations::MAX_PER_SECOND` events a second), so a threshold
/// above that many per second of window is never reached.
pub async fn violations(metrics: Arc<ServiceMetrics>, alerts: Alerts) {
    let log = &metrics.violations;
    let mut next = log.next_seq();
    let mut tick = tokio::time::interval(VIOLATIONS_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let events = log.since(next);
        let Some(last) = events.last() else {
            continue;
        };
        next = last.seq + 1;
        let mut per_domain: HashMap<&str, u64> = HashMap::new();
        for e in &events {
            *per_domain.entry(e.domain.as_str()).or_default() += 1;
        }
        for (domain, count) in per_domain {
            alerts.emit(AlertEvent::Violations {
                domain: domain.to_string(),
                count,
            });
        }
    }
}
