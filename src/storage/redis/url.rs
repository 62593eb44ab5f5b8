//! Storage URLs: `redis://`, `rediss://`, `redis-sentinel://`, `redis-cluster://`.

use fred::types::config::{ClusterDiscoveryPolicy, Config, Server, ServerConfig};

/// How to reach Redis, parsed from a storage URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisUrl {
    pub topology: Topology,
    pub hosts: Vec<(String, u16)>,
    pub username: Option<String>,
    pub password: Option<String>,
    pub database: Option<u8>,
    pub tls: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Topology {
    Standalone,
    /// Sentinels to ask for the current master of this service.
    Sentinel {
        service: String,
    },
    /// Seed nodes; the rest of the cluster is discovered.
    Cluster,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid storage URL {url:?}: {reason}")]
pub struct UrlError {
    pub url: String,
    pub reason: String,
}

impl RedisUrl {
    pub fn parse(url: &str) -> Result<RedisUrl, UrlError> {
        let err = |reason: &str| UrlError {
            url: redact(url),
            reason: reason.to_string(),
        };
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| err("expected scheme://..."))?;
        let (tls, topology_kind) = match scheme {
            "redis" => (false, 0),
            "rediss" => (true, 0),
            "redis-sentinel" => (false, 1),
            "rediss-sentinel" => (true, 1),
            "redis-cluster" => (false, 2),
            "rediss-cluster" => (true, 2),
            _ => {
                return Err(err(
                    "unknown scheme (expected redis, rediss, redis-sentinel or redis-cluster)",
                ));
            }
        };
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let (userinfo, hostlist) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority),
        };
        let (username, password) = match userinfo {
            None => (None, None),
            Some(u) => match u.split_once(':') {
                Some((user, pass)) => (
                    Some(percent_decode(user)).filter(|s| !s.is_empty()),
                    Some(percent_decode(pass)),
                ),
                None => (Some(percent_decode(u)).filter(|s| !s.is_empty()), None),
            },
        };
        let mut hosts = Vec::new();
        for h in hostlist.split(',').filter(|h| !h.is_empty()) {
            let (host, port) = match h.rsplit_once(':') {
                Some((host, port)) if !host.ends_with(']') || h.starts_with('[') => (
                    host,
                    port.parse::<u16>()
                        .map_err(|_| err(&format!("bad port in {h:?}")))?,
                ),
                _ => (h, if topology_kind == 1 { 26379 } else { 6379 }),
            };
            let host = host.trim_start_matches('[').trim_end_matches(']');
            if host.is_empty() {
                return Err(err("empty host"));
            }
            hosts.push((host.to_string(), port));
        }
        if hosts.is_empty() {
            return Err(err("no host"));
        }
        let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        let parse_db = |s: &str| {
            s.parse::<u8>()
                .map_err(|_| err(&format!("database must be a number 0-255, found {s:?}")))
        };
        let (topology, database) = match topology_kind {
            0 => {
                if hosts.len() > 1 {
                    return Err(err(
                        "a standalone URL takes one host (use redis-cluster:// or redis-sentinel://)",
                    ));
                }
                let db = match segments.as_slice() {
                    [] => None,
                    [db] => Some(parse_db(db)?),
                    _ => return Err(err("expected /<db>")),
                };
                (Topology::Standalone, db)
            }
            1 => match segments.as_slice() {
                [service] => (
                    Topology::Sentinel {
                        service: service.to_string(),
                    },
                    None,
                ),
                [service, db] => (
                    Topology::Sentinel {
                        service: service.to_string(),
                    },
                    Some(parse_db(db)?),
                ),
                _ => {
                    return Err(err(
                        "expected /<service name>[/<db>] after the sentinel hosts",
                    ));
                }
            },
            _ => {
                if !segments.is_empty() {
                    return Err(err("a cluster has no database: remove the path"));
                }
                (Topology::Cluster, None)
            }
        };
        Ok(RedisUrl {
            topology,
            hosts,
            username,
            password,
            database,
            tls,
        })
    }

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

    pub fn is_cluster(&self) -> bool {
        self.topology == Topology::Cluster
    }
}

/// `url` with `password` set (`--redis-password`, from a Secret, so it stays out of the URL
/// in the pod spec). Refused for `memory` and for a URL that already has a password.
pub fn with_password(url: &str, password: &str) -> Result<String, String> {
    let parsed = RedisUrl::parse(url).map_err(|e| e.to_string())?;
    if parsed.password.is_some() {
        return Err(format!("{} already has a password", redact(url)));
    }
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err("expected scheme://...".into());
    };
    let (user, hosts) = match rest.rsplit_once('@') {
        Some((user, hosts)) => (user, hosts),
        None => ("", rest),
    };
    let mut encoded = String::new();
    for b in password.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            encoded.push(char::from(b));
        } else {
            encoded.push_str(&format!("%{b:02X}"));
        }
    }
    Ok(format!("{scheme}://{user}:{encoded}@{hosts}"))
}

/// The URL with its password replaced, for logs and errors.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let userinfo = &url[s + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..s + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standalone_with_auth_and_db() {
        let u = RedisUrl::parse("redis://user:p%40ss@127.0.0.1:6380/3").expect("valid");
        assert_eq!(u.topology, Topology::Standalone);
        assert_eq!(u.hosts, vec![("127.0.0.1".to_string(), 6380)]);
        assert_eq!(u.username.as_deref(), Some("user"));
        assert_eq!(u.password.as_deref(), Some("p@ss"));
        assert_eq!(u.database, Some(3));
        assert!(!u.tls);
        let u = RedisUrl::parse("rediss://:secret@redis.example.com").expect("valid");
        assert!(u.tls);
        assert_eq!(u.username, None);
        assert_eq!(u.password.as_deref(), Some("secret"));
        assert_eq!(u.hosts[0].1, 6379);
    }

    #[test]
    fn sentinel_and_cluster() {
        let u = RedisUrl::parse("redis-sentinel://s1:26379,s2:26380/mymaster").expect("valid");
        assert_eq!(
            u.topology,
            Topology::Sentinel {
                service: "mymaster".into()
            }
        );
        assert_eq!(u.hosts.len(), 2);
        let u = RedisUrl::parse("redis-cluster://a:7000,b:7001,c").expect("valid");
        assert!(u.is_cluster());
        assert_eq!(u.hosts[2], ("c".to_string(), 6379));
        let u = RedisUrl::parse("redis://[::1]:7000").expect("ipv6");
        assert_eq!(u.hosts[0], ("::1".to_string(), 7000));
    }

    #[test]
    fn a_password_from_elsewhere_is_encoded_into_the_url() {
        let url = with_password("redis-sentinel://h1:26379,h2/mymaster", "p@ss:/w").unwrap();
        let u = RedisUrl::parse(&url).unwrap();
        assert_eq!(u.password.as_deref(), Some("p@ss:/w"));
        assert_eq!(u.hosts.len(), 2);
        let u = RedisUrl::parse(&with_password("redis://alice@h:1/2", "x").unwrap()).unwrap();
        assert_eq!(
            (u.username.as_deref(), u.password.as_deref(), u.database),
            (Some("alice"), Some("x"), Some(2))
        );
        assert!(
            with_password("redis://:a@h", "b")
                .unwrap_err()
                .contains("already has a password")
        );
        assert!(with_password("memory", "b").is_err());
    }

    #[test]
    fn bad_urls_say_why_and_hide_passwords() {
        for bad in [
            "memcached://x",
            "redis://",
            "redis://h:notaport",
            "redis://h:1/db",
            "redis://a:1,b:2",
            "redis-sentinel://s1:26379",
            "redis-cluster://a:1/0",
        ] {
            assert!(RedisUrl::parse(bad).is_err(), "{bad}");
        }
        let e = RedisUrl::parse("redis://u:hunter2@h:bad").expect_err("bad port");
        assert!(!e.to_string().contains("hunter2"), "{e}");
    }
}
