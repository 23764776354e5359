//! The benchmark: planned moves and crashes N times per set-up, on one lab per cell of the
//! grid (front-ends × VIPs), summarised as a Markdown table, JSON, an SVG timeline of the
//! probes around each fault, a histogram of the agents' reaction times, and the agent's
//! footprint idle and during the storm.

pub mod cell;
pub mod footprint;
pub mod grid;
pub mod reaction;
pub mod release;

use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

use crate::lab::Setup;
use crate::lab::faults::Fault;
use crate::scenario::{self, Outcome};

pub use cell::Cell;
pub use grid::{BenchRun, Grid, GridPlan};

#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    pub runs: usize,
    pub recovered: usize,
    pub median: Option<Duration>,
    pub p99: Option<Duration>,
    pub max: Option<Duration>,
}

/// Median, p99 (nearest rank) and max of the runs that recovered.
pub fn stats(values: &[Option<Duration>]) -> Stats {
    let mut v: Vec<Duration> = values.iter().flatten().copied().collect();
    v.sort();
    let rank = |q: f64| -> Option<Duration> {
        if v.is_empty() {
            return None;
        }
        let i = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
        Some(v[i])
    };
    Stats {
        runs: values.len(),
        recovered: v.len(),
        median: rank(0.5),
        p99: rank(0.99),
        max: v.last().copied(),
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub cell: Cell,
    pub setup: String,
    pub fault: Fault,
    pub recovery: Stats,
    pub takeover: Stats,
    /// Per run: its recovery minus its own takeover.
    pub recovery_minus_takeover: Stats,
    /// Every front-end's and VIP's reaction in every run, ms; None where the set-up has
    /// no owner event to react to (no store, or no agent).
    pub reaction: Option<reaction::Spread>,
    pub cleartext_packets: u64,
    pub stale_answers: usize,
}

/// One row per cell, set-up and fault, in the order they ran.
pub fn rows(runs: &[BenchRun]) -> Vec<Row> {
    let mut rows = Vec::new();
    let mut keys: Vec<(Cell, String, Fault)> = Vec::new();
    for r in runs {
        let key = (r.cell, r.outcome.setup.clone(), r.outcome.fault);
        if !keys.contains(&key) {
            keys.push(key);
        }
    }
    for (cell, setup, fault) in keys {
        let of: Vec<&BenchRun> = runs
            .iter()
            .filter(|r| r.cell == cell && r.outcome.setup == setup && r.outcome.fault == fault)
            .collect();
        let outcomes: Vec<&Outcome> = of.iter().map(|r| &r.outcome).collect();
        let reaction = of
            .iter()
            .map(|r| r.reactions.as_ref())
            .collect::<Option<Vec<_>>>()
            .map(|all| {
                let ms: Vec<i64> = all
                    .iter()
                    .flat_map(|r| r.reactions.iter().map(|x| x.reaction_ms))
                    .collect();
                reaction::spread(&ms)
            });
        rows.push(Row {
            cell,
            setup,
            fault,
            recovery: stats(&outcomes.iter().map(|o| o.recovery).collect::<Vec<_>>()),
            takeover: stats(&outcomes.iter().map(|o| o.takeover).collect::<Vec<_>>()),
            recovery_minus_takeover: stats(
                &outcomes
                    .iter()
                    .map(|o| o.recovery_minus_takeover())
                    .collect::<Vec<_>>(),
            ),
            reaction,
            cleartext_packets: outcomes.iter().map(|o| o.cleartext.total()).sum(),
            stale_answers: outcomes.iter().map(|o| o.stale_answers).sum(),
        });
    }
    rows
}

/// A duration for the table; None is a run that never got there.
fn secs_or_never(d: Option<Duration>, cap: Duration) -> String {
    match d {
        Some(d) => format!("{:.3} s", d.as_secs_f64()),
        None => format!("no recovery (> {} s)", cap.as_secs()),
    }
}

/// Median with the share of runs it stands for when some never got there.
fn median_cell(s: &Stats, cap: Duration) -> String {
    let m = secs_or_never(s.median, cap);
    if s.recovered < s.runs && s.recovered > 0 {
        format!("{m} ({}/{} recovered)", s.recovered, s.runs)
    } else {
        m
    }
}

fn ms_or_dash(v: Option<i64>) -> String {
    v.map(|v| format!("{v} ms")).unwrap_or_else(|| "-".into())
}

pub fn markdown(rows: &[Row], cap: Duration) -> String {
    let mut s = String::new();
    s += "| cell | set-up | fault | runs | recovery median | recovery p99 | recovery max | takeover median | recovery − takeover median | recovery − takeover p99 | recovery − takeover max | reaction median | reaction p99 | clear-text packets | stale answers |\n";
    s += "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n";
    for r in rows {
        let d = |d: Option<Duration>| secs_or_never(d, cap);
        let (react_median, react_p99) = match &r.reaction {
            Some(x) if x.n > 0 => (
                format!("{} (n={})", ms_or_dash(x.median_ms), x.n),
                ms_or_dash(x.p99_ms),
            ),
            Some(_) => ("none recorded".into(), "-".into()),
            None => ("n/a".into(), "n/a".into()),
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {react_median} | {react_p99} | {} | {} |",
            r.cell,
            r.setup,
            r.fault.name(),
            r.recovery.runs,
            median_cell(&r.recovery, cap),
            d(r.recovery.p99),
            d(r.recovery.max),
            median_cell(&r.takeover, cap),
            median_cell(&r.recovery_minus_takeover, cap),
            d(r.recovery_minus_takeover.p99),
            d(r.recovery_minus_takeover.max),
            r.cleartext_packets,
            r.stale_answers
        );
    }
    s
}

/// A timeline per (set-up, fault): one row per run and front-end, one mark per probe
/// attempt at its start time relative to the fault; green = new owner answered, blue = old
/// owner answered, red = failed. Vertical marks: fault (0), takeover, recovery.
pub fn svg(outcomes: &[&Outcome]) -> String {
    const LEFT: f64 = 240.0;
    const WIDTH: f64 = 900.0;
    const ROW: f64 = 16.0;
    let t_min = -1.0f64;
    let t_max = outcomes
        .iter()
        .map(|o| {
            o.timeline
                .iter()
                .map(|r| r.start as f64 / 1e9 - o.fault_at as f64 / 1e9)
                .fold(1.0, f64::max)
        })
        .fold(2.0, f64::max);
    let x = |t: f64| LEFT + (t - t_min) / (t_max - t_min) * WIDTH;
    let rows: usize = outcomes.iter().map(|o| o.per_flow.len()).sum();
    let height = 50.0 + rows as f64 * ROW + 30.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{height}\" font-family=\"monospace\" font-size=\"11\">",
        LEFT + WIDTH + 20.0
    );
    s += "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n";
    if let Some(o) = outcomes.first() {
        let _ = writeln!(
            s,
            "<text x=\"10\" y=\"16\" font-size=\"13\">{} / {}: probe attempts around the fault (green new owner, blue old owner, red failed; | takeover, recovery)</text>",
            o.setup,
            o.fault.name()
        );
    }
    // Seconds axis.
    let axis_y = height - 20.0;
    let mut t = t_min.ceil();
    while t <= t_max {
        let _ = writeln!(
            s,
            "<line x1=\"{0:.1}\" y1=\"30\" x2=\"{0:.1}\" y2=\"{axis_y}\" stroke=\"#eee\"/><text x=\"{0:.1}\" y=\"{1}\" text-anchor=\"middle\">{t}s</text>",
            x(t),
            axis_y + 14.0
        );
        t += if t_max - t_min > 30.0 { 5.0 } else { 1.0 };
    }
    let mut y = 40.0;
    for (i, o) in outcomes.iter().enumerate() {
        for key in o.per_flow.keys() {
            let _ = writeln!(
                s,
                "<text x=\"10\" y=\"{:.1}\">run {} {key} {}→{}</text>",
                y + 10.0,
                i + 1,
                o.from,
                o.to
            );
            // Consecutive attempts of one colour become one bar, which keeps a 60 s
            // timeline small.
            let mut bars: Vec<(f64, f64, &str)> = Vec::new();
            let many = o.vips > 1;
            for r in o
                .timeline
                .iter()
                .filter(|r| scenario::flow_key(&r.fe, r.target.ip(), many) == *key)
            {
                let rel = r.start as f64 / 1e9 - o.fault_at as f64 / 1e9;
                let colour = match r.node.as_deref() {
                    Some(n) if n == o.to => "#2a2",
                    Some(_) => "#36c",
                    None => "#d33",
                };
                match bars.last_mut() {
                    Some(bar) if bar.2 == colour => bar.1 = rel,
                    _ => bars.push((rel, rel, colour)),
                }
            }
            for (from, to, colour) in bars {
                let _ = writeln!(
                    s,
                    "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{}\" fill=\"{colour}\"/>",
                    x(from),
                    y + 2.0,
                    x(to) - x(from) + 2.0,
                    ROW - 4.0
                );
            }
            let mark = |s: &mut String, d: Option<Duration>, colour: &str| {
                if let Some(d) = d {
                    let _ = writeln!(
                        s,
                        "<line x1=\"{0:.1}\" y1=\"{1:.1}\" x2=\"{0:.1}\" y2=\"{2:.1}\" stroke=\"{colour}\" stroke-width=\"2\"/>",
                        x(d.as_secs_f64()),
                        y,
                        y + ROW
                    );
                }
            };
            mark(&mut s, Some(Duration::ZERO), "black");
            mark(&mut s, o.takeover, "orange");
            mark(&mut s, o.per_flow[key], "green");
            y += ROW;
        }
    }
    s += "</svg>\n";
    s
}

/// The faults a set-up is measured with: a planned move and a crash everywhere; beside
/// Pacemaker also standby and the agent's resource failing (agent SIGKILLed).
pub fn faults(setup: Setup) -> Vec<Fault> {
    match setup.cluster_manager() {
        crate::lab::ClusterManager::Keepalived => vec![Fault::Planned, Fault::Crash],
        crate::lab::ClusterManager::Pacemaker => vec![
            Fault::Planned,
            Fault::Crash,
            Fault::Standby,
            Fault::AgentKilled,
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let ms = |n| Some(Duration::from_millis(n));
        let s = stats(&[ms(300), ms(100), None, ms(200)]);
        assert_eq!((s.runs, s.recovered), (4, 3));
        assert_eq!(s.median, ms(200));
        assert_eq!(s.p99, ms(300));
        assert_eq!(s.max, ms(300));
        assert_eq!(stats(&[None, None]).median, None);
    }
}
