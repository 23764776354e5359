//! Linux XFRM over netlink: fail-secure block policies, SA dumps with counters, SA
//! deletion and kernel events.
//!
//! Requests go through `xfrmnetlink`'s builders; no raw messages were needed. Only the
//! event socket's multicast bind is done with libc (see `events` for why).
//! Block policies are recognised by a reserved index range ([`policy`] explains why not
//! marks). Nothing removes them on drop: if the agent dies, they stay (fail closed) and
//! the next run adopts them through [`Kernel::reconcile`].

mod events;
pub use events::XfrmEvent;
mod netlink;
pub mod policy;
pub mod route_guard;
pub mod state;

use std::collections::BTreeSet;
use std::ffi::CString;

use async_trait::async_trait;
use futures::TryStreamExt;
use netlink_packet_xfrm::{XFRM_INF, XFRM_POLICY_BLOCK, XFRM_POLICY_OUT};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use self::netlink::{Session, errno, full_prefix, netlink_error, unspecified_like};
use self::policy::{BlockSelector, PolicyTable};
use self::state::{KernelSa, VipMap, VipSa};
use super::{GuardCheck, Kernel, KernelError};
use crate::InputSink;
use crate::config::Config;
use crate::model::{FlowDirection, ProtectedFlow, TrafficCounters, Vip};

/// How often engage re-adds a policy whose requested index was taken meanwhile.
const INDEX_RETRIES: usize = 3;

pub struct XfrmKernel {
    /// Protected flows by VIP: from the config, or from each VIP's policy.
    flows: std::sync::RwLock<Vec<ProtectedFlow>>,
    interface: Option<String>,
    block_priority: u32,
    /// charon runs its own ESP (kernel-libipsec): IPv6 flows are guarded by routing rules.
    libipsec: bool,
    vips: VipMap,
    /// Engage and release read, then change the policy table; one at a time keeps two
    /// calls from picking the same free index.
    policy_ops: Mutex<()>,
    /// See [`Kernel::guard_disturbed`].
    disturbed: std::sync::Arc<tokio::sync::Notify>,
}

impl XfrmKernel {
    pub fn new(config: &Config) -> anyhow::Result<Self> {
        Ok(XfrmKernel {
            flows: std::sync::RwLock::new(config.protected_flows()),
            interface: config.kernel.interface.clone(),
            block_priority: config.kernel.block_priority,
            libipsec: config.kernel.libipsec(),
            vips: VipMap::from_config(config),
            policy_ops: Mutex::new(()),
            disturbed: Default::default(),
        })
    }

    /// Every SA the kernel holds, with its counters.
    pub async fn states(&self) -> Result<Vec<KernelSa>, KernelError> {
        let session = Session::open()?;
        dump_states(&session).await
    }

    /// The SAs of the configured VIPs (hosted: the VIP is the source of outbound SAs;
    /// peer: the VIP is the destination of outbound SAs), with counters and last use.
    pub async fn vip_states(&self) -> Result<Vec<VipSa>, KernelError> {
        Ok(self.vips.map(self.states().await?))
    }

    /// Summed counters per configured VIP.
    pub async fn vip_counters(
        &self,
    ) -> Result<std::collections::BTreeMap<Vip, TrafficCounters>, KernelError> {
        Ok(state::counters_by_vip(&self.vip_states().await?))
    }

    /// Decodes kernel XFRM events (acquire, expire, SA and policy changes) into `events`
    /// until cancelled; each is logged as in [`Kernel::run`].
    pub async fn watch_events(
        &self,
        events: tokio::sync::mpsc::Sender<XfrmEvent>,
        cancel: CancellationToken,
    ) {
        events::watch(&self.vips, Some(events), None, cancel).await;
    }

    /// The agent's block policies currently in the kernel.
    pub async fn block_policies(&self) -> Result<Vec<policy::AgentPolicy>, KernelError> {
        let session = Session::open()?;
        Ok(dump_policies(&session).await?.agent)
    }

    /// What should guard the VIP: its configured flows as routing rules or as block
    /// policies (the latter with the interface filled in by the caller).
    fn shape(&self, vip: Vip) -> Result<GuardShape, KernelError> {
        let flows: Vec<ProtectedFlow> = self
            .flows
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|f| f.vip == vip)
            .copied()
            .collect();
        if uses_route_guard(vip, self.libipsec) {
            let mut rules: Vec<_> = flows
                .iter()
                .flat_map(route_guard::GuardRule::for_flow)
                .collect();
            rules.sort();
            rules.dedup();
            return Ok(GuardShape::Rules(rules));
        }
        Ok(GuardShape::Blocks(
            flows
                .iter()
                .map(|f| BlockSelector::for_flow(f, 0))
                .collect(),
        ))
    }

    /// The selector ifindex for block policies: the configured interface, or 0 (any).
    fn ifindex(&self) -> Result<i32, KernelError> {
        let Some(name) = &self.interface else {
            return Ok(0);
        };
        let c = CString::new(name.as_str())
            .map_err(|_| KernelError::Other(format!("interface name {name:?}")))?;
        // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
        let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
        if index == 0 {
            return Err(KernelError::Other(format!(
                "kernel.interface {name:?}: {}",
                std::io::Error::last_os_error()
            )));
        }
        i32::try_from(index).map_err(|_| KernelError::Other(format!("ifindex {index}")))
    }

    /// Adds one block policy; `Ok(false)` when a policy with the same selector exists.
    async fn add_block(
        &self,
        session: &Session,
        sel: &BlockSelector,
        index: u32,
    ) -> Result<bool, KernelError> {
        let vip = sel.vip;
        let (src, src_len, dst, dst_len) = match sel.direction {
            FlowDirection::ToVip => (unspecified_like(&vip), 0, vip, full_prefix(&vip)),
            FlowDirection::FromVip => (vip, full_prefix(&vip), unspecified_like(&vip), 0),
        };
        let mut req = session
            .handle
            .policy()
            .add(src, src_len, dst, dst_len)
            .direction(XFRM_POLICY_OUT)
            .action(XFRM_POLICY_BLOCK)
            .priority(self.block_priority)
            .index(index)
            // No byte or packet limits, as `ip xfrm policy add` sets them.
            .byte_limit(XFRM_INF, XFRM_INF)
            .packet_limit(XFRM_INF, XFRM_INF);
        if sel.proto != 0 {
            req = req.selector_protocol(sel.proto);
        }
        if let Some(port) = sel.dport {
            req = match sel.direction {
                FlowDirection::ToVip => req.selector_protocol_dst_port(port),
                FlowDirection::FromVip => req.selector_protocol_src_port(port),
            };
        }
        if sel.ifindex != 0 {
            req = req.selector_dev_id(sel.ifindex as u32);
        }
        match req.execute().await {
            Ok(()) => Ok(true),
            Err(e) if errno(&e) == Some(libc::EEXIST) => Ok(false),
            Err(e) => Err(netlink_error(&format!("add block policy {sel:?}"), e)),
        }
    }
}

/// The interface a VIP's block policies are bound to.
///
/// IPv4's output route lookup writes the chosen device into the flow before the policy
/// lookup; IPv6's does not (the flow's oif stays 0 unless the socket is bound to a
/// device), so an IPv6 selector bound to an interface never matches an unbound socket
/// (agent/tests/kernel_xfrm.rs shows it). IPv6 block policies are only used with kernel
/// ESP, where charon's own policies win over them by priority: they go unbound.
fn selector_ifindex(vip: Vip, configured: i32) -> i32 {
    if vip.is_ipv6() { 0 } else { configured }
}

/// Whether a VIP's flows are guarded by policy routing rules rather than XFRM policies:
/// an IPv6 VIP under kernel-libipsec (see [`route_guard`]).
fn uses_route_guard(vip: Vip, libipsec: bool) -> bool {
    vip.is_ipv6() && libipsec
}

/// What guards one VIP in the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
enum GuardShape {
    Blocks(BTreeSet<BlockSelector>),
    Rules(Vec<route_guard::GuardRule>),
}

async fn dump_policies(session: &Session) -> Result<PolicyTable, KernelError> {
    let dump: Vec<_> = session
        .handle
        .policy()
        .get_dump()
        .execute()
        .try_collect()
        .await
        .map_err(|e| netlink_error("dump policies", e))?;
    Ok(PolicyTable::from_dump(&dump))
}

async fn dump_states(session: &Session) -> Result<Vec<KernelSa>, KernelError> {
    let dump: Vec<_> = session
        .handle
        .state()
        .get_dump()
        .execute()
        .try_collect()
        .await
        .map_err(|e| netlink_error("dump states", e))?;
    Ok(dump.iter().filter_map(KernelSa::from_dump).collect())
}

async fn delete_policy(session: &Session, index: u32) -> Result<bool, KernelError> {
    match session
        .handle
        .policy()
        .delete_index(index)
        .direction(XFRM_POLICY_OUT)
        .execute()
        .await
    {
        Ok(()) => Ok(true),
        Err(e) if errno(&e) == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(netlink_error(&format!("delete policy index {index}"), e)),
    }
}

#[async_trait]
impl Kernel for XfrmKernel {
    fn kind(&self) -> &'static str {
        "xfrm"
    }

    async fn reconcile(&self) -> Result<Vec<Vip>, KernelError> {
        let session = Session::open()?;
        let table = dump_policies(&session).await?;
        for p in &table.agent {
            info!(index = p.index, vip = %p.selector.vip, proto = p.selector.proto,
                dport = ?p.selector.dport, ifindex = p.selector.ifindex,
                "adopting block policy of an earlier run");
        }
        let mut vips: BTreeSet<Vip> = policy::blocked_vips(&table).into_iter().collect();
        for r in route_guard::rules().await? {
            info!(vip = %r.vip, proto = r.proto, port = ?r.port, direction = ?r.direction,
                "adopting guard rule of an earlier run");
            vips.insert(r.vip);
        }
        Ok(vips.into_iter().collect())
    }

    /// Returns how many of the VIP's configured flows the agent's policies block now.
    async fn engage_fail_secure(&self, vip: Vip) -> Result<u32, KernelError> {
        let _one_at_a_time = self.policy_ops.lock().await;
        let wanted = match self.shape(vip)? {
            // No flows (any more): what the kernel holds stays until removed on purpose.
            GuardShape::Rules(rules) if rules.is_empty() => {
                warn!(%vip, "fail-secure: no protected flows configured for this VIP");
                return Ok(0);
            }
            GuardShape::Rules(rules) => {
                let n = route_guard::engage(vip, &rules).await?;
                debug!(%vip, installed = n, rules = rules.len(),
                    "guard in place (policy routing rules: an IPv6 VIP under kernel-libipsec)");
                return Ok(n);
            }
            GuardShape::Blocks(wanted) => wanted,
        };
        if wanted.is_empty() {
            warn!(%vip, "fail-secure: no protected flows configured for this VIP");
            return Ok(0);
        }
        let ifindex = selector_ifindex(vip, self.ifindex()?);
        let wanted: BTreeSet<BlockSelector> = wanted
            .into_iter()
            .map(|mut sel| {
                sel.ifindex = ifindex;
                sel
            })
            .collect();
        let session = Session::open()?;
        let mut table = dump_policies(&session).await?;
        for _ in 0..INDEX_RETRIES {
            let present: BTreeSet<BlockSelector> =
                table.agent_for(vip).map(|p| p.selector).collect();
            let missing: Vec<&BlockSelector> = wanted.difference(&present).collect();
            if missing.is_empty() {
                break;
            }
            let mut free: Vec<u32> = table.free_indexes().take(missing.len()).collect();
            free.reverse();
            let mut added = Vec::new();
            for sel in missing {
                let index = free.pop().ok_or_else(|| {
                    KernelError::Other("the agent's policy index range is full".into())
                })?;
                if self.add_block(&session, sel, index).await? {
                    debug!(%vip, index, ?sel, "block policy added");
                    added.push(*sel);
                } else {
                    warn!(%vip, ?sel, "a policy the agent does not own has this flow's selector; leaving it alone");
                }
            }
            table = dump_policies(&session).await?;
            // The kernel gives a policy another index, silently, when the requested one is
            // taken: such a policy is ours (we just created it) but would not be
            // recognised later, so replace it.
            let mut replaced = false;
            for sel in &added {
                if table.agent_for(vip).any(|p| p.selector == *sel) {
                    continue;
                }
                // The add succeeded, so no untagged policy had this selector before: the
                // untagged block with it now is the one just added.
                if let Some(p) = table.foreign.iter().find(|p| {
                    p.selector == *sel
                        && !p.tagged
                        && p.action == XFRM_POLICY_BLOCK
                        && p.priority == self.block_priority
                }) {
                    warn!(%vip, index = p.index, "block policy got an index outside the agent's range; replacing it");
                    delete_policy(&session, p.index).await?;
                    replaced = true;
                }
            }
            if !replaced {
                break;
            }
            table = dump_policies(&session).await?;
        }
        // Flows no longer protected (the VIP's policy changed) go only now, after the
        // wanted ones are in place.
        let extra: Vec<u32> = table
            .agent_for(vip)
            .filter(|p| !wanted.contains(&p.selector))
            .map(|p| p.index)
            .collect();
        for index in &extra {
            delete_policy(&session, *index).await?;
        }
        if !extra.is_empty() {
            table = dump_policies(&session).await?;
        }
        let blocked = table
            .agent_for(vip)
            .filter(|p| wanted.contains(&p.selector))
            .count() as u32;
        debug!(%vip, blocked, flows = wanted.len(), priority = self.block_priority, ifindex,
            "guard in place");
        Ok(blocked)
    }

    async fn set_flows(&self, vip: Vip, flows: Vec<ProtectedFlow>) -> Result<(), KernelError> {
        {
            let mut all = self.flows.write().unwrap_or_else(|e| e.into_inner());
            all.retain(|f| f.vip != vip);
            all.extend(flows.into_iter().filter(|f| f.vip == vip));
        }
        // The guard stands for as long as flows are configured: the new flows are added
        // before the old ones go, so nothing slips through in between.
        self.engage_fail_secure(vip).await?;
        Ok(())
    }

    async fn guard_check(&self) -> Result<Vec<GuardCheck>, KernelError> {
        let session = Session::open()?;
        let table = dump_policies(&session).await?;
        let rules = route_guard::rules().await?;
        let ifindex = self.ifindex().unwrap_or(0);
        let vips: BTreeSet<Vip> = self
            .flows
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|f| f.vip)
            .chain(table.agent.iter().map(|p| p.selector.vip))
            .chain(rules.iter().map(|r| r.vip))
            .collect();
        let mut out = Vec::new();
        for vip in vips {
            let (wanted, installed) = match self.shape(vip)? {
                GuardShape::Rules(w) => {
                    let n = w.iter().filter(|r| rules.contains(r)).count();
                    (w.len(), n)
                }
                GuardShape::Blocks(w) => {
                    let w: BTreeSet<BlockSelector> = w
                        .into_iter()
                        .map(|mut sel| {
                            sel.ifindex = selector_ifindex(vip, ifindex);
                            sel
                        })
                        .collect();
                    let n = table
                        .agent_for(vip)
                        .filter(|p| w.contains(&p.selector))
                        .count();
                    (w.len(), n)
                }
            };
            let held = table.agent_for(vip).count() + rules.iter().filter(|r| r.vip == vip).count();
            out.push(GuardCheck {
                vip,
                wanted: wanted as u32,
                installed: installed as u32,
                extra: held.saturating_sub(installed) as u32,
            });
        }
        Ok(out)
    }

    async fn release_fail_secure(&self, vip: Vip) -> Result<(), KernelError> {
        let _one_at_a_time = self.policy_ops.lock().await;
        let session = Session::open()?;
        let table = dump_policies(&session).await?;
        let mut removed = 0u32;
        // Every agent policy of the VIP goes, also flows no longer in the configuration.
        for p in table.agent_for(vip) {
            if delete_policy(&session, p.index).await? {
                removed += 1;
            }
        }
        let rules = route_guard::release(vip).await?;
        info!(%vip, removed, rules, "fail-secure released");
        Ok(())
    }

    async fn delete_states(&self, vip: Vip) -> Result<u32, KernelError> {
        let session = Session::open()?;
        let mut deleted = 0;
        for sa in dump_states(&session).await? {
            if sa.src != vip && sa.dst != vip {
                continue;
            }
            let mut req = session
                .handle
                .state()
                .delete(sa.src, sa.dst)
                .protocol(sa.proto)
                .spi(sa.spi);
            if let Some((value, mask)) = sa.mark {
                req = req.mark(value, mask);
            }
            match req.execute().await {
                Ok(()) => {
                    deleted += 1;
                    info!(%vip, src = %sa.src, dst = %sa.dst, spi = format_args!("{:#010x}", sa.spi),
                        "kernel SA deleted");
                }
                // Gone already (expired, or deleted by the keying daemon meanwhile).
                Err(e) if matches!(errno(&e), Some(libc::ESRCH | libc::ENOENT)) => {}
                Err(e) => return Err(netlink_error("delete state", e)),
            }
        }
        Ok(deleted)
    }

    fn guard_disturbed(&self) -> Option<std::sync::Arc<tokio::sync::Notify>> {
        Some(self.disturbed.clone())
    }

    /// Logs kernel events and tells the guard keeper of changes that may touch the
    /// guard; sends nothing to the core (see [`events`] for why).
    async fn run(&self, sink: InputSink, cancel: CancellationToken) {
        drop(sink);
        let rules = async {
            while !cancel.is_cancelled() {
                if let Err(e) = route_guard::watch_deletions(&self.disturbed, &cancel).await {
                    warn!(error = %e, "routing rule subscription failed; retrying");
                }
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                }
            }
        };
        tokio::join!(
            events::watch(&self.vips, None, Some(&self.disturbed), cancel.clone()),
            rules
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_block_policies_go_unbound_and_ipv4_ones_keep_the_interface() {
        let v6: Vip = "2001:db8::100".parse().unwrap();
        let v4: Vip = "192.0.2.100".parse().unwrap();
        assert_eq!(selector_ifindex(v6, 3), 0);
        assert_eq!(selector_ifindex(v4, 3), 3);
        assert_eq!(selector_ifindex(v4, 0), 0);
    }

    #[test]
    fn ipv6_vips_under_libipsec_use_routing_rules_whatever_their_direction() {
        let v6: Vip = "2001:db8::100".parse().unwrap();
        let v4: Vip = "192.0.2.100".parse().unwrap();
        assert!(uses_route_guard(v6, true));
        assert!(!uses_route_guard(v6, false));
        assert!(!uses_route_guard(v4, true));
    }
}
