//! The `ratethrottle` command line: `serve`, `config validate|show`, `check`, `manage`, `crd`,
//! and the operators' commands against a running server: `stats`, `test`, `monitor`.
//!
//! Owns: argument parsing (every flag also from a `RATETHROTTLE_*` env var), exit codes, and
//! reporting errors with context. Must not touch: decisions or config semantics.
#![allow(
    clippy::disallowed_methods,
    reason = "the command line is where the environment and the wall clock are read"
)]

mod check;
mod fire;
mod manage;
mod monitor;
mod remote;
mod serve;
mod stats;

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

/// Exit code for unusable configuration or arguments (sysexits' EX_USAGE).
pub const EXIT_CONFIG: u8 = 64;

/// `--version`: the crate version, the git commit and the target it was built from (build.rs).
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("RATETHROTTLE_GIT_COMMIT"),
    ", ",
    env!("RATETHROTTLE_BUILD_TARGET"),
    ")"
);

#[derive(Debug, Parser)]
#[command(
    name = "ratethrottle",
    version = VERSION,
    about = "Envoy rate limit and ext_authz sidecar"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gRPC services and the admin HTTP server.
    Serve(serve::ServeArgs),
    /// Work with configuration files.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Send one ShouldRateLimit to a running server and print the answer.
    Check(check::CheckArgs),
    /// Add, remove and list runtime allow/block entries of a running server.
    Manage(manage::ManageArgs),
    /// Print a running server's stats (requests/s, over-limit/s, top limited descriptors,
    /// storage health) once, or record them to JSON/CSV.
    Stats(stats::StatsArgs),
    /// Fire N ShouldRateLimit calls at a running server and print how many were allowed and
    /// how the remaining quota and reset moved.
    Test(fire::TestArgs),
    /// A live terminal dashboard of a running server (q quits, 1-4/Tab switch views).
    Monitor(monitor::MonitorArgs),
    /// Print the CustomResourceDefinitions (RateLimitPolicy, AccessList) as YAML.
    Crd {
        /// Write one `<name>.yaml` per CRD into this directory instead.
        #[arg(long)]
        out_dir: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Exit 0 when the file or directory is valid; otherwise print every error.
    Validate {
        /// A settings file, a domain file, or a directory of them.
        path: PathBuf,
    },
    /// Check RateLimitPolicy/AccessList manifests as the watcher would (for CI before
    /// `kubectl apply`): every spec, and domain conflicts among them and with `--config`.
    /// Exit 0 when every resource would be accepted, 64 otherwise.
    ValidateResources {
        /// Manifest files (multi-document YAML; other kinds are skipped).
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// The file configuration the resources would join (its domains take precedence).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Print a running server's effective configuration (files and resources merged) and
    /// its version, through the admin API.
    Show {
        /// Admin address of a running `ratethrottle serve`.
        #[arg(
            long,
            env = "RATETHROTTLE_ADMIN_ADDR",
            default_value = "127.0.0.1:8080"
        )]
        admin_addr: String,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve::run(args),
        Command::Config {
            command: ConfigCommand::Validate { path },
        } => validate(&path),
        Command::Config {
            command: ConfigCommand::ValidateResources { files, config },
        } => validate_resources(&files, config.as_deref()),
        Command::Config {
            command: ConfigCommand::Show { admin_addr },
        } => config_show(&admin_addr),
        Command::Check(args) => check::run(args),
        Command::Stats(args) => stats::run(args),
        Command::Test(args) => fire::run(args),
        Command::Monitor(args) => monitor::run(args),
        Command::Manage(args) => manage::run(args),
        Command::Crd { out_dir } => crd(out_dir.as_deref()),
    }
}

fn config_show(admin_addr: &str) -> ExitCode {
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
    let result = rt.block_on(async {
        let mut client = remote::connect(admin_addr).await?;
        client
            .get_config(crate::proto::admin::v1::GetConfigRequest {})
            .await
            .map(|r| r.into_inner())
            .map_err(|s| remote::status(&s))
    });
    match result {
        Ok(c) => {
            println!("# version: {}", c.version);
            if !c.source.is_empty() {
                println!("# source: {}", c.source);
            }
            println!(
                "# storage: {}{}",
                c.storage,
                if c.storage_degraded {
                    " (degraded)"
                } else {
                    ""
                }
            );
            if !c.last_error.is_empty() {
                println!(
                    "# last load error (the version above stays in force): {}",
                    c.last_error
                );
            }
            let pretty = serde_json::from_str::<serde_json::Value>(&c.config_json)
                .and_then(|v| serde_json::to_string_pretty(&v))
                .unwrap_or(c.config_json);
            println!("{pretty}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn crd(out_dir: Option<&std::path::Path>) -> ExitCode {
    for (name, crd) in crate::k8s::crds() {
        let yaml = match crate::k8s::crd_yaml(&crd) {
            Ok(yaml) => yaml,
            Err(e) => {
                eprintln!("error: rendering the {name} CRD: {e}");
                return ExitCode::FAILURE;
            }
        };
        match out_dir {
            None => print!("{yaml}"),
            Some(dir) => {
                let path = dir.join(format!("{name}.yaml"));
                if let Err(e) = std::fs::write(&path, yaml) {
                    eprintln!("error: writing {}: {e}", path.display());
                    return ExitCode::FAILURE;
                }
                println!("wrote {}", path.display());
            }
        }
    }
    ExitCode::SUCCESS
}

fn validate(path: &std::path::Path) -> ExitCode {
    match crate::config::load(path) {
        Ok(config) => {
            let rules: usize = config.domains.iter().map(|d| count(&d.descriptors)).sum();
            println!(
                "{}: valid ({} domains, {} descriptors, version {})",
                path.display(),
                config.domains.len(),
                rules,
                config.version
            );
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for e in errors.iter() {
                eprintln!("{e}");
            }
            eprintln!("{}: {} error(s)", path.display(), errors.len());
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

fn validate_resources(files: &[PathBuf], config: Option<&std::path::Path>) -> ExitCode {
    let config = match config.map(crate::config::load).transpose() {
        Ok(config) => config,
        Err(errors) => {
            for e in errors.iter() {
                eprintln!("{e}");
            }
            eprintln!("error: --config is not a valid configuration");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let mut texts = Vec::new();
    for file in files {
        match std::fs::read_to_string(file) {
            Ok(text) => texts.push((file.clone(), text)),
            Err(e) => {
                eprintln!("error: {}: {e}", file.display());
                return ExitCode::from(EXIT_CONFIG);
            }
        }
    }
    let reports = crate::k8s::validate_manifests(&texts, config.as_ref());
    let mut refused = 0;
    let mut checked = 0;
    for r in &reports {
        let file = r.file.display();
        match &r.outcome {
            Ok(Some(what)) => {
                checked += 1;
                println!("{file}: {}: accepted: {what}", r.resource);
            }
            Ok(None) => println!(
                "{file}: {}: skipped (not a ratethrottle.io resource)",
                r.resource
            ),
            Err(why) => {
                checked += 1;
                refused += 1;
                eprintln!("{file}: {}: refused: {why}", r.resource);
            }
        }
    }
    if refused > 0 {
        eprintln!("{refused} of {checked} resource(s) would be refused");
        ExitCode::from(EXIT_CONFIG)
    } else {
        ExitCode::SUCCESS
    }
}

fn count(ds: &[crate::config::DescriptorConfig]) -> usize {
    ds.iter().map(|d| 1 + count(&d.descriptors)).sum()
}
