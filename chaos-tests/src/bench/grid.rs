//! Runs the bench grid: for each cell (front-ends × VIPs) a lab of its own, one at a time;
//! on it every set-up in turn, each fault N times; around each run the agents' reaction
//! times and footprint. Reports are rewritten after every set-up, so an interrupted grid
//! leaves what it measured.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use vipsec_testbed::process::wait_for;

use super::cell::Cell;
use super::footprint::{self, Sampler, Usage};
use super::reaction::{self, RunReactions};
use super::{Row, faults, markdown, rows, svg};
use crate::clock::now_ns;
use crate::lab::faults::Fault;
use crate::lab::setup::AgentStore;
use crate::lab::{ClusterManager, Lab, LabOptions, Progress, Role, Setup};
use crate::scenario::{self, Outcome};

/// How often the footprint sampler reads /proc.
const SAMPLE_PERIOD: Duration = Duration::from_millis(50);
/// Timeline SVGs stop adding runs past this many rows (one per front-end and VIP and run),
/// so big cells stay viewable; results.json has every run.
const TIMELINE_ROWS: usize = 240;

pub struct GridPlan {
    pub cells: Vec<Cell>,
    pub setups: Vec<Setup>,
    /// Only these faults (of those each set-up is measured with); all when empty.
    pub faults: Vec<Fault>,
    pub runs: usize,
    pub cap: Duration,
    pub vrrp_advert: Duration,
    /// Overrides of what each cell chooses for itself ([`Cell::probe_interval`],
    /// [`Cell::initiate_timeout`]).
    pub probe_interval: Option<Duration>,
    pub initiate_timeout: Option<Duration>,
    /// Steady state measured for the idle footprint; zero skips it.
    pub idle_window: Duration,
    /// Left out before the idle window, once every front-end's tunnels are up: the agents
    /// (restarted by the lab's reset) are still granting leases and taking first samples.
    pub idle_warmup: Duration,
    /// Width of the reaction histograms' bins.
    pub bin_ms: i64,
    /// The `vipsec-chaos` binary the nodes run (the agent is the `vipsec` beside it).
    pub self_exe: PathBuf,
}

impl GridPlan {
    pub fn probe_interval(&self, cell: Cell) -> Duration {
        self.probe_interval.unwrap_or_else(|| cell.probe_interval())
    }

    pub fn initiate_timeout(&self, cell: Cell) -> Duration {
        self.initiate_timeout
            .unwrap_or_else(|| cell.initiate_timeout())
    }
}

/// One run: its cell, the scenario's outcome, the reactions and the footprint.
#[derive(Debug, Clone, Serialize)]
pub struct BenchRun {
    pub cell: Cell,
    #[serde(flatten)]
    pub outcome: Outcome,
    /// None where the set-up has no owner event to react to.
    pub reactions: Option<RunReactions>,
    /// The agent on the new owner and on the first front-end, from the fault to recovery
    /// (to the end of the run without one).
    pub footprint: BTreeMap<String, Usage>,
}

/// The agent's footprint in steady state, before a set-up's first run in a cell.
#[derive(Debug, Clone, Serialize)]
pub struct IdleFootprint {
    pub cell: Cell,
    pub setup: String,
    pub node: String,
    pub role: &'static str,
    pub ike_sas: usize,
    pub child_sas: usize,
    pub usage: Usage,
}

#[derive(Default, Serialize)]
pub struct Grid {
    pub runs: Vec<BenchRun>,
    pub idle: Vec<IdleFootprint>,
    /// Cells or set-ups that could not be measured, and why.
    pub failures: Vec<String>,
}

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Runs the whole grid, writing reports into `out` as it goes.
pub fn run(plan: &GridPlan, progress: &Progress, out: &Path) -> anyhow::Result<Grid> {
    std::fs::create_dir_all(out)?;
    let mut grid = Grid::default();
    for (i, &cell) in plan.cells.iter().enumerate() {
        let setups: Vec<Setup> = plan
            .setups
            .iter()
            .copied()
            .filter(|s| {
                let fits = s.cluster_manager() != ClusterManager::Pacemaker || cell.vips == 1;
                if !fits {
                    grid.failures.push(format!(
                        "cell {cell}, {s}: not measured (the Pacemaker lab has one VIP)"
                    ));
                }
                fits
            })
            .collect();
        let Some(&first) = setups.first() else {
            continue;
        };
        progress.step(&format!(
            "cell {}/{}: {cell} ({} front-ends x {} VIPs, {} SAs on the owner; probe every {:?}, initiate timeout {:?}): building its lab",
            i + 1,
            plan.cells.len(),
            cell.front_ends,
            cell.vips,
            cell.sas(),
            plan.probe_interval(cell),
            plan.initiate_timeout(cell),
        ));
        let mut opts = LabOptions::new(first, plan.self_exe.clone());
        opts.front_ends = cell.front_ends;
        opts.vips = cell.vips;
        opts.probe_interval = plan.probe_interval(cell);
        opts.initiate_timeout = plan.initiate_timeout(cell);
        opts.vrrp_advert = plan.vrrp_advert;
        opts.steady_timeout = cell.settle_timeout();
        let built = now_ns();
        let mut lab = match Lab::build(opts, progress.clone()) {
            Ok(lab) => lab,
            Err(e) => {
                let why = format!("cell {cell}: the lab did not come up: {e:#}");
                progress.step(&why);
                grid.failures.push(why);
                write_reports(&grid, plan, out)?;
                continue;
            }
        };
        progress.step(&format!(
            "cell {cell}: lab steady after {:.1} s",
            (now_ns() - built) as f64 / 1e9
        ));
        for &setup in &setups {
            if let Err(e) = run_setup(&mut lab, &mut grid, plan, cell, setup) {
                let why = format!("cell {cell}, {setup}: stopped: {e:#}");
                progress.step(&why);
                grid.failures.push(why);
                write_reports(&grid, plan, out)?;
                // The lab may be half broken; the next cell gets a fresh one.
                break;
            }
            write_reports(&grid, plan, out)?;
        }
        progress.step(&format!("cell {cell}: tearing its lab down"));
        drop(lab);
    }
    write_reports(&grid, plan, out)?;
    Ok(grid)
}

fn run_setup(
    lab: &mut Lab,
    grid: &mut Grid,
    plan: &GridPlan,
    cell: Cell,
    setup: Setup,
) -> anyhow::Result<()> {
    if lab.setup != setup {
        lab.progress
            .step(&format!("cell {cell}: switching to {setup}"));
        lab.switch_setup(setup)?;
    }
    if setup.agent().is_some() && !plan.idle_window.is_zero() {
        lab.reset()?;
        let idle = idle_footprint(lab, cell, plan.idle_warmup, plan.idle_window)?;
        grid.idle.extend(idle);
    }
    let fault_list: Vec<Fault> = faults(setup)
        .into_iter()
        .filter(|f| plan.faults.is_empty() || plan.faults.contains(f))
        .collect();
    for fault in fault_list {
        for i in 0..plan.runs {
            lab.reset()?;
            if setup.agent().is_some() {
                // Traffic flows before the agents are done starting (charon brings the
                // tunnels up by itself): a fault then meets a front-end that has not yet
                // read the owners, and measures a restart, not a move (one 1x100 crash
                // run, its fault 50 ms after the front-end's agent came up, took 39 s).
                wait_agents_settled(lab, setup.agent() == Some(AgentStore::Etcd))?;
            }
            lab.progress.step(&format!(
                "cell {cell} {setup} {} run {}/{}",
                fault.name(),
                i + 1,
                plan.runs
            ));
            let run = run_one(lab, cell, fault, plan.cap)?;
            grid.runs.push(run);
        }
    }
    Ok(())
}

/// The agents the footprint follows in a run: every back-end's (the new owner is known
/// only afterwards) and the first front-end's.
fn watched_agents(lab: &Lab) -> Vec<(String, u32)> {
    let mut nodes = lab.names(Role::BackEnd);
    nodes.extend(lab.names(Role::FrontEnd).into_iter().take(1));
    nodes
        .into_iter()
        .filter_map(|n| lab.agent_pid(&n).map(|pid| (n, pid)))
        .collect()
}

fn run_one(lab: &mut Lab, cell: Cell, fault: Fault, cap: Duration) -> anyhow::Result<BenchRun> {
    let watched = watched_agents(lab);
    let sampler = (!watched.is_empty()).then(|| Sampler::start(watched, SAMPLE_PERIOD));
    // Agents mark moves in wall-clock ms, the scenario counts on CLOCK_MONOTONIC: one
    // reading of both (every node shares this machine's clocks).
    let mono_to_wall_ms = wall_ms() as i64 - (now_ns() / 1_000_000) as i64;
    let outcome = scenario::run(lab, fault, cap)?;
    let end_ns = now_ns();
    let samples = sampler.map(Sampler::finish).unwrap_or_default();
    lab.progress.step(&outcome.summary());
    for line in &outcome.cleartext_seen {
        lab.progress.step(&format!("clear text: {line}"));
    }

    let front_ends = lab.names(Role::FrontEnd);
    let reactions = match lab.setup.agent() {
        Some(AgentStore::Etcd) => {
            let fault_ms = (outcome.fault_at / 1_000_000) as i64 + mono_to_wall_ms;
            // etcd may still be busy with the storm's writes; a slow read is not a failure.
            let mut last_error = None;
            let marks = wait_for("the move marks in etcd", Duration::from_secs(10), || {
                lab.move_marks()
                    .map_err(|e| last_error = Some(format!("{e:#}")))
                    .ok()
            })
            .map_err(|e| anyhow::anyhow!("{e}: {}", last_error.unwrap_or_default()))?;
            // The fault's ms was truncated; a record taken in the same ms still counts.
            let r = reaction::reactions(
                &marks,
                &front_ends,
                fault_ms.saturating_sub(1).max(0) as u64,
                wall_ms(),
            );
            let ms: Vec<i64> = r.reactions.iter().map(|x| x.reaction_ms).collect();
            let s = reaction::spread(&ms);
            let dash = |v: Option<i64>| v.map(|v| format!("{v} ms")).unwrap_or("-".into());
            lab.progress.step(&format!(
                "reaction (epoch recorded -> IKE_SA_INIT to charon): {} moves, n={} median {} p99 {} max {}{}",
                r.moves,
                s.n,
                dash(s.median_ms),
                dash(s.p99_ms),
                dash(s.max_ms),
                if r.without_initiation.is_empty() {
                    String::new()
                } else {
                    format!(", no initiation marked: {}", r.without_initiation.join(" "))
                }
            ));
            Some(r)
        }
        _ => None,
    };

    let until = outcome
        .recovery
        .map(|d| outcome.fault_at + d.as_nanos() as u64)
        .unwrap_or(end_ns);
    let tps = footprint::ticks_per_second();
    let mut usage = BTreeMap::new();
    for node in [Some(outcome.to.clone()), front_ends.first().cloned()]
        .into_iter()
        .flatten()
    {
        if let Some(u) = samples
            .get(&node)
            .and_then(|s| footprint::usage(s, outcome.fault_at, until, tps))
        {
            lab.progress.step(&format!(
                "agent on {node}, fault to recovery ({:.2} s): CPU {:.1} %, RSS max {:.1} MB",
                u.seconds,
                u.cpu_percent,
                u.rss_max_kb as f64 / 1024.0
            ));
            usage.insert(node, u);
        }
    }
    Ok(BenchRun {
        cell,
        outcome,
        reactions,
        footprint: usage,
    })
}

/// IKE_SAs and CHILD_SAs the node's charon holds, as `vipsec sas --json` lists them.
pub fn count_sas(sas: &serde_json::Value) -> (usize, usize) {
    let mut ike = Vec::new();
    if let Some(vips) = sas["vips"].as_array() {
        for v in vips {
            ike.extend(v["sas"].as_array().into_iter().flatten());
        }
    }
    ike.extend(sas["unmapped"].as_array().into_iter().flatten());
    let children = ike
        .iter()
        .map(|sa| sa["children"].as_array().map_or(0, Vec::len))
        .sum();
    (ike.len(), children)
}

/// How long the front-ends' agents may take to report every peer VIP up after a reset.
const SETTLE_LIMIT: Duration = Duration::from_secs(120);

/// Waits until every front-end's agent reports each peer VIP's CHILD_SA up with no
/// renegotiation running and, with `owners`, each VIP's owner of record known; returns
/// how long that took.
fn wait_agents_settled(lab: &mut Lab, owners: bool) -> anyhow::Result<Duration> {
    let from = now_ns();
    for fe in lab.names(Role::FrontEnd) {
        let mut last = serde_json::Value::Null;
        let settled = wait_for(&format!("{fe}'s peer VIPs up"), SETTLE_LIMIT, || {
            last = lab.agent_json(&fe, &["status"]).ok()?;
            (peers_settled(&last) && (!owners || owners_known(&last))).then_some(())
        });
        settled.map_err(|e| anyhow::anyhow!("{e}: {last:#}"))?;
    }
    Ok(Duration::from_nanos(now_ns() - from))
}

/// Whether an agent's `status --json` names an owner of record for every peer VIP.
fn owners_known(status: &serde_json::Value) -> bool {
    status["peer_vips"]
        .as_array()
        .is_some_and(|peers| peers.iter().all(|p| !p["owner"].is_null()))
}

/// Whether an agent's `status --json` shows every peer VIP with its CHILD_SA up and no
/// renegotiation running.
fn peers_settled(status: &serde_json::Value) -> bool {
    status["peer_vips"].as_array().is_some_and(|peers| {
        !peers.is_empty()
            && peers
                .iter()
                .all(|p| p["child_state"] == "established" && p["renegotiating"] == false)
    })
}

/// The agent on the VIPs' owner and on the first front-end over `window` of steady
/// traffic with nothing moving: after every front-end's agent reports all its peer VIPs
/// up, and `warmup` more.
fn idle_footprint(
    lab: &mut Lab,
    cell: Cell,
    warmup: Duration,
    window: Duration,
) -> anyhow::Result<Vec<IdleFootprint>> {
    let took = wait_agents_settled(lab, false)?;
    lab.progress.step(&format!(
        "idle footprint: every front-end's tunnels up after {:.1} s; {} s of warm-up left out",
        took.as_secs_f64(),
        warmup.as_secs_f64()
    ));
    // Left out of the measurement on purpose; the probes keep the SAs busy meanwhile.
    let until = now_ns() + warmup.as_nanos() as u64;
    while now_ns() < until {
        lab.poll_probes()?;
        std::thread::sleep(Duration::from_millis(100));
    }
    let owner = lab.wait_owner(Duration::from_secs(10))?;
    let fe = lab
        .names(Role::FrontEnd)
        .into_iter()
        .next()
        .ok_or_else(|| anyhow::anyhow!("no front-end"))?;
    let mut nodes = Vec::new();
    for (node, role) in [(owner, "owner back-end"), (fe, "front-end")] {
        let pid = lab
            .agent_pid(&node)
            .ok_or_else(|| anyhow::anyhow!("no agent process on {node}"))?;
        let (ike, child) = count_sas(&lab.agent_json(&node, &["sas"])?);
        nodes.push((node, role, pid, ike, child));
    }
    lab.progress.step(&format!(
        "idle footprint: {} s of steady traffic; {}",
        window.as_secs_f64(),
        nodes
            .iter()
            .map(|(n, _, _, ike, child)| format!("{n} holds {ike} IKE_SAs, {child} CHILD_SAs"))
            .collect::<Vec<_>>()
            .join("; ")
    ));
    let sampler = Sampler::start(
        nodes
            .iter()
            .map(|(n, _, pid, ..)| (n.clone(), *pid))
            .collect(),
        SAMPLE_PERIOD,
    );
    let from = now_ns();
    let to = from + window.as_nanos() as u64;
    // A measurement window, not a wait for something: the probes keep the SAs busy.
    while now_ns() < to {
        lab.poll_probes()?;
        std::thread::sleep(Duration::from_millis(100));
    }
    let samples = sampler.finish();
    let tps = footprint::ticks_per_second();
    let mut out = Vec::new();
    for (node, role, _, ike_sas, child_sas) in nodes {
        let usage = samples
            .get(&node)
            .and_then(|s| footprint::usage(s, from, to, tps))
            .ok_or_else(|| anyhow::anyhow!("no samples of the agent on {node}"))?;
        lab.progress.step(&format!(
            "idle: agent on {node} ({role}): CPU {:.2} %, RSS max {:.1} MB",
            usage.cpu_percent,
            usage.rss_max_kb as f64 / 1024.0
        ));
        out.push(IdleFootprint {
            cell,
            setup: lab.setup.name().to_string(),
            node,
            role,
            ike_sas,
            child_sas,
            usage,
        });
    }
    Ok(out)
}

/// The footprint table: idle, then during the storm (median and max over runs).
pub fn footprint_markdown(grid: &Grid) -> String {
    let mut s = String::new();
    s += "| cell | set-up | window | node | SAs (IKE / CHILD) | CPU % of one core | RSS max |\n";
    s += "| --- | --- | --- | --- | --- | --- | --- |\n";
    let mb = |kb: u64| format!("{:.1} MB", kb as f64 / 1024.0);
    for i in &grid.idle {
        let _ = writeln!(
            s,
            "| {} | {} | idle, {:.0} s | {} ({}) | {} / {} | {:.2} | {} |",
            i.cell,
            i.setup,
            i.usage.seconds,
            i.node,
            i.role,
            i.ike_sas,
            i.child_sas,
            i.usage.cpu_percent,
            mb(i.usage.rss_max_kb)
        );
    }
    let mut keys: Vec<(Cell, String, Fault, &'static str)> = Vec::new();
    for r in &grid.runs {
        for node in r.footprint.keys() {
            let role = if *node == r.outcome.to {
                "new owner"
            } else {
                "front-end"
            };
            let k = (r.cell, r.outcome.setup.clone(), r.outcome.fault, role);
            if !keys.contains(&k) {
                keys.push(k);
            }
        }
    }
    for (cell, setup, fault, role) in keys {
        let usages: Vec<(&str, &Usage)> = grid
            .runs
            .iter()
            .filter(|r| r.cell == cell && r.outcome.setup == setup && r.outcome.fault == fault)
            .flat_map(|r| {
                r.footprint
                    .iter()
                    .filter(|(n, _)| (**n == r.outcome.to) == (role == "new owner"))
                    .map(|(n, u)| (n.as_str(), u))
            })
            .collect();
        let mut cpu: Vec<f64> = usages.iter().map(|(_, u)| u.cpu_percent).collect();
        cpu.sort_by(f64::total_cmp);
        let Some(&cpu_max) = cpu.last() else {
            continue;
        };
        let cpu_median = cpu[cpu.len().div_ceil(2) - 1];
        let rss = usages.iter().map(|(_, u)| u.rss_max_kb).max().unwrap_or(0);
        let mut names: Vec<&str> = usages.iter().map(|(n, _)| *n).collect();
        names.sort_unstable();
        names.dedup();
        let _ = writeln!(
            s,
            "| {cell} | {setup} | {}: fault → recovery, {} runs | {} ({role}) | {} in the cell | median {cpu_median:.1}, max {cpu_max:.1} | {} |",
            fault.name(),
            usages.len(),
            names.join(", "),
            cell.sas(),
            mb(rss)
        );
    }
    s
}

/// report.md, results.json, and the SVGs: a probe timeline and a reaction histogram per
/// cell, set-up and fault. A grid of one cell keeps the single-lab names
/// (`timeline-SETUP-FAULT.svg`); several cells put the cell first.
pub fn write_reports(grid: &Grid, plan: &GridPlan, out: &Path) -> anyhow::Result<()> {
    let rows = rows(&grid.runs);
    let several = plan.cells.len() > 1;
    let name = |kind: &str, r: &Row| {
        if several {
            format!("{kind}-{}-{}-{}.svg", r.cell, r.setup, r.fault.name())
        } else {
            format!("{kind}-{}-{}.svg", r.setup, r.fault.name())
        }
    };
    let mut md = String::new();
    md += "# vipsec chaos bench\n\n";
    let _ = writeln!(
        md,
        "Recovery = fault to the first answer from the new owner on every front-end for every VIP (probe: a new TCP connection to each VIP:143 every probe interval). Takeover = fault to the kernel's announcement of the last VIP on the new owner (rtnetlink; keepalived with advert {:?}, or Pacemaker's IPaddr2 with corosync's 1 s token). Recovery − takeover is taken per run. Reaction = a front-end agent's first IKE_SA_INIT handed to charon minus the new owner's record in the store (`epoch-recorded`), per front-end and VIP, from the agents' move timelines (wall clock, shared by every node of the lab); n/a without a store. Pacemaker's planned move is `crm_resource --move`. Cap {} s, {} runs per cell, set-up and fault.\n",
        plan.vrrp_advert,
        plan.cap.as_secs(),
        plan.runs
    );
    let _ = writeln!(
        md,
        "Binaries: `{}` and the `vipsec` agent beside it ({} build).\n",
        plan.self_exe.display(),
        profile_of(&plan.self_exe)
    );
    md += "| cell (front-ends x VIPs) | probe interval per flow | keying.initiate_timeout |\n| --- | --- | --- |\n";
    for &c in &plan.cells {
        let _ = writeln!(
            md,
            "| {c} | {:?} | {:?} |",
            plan.probe_interval(c),
            plan.initiate_timeout(c)
        );
    }
    md += "\n";
    md += &markdown(&rows, plan.cap);
    md += "\n## The agent's footprint\n\nGoals: RSS ≤ 25 MB; idle CPU < 0.5 % with 500 SAs. Idle: steady probe traffic, nothing moving. Storm: from the fault to recovery (to the run's end without one), the new owner and the first front-end. CPU is utime + stime of /proc/PID/stat (all threads, 10 ms ticks) over the window.\n\n";
    md += &footprint_markdown(grid);
    if let Some(biggest) = plan.cells.iter().max_by_key(|c| c.sas()) {
        let _ = writeln!(
            md,
            "\nThe largest cell here is {biggest} ({} SAs on the owner).",
            biggest.sas()
        );
    }
    if !grid.failures.is_empty() {
        md += "\n## Not measured\n\n";
        for f in &grid.failures {
            let _ = writeln!(md, "- {f}");
        }
    }
    md += "\n## Files\n\n";
    for r in &rows {
        let _ = write!(
            md,
            "- {} {} {}: `{}`",
            r.cell,
            r.setup,
            r.fault.name(),
            name("timeline", r)
        );
        if r.reaction.is_some() {
            let _ = write!(md, ", `{}`", name("reaction", r));
        }
        md += "\n";
    }
    std::fs::write(out.join("report.md"), md)?;

    #[derive(Serialize)]
    struct Json<'a> {
        rows: &'a [Row],
        idle_footprint: &'a [IdleFootprint],
        failures: &'a [String],
        runs: &'a [BenchRun],
    }
    std::fs::write(
        out.join("results.json"),
        serde_json::to_string_pretty(&Json {
            rows: &rows,
            idle_footprint: &grid.idle,
            failures: &grid.failures,
            runs: &grid.runs,
        })?,
    )?;
    for r in &rows {
        let of: Vec<&BenchRun> = grid
            .runs
            .iter()
            .filter(|x| {
                x.cell == r.cell && x.outcome.setup == r.setup && x.outcome.fault == r.fault
            })
            .collect();
        let mut shown: Vec<&Outcome> = Vec::new();
        let mut lines = 0;
        for x in &of {
            if !shown.is_empty() && lines + x.outcome.per_flow.len() > TIMELINE_ROWS {
                break;
            }
            lines += x.outcome.per_flow.len();
            shown.push(&x.outcome);
        }
        std::fs::write(out.join(name("timeline", r)), svg(&shown))?;
        if r.reaction.is_some() {
            let ms: Vec<i64> = of
                .iter()
                .filter_map(|x| x.reactions.as_ref())
                .flat_map(|x| x.reactions.iter().map(|y| y.reaction_ms))
                .collect();
            let title = format!("{} {} {}", r.cell, r.setup, r.fault.name());
            std::fs::write(
                out.join(name("reaction", r)),
                super::reaction::svg(&title, &ms, plan.bin_ms),
            )?;
        }
    }
    Ok(())
}

/// `release` or `debug` from a binary's cargo target directory (`target/<profile>/`).
pub fn profile_of(exe: &Path) -> String {
    exe.parent()
        .and_then(|d| d.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| n == "release" || n == "debug")
        .unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::peers_settled;

    #[test]
    fn settled_needs_every_peer_vip_up_and_none_renegotiating() {
        let status = |peers: serde_json::Value| serde_json::json!({ "peer_vips": peers });
        let up = serde_json::json!({"child_state": "established", "renegotiating": false});
        let again = serde_json::json!({"child_state": "established", "renegotiating": true});
        let down = serde_json::json!({"child_state": "connecting", "renegotiating": true});
        assert!(peers_settled(&status(serde_json::json!([up, up]))));
        assert!(!peers_settled(&status(serde_json::json!([up, again]))));
        assert!(!peers_settled(&status(serde_json::json!([down, up]))));
        assert!(!peers_settled(&serde_json::json!({"error": "no agent"})));
        assert!(!peers_settled(&status(serde_json::json!([]))));
    }

    #[test]
    fn owners_are_known_when_every_peer_vip_names_one() {
        let status = |peers: serde_json::Value| serde_json::json!({ "peer_vips": peers });
        let owned = serde_json::json!({"owner": {"node": "be1", "epoch": 3}});
        let unknown = serde_json::json!({"owner": null});
        assert!(super::owners_known(&status(serde_json::json!([
            owned, owned
        ]))));
        assert!(!super::owners_known(&status(serde_json::json!([
            owned, unknown
        ]))));
        assert!(!super::owners_known(
            &serde_json::json!({"error": "no agent"})
        ));
    }

    use super::*;

    #[test]
    fn sas_are_counted_from_the_cli_json() {
        let v = serde_json::json!({
            "vips": [
                {"vip": "192.0.2.100", "sas": [
                    {"children": [{}, {}]},
                    {"children": [{}]}
                ]},
                {"vip": "192.0.2.101", "sas": []}
            ],
            "unmapped": [{"children": []}]
        });
        assert_eq!(count_sas(&v), (3, 3));
        assert_eq!(count_sas(&serde_json::json!({})), (0, 0));
    }

    #[test]
    fn profiles_come_from_the_target_directory() {
        assert_eq!(
            profile_of(Path::new("/w/target/release/vipsec-chaos")),
            "release"
        );
        assert_eq!(
            profile_of(Path::new("/w/target/debug/vipsec-chaos")),
            "debug"
        );
        assert_eq!(profile_of(Path::new("/usr/bin/vipsec-chaos")), "unknown");
    }
}
