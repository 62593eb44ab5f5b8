//! Storage URLs: `redis://`, `rediss://`, `redis-sentinel://`, `redis-cluster://` — text to a
//! checked model, so `config validate` and `serve` refuse the same URLs with the same words.
//!
//! Owns: the URL grammar, strict percent-decoding of the user name and password, redaction
//! (no password ever reaches a message). Must not touch: connecting (storage::redis).

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};

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
        let decode = |text: &str, what: &str| {
            percent_decode(text).map_err(|e| err(&format!("the {what} has {e}")))
        };
        let (username, password) = match userinfo {
            None => (None, None),
            Some(u) => match u.split_once(':') {
                Some((user, pass)) => (
                    Some(decode(user, "user name")?).filter(|s| !s.is_empty()),
                    Some(decode(pass, "password")?),
                ),
                None => (
                    Some(decode(u, "user name")?).filter(|s| !s.is_empty()),
                    None,
                ),
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
    let encoded = utf8_percent_encode(password, USERINFO);
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

/// What a user name or password keeps unescaped (RFC 3986 unreserved characters).
const USERINFO: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Strict percent-decoding: every `%` starts two hex digits and the result is UTF-8. A bad
/// escape is an error (never taken as literal text: the password would silently be another).
fn percent_decode(text: &str) -> Result<String, &'static str> {
    let bytes = text.as_bytes();
    for (i, _) in text.match_indices('%') {
        let hex = |j: usize| bytes.get(i + j).is_some_and(u8::is_ascii_hexdigit);
        if !(hex(1) && hex(2)) {
            return Err("a bad percent escape (% must start two hex digits; write % as %25)");
        }
    }
    percent_decode_str(text)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| "percent escapes that do not decode to UTF-8")
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
        // Bad escapes: an error naming the problem, the password redacted, never a panic.
        for bad in [
            "redis://:%a\u{e9}hunter2@h:1",
            "redis://:%zzhunter2@h:1",
            "redis://:hunter2%@h:1",
            "redis://:hunter2%f@h:1",
            "redis://:hunter2%ff@h:1",
            "redis://u%ZZ:hunter2@h:1",
        ] {
            let e = RedisUrl::parse(bad).expect_err(bad).to_string();
            assert!(e.contains("percent"), "{e}");
            assert!(!e.contains("hunter2"), "{e}");
        }
        let ok = RedisUrl::parse("redis://:%C3%A9t%C3%A9%25@h:1").expect("valid");
        assert_eq!(ok.password.as_deref(), Some("été%"));
    }
}
