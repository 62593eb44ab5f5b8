//! ratethrottle: an Envoy rate limit and external authorization sidecar.
//!
//! Layers, lowest first; a module uses only layers below its own (`tests/architecture.rs`
//! checks every `crate::` path against this map): `digest` (stable hashes), `text`, `proto`
//! (generated API types) → `limiter` (pure algorithms) and `anomaly` (sans-IO detection) →
//! `lists` (allow/block entry model, CIDR trie) → `config` (text → validated model) → `rules`
//! (compiled match tree) → `storage` (counters in memory or Redis) and `telemetry` (metric
//! counters, trace export) → `alerts` (events to webhook, Slack and Alertmanager sinks; fed by the runtime
//! and the server's watchers) → `engine` (one ShouldRateLimit decision) → `runtime` (live merge of files and
//! resources, reload, runtime lists) → `authz` (ext_authz decisions) → `service` (gRPC face)
//! and `k8s` (resource watcher) → `admin` (HTTP face) → `server` (assembly) → `cli`.
//! See each module's top comment for what it owns and must not touch.
#![forbid(unsafe_code)]
// The Redis request path nests deep futures (service → engine → store → coalescing → wire):
// computing their layouts needs more than the default 128 query levels.
#![recursion_limit = "256"]

pub mod admin;
pub mod alerts;
pub mod anomaly;
pub mod authz;
pub mod cli;
pub mod config;
pub mod digest;
pub mod engine;
pub mod k8s;
pub mod limiter;
pub mod lists;
pub mod proto;
pub mod rules;
pub mod runtime;
pub mod server;
pub mod service;
pub mod storage;
pub mod telemetry;
pub mod text;
