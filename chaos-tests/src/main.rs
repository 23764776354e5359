//! `vipsec-chaos`: the lab's demo and benchmark, and the small programs the lab runs inside
//! its nodes (the mail-like server and the probe).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use vipsec_chaos::lab::probe::{self, ProbeArgs};
use vipsec_chaos::lab::{Lab, LabOptions, Progress, Setup, mailserver};
use vipsec_chaos::{bench, demo, sim};

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
        /// vipsec-policy (keepalived moves the VIP), pacemaker (a two-node Pacemaker
        /// cluster does; also measured: standby and the agent's resource failing).
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "strongswan-defaults,strongswan-dpd,vipsec-etcd,vipsec-idle,vipsec-policy"
        )]
        setups: Vec<Setup>,
        /// Comma-separated: only these faults (planned, crash; with pacemaker also standby,
        /// agent-killed); all of a set-up's when absent.
        #[arg(long, value_delimiter = ',')]
        faults: Vec<vipsec_chaos::lab::faults::Fault>,
        #[arg(long, default_value = "chaos-bench-out")]
        out: PathBuf,
        #[arg(long, default_value_t = 60)]
        cap: u64,
        /// How many VIPs (192.0.2.100 onward), all moved together by keepalived.
        #[arg(long, default_value_t = 1)]
        vips: usize,
    },
    /// A reconnect storm in one process on paused time: front-ends' real runtimes against
    /// a model of the new owner's charon (see docs/bench/simulation.md).
    Simulate {
        /// Comma-separated front-end counts, e.g. 20,100,1000.
        #[arg(long, value_delimiter = ',', default_value = "20")]
        front_ends: Vec<usize>,
        /// VIPs per front-end, all owned by one back-end.
        #[arg(long, default_value_t = 3)]
        vips: usize,
        /// Comma-separated: adaptive, fixed, off.
        #[arg(long, value_delimiter = ',', default_value = "adaptive,fixed,off")]
        control: Vec<String>,
        /// The responder's CPU per IKE_SA, in milliseconds, and how many it builds at once.
        #[arg(long, default_value_t = 25)]
        cost_ms: u64,
        #[arg(long, default_value_t = 2)]
        workers: usize,
        /// IKE_SA_INITs the responder holds waiting; more are lost (its UDP buffer).
        #[arg(long, default_value_t = 256)]
        queue: usize,
        /// The front-ends' `keying.initiate_timeout` and `failover.retry_max` (the lab's
        /// storm settings by default; the agent's defaults are 1000 and 1000).
        #[arg(long, default_value_t = 500)]
        initiate_timeout_ms: u64,
        #[arg(long, default_value_t = 500)]
        retry_max_ms: u64,
        /// Simulated seconds to follow the storm.
        #[arg(long, default_value_t = 120)]
        horizon: u64,
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
            faults,
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
            let plan = bench::BenchPlan {
                setups,
                faults,
                runs,
                cap,
            };
            let outcomes = bench::run(&mut lab, &plan, &out)?;
            drop(lab);
            println!("{}", bench::markdown(&bench::rows(&outcomes), cap));
            println!("written to {}", out.display());
            Ok(())
        }
        Command::Simulate {
            front_ends,
            vips,
            control,
            cost_ms,
            workers,
            queue,
            initiate_timeout_ms,
            retry_max_ms,
            horizon,
        } => {
            let mut results = Vec::new();
            for n in front_ends {
                for c in &control {
                    let control = match c.as_str() {
                        "adaptive" => sim::Control::Adaptive,
                        "fixed" => sim::Control::Fixed,
                        "off" => sim::Control::Off,
                        other => anyhow::bail!("--control {other:?}: adaptive, fixed or off"),
                    };
                    let mut plan = sim::SimPlan::lab(n, vips, control);
                    plan.cost = Duration::from_millis(cost_ms);
                    plan.workers = workers;
                    plan.queue = queue;
                    plan.initiate_timeout = Duration::from_millis(initiate_timeout_ms);
                    plan.retry_max = Duration::from_millis(retry_max_ms);
                    plan.horizon = Duration::from_secs(horizon);
                    eprintln!("simulating {n} front-ends x {vips} VIPs, storm control {c} ...");
                    let r = sim::run(&plan)?;
                    eprint!("{}", sim::markdown(std::slice::from_ref(&r)));
                    results.push(r);
                }
            }
            println!("{}", sim::markdown(&results));
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
