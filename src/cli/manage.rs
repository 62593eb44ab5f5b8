//! `ratethrottle manage`: the runtime allow/block lists and the anomaly module's decisions of
//! a running server, through its admin API (`/v1/lists`, `/v1/anomaly`).

use clap::{ArgGroup, Args};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use std::process::ExitCode;
use std::time::Duration;

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("action").required(true).args([
    "blocklist_add", "blocklist_remove", "allowlist_add", "allowlist_remove", "list",
    "anomaly_decisions", "anomaly_explain", "anomaly_unban"
])))]
pub struct ManageArgs {
    /// Admin HTTP address of a running `ratethrottle serve`.
    #[arg(
        long,
        env = "RATETHROTTLE_ADMIN_ADDR",
        default_value = "127.0.0.1:8080"
    )]
    admin_addr: String,
    /// The server's admin token.
    #[arg(long, env = "RATETHROTTLE_ADMIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Block an IP, a CIDR or an identity (`user:alice`).
    #[arg(long, value_name = "IP|CIDR|ID")]
    blocklist_add: Option<String>,
    #[arg(long, value_name = "IP|CIDR|ID")]
    blocklist_remove: Option<String>,
    /// Let an IP, a CIDR or an identity bypass lists and limits.
    #[arg(long, value_name = "IP|CIDR|ID")]
    allowlist_add: Option<String>,
    #[arg(long, value_name = "IP|CIDR|ID")]
    allowlist_remove: Option<String>,
    /// Print both lists.
    #[arg(long)]
    list: bool,
    /// Print the anomaly module's recent decisions (enforced and dry-run, with evidence).
    #[arg(long)]
    anomaly_decisions: bool,
    /// Why an address, a /24, /64 or /48, or an identity is or isn't flagged, and its trust.
    #[arg(long, value_name = "IP|CIDR|ID")]
    anomaly_explain: Option<String>,
    /// Undo an anomaly decision: removes its block entry (never a manual one), ends a
    /// throttle, and suppresses re-detection for a while.
    #[arg(long, value_name = "IP|CIDR|ID")]
    anomaly_unban: Option<String>,
    /// With an add: the entry expires after this many seconds (default: never).
    #[arg(long, value_name = "SECS")]
    duration: Option<u64>,
    /// With an add: why (shown to operators, never to callers).
    #[arg(long, default_value = "")]
    reason: String,
    /// With an add: the public reason code blocked callers see (a-z, 0-9, _ and -).
    #[arg(long)]
    code: Option<String>,
}

pub fn run(args: ManageArgs) -> ExitCode {
    let (method, path, body) = if let Some(v) = &args.blocklist_add {
        (
            "POST",
            "/v1/lists/block".to_string(),
            Some(add_body(&args, v)),
        )
    } else if let Some(v) = &args.allowlist_add {
        (
            "POST",
            "/v1/lists/allow".to_string(),
            Some(add_body(&args, v)),
        )
    } else if let Some(v) = &args.blocklist_remove {
        ("DELETE", format!("/v1/lists/block/{}", encode(v)), None)
    } else if let Some(v) = &args.allowlist_remove {
        ("DELETE", format!("/v1/lists/allow/{}", encode(v)), None)
    } else if args.anomaly_decisions {
        ("GET", "/v1/anomaly/decisions".to_string(), None)
    } else if let Some(v) = &args.anomaly_explain {
        (
            "GET",
            format!("/v1/anomaly/explain?key={}", encode_query(v)),
            None,
        )
    } else if let Some(v) = &args.anomaly_unban {
        (
            "DELETE",
            format!("/v1/anomaly/decisions/{}", encode(v)),
            None,
        )
    } else {
        ("GET", "/v1/lists".to_string(), None)
    };
    if args.duration == Some(0) {
        eprintln!("error: --duration must be greater than 0");
        return ExitCode::from(super::EXIT_CONFIG);
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let addr = args
        .admin_addr
        .trim_start_matches("http://")
        .trim_end_matches('/');
    let result = rt.block_on(request(
        addr,
        method,
        &path,
        args.token.as_deref(),
        body.as_deref(),
    ));
    let (status, body) = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {addr}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let json: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    if !(200..300).contains(&status) {
        let msg = json["error"].as_str().unwrap_or(body.trim());
        eprintln!("error: {status}: {msg}");
        return ExitCode::FAILURE;
    }
    if args.list {
        print_lists(&json);
    } else if args.anomaly_decisions {
        print_decisions(&json);
    } else if args.anomaly_explain.is_some() {
        println!(
            "{}",
            serde_json::to_string_pretty(&json).unwrap_or_else(|_| body.trim().to_string())
        );
    } else if let Some(v) = &args.anomaly_unban {
        println!("unbanned: {v}");
    } else if let Some(e) = json.get("entry") {
        println!(
            "added to {}list: {}{}",
            json["list"].as_str().unwrap_or_default(),
            e["value"].as_str().unwrap_or_default(),
            match e["expires_at_ms"].as_u64() {
                Some(ms) => format!(" (expires in {}s)", args.duration.unwrap_or(ms / 1000)),
                None => String::new(),
            }
        );
    } else {
        println!(
            "removed from {}list: {}",
            json["list"].as_str().unwrap_or_default(),
            json["removed"].as_str().unwrap_or_default()
        );
    }
    ExitCode::SUCCESS
}

fn add_body(args: &ManageArgs, value: &str) -> String {
    let mut b = serde_json::json!({ "value": value, "reason": args.reason });
    if let Some(d) = args.duration {
        b["ttl_seconds"] = d.into();
    }
    if let Some(c) = &args.code {
        b["code"] = c.as_str().into();
    }
    b.to_string()
}

fn print_decisions(json: &serde_json::Value) {
    println!(
        "{:<9} {:<40} {:<9} {:<22} {:<8} {:>8} {:<9} NOTE",
        "SCOPE", "VALUE", "ACTION", "REASON", "MODE", "COUNT", "REPLICA"
    );
    for d in json["decisions"].as_array().into_iter().flatten() {
        let mode = if d["dry_run"] == true {
            "dry-run"
        } else if d["unbanned_at_ms"].is_u64() {
            "unbanned"
        } else if d["enforced"] == true {
            "enforced"
        } else {
            "recorded"
        };
        println!(
            "{:<9} {:<40} {:<9} {:<22} {:<8} {:>8} {:<9} {}",
            d["scope"].as_str().unwrap_or_default(),
            d["value"].as_str().unwrap_or_default(),
            d["action"].as_str().unwrap_or_default(),
            d["reason"].as_str().unwrap_or_default(),
            mode,
            d["evidence"]["count"].as_u64().unwrap_or(0),
            d["replica"].as_str().unwrap_or_default(),
            d["note"].as_str().unwrap_or_default()
        );
    }
}

fn print_lists(json: &serde_json::Value) {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    println!(
        "{:<6} {:<40} {:<8} {:>10} {:<18} REASON",
        "LIST", "VALUE", "SOURCE", "EXPIRES", "CODE"
    );
    for list in ["allow", "block"] {
        for e in json[list].as_array().into_iter().flatten() {
            let expires = match e["expires_at_ms"].as_u64() {
                Some(ms) => format!("{}s", ms.saturating_sub(now_ms).div_ceil(1000)),
                None => "never".into(),
            };
            println!(
                "{:<6} {:<40} {:<8} {:>10} {:<18} {}",
                list,
                e["value"].as_str().unwrap_or_default(),
                e["source"].as_str().unwrap_or_default(),
                expires,
                e["code"].as_str().unwrap_or("-"),
                e["reason"].as_str().unwrap_or_default()
            );
        }
    }
}

/// What a list value keeps unescaped in the request path: a CIDR's `/` and an identity's
/// `:`, `/` and `@` stay (the server's route takes the rest of the path).
const PATH_VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b':')
    .remove(b'/')
    .remove(b'@');

fn encode(v: &str) -> String {
    utf8_percent_encode(v, PATH_VALUE).to_string()
}

/// A query value: everything but unreserved characters escaped (`+`, `&`, `=`, `#` too).
fn encode_query(v: &str) -> String {
    const QUERY: &AsciiSet = &NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~');
    utf8_percent_encode(v, QUERY).to_string()
}

/// One HTTP/1.1 request over its own connection (hyper's client): status and body.
pub(crate) async fn request(
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> Result<(u16, String), String> {
    let work = async {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connecting: {e}"))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| format!("connecting: {e}"))?;
        tokio::spawn(conn);
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, addr)
            .header(hyper::header::CONTENT_TYPE, "application/json");
        if let Some(t) = token {
            req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default().to_string())))
            .map_err(|e| format!("bad request: {e}"))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("sending: {e}"))?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("reading: {e}"))?
            .to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(Duration::from_secs(10), work)
        .await
        .map_err(|_| "no answer within 10s".to_string())?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_values_for_the_path() {
        assert_eq!(encode("10.0.0.0/8"), "10.0.0.0/8");
        assert_eq!(encode("2001:db8::/32"), "2001:db8::/32");
        assert_eq!(encode("user:a b?"), "user:a%20b%3F");
        assert_eq!(encode_query("user:a+b&c=é"), "user%3Aa%2Bb%26c%3D%C3%A9");
    }
}
