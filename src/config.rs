//! Configuration: the model the server runs from, loading it from YAML with positions,
//! and validating it.
//!
//! Owns: the config model (`Config`, `Settings`, `DomainConfig`, `DescriptorConfig`,
//! `RateLimitConfig`), reading envoyproxy/ratelimit domain files unchanged plus our
//! extensions and settings, and reporting every problem with file, line, column and key
//! path (`ConfigErrors`).
//!
//! Must not touch: descriptor matching, the limiter algorithms, storage, or any I/O beyond
//! reading the config files, no environment variables. Watching for changes and swapping
//! rules in is `runtime`'s: it calls `load` again and swaps the result in only when loading
//! succeeded.

pub mod alerts;
pub mod anomaly;
pub mod authz;
mod decode;
mod error;
mod load;
mod model;
pub mod otel;
pub mod storage_url;
pub mod yaml;

pub use decode::uses_burst;
pub mod jwks;
pub use error::{ConfigError, ConfigErrors};
pub use load::{load, parse_domain, parse_lists, parse_str};
pub use model::{
    Config, DescriptorConfig, DomainConfig, FailureMode, RateLimitConfig, RedisSettings, Settings,
};
