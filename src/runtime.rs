//! The running state built from configuration: the rules in force (the live merge of files
//! and resources, compiled and swapped whole), hot reload of the files, and the runtime
//! allow/block store (in memory, or shared through Redis), the anomaly task and the trust it
//! shares for adaptive limits.
//!
//! Owns: what changes while the process runs, and when it may change (a reload that would
//! drop every limit is refused; runtime list entries are shared across replicas).
//! Must not touch: decisions (engine, authz) or serving (service, admin); it reaches the
//! layers above only through install hooks they register.

pub mod adaptive;
pub mod anomaly;
pub mod blocklist;
pub mod live;
pub mod reload;
pub mod replicas;
