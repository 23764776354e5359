//! Per-move timelines: when a VIP moved, what each node saw of the move and when.
//!
//! A move is keyed by (VIP, new epoch). Each node sees only some of the six marks (the old
//! owner the release, the new owner the address and the record, each front-end its own
//! renegotiation), so every node publishes its own [`NodeMarks`] to the store and anyone
//! can merge them into the whole [`MoveTimeline`]. The [`Recorder`] derives a node's marks
//! from the failover core's inputs and actions, without touching the core.

mod recorder;

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::model::Vip;

pub use recorder::Recorder;

/// One step of a move, in the order a planned move goes through them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mark {
    /// Old owner: the VIP was drained or left its interface.
    Released,
    /// New owner: the address is there (IPv6: past DAD), as the address watcher saw it.
    Usable,
    /// The new owner's record with the new epoch is in the store (the record's own
    /// `taken_at`, written just before the store committed it).
    EpochRecorded,
    /// A front-end decided to renegotiate toward the VIP after it learnt the new owner: the
    /// initiation joins the reconnect pacer's queue.
    InitiationQueued,
    /// That initiation left the pacer and was handed to the keying daemon, which sends the
    /// IKE_SA_INIT at once. The step before it is the pacer's wait (jitter, rate, limit).
    /// When the new owner answers an initiation that was already out before the move was
    /// learnt (the daemon retransmits it to the VIP's address), this step and the one
    /// before are the moment the move was learnt: there was no wait.
    FirstIkeSaInit,
    /// That front-end's CHILD_SA toward the VIP is up.
    ChildSaInstalled,
    /// That front-end's SA counters grew in both directions after it came up.
    FirstTraffic,
}

impl Mark {
    pub const ALL: [Mark; 7] = [
        Mark::Released,
        Mark::Usable,
        Mark::EpochRecorded,
        Mark::InitiationQueued,
        Mark::FirstIkeSaInit,
        Mark::ChildSaInstalled,
        Mark::FirstTraffic,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Mark::Released => "released",
            Mark::Usable => "usable",
            Mark::EpochRecorded => "epoch-recorded",
            Mark::InitiationQueued => "initiation-queued",
            Mark::FirstIkeSaInit => "first-ike-sa-init",
            Mark::ChildSaInstalled => "child-sa-installed",
            Mark::FirstTraffic => "first-traffic",
        }
    }

    pub fn parse(s: &str) -> Option<Mark> {
        Mark::ALL.into_iter().find(|m| m.as_str() == s)
    }

    /// Marks a front-end records (the rest come from back-ends).
    pub fn is_front_end(self) -> bool {
        matches!(
            self,
            Mark::InitiationQueued
                | Mark::FirstIkeSaInit
                | Mark::ChildSaInstalled
                | Mark::FirstTraffic
        )
    }
}

impl fmt::Display for Mark {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What one node saw of one move: the unit published to the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeMarks {
    pub vip: Vip,
    pub epoch: u64,
    pub node: String,
    /// The previous owner as this node knew it (None when it knew of none).
    pub from_node: Option<String>,
    pub to_node: String,
    /// Wall-clock milliseconds since the Unix epoch, per mark.
    pub marks: BTreeMap<Mark, u64>,
}

/// The whole move, merged from every node's marks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveTimeline {
    pub vip: Vip,
    pub epoch: u64,
    pub from_node: Option<String>,
    pub to_node: String,
    /// Each mark with the node that saw it and when (Unix ms).
    pub marks: BTreeMap<Mark, (String, u64)>,
}

/// Named steps between two marks, for metrics and reports.
pub const STEPS: [(&str, Mark, Mark); 6] = [
    ("released_to_usable", Mark::Released, Mark::Usable),
    (
        "usable_to_epoch_recorded",
        Mark::Usable,
        Mark::EpochRecorded,
    ),
    (
        "epoch_recorded_to_initiation_queued",
        Mark::EpochRecorded,
        Mark::InitiationQueued,
    ),
    (
        "initiation_queued_to_first_ike_sa_init",
        Mark::InitiationQueued,
        Mark::FirstIkeSaInit,
    ),
    (
        "first_ike_sa_init_to_child_sa_installed",
        Mark::FirstIkeSaInit,
        Mark::ChildSaInstalled,
    ),
    (
        "child_sa_installed_to_first_traffic",
        Mark::ChildSaInstalled,
        Mark::FirstTraffic,
    ),
];

impl MoveTimeline {
    /// Merges every node's marks of one move. Back-end marks are unique (one old owner,
    /// one new owner). Front-end marks come from one front-end, never mixed: the one that
    /// has not seen traffic yet if any (the move is not over for it), else the one whose
    /// traffic came back last (the move is over when the last front-end recovered).
    pub fn merge(parts: &[NodeMarks]) -> Option<MoveTimeline> {
        let first = parts.first()?;
        let mut t = MoveTimeline {
            vip: first.vip,
            epoch: first.epoch,
            from_node: None,
            to_node: first.to_node.clone(),
            marks: BTreeMap::new(),
        };
        // The old owner knows best who it was; otherwise the first node that knew one.
        t.from_node = parts
            .iter()
            .find(|p| p.marks.contains_key(&Mark::Released))
            .and_then(|p| p.from_node.clone())
            .or_else(|| parts.iter().find_map(|p| p.from_node.clone()));
        for p in parts {
            for (m, at) in &p.marks {
                if m.is_front_end() {
                    continue;
                }
                let keep = t.marks.get(m).is_none_or(|(_, old)| at < old);
                if keep {
                    t.marks.insert(*m, (p.node.clone(), *at));
                }
            }
        }
        let front_ends: Vec<&NodeMarks> = parts
            .iter()
            .filter(|p| p.marks.keys().any(|m| m.is_front_end()))
            .collect();
        let chosen = front_ends
            .iter()
            .filter(|p| !p.marks.contains_key(&Mark::FirstTraffic))
            .min_by(|a, b| a.node.cmp(&b.node))
            .or_else(|| {
                front_ends
                    .iter()
                    .max_by_key(|p| (p.marks.get(&Mark::FirstTraffic), &p.node))
            });
        if let Some(fe) = chosen {
            for (m, at) in fe.marks.iter().filter(|(m, _)| m.is_front_end()) {
                t.marks.insert(*m, (fe.node.clone(), *at));
            }
        }
        Some(t)
    }

    /// Groups any set of node marks into timelines, ordered by VIP then epoch.
    pub fn merge_all(parts: Vec<NodeMarks>) -> Vec<MoveTimeline> {
        let mut by_move: BTreeMap<(Vip, u64), Vec<NodeMarks>> = BTreeMap::new();
        for p in parts {
            by_move.entry((p.vip, p.epoch)).or_default().push(p);
        }
        by_move
            .values()
            .filter_map(|parts| MoveTimeline::merge(parts))
            .collect()
    }

    /// All six marks are there.
    pub fn complete(&self) -> bool {
        Mark::ALL.iter().all(|m| self.marks.contains_key(m))
    }

    pub fn missing(&self) -> Vec<Mark> {
        Mark::ALL
            .into_iter()
            .filter(|m| !self.marks.contains_key(m))
            .collect()
    }

    pub fn at(&self, m: Mark) -> Option<u64> {
        self.marks.get(&m).map(|(_, at)| *at)
    }

    /// The earliest mark's time.
    pub fn first_ms(&self) -> Option<u64> {
        self.marks.values().map(|(_, at)| *at).min()
    }

    /// From one mark to another, when both are there (zero if the clocks disagree).
    pub fn between(&self, from: Mark, to: Mark) -> Option<Duration> {
        Some(Duration::from_millis(
            self.at(to)?.saturating_sub(self.at(from)?),
        ))
    }

    /// The recovery: from the release (or, without one, the first mark) to first traffic.
    pub fn recovery(&self) -> Option<Duration> {
        let start = self.at(Mark::Released).or_else(|| self.first_ms())?;
        Some(Duration::from_millis(
            self.at(Mark::FirstTraffic)?.saturating_sub(start),
        ))
    }

    /// One line for logs and the `move-completed` event.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "{} epoch {}: {} -> {}",
            self.vip,
            self.epoch,
            self.from_node.as_deref().unwrap_or("(none)"),
            self.to_node
        );
        let first = self.first_ms().unwrap_or(0);
        for (m, (node, at)) in &self.marks {
            s += &format!(", {m} +{}ms on {node}", at.saturating_sub(first));
        }
        match self.recovery() {
            Some(d) => s += &format!("; recovery {} ms", d.as_millis()),
            None => {
                let missing: Vec<&str> = self.missing().iter().map(|m| m.as_str()).collect();
                s += &format!("; missing {}", missing.join(", "));
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(node: &str, marks: &[(Mark, u64)]) -> NodeMarks {
        NodeMarks {
            vip: "192.0.2.100".parse().unwrap(),
            epoch: 4,
            node: node.into(),
            from_node: (node == "be1").then(|| "be1".to_string()),
            to_node: "be2".into(),
            marks: marks.iter().copied().collect(),
        }
    }

    #[test]
    fn merge_takes_back_end_marks_and_the_slowest_front_end() {
        let t = MoveTimeline::merge(&[
            part("be1", &[(Mark::Released, 100)]),
            part("be2", &[(Mark::Usable, 700), (Mark::EpochRecorded, 705)]),
            part(
                "fe1",
                &[
                    (Mark::InitiationQueued, 706),
                    (Mark::FirstIkeSaInit, 720),
                    (Mark::ChildSaInstalled, 760),
                    (Mark::FirstTraffic, 900),
                ],
            ),
            part(
                "fe2",
                &[
                    (Mark::InitiationQueued, 707),
                    (Mark::FirstIkeSaInit, 710),
                    (Mark::ChildSaInstalled, 790),
                    (Mark::FirstTraffic, 1000),
                ],
            ),
        ])
        .unwrap();
        assert!(t.complete(), "{}", t.summary());
        assert_eq!(t.from_node.as_deref(), Some("be1"));
        assert_eq!(t.marks[&Mark::FirstIkeSaInit], ("fe2".to_string(), 710));
        assert_eq!(t.marks[&Mark::FirstTraffic], ("fe2".to_string(), 1000));
        assert_eq!(t.recovery(), Some(Duration::from_millis(900)));
        assert_eq!(
            t.between(Mark::Released, Mark::Usable),
            Some(Duration::from_millis(600))
        );
    }

    #[test]
    fn a_front_end_still_recovering_makes_the_move_incomplete() {
        let t = MoveTimeline::merge(&[
            part("be2", &[(Mark::Usable, 700), (Mark::EpochRecorded, 705)]),
            part(
                "fe1",
                &[(Mark::InitiationQueued, 706), (Mark::FirstIkeSaInit, 720)],
            ),
            part(
                "fe2",
                &[
                    (Mark::InitiationQueued, 707),
                    (Mark::FirstIkeSaInit, 710),
                    (Mark::ChildSaInstalled, 790),
                    (Mark::FirstTraffic, 1000),
                ],
            ),
        ])
        .unwrap();
        assert_eq!(
            t.missing(),
            vec![Mark::Released, Mark::ChildSaInstalled, Mark::FirstTraffic]
        );
        assert_eq!(t.marks[&Mark::FirstIkeSaInit].0, "fe1");
        assert!(t.summary().contains("missing released"), "{}", t.summary());
    }

    #[test]
    fn marks_round_trip_as_json_with_readable_names() {
        let p = part("be1", &[(Mark::Released, 100)]);
        let text = serde_json::to_string(&p).unwrap();
        assert!(text.contains(r#""released":100"#), "{text}");
        assert_eq!(serde_json::from_str::<NodeMarks>(&text).unwrap(), p);
        for m in Mark::ALL {
            assert_eq!(Mark::parse(m.as_str()), Some(m));
        }
    }
}
