//! The benchmark: planned moves and crashes N times per set-up on one lab, summarised as
//! a Markdown table, JSON, and an SVG timeline of the probes around each fault.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use serde::Serialize;

use crate::lab::faults::Fault;
use crate::lab::{Lab, Setup};
use crate::scenario::{self, Outcome};

#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    pub runs: usize,
    pub recovered: usize,
    pub median: Option<Duration>,
    pub p99: Option<Duration>,
}

/// Median and p99 (nearest rank) of the runs that recovered.
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
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub setup: String,
    pub fault: Fault,
    pub recovery: Stats,
    pub takeover: Stats,
    pub recovery_minus_takeover: Stats,
    pub cleartext_packets: u64,
    pub stale_answers: usize,
}

pub fn rows(outcomes: &[Outcome]) -> Vec<Row> {
    let mut rows = Vec::new();
    let mut keys: Vec<(String, Fault)> = Vec::new();
    for o in outcomes {
        if !keys.contains(&(o.setup.clone(), o.fault)) {
            keys.push((o.setup.clone(), o.fault));
        }
    }
    for (setup, fault) in keys {
        let of: Vec<&Outcome> = outcomes
            .iter()
            .filter(|o| o.setup == setup && o.fault == fault)
            .collect();
        rows.push(Row {
            setup,
            fault,
            recovery: stats(&of.iter().map(|o| o.recovery).collect::<Vec<_>>()),
            takeover: stats(&of.iter().map(|o| o.takeover).collect::<Vec<_>>()),
            recovery_minus_takeover: stats(
                &of.iter()
                    .map(|o| o.recovery_minus_takeover())
                    .collect::<Vec<_>>(),
            ),
            cleartext_packets: of.iter().map(|o| o.cleartext.total()).sum(),
            stale_answers: of.iter().map(|o| o.stale_answers).sum(),
        });
    }
    rows
}

fn cell(s: &Stats, cap: Duration) -> (String, String) {
    let f = |d: Option<Duration>| match d {
        Some(d) => format!("{:.2} s", d.as_secs_f64()),
        None => format!("no recovery (> {} s)", cap.as_secs()),
    };
    let med = if s.recovered < s.runs && s.recovered > 0 {
        format!("{} ({}/{} recovered)", f(s.median), s.recovered, s.runs)
    } else {
        f(s.median)
    };
    (med, f(s.p99))
}

pub fn markdown(rows: &[Row], cap: Duration) -> String {
    let mut s = String::new();
    s += "| set-up | fault | runs | recovery median | recovery p99 | takeover median | recovery − takeover median | clear-text packets | stale answers |\n";
    s += "| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n";
    for r in rows {
        let (rm, rp) = cell(&r.recovery, cap);
        let (tm, _) = cell(&r.takeover, cap);
        let (dm, _) = cell(&r.recovery_minus_takeover, cap);
        let _ = writeln!(
            s,
            "| {} | {} | {} | {rm} | {rp} | {tm} | {dm} | {} | {} |",
            r.setup,
            r.fault.name(),
            r.recovery.runs,
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

pub struct BenchPlan {
    pub setups: Vec<Setup>,
    /// Only these faults (of those each set-up is measured with); all when empty.
    pub faults: Vec<Fault>,
    pub runs: usize,
    pub cap: Duration,
}

/// Runs the benchmark on `lab`, switching set-ups in turn; writes report.md, results.json
/// and one SVG per set-up and fault into `out`.
pub fn run(lab: &mut Lab, plan: &BenchPlan, out: &Path) -> anyhow::Result<Vec<Outcome>> {
    std::fs::create_dir_all(out)?;
    let mut outcomes = Vec::new();
    for &setup in &plan.setups {
        if lab.setup != setup {
            lab.progress.step(&format!("switching to {setup}"));
            lab.switch_setup(setup)?;
        }
        for fault in faults(setup)
            .into_iter()
            .filter(|f| plan.faults.is_empty() || plan.faults.contains(f))
        {
            for i in 0..plan.runs {
                lab.reset()?;
                lab.progress.step(&format!(
                    "{setup} {} run {}/{}",
                    fault.name(),
                    i + 1,
                    plan.runs
                ));
                let o = scenario::run(lab, fault, plan.cap)?;
                lab.progress.step(&o.summary());
                for line in &o.cleartext_seen {
                    lab.progress.step(&format!("clear text: {line}"));
                }
                outcomes.push(o);
            }
        }
        write_reports(&outcomes, plan.cap, out)?;
    }
    Ok(outcomes)
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

pub fn write_reports(outcomes: &[Outcome], cap: Duration, out: &Path) -> anyhow::Result<()> {
    let rows = rows(outcomes);
    let md = format!(
        "# vipsec chaos bench\n\nRecovery = fault to the first answer from the new owner on every front-end (probe: new TCP connection to VIP:143 every 20 ms). Takeover = fault to the VIP present on the new owner (keepalived with advert 1 s, or Pacemaker's IPaddr2 with corosync's 1 s token). Pacemaker's planned move is `crm_resource --move`. Cap {} s.\n\n{}",
        cap.as_secs(),
        markdown(&rows, cap)
    );
    std::fs::write(out.join("report.md"), md)?;
    #[derive(Serialize)]
    struct Json<'a> {
        rows: &'a [Row],
        runs: &'a [Outcome],
    }
    std::fs::write(
        out.join("results.json"),
        serde_json::to_string_pretty(&Json {
            rows: &rows,
            runs: outcomes,
        })?,
    )?;
    for r in &rows {
        let of: Vec<&Outcome> = outcomes
            .iter()
            .filter(|o| o.setup == r.setup && o.fault == r.fault)
            .collect();
        std::fs::write(
            out.join(format!("timeline-{}-{}.svg", r.setup, r.fault.name())),
            svg(&of),
        )?;
    }
    Ok(())
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
        assert_eq!(stats(&[None, None]).median, None);
    }
}
