//! `vipsec-chaos`: the lab's demo and benchmark, and the small programs the lab runs inside
//! its nodes (the mail-like server and the probe).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use vipsec_chaos::lab::probe::{self, ProbeArgs};
use vipsec_chaos::lab::{Progress, Setup, mailserver};
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
    /// Planned moves and crashes N times per set-up and cell (front-ends x VIPs, one lab
    /// per cell); writes report.md, results.json, probe timelines and reaction histograms.
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
        /// How many VIPs (192.0.2.100 onward), all moved together by keepalived (one cell,
        /// when --cells is absent).
        #[arg(long, default_value_t = 1)]
        vips: usize,
        /// How many front-ends (one cell, when --cells is absent).
        #[arg(long, default_value_t = 2)]
        front_ends: usize,
        /// Comma-separated cells FRONT_ENDSxVIPS, e.g. 1x1,1x10,20x1,20x3,1x100: each gets
        /// a lab of its own, one after the other, and every set-up runs on it.
        #[arg(long, value_delimiter = ',', conflicts_with_all = ["vips", "front_ends"])]
        cells: Vec<bench::Cell>,
        /// keepalived's advert interval (e.g. 100ms).
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        vrrp_advert: Duration,
        /// Probe interval per front-end and VIP; by default 20 ms, slower in cells whose
        /// probes would pass 400 connections a second.
        #[arg(long, value_parser = humantime::parse_duration)]
        probe_interval: Option<Duration>,
        /// The agents' keying.initiate_timeout; by default 500 ms, 2 s in cells of more than
        /// 20 SAs on the owner.
        #[arg(long, value_parser = humantime::parse_duration)]
        initiate_timeout: Option<Duration>,
        /// Steady state measured for the agent's idle footprint, per cell and vipsec
        /// set-up; 0s skips it.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        idle_window: Duration,
        /// Left out before the idle window, once every front-end's agent reports all its
        /// tunnels up (the lab's reset restarts the agents).
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        idle_warmup: Duration,
        /// Width of the reaction histograms' bins, in ms.
        #[arg(long, default_value_t = 5)]
        bin_ms: i64,
        /// Build the release binaries (`cargo build --release -p vipsec -p vipsec-chaos`,
        /// output live) and run the whole bench from them.
        #[arg(long)]
        release: bool,
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
        /// Half-open IKE_SAs the responder takes from one front-end (strongSwan's
        /// `charon.block_threshold`); more are ignored.
        #[arg(long, default_value_t = 5)]
        per_peer: usize,
        /// The front-ends' `keying.initiate_timeout` and `failover.retry_max` (the lab's
        /// storm settings by default; the agent's defaults are 1000 and 1000).
        #[arg(long, default_value_t = 500)]
        initiate_timeout_ms: u64,
        #[arg(long, default_value_t = 500)]
        retry_max_ms: u64,
        /// Simulated seconds to follow the storm.
        #[arg(long, default_value_t = 120)]
        horizon: u64,
        /// The front-ends' `failover.reconnect.jitter` (the most their window may grow
        /// to), in milliseconds; the agent's default when absent.
        #[arg(long)]
        jitter_ms: Option<u64>,
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
            front_ends,
            cells,
            vrrp_advert,
            probe_interval,
            initiate_timeout,
            idle_window,
            idle_warmup,
            bin_ms,
            release,
        } => {
            anyhow::ensure!(!setups.is_empty(), "name at least one set-up");
            anyhow::ensure!(runs > 0, "--runs takes at least 1");
            anyhow::ensure!(bin_ms > 0, "--bin-ms takes at least 1");
            let progress = Progress::new(true);
            let self_exe = if release {
                bench::release::build_and_hand_over(&progress)?
            } else {
                self_exe
            };
            let cells = if cells.is_empty() {
                let cell = format!("{front_ends}x{vips}");
                vec![cell.parse().map_err(|e: String| anyhow::anyhow!(e))?]
            } else {
                cells
            };
            let plan = bench::GridPlan {
                cells,
                setups,
                faults,
                runs,
                cap: Duration::from_secs(cap),
                vrrp_advert,
                probe_interval,
                initiate_timeout,
                idle_window,
                idle_warmup,
                bin_ms,
                self_exe,
            };
            let grid = bench::grid::run(&plan, &progress, &out)?;
            println!("{}", bench::markdown(&bench::rows(&grid.runs), plan.cap));
            println!("{}", bench::grid::footprint_markdown(&grid));
            for f in &grid.failures {
                println!("not measured: {f}");
            }
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
            per_peer,
            initiate_timeout_ms,
            retry_max_ms,
            horizon,
            jitter_ms,
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
                    plan.per_peer = per_peer;
                    plan.initiate_timeout = Duration::from_millis(initiate_timeout_ms);
                    plan.retry_max = Duration::from_millis(retry_max_ms);
                    plan.horizon = Duration::from_secs(horizon);
                    plan.jitter = jitter_ms.map(Duration::from_millis);
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
