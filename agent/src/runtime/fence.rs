//! The runtime's fences: the one place where an action the core decided is refused because
//! the world has moved past the decision. (The store fences its own writes with the epoch
//! in the same transaction; see `store::etcd`.)
//!
//! Every action carries the epoch of its VIP when the core decided it. Two things can
//! happen before it runs:
//! - the core learns of a newer owner while an initiation waits its turn in the pacer: the
//!   core has then decided again, and the old initiation would aim at the wrong node;
//! - this node is paused or cut off while the VIP moves on: when it wakes, the delete it
//!   was about to send would tear down SAs the new owner's peers rely on, so the store is
//!   read again first.

use crate::model::Vip;
use crate::store::OwnershipStore;

use super::knowledge::KnowledgeReader;

/// Why an action was not carried out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("decided under epoch {decided}; {now}")]
pub struct Fenced {
    pub decided: u64,
    /// What is known now, in words ("the owner is now at epoch 7").
    pub now: String,
}

/// An initiation decided under `decided` may start only if the core has not moved past it.
pub(super) fn initiation(
    knowledge: &KnowledgeReader,
    vip: Vip,
    decided: u64,
) -> Result<(), Fenced> {
    let known = knowledge.epoch(vip);
    if decided < known {
        return Err(Fenced {
            decided,
            now: format!("the owner is now at epoch {known}"),
        });
    }
    Ok(())
}

/// A hosted VIP's SAs may be deleted under `decided` unless the store, read again now,
/// shows another node at a newer epoch. An unreachable store does not stop a delete (a
/// drain must go on during a store outage); the VIP is gone or ours then anyway.
pub(super) async fn hosted_delete(
    store: &dyn OwnershipStore,
    node: &str,
    vip: Vip,
    decided: u64,
) -> Result<(), Fenced> {
    match store.current(vip).await {
        Ok((owner, highest)) => {
            let ours = owner.as_ref().is_some_and(|o| o.node == node);
            if highest > decided && !ours {
                let holder = owner.map_or("nobody".to_string(), |o| o.node);
                return Err(Fenced {
                    decided,
                    now: format!("the store is at epoch {highest} (owner {holder})"),
                });
            }
            Ok(())
        }
        Err(e) => {
            tracing::debug!(%vip, error = %e, "store unreachable; deleting without an epoch check");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::knowledge::Knowledge;

    fn vip() -> Vip {
        "192.0.2.100".parse().unwrap()
    }

    #[test]
    fn an_initiation_decided_under_an_older_epoch_is_fenced() {
        let k = KnowledgeReader::fixed(Knowledge::default().with(vip(), 7, Some("be2")));
        assert_eq!(initiation(&k, vip(), 7), Ok(()));
        assert_eq!(initiation(&k, vip(), 8), Ok(()));
        let e = initiation(&k, vip(), 6).unwrap_err();
        assert_eq!(
            e.to_string(),
            "decided under epoch 6; the owner is now at epoch 7"
        );
    }
}
