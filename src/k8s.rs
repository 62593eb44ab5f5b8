//! Kubernetes: the `RateLimitPolicy` and `AccessList` custom resources, and the watcher that
//! keeps them in force beside the file configuration.
//!
//! Owns: the resource types and their generated CRDs (`crd`), turning a resource into
//! rules or list entries and deciding its status (`resource`), and the list/watch loop
//! with status writes (`watcher`).
//!
//! Must not touch: how rules are merged or compiled (config::live), how entries are
//! matched (authz, blocklist). Kubernetes being slow, gone or wrong must never take rules
//! out of force: the last good set stays until the API server says otherwise.

pub mod crd;
mod resource;
mod watcher;

pub use crd::{AccessList, RateLimitPolicy, crd_yaml, crds};
pub use resource::{ManifestReport, validate_manifests};
pub use watcher::{KubernetesError, KubernetesOptions, Scope, Watcher};
