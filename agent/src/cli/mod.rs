//! The `vipsec` command line: the daemon (`agent`) and the client subcommands, one file
//! each.

mod agent;
mod client;
mod config_check;
mod doctor;
mod drain;
mod drill;
mod events;
mod guard;
mod health;
mod log_level;
mod mode;
mod moves;
mod policy;
mod render;
mod sas;
mod status;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

use crate::config::DEFAULT_API_ENDPOINT;

#[derive(Debug, Parser)]
#[command(
    name = "vipsec",
    version,
    about = "Keeps IPsec traffic alive across virtual IP moves"
)]
pub struct Cli {
    /// Agent API endpoint: unix:///path or tcp://host:port (TLS).
    #[arg(long, global = true, env = "VIPSEC_ENDPOINT", default_value = DEFAULT_API_ENDPOINT)]
    pub endpoint: String,
    /// CA certificate to verify a TCP endpoint.
    #[arg(long, global = true, env = "VIPSEC_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate and key for a TCP endpoint that requires them.
    #[arg(long, global = true, env = "VIPSEC_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    #[arg(long, global = true, env = "VIPSEC_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent in the foreground.
    Agent {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Node, mode, backends and every VIP this node hosts or talks to.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// The SAs the keying daemon holds, grouped by VIP.
    Sas {
        /// Only this VIP.
        vip: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Stream failover events as they happen.
    Events {
        /// Only this VIP.
        vip: Option<String>,
        /// JSON lines instead of a table.
        #[arg(long)]
        json: bool,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<usize>,
    },
    /// Exit 0 when the agent and the parts failover depends on are healthy, 1 otherwise.
    Health {
        /// Print nothing on success.
        #[arg(long, short)]
        quiet: bool,
    },
    /// Before a planned move: gracefully delete this node's SAs for a hosted VIP.
    Drain { vip: String },
    /// Switch failover mode.
    Mode {
        mode: ModeArg,
        /// Idle timeout for that mode, e.g. 2s or 1500ms.
        #[arg(long, value_parser = parse_duration)]
        idle_timeout: Option<Duration>,
    },
    /// Timelines of recent VIP moves (every node's marks, from the cluster store).
    Moves {
        /// Only this VIP.
        vip: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Move a VIP through the configured cluster manager and report the move's timeline
    /// against the recovery target (exit 0 when the drill ran, whether or not it met it).
    Drill {
        vip: String,
        /// The node that should take the VIP.
        #[arg(long)]
        to: String,
        /// How long to wait for the whole timeline.
        #[arg(long, value_parser = parse_duration, default_value = "30s")]
        timeout: Duration,
        #[arg(long)]
        json: bool,
    },
    /// Replace the agent's log filter, e.g. `debug` or `info,vipsec::keying=trace`.
    LogLevel { filter: String },
    /// Cluster-wide IPsec policies (the agent loads each VIP's into charon).
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Preflight check of this node (no agent needed): everything that would break
    /// failover, with what to do. Exit 0 ok/warnings, 1 errors, 2 cannot run.
    Doctor {
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// The kernel's standing clear-text guard, without the agent: install it (boot unit),
    /// show it, or remove it (the only way it goes).
    Guard {
        #[command(subcommand)]
        command: guard::GuardCommand,
    },
    /// Configuration files.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Check a config file; prints each problem with its key and reason.
    Check { file: PathBuf },
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// The policy in force for each VIP (with its source and version) and every stored one.
    Show {
        #[arg(long)]
        json: bool,
    },
    /// Validate a policy file (TOML or JSON) and store it cluster-wide.
    Apply {
        file: PathBuf,
        /// Store only if the stored version is still this one.
        #[arg(long)]
        expect_version: Option<u64>,
        /// Store only if no policy of that name exists yet.
        #[arg(long, conflicts_with = "expect_version")]
        create: bool,
    },
    /// Validate a policy file without storing it.
    Check { file: PathBuf },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ModeArg {
    Normal,
    Fast,
}

const DEFAULT_CONFIG: &str = "/etc/vipsec/agent.toml";

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration like 2s or 1500ms: {e}"))
}

/// A failure with the exit code it maps to.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Bad arguments or config: exit code 2.
    #[error("{0}")]
    Usage(String),
    /// The work itself failed: exit code 1.
    #[error("{0}")]
    Runtime(String),
}

impl CliError {
    fn code(&self) -> u8 {
        match self {
            CliError::Usage(_) => 2,
            CliError::Runtime(_) => 1,
        }
    }
}

impl From<tonic::Status> for CliError {
    fn from(s: tonic::Status) -> CliError {
        let msg = format!("agent: {}", s.message());
        match s.code() {
            tonic::Code::InvalidArgument | tonic::Code::NotFound => CliError::Usage(msg),
            _ => CliError::Runtime(msg),
        }
    }
}

pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("vipsec: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let one_line = e.to_string().lines().collect::<Vec<_>>().join("; ");
            eprintln!("vipsec: {one_line}");
            ExitCode::from(e.code())
        }
    }
}

async fn run(cli: Cli) -> Result<(), CliError> {
    let target = client::Target {
        endpoint: cli.endpoint.clone(),
        tls_ca: cli.tls_ca.clone(),
        tls_cert: cli.tls_cert.clone(),
        tls_key: cli.tls_key.clone(),
    };
    match cli.command {
        Command::Agent { config } => agent::run(&config).await,
        Command::Status { json } => status::run(&target, json).await,
        Command::Sas { vip, json } => sas::run(&target, vip, json).await,
        Command::Events { vip, json, count } => events::run(&target, vip, json, count).await,
        Command::Health { quiet } => health::run(&target, quiet).await,
        Command::Drain { vip } => drain::run(&target, &vip).await,
        Command::Mode { mode, idle_timeout } => mode::run(&target, mode, idle_timeout).await,
        Command::Moves { vip, json } => moves::run(&target, vip, json).await,
        Command::Drill {
            vip,
            to,
            timeout,
            json,
        } => drill::run(&target, &vip, &to, timeout, json).await,
        Command::LogLevel { filter } => log_level::run(&target, &filter).await,
        Command::Doctor { config, json } => doctor::run(&config, json).await,
        Command::Guard { command } => guard::run(&target, command).await,
        Command::Config {
            command: ConfigCommand::Check { file },
        } => config_check::run(&file),
        Command::Policy { command } => match command {
            PolicyCommand::Show { json } => policy::show(&target, json).await,
            PolicyCommand::Apply {
                file,
                expect_version,
                create,
            } => policy::apply(&target, &file, expect_version, create).await,
            PolicyCommand::Check { file } => policy::check(&file),
        },
    }
}
