//! The fred client configuration for a storage URL (parsed and checked in
//! `config::storage_url`).

pub use crate::config::storage_url::{RedisUrl, Topology, UrlError, redact, with_password};
use fred::types::config::{ClusterDiscoveryPolicy, Config, Server, ServerConfig};

impl RedisUrl {
    /// The fred client configuration (without TLS; the caller adds it).
    pub fn fred_config(&self) -> Config {
        let servers: Vec<Server> = self
            .hosts
            .iter()
            .map(|(h, p)| Server::new(h.as_str(), *p))
            .collect();
        let server = match &self.topology {
            Topology::Standalone => ServerConfig::Centralized {
                server: servers[0].clone(),
            },
            Topology::Cluster => ServerConfig::Clustered {
                hosts: servers,
                policy: ClusterDiscoveryPolicy::default(),
            },
            Topology::Sentinel { service } => ServerConfig::Sentinel {
                hosts: servers,
                service_name: service.clone(),
            },
        };
        Config {
            server,
            username: self.username.clone(),
            password: self.password.clone(),
            database: self.database,
            // Start even when Redis is down: the failure mode answers until it returns.
            fail_fast: false,
            ..Default::default()
        }
    }
}
