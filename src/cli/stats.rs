//! `ratethrottle stats`: one snapshot of a running server's `WatchStats`, or a recording of
//! it (`--interval`), printed or exported as JSON (an array) or CSV (a row per snapshot).

use super::remote;
use crate::proto::admin::v1 as pb;
use clap::Args;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use tokio_stream::StreamExt;

#[derive(Debug, Args)]
pub struct StatsArgs {
    /// Admin address of a running `ratethrottle serve`.
    #[arg(
        long,
        env = "RATETHROTTLE_ADMIN_ADDR",
        default_value = "127.0.0.1:8080"
    )]
    admin_addr: String,
    /// The server's admin token: adds the blocked identities.
    #[arg(long, env = "RATETHROTTLE_ADMIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Write the snapshots to this file: `.json` (an array) or `.csv`.
    #[arg(long, value_name = "FILE")]
    export: Option<PathBuf>,
    /// Record a snapshot every this many seconds (until --count or Ctrl-C) instead of one.
    #[arg(long, value_name = "SECS")]
    interval: Option<f64>,
    /// With --interval: stop after this many snapshots.
    #[arg(long)]
    count: Option<u64>,
    /// Rows of the top-N lists.
    #[arg(long, default_value_t = 10)]
    top: u32,
}

enum Format {
    Json,
    Csv,
}

/// An export file, opened (and so checked writable) before anything is asked of the server.
struct Export {
    file: std::io::BufWriter<std::fs::File>,
    format: Format,
    rows: u64,
    path: PathBuf,
}

impl Export {
    fn open(path: PathBuf) -> Result<Export, String> {
        let format = match path.extension().and_then(|e| e.to_str()) {
            Some(e) if e.eq_ignore_ascii_case("json") => Format::Json,
            Some(e) if e.eq_ignore_ascii_case("csv") => Format::Csv,
            _ => {
                return Err(format!(
                    "--export {}: the file name must end in .json or .csv",
                    path.display()
                ));
            }
        };
        let file = std::fs::File::create(&path)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        let mut export = Export {
            file: std::io::BufWriter::new(file),
            format,
            rows: 0,
            path,
        };
        match export.format {
            Format::Json => export.write("[\n")?,
            Format::Csv => export.write(&format!("{}\n", remote::CSV_HEADER))?,
        }
        Ok(export)
    }

    fn write(&mut self, s: &str) -> Result<(), String> {
        self.file
            .write_all(s.as_bytes())
            .and_then(|_| self.file.flush())
            .map_err(|e| format!("writing {}: {e}", self.path.display()))
    }

    fn add(&mut self, s: &pb::StatsSnapshot) -> Result<(), String> {
        let line = match self.format {
            Format::Json => {
                let sep = if self.rows == 0 { "  " } else { ",\n  " };
                format!("{sep}{}", remote::snapshot_json(s))
            }
            Format::Csv => format!("{}\n", remote::snapshot_csv(s)),
        };
        self.rows += 1;
        self.write(&line)
    }

    fn finish(mut self) -> Result<(), String> {
        if let Format::Json = self.format {
            self.write("\n]\n")?;
        }
        eprintln!("wrote {} snapshot(s) to {}", self.rows, self.path.display());
        Ok(())
    }
}

pub fn run(args: StatsArgs) -> ExitCode {
    if let Some(i) = args.interval
        && !(i.is_finite() && (0.1..=3600.0).contains(&i))
    {
        eprintln!("error: --interval must be between 0.1 and 3600 seconds");
        return ExitCode::from(super::EXIT_CONFIG);
    }
    let export = match args.export.clone().map(Export::open).transpose() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
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
    match rt.block_on(record(&args, export)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn record(args: &StatsArgs, mut export: Option<Export>) -> Result<(), String> {
    let mut client = remote::connect(&args.admin_addr).await?;
    // One snapshot: the second of a 1 s stream, so its rates cover a second.
    let (interval_ms, wanted, skip) = match args.interval {
        None => (1000, 1, 1),
        Some(s) => ((s * 1000.0) as u32, args.count.unwrap_or(u64::MAX), 0),
    };
    let req = remote::request(
        pb::WatchStatsRequest {
            interval_ms,
            top_n: args.top,
        },
        args.token.as_deref(),
    )?;
    let mut stream = client
        .watch_stats(req)
        .await
        .map_err(|s| remote::status(&s))?
        .into_inner();
    let mut taken = 0u64;
    let mut seen = 0u64;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    while taken < wanted {
        let next = tokio::select! {
            n = stream.next() => n,
            _ = &mut ctrl_c => break,
        };
        let snap = match next {
            Some(Ok(s)) => s,
            Some(Err(s)) => return Err(remote::status(&s)),
            None => return Err("the server closed the stats stream".into()),
        };
        seen += 1;
        if seen <= skip {
            continue;
        }
        taken += 1;
        match &mut export {
            Some(e) => e.add(&snap)?,
            None => print_snapshot(&snap, args.interval.is_some()),
        }
    }
    if let Some(e) = export {
        e.finish()?;
    }
    Ok(())
}

fn print_snapshot(s: &pb::StatsSnapshot, compact: bool) {
    // A closed stdout (`| head`) ends the output, never the process with a panic.
    let mut out = std::io::stdout().lock();
    if compact {
        let _ = writeln!(
            out,
            "{} requests/s {:.1} over_limit/s {:.1} requests_total {} over_limit_total {}",
            s.unix_ms,
            s.requests_per_second,
            s.over_limit_per_second,
            s.requests_total,
            s.over_limit_total
        );
        return;
    }
    let storage = s.storage.clone().unwrap_or_default();
    let _ = writeln!(out, "config version:    {}", s.config_version);
    let _ = writeln!(
        out,
        "requests:          {:.1}/s ({} total)",
        s.requests_per_second, s.requests_total
    );
    let _ = writeln!(
        out,
        "over limit:        {:.1}/s ({} total)",
        s.over_limit_per_second, s.over_limit_total
    );
    let _ = writeln!(
        out,
        "storage:           {}{}{}",
        storage.kind,
        if storage.degraded { " DEGRADED" } else { " ok" },
        if storage.kind == "redis" {
            format!(", ping {:.2} ms", storage.ping_ms)
        } else {
            String::new()
        }
    );
    for d in &s.domains {
        let _ = writeln!(
            out,
            "domain {}: {:.1} hits/s, {:.1} over limit/s ({} over limit total)",
            d.domain, d.hits_per_second, d.over_limit_per_second, d.over_limit_total
        );
    }
    if !s.top_limited.is_empty() {
        let _ = writeln!(out, "top limited descriptors:");
        for d in &s.top_limited {
            let _ = writeln!(
                out,
                "  {:<48} {:>8.1}/s {:>10} total",
                d.stat_key, d.over_limit_per_second, d.over_limit_total
            );
        }
    }
    if s.identities_redacted {
        let _ = writeln!(out, "blocked identities: (pass --token to see them)");
    } else if !s.blocked_identities.is_empty() {
        let _ = writeln!(out, "blocked identities (recent):");
        for i in &s.blocked_identities {
            let _ = writeln!(out, "  {:<48} {:>6}", i.identity, i.count);
        }
    }
}
