//! What the failover core knows of each VIP — the owner of record, its epoch, whether this
//! node is draining it — published by the core loop alone after every decision. The lanes,
//! the pacer and the policy runtime read it here; none keeps a copy of its own, so an action
//! is always judged against what the core knows now, not what some task last heard.

use std::collections::{BTreeMap, BTreeSet};

use tokio::sync::watch;

use crate::failover::FailoverCore;
use crate::model::{IkeId, Vip};

/// One VIP as the core knows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VipKnowledge {
    /// The highest epoch the core has seen for the VIP.
    pub epoch: u64,
    /// The owner of record's node name (its IKE identity), if any.
    pub owner: Option<String>,
    /// This node is draining the VIP (hosted VIPs only).
    pub draining: bool,
    /// A peer VIP has an SA up and no renegotiation running: an initiation still waiting
    /// in the pacer would only make a second IKE_SA.
    pub covered: bool,
    /// The peer VIP's SAs the core holds. A drop is decided with none held (the core
    /// forgets the SAs it drops), so any held when the drop runs came up since, toward
    /// the VIP's new holder, and is spared.
    pub sas: BTreeSet<IkeId>,
}

/// Every VIP the core knows of.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Knowledge {
    vips: BTreeMap<Vip, VipKnowledge>,
}

impl Knowledge {
    /// Reads what the core knows now.
    pub fn of(core: &FailoverCore) -> Knowledge {
        let vips = core
            .epochs()
            .map(|(vip, epoch)| {
                let k = VipKnowledge {
                    epoch,
                    owner: core.owner_of(vip).map(|o| o.node.clone()),
                    draining: core.hosted().get(&vip).is_some_and(|h| h.draining),
                    covered: core
                        .peers()
                        .get(&vip)
                        .is_some_and(|p| !p.sas.is_empty() && p.renegotiation.is_none()),
                    sas: core
                        .peers()
                        .get(&vip)
                        .map(|p| p.sas.keys().copied().collect())
                        .unwrap_or_default(),
                };
                (vip, k)
            })
            .collect();
        Knowledge { vips }
    }

    pub fn vip(&self, vip: Vip) -> Option<&VipKnowledge> {
        self.vips.get(&vip)
    }

    pub fn epoch(&self, vip: Vip) -> u64 {
        self.vip(vip).map_or(0, |k| k.epoch)
    }

    pub fn owner(&self, vip: Vip) -> Option<&str> {
        self.vip(vip).and_then(|k| k.owner.as_deref())
    }
}

/// The core loop's end: the only writer.
pub(super) struct KnowledgeWriter(watch::Sender<Knowledge>);

impl KnowledgeWriter {
    /// Publishes what the core knows now. An epoch never goes back: a reader that fenced
    /// an action under a newer epoch must not see an older one afterwards.
    pub(super) fn publish(&self, core: &FailoverCore) {
        let mut now = Knowledge::of(core);
        self.0.send_if_modified(|old| {
            for (vip, k) in now.vips.iter_mut() {
                k.epoch = k.epoch.max(old.epoch(*vip));
            }
            if *old == now {
                false
            } else {
                *old = std::mem::take(&mut now);
                true
            }
        });
    }
}

/// A reader's end, cheap to clone.
#[derive(Clone)]
pub struct KnowledgeReader(watch::Receiver<Knowledge>);

impl KnowledgeReader {
    pub fn epoch(&self, vip: Vip) -> u64 {
        self.0.borrow().epoch(vip)
    }

    pub fn owner(&self, vip: Vip) -> Option<String> {
        self.0.borrow().owner(vip).map(str::to_string)
    }

    pub fn draining(&self, vip: Vip) -> bool {
        self.0.borrow().vip(vip).is_some_and(|k| k.draining)
    }

    pub fn covered(&self, vip: Vip) -> bool {
        self.0.borrow().vip(vip).is_some_and(|k| k.covered)
    }

    /// Returns once the core holds an SA toward the peer VIP and runs no renegotiation
    /// for it (at once when it does now); never, once the core is gone.
    pub async fn until_covered(&self, vip: Vip) {
        let mut rx = self.0.clone();
        if rx
            .wait_for(|k| k.vip(vip).is_some_and(|k| k.covered))
            .await
            .is_err()
        {
            std::future::pending::<()>().await;
        }
    }

    /// The core holds this SA toward the peer VIP now.
    pub fn holds_sa(&self, vip: Vip, ike_id: IkeId) -> bool {
        self.0
            .borrow()
            .vip(vip)
            .is_some_and(|k| k.sas.contains(&ike_id))
    }

    /// A reader a test changes by hand through the sender.
    #[cfg(test)]
    pub(super) fn settable(knowledge: Knowledge) -> (watch::Sender<Knowledge>, KnowledgeReader) {
        let (tx, rx) = watch::channel(knowledge);
        (tx, KnowledgeReader(rx))
    }

    /// A reader that never changes, for tests of one task on its own.
    #[cfg(test)]
    pub(super) fn fixed(knowledge: Knowledge) -> KnowledgeReader {
        let (tx, rx) = watch::channel(knowledge);
        // The receiver keeps the last value after the sender is gone.
        drop(tx);
        KnowledgeReader(rx)
    }
}

pub(super) fn channel() -> (KnowledgeWriter, KnowledgeReader) {
    let (tx, rx) = watch::channel(Knowledge::default());
    (KnowledgeWriter(tx), KnowledgeReader(rx))
}

#[cfg(test)]
impl Knowledge {
    pub(super) fn with(mut self, vip: Vip, epoch: u64, owner: Option<&str>) -> Knowledge {
        self.vips.insert(
            vip,
            VipKnowledge {
                epoch,
                owner: owner.map(str::to_string),
                draining: false,
                covered: false,
                sas: BTreeSet::new(),
            },
        );
        self
    }

    /// A peer VIP with an SA up toward `owner`.
    pub(super) fn with_covered(mut self, vip: Vip, epoch: u64, owner: &str) -> Knowledge {
        self = self.with(vip, epoch, Some(owner));
        if let Some(k) = self.vips.get_mut(&vip) {
            k.covered = true;
        }
        self
    }
}
