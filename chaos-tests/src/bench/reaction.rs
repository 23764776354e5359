//! The agent's own reaction time: from the owner event a front-end reacted to (the new
//! owner's record in the store, `epoch-recorded`) to its first IKE_SA_INIT handed to charon
//! (`first-ike-sa-init`), per front-end and VIP, from the marks every agent publishes.
//!
//! Both marks are wall-clock milliseconds taken by different agents; every lab node is a
//! network namespace of one machine, so they read the same clock. Without a store there is
//! no owner event: a front-end learns of the move from its own idle detector, which the
//! timelines do not mark, so store-less set-ups have no reaction time.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;
use vipsec::timeline::{Mark, NodeMarks};

/// One front-end's reaction to one move of one VIP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Reaction {
    pub fe: String,
    pub vip: String,
    pub epoch: u64,
    /// `first-ike-sa-init` minus `epoch-recorded`, in ms (same clock; see the module).
    pub reaction_ms: i64,
    /// The part of it before the initiation joined the reconnect pacer's queue (the
    /// store's watch, the core) ...
    pub to_queued_ms: Option<i64>,
    /// ... and the pacer's wait (jitter, rate, concurrency).
    pub pacer_wait_ms: Option<i64>,
}

/// What the marks say about the moves of one run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RunReactions {
    pub reactions: Vec<Reaction>,
    /// Moves recorded in the run's window.
    pub moves: usize,
    /// Front-end and VIP pairs of those moves without a `first-ike-sa-init`.
    pub without_initiation: Vec<String>,
}

/// The reactions to moves whose `epoch-recorded` lies in `[from_ms, to_ms]` (a run's
/// fault to its end), for the front-ends named.
pub fn reactions(
    marks: &[NodeMarks],
    front_ends: &[String],
    from_ms: u64,
    to_ms: u64,
) -> RunReactions {
    let mut by_move: BTreeMap<(String, u64), Vec<&NodeMarks>> = BTreeMap::new();
    for m in marks {
        by_move
            .entry((m.vip.to_string(), m.epoch))
            .or_default()
            .push(m);
    }
    let mut out = RunReactions::default();
    for ((vip, epoch), parts) in by_move {
        let Some(recorded) = parts
            .iter()
            .filter_map(|p| p.marks.get(&Mark::EpochRecorded).copied())
            .min()
        else {
            continue;
        };
        if recorded < from_ms || recorded > to_ms {
            continue;
        }
        out.moves += 1;
        for fe in front_ends {
            let own = parts.iter().find(|p| &p.node == fe);
            let at = |m: Mark| own.and_then(|p| p.marks.get(&m).copied());
            let Some(init) = at(Mark::FirstIkeSaInit) else {
                out.without_initiation.push(format!("{fe}→{vip}"));
                continue;
            };
            let diff = |a: u64, b: u64| b as i64 - a as i64;
            let queued = at(Mark::InitiationQueued);
            out.reactions.push(Reaction {
                fe: fe.clone(),
                vip: vip.clone(),
                epoch,
                reaction_ms: diff(recorded, init),
                to_queued_ms: queued.map(|q| diff(recorded, q)),
                pacer_wait_ms: queued.map(|q| diff(q, init)),
            });
        }
    }
    out
}

/// Nearest-rank percentile of sorted values.
pub fn percentile(sorted: &[i64], q: f64) -> Option<i64> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    Some(sorted[i])
}

/// Reaction times summarised: how many, median, p99, max (ms).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Spread {
    pub n: usize,
    pub median_ms: Option<i64>,
    pub p99_ms: Option<i64>,
    pub max_ms: Option<i64>,
}

pub fn spread(values: &[i64]) -> Spread {
    let mut v = values.to_vec();
    v.sort_unstable();
    Spread {
        n: v.len(),
        median_ms: percentile(&v, 0.5),
        p99_ms: percentile(&v, 0.99),
        max_ms: v.last().copied(),
    }
}

/// Counts per bin of `bin_ms`: `(bin start, count)` for every bin from zero (or the
/// lowest value's, when below) to the highest value's, empty bins included, so the bars
/// line up with the axis and histograms of different set-ups compare at a glance.
pub fn histogram(values: &[i64], bin_ms: i64) -> Vec<(i64, usize)> {
    assert!(bin_ms > 0, "a bin is at least 1 ms wide");
    let (Some(&lo), Some(&hi)) = (values.iter().min(), values.iter().max()) else {
        return Vec::new();
    };
    let first = lo.min(0).div_euclid(bin_ms);
    let last = hi.div_euclid(bin_ms);
    let mut bins: Vec<(i64, usize)> = (first..=last).map(|b| (b * bin_ms, 0)).collect();
    for v in values {
        bins[(v.div_euclid(bin_ms) - first) as usize].1 += 1;
    }
    bins
}

/// A histogram of reaction times as SVG, with the median and p99 marked.
pub fn svg(title: &str, values: &[i64], bin_ms: i64) -> String {
    const LEFT: f64 = 60.0;
    const WIDTH: f64 = 800.0;
    const TOP: f64 = 40.0;
    const HEIGHT: f64 = 240.0;
    let bins = histogram(values, bin_ms);
    let s_ = spread(values);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{}\" font-family=\"monospace\" font-size=\"11\">",
        LEFT + WIDTH + 20.0,
        TOP + HEIGHT + 50.0
    );
    s += "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n";
    let fmt = |v: Option<i64>| v.map(|v| format!("{v} ms")).unwrap_or_else(|| "-".into());
    let _ = writeln!(
        s,
        "<text x=\"10\" y=\"16\" font-size=\"13\">{title}: epoch recorded → IKE_SA_INIT handed to charon, {} ms bins, n={} median {} p99 {} max {}</text>",
        bin_ms,
        s_.n,
        fmt(s_.median_ms),
        fmt(s_.p99_ms),
        fmt(s_.max_ms)
    );
    let (Some(&(lo, _)), Some(&(hi, _))) = (bins.first(), bins.last()) else {
        let _ = writeln!(
            s,
            "<text x=\"{LEFT}\" y=\"{}\">no reaction recorded</text>",
            TOP + 20.0
        );
        s += "</svg>\n";
        return s;
    };
    let span = (hi + bin_ms - lo) as f64;
    let x = |ms: f64| LEFT + (ms - lo as f64) / span * WIDTH;
    let top = bins.iter().map(|b| b.1).max().unwrap_or(1).max(1) as f64;
    let base = TOP + HEIGHT;
    for &(start, count) in &bins {
        if count == 0 {
            continue;
        }
        let h = count as f64 / top * HEIGHT;
        let _ = writeln!(
            s,
            "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{h:.1}\" fill=\"#36c\"><title>{start}–{} ms: {count}</title></rect>",
            x(start as f64),
            base - h,
            (x((start + bin_ms) as f64) - x(start as f64) - 1.0).max(1.0),
            start + bin_ms
        );
    }
    let _ = writeln!(
        s,
        "<line x1=\"{LEFT}\" y1=\"{base}\" x2=\"{}\" y2=\"{base}\" stroke=\"black\"/>",
        LEFT + WIDTH
    );
    let _ = writeln!(
        s,
        "<text x=\"10\" y=\"{}\">{}</text><text x=\"10\" y=\"{}\">0</text>",
        TOP + 10.0,
        top as usize,
        base
    );
    // About ten labelled ticks, on multiples of the bin width.
    let step = ((span / 10.0 / bin_ms as f64).ceil() as i64).max(1) * bin_ms;
    let mut t = lo;
    while t <= hi + bin_ms {
        let _ = writeln!(
            s,
            "<line x1=\"{0:.1}\" y1=\"{base}\" x2=\"{0:.1}\" y2=\"{1}\" stroke=\"black\"/><text x=\"{0:.1}\" y=\"{2}\" text-anchor=\"middle\">{t}</text>",
            x(t as f64),
            base + 4.0,
            base + 16.0
        );
        t += step;
    }
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">ms</text>",
        LEFT + WIDTH / 2.0,
        base + 32.0
    );
    for (v, colour, name) in [(s_.median_ms, "green", "median"), (s_.p99_ms, "red", "p99")] {
        if let Some(v) = v {
            let _ = writeln!(
                s,
                "<line x1=\"{0:.1}\" y1=\"{TOP}\" x2=\"{0:.1}\" y2=\"{base}\" stroke=\"{colour}\" stroke-dasharray=\"4 3\"/><text x=\"{0:.1}\" y=\"{1}\" fill=\"{colour}\">{name}</text>",
                x(v as f64 + 0.5),
                TOP - 4.0
            );
        }
    }
    s += "</svg>\n";
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn marks(node: &str, vip: &str, epoch: u64, m: &[(Mark, u64)]) -> NodeMarks {
        NodeMarks {
            vip: vip.parse().unwrap(),
            epoch,
            node: node.into(),
            from_node: Some("be1".into()),
            to_node: "be2".into(),
            marks: m.iter().copied().collect(),
        }
    }

    #[test]
    fn reactions_count_from_the_recorded_epoch_per_front_end_and_vip() {
        let v = "192.0.2.100";
        let all = [
            marks(
                "be2",
                v,
                7,
                &[(Mark::Usable, 995), (Mark::EpochRecorded, 1000)],
            ),
            marks(
                "fe1",
                v,
                7,
                &[(Mark::InitiationQueued, 1003), (Mark::FirstIkeSaInit, 1010)],
            ),
            marks("fe2", v, 7, &[(Mark::InitiationQueued, 1004)]),
            // An earlier move, outside the run's window.
            marks("be1", v, 6, &[(Mark::EpochRecorded, 10)]),
            marks("fe1", v, 6, &[(Mark::FirstIkeSaInit, 20)]),
        ];
        let fes = vec!["fe1".to_string(), "fe2".to_string()];
        let r = reactions(&all, &fes, 900, 5000);
        assert_eq!(r.moves, 1);
        assert_eq!(
            r.reactions,
            vec![Reaction {
                fe: "fe1".into(),
                vip: v.into(),
                epoch: 7,
                reaction_ms: 10,
                to_queued_ms: Some(3),
                pacer_wait_ms: Some(7),
            }]
        );
        assert_eq!(r.without_initiation, ["fe2→192.0.2.100"]);
        assert_eq!(reactions(&all, &fes, 2000, 5000).moves, 0);
    }

    #[test]
    fn spreads_use_nearest_ranks() {
        let s = spread(&[30, 10, 20, 40]);
        assert_eq!(
            s,
            Spread {
                n: 4,
                median_ms: Some(20),
                p99_ms: Some(40),
                max_ms: Some(40)
            }
        );
        assert_eq!(spread(&[]).median_ms, None);
        let many: Vec<i64> = (1..=200).collect();
        assert_eq!(percentile(&many, 0.99), Some(198));
    }

    #[test]
    fn histograms_bin_every_value_and_keep_empty_bins() {
        assert_eq!(
            histogram(&[0, 4, 5, 17, -1], 5),
            vec![(-5, 1), (0, 2), (5, 1), (10, 0), (15, 1)]
        );
        assert!(histogram(&[], 5).is_empty());
        assert_eq!(histogram(&[12], 5), vec![(0, 0), (5, 0), (10, 1)]);
        let svg = svg("t", &[3, 4, 12], 5);
        assert!(
            svg.starts_with("<svg") && svg.ends_with("</svg>\n"),
            "{svg}"
        );
        assert_eq!(svg.matches("fill=\"#36c\"").count(), 2, "{svg}");
        assert!(svg.contains("n=3 median 4 ms"), "{svg}");
        assert!(self::svg("t", &[], 5).contains("no reaction recorded"));
    }
}
