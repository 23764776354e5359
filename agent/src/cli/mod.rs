//! The `vipsec` command line: the daemon (`agent`) and the client subcommands, one file
//! each.

mod agent;
mod client;
mod config_check;
mod config_reference;
mod config_show;
mod doctor;
mod drain;
mod drill;
mod events;
mod generate;
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
    about = "Keeps IPsec traffic alive across virtual IP moves",
    long_about = "Keeps IPsec traffic alive across virtual IP moves.\n\n\
        `vipsec agent` is the daemon that runs on every node beside charon and the cluster \
        manager; the other commands are its client (they reach the agent at --endpoint) or \
        work without it (doctor, guard, config).",
    after_long_help = "Exit status: 0 on success, 1 when the work itself failed, 2 for a usage \
        or configuration error.\n\n\
        Environment: VIPSEC_ENDPOINT, VIPSEC_TLS_CA, VIPSEC_TLS_CERT and VIPSEC_TLS_KEY stand \
        in for the options of the same names.\n\n\
        Files: /etc/vipsec/agent.toml (the agent's configuration; every key in \
        /usr/share/doc/vipsec/config-reference.md or `vipsec config reference`), \
        /run/vipsec/agent.sock (the API socket). The operator guides are in \
        /usr/share/doc/vipsec/."
)]
pub struct Cli {
    /// Agent API endpoint: unix:///path or tcp://host:port (TLS).
    #[arg(long, global = true, env = "VIPSEC_ENDPOINT", default_value = DEFAULT_API_ENDPOINT)]
    pub endpoint: String,
    /// CA certificate to verify a TCP endpoint.
    #[arg(long, global = true, env = "VIPSEC_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate for a TCP endpoint that requires one (with --tls-key).
    #[arg(long, global = true, env = "VIPSEC_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The client certificate's private key (with --tls-cert).
    #[arg(long, global = true, env = "VIPSEC_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent in the foreground.
    Agent {
        /// Agent config file (TOML), e.g. /etc/vipsec/agent.toml.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Node, mode, backends and every VIP this node hosts or talks to.
    Status {
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// The SAs the keying daemon holds, grouped by VIP.
    Sas {
        /// Only this VIP.
        vip: Option<String>,
        /// JSON instead of a table.
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
    /// Before a planned move: gracefully delete this node's SAs for hosted VIPs (all at
    /// once).
    Drain {
        /// The hosted VIPs about to move, e.g. 192.0.2.100 192.0.2.101.
        #[arg(required = true)]
        vips: Vec<String>,
    },
    /// Switch failover mode.
    Mode {
        /// `fast` arms the short idle detector; `normal` uses the long idle timeout.
        mode: ModeArg,
        /// Idle timeout for that mode, e.g. 2s or 1500ms.
        #[arg(long, value_parser = parse_duration)]
        idle_timeout: Option<Duration>,
    },
    /// Timelines of recent VIP moves (every node's marks, from the cluster store).
    Moves {
        /// Only this VIP.
        vip: Option<String>,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Move a VIP through the configured cluster manager and report the move's timeline
    /// against the recovery target (exit 0 when the drill ran, whether or not it met it).
    Drill {
        /// The VIP to move, e.g. 192.0.2.100.
        vip: String,
        /// The node that should take the VIP.
        #[arg(long)]
        to: String,
        /// How long to wait for the whole timeline.
        #[arg(long, value_parser = parse_duration, default_value = "30s")]
        timeout: Duration,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Replace the agent's log filter, e.g. `debug` or `info,vipsec::keying=trace`.
    LogLevel {
        /// tracing filter directives (EnvFilter syntax).
        filter: String,
    },
    /// Cluster-wide IPsec policies (the agent loads each VIP's into charon).
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Preflight check of this node (no agent needed): everything that would break
    /// failover, with what to do. Exit 0 ok/warnings, 1 errors, 2 cannot run.
    Doctor {
        /// Agent config file to check the node against.
        #[arg(long, short, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// The kernel's standing clear-text guard, without the agent: install it (boot unit),
    /// show it, or remove it (the only way it goes).
    Guard {
        #[command(subcommand)]
        command: guard::GuardCommand,
    },
    /// Configuration files: check one, show its effective values, print the reference.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Write the man pages or shell completions generated from this command line (for
    /// packaging).
    #[command(hide = true)]
    Generate {
        #[command(subcommand)]
        command: generate::GenerateCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Check a config file; prints each problem with its key and reason.
    Check {
        /// Agent config file (TOML).
        file: PathBuf,
    },
    /// Print a valid config file's keys and values: with --effective every key, defaults
    /// included, else only those that differ from their default.
    Show {
        /// Every key, with its value and its default.
        #[arg(long)]
        effective: bool,
        /// Agent config file (TOML).
        file: PathBuf,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print the configuration reference (markdown): every key with its type, default and
    /// meaning, generated from the code (docs/config-reference.md).
    Reference,
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// The policy in force for each VIP (with its source and version) and every stored one.
    Show {
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Validate a policy file (TOML or JSON) and store it cluster-wide.
    Apply {
        /// Policy file (TOML or JSON).
        file: PathBuf,
        /// Store only if the stored version is still this one.
        #[arg(long)]
        expect_version: Option<u64>,
        /// Store only if no policy of that name exists yet.
        #[arg(long, conflicts_with = "expect_version")]
        create: bool,
    },
    /// Validate a policy file without storing it.
    Check {
        /// Policy file (TOML or JSON).
        file: PathBuf,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ModeArg {
    /// The cluster store drives failover; the idle detector waits the normal timeout.
    Normal,
    /// A short idle timeout finds a dead peer in seconds.
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

/// glibc gives a thread that allocates while another holds an arena an arena of its own
/// (up to eight per core) and keeps what each one freed. The agent allocates little and
/// seldom from two threads at once: one arena cost the 1x100 bench's owner (100 leases
/// renewed together) no CPU that could be measured and 3.6 MB less RSS, and a larger
/// machine runs more worker threads.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn one_malloc_arena() {
    // SAFETY: mallopt only sets an allocator parameter; no other thread runs yet.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn one_malloc_arena() {}

pub fn main() -> ExitCode {
    one_malloc_arena();
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
        Command::Drain { vips } => drain::run(&target, &vips).await,
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
        Command::Config { command } => match command {
            ConfigCommand::Check { file } => config_check::run(&file),
            ConfigCommand::Show {
                effective,
                file,
                json,
            } => config_show::run(&file, effective, json),
            ConfigCommand::Reference => config_reference::run(),
        },
        Command::Generate { command } => generate::run(command),
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

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::Cli;

    /// The man pages and completions are generated from this definition: an argument
    /// without help text would be an undocumented one there.
    #[test]
    fn every_argument_and_command_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if arg.is_hide_set() || id == "help" || id == "version" {
                    continue;
                }
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                let name = format!("{path} {}", sub.get_name());
                if sub.get_about().is_none() && sub.get_name() != "help" {
                    missing.push(name.clone());
                }
                walk(sub, &name, missing);
            }
        }
        let cmd = Cli::command();
        cmd.clone().debug_assert();
        let mut missing = Vec::new();
        walk(&cmd, "vipsec", &mut missing);
        assert!(missing.is_empty(), "no help text: {missing:?}");
    }
}
