//! `vipsec-chaos`: the lab's demo and benchmark, and the small programs the lab runs inside
//! its nodes (the mail-like server and the probe).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use vipsec_chaos::lab::probe::{self, ProbeArgs};
use vipsec_chaos::lab::{Lab, LabOptions, Progress, Setup, mailserver};
use vipsec_chaos::{bench, demo};

#[derive(Parser)]
#[command(name = "vipsec-chaos", about = "vipsec's multi-node failover lab")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build the lab, run a planned move and a crash with live progress, tear down.
    Demo {
        #[arg(long, default_value = "vipsec-etcd")]
        setup: Setup,
        /// Give up waiting for recovery after this many seconds.
        #[arg(long, default_value_t = 60)]
        cap: u64,
    },
    /// Planned moves and crashes N times per set-up; writes report.md, results.json, SVGs.
    Bench {
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Comma-separated: strongswan-defaults, strongswan-dpd, vipsec-etcd, vipsec-idle,
        /// vipsec-policy.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "strongswan-defaults,strongswan-dpd,vipsec-etcd,vipsec-idle,vipsec-policy"
        )]
        setups: Vec<Setup>,
        #[arg(long, default_value = "chaos-bench-out")]
        out: PathBuf,
        #[arg(long, default_value_t = 60)]
        cap: u64,
        /// How many VIPs (192.0.2.100 onward), all moved together by keepalived.
        #[arg(long, default_value_t = 1)]
        vips: usize,
    },
    /// (inside a back-end) The mail-like server.
    ServeMail {
        #[arg(long)]
        node: String,
        #[arg(long, value_delimiter = ',', default_value = "143,110,80")]
        ports: Vec<u16>,
        /// The address to listen on (`::` in an IPv6 lab).
        #[arg(long, default_value = "0.0.0.0")]
        bind: std::net::IpAddr,
    },
    /// (inside a front-end) The traffic probe.
    Probe {
        #[arg(long)]
        fe: String,
        #[arg(long, required = true)]
        target: Vec<SocketAddr>,
        #[arg(long)]
        out: PathBuf,
        /// Milliseconds between attempts.
        #[arg(long, default_value_t = 20)]
        interval: u64,
        /// Milliseconds an attempt may take.
        #[arg(long, default_value_t = 500)]
        timeout: u64,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let self_exe = std::env::current_exe()?;
    match cli.command {
        Command::Demo { setup, cap } => demo::run(setup, self_exe, Duration::from_secs(cap)),
        Command::Bench {
            runs,
            setups,
            out,
            cap,
            vips,
        } => {
            anyhow::ensure!(!setups.is_empty(), "name at least one set-up");
            let progress = Progress::new(true);
            let cap = Duration::from_secs(cap);
            anyhow::ensure!((1..=11).contains(&vips), "--vips takes 1 to 11");
            let mut opts = LabOptions::new(setups[0], self_exe);
            opts.vips = vips;
            let mut lab = Lab::build(opts, progress.clone())?;
            let plan = bench::BenchPlan { setups, runs, cap };
            let outcomes = bench::run(&mut lab, &plan, &out)?;
            drop(lab);
            println!("{}", bench::markdown(&bench::rows(&outcomes), cap));
            println!("written to {}", out.display());
            Ok(())
        }
        Command::ServeMail { node, ports, bind } => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(mailserver::serve(node, ports, bind)),
        Command::Probe {
            fe,
            target,
            out,
            interval,
            timeout,
        } => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(probe::run(ProbeArgs {
                fe,
                targets: target,
                interval: Duration::from_millis(interval),
                timeout: Duration::from_millis(timeout),
                out,
            })),
    }
}
