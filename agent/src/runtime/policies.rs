//! Cluster-wide policies at run time: reads them from the store, decides which governs
//! each VIP of this node (`policy::assign`), and keeps charon and the kernel in line:
//! the connections loaded, the pre-shared key, the fail-secure flows.
//!
//! Three rules carry the split-brain guard into charon. A hosted VIP's connection is
//! loaded only while the core says this node may accept SAs for it, so a node that is
//! not the owner of record answers no IKE for the VIP. A front-end's connection requires
//! the owner of record's IKE identity, so it can never complete IKE with another node.
//! A document this version cannot apply (invalid, or written by a newer vipsec) never
//! reaches charon: the policy in force before stays.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::events::EventSink;
use super::knowledge::KnowledgeReader;
use crate::config::Config;
use crate::failover::{Notice, NoticeKind};
use crate::kernel::Kernel;
use crate::keying::Keying;
use crate::model::{
    FlowDirection, FlowProtocol, IkeId, PeerConnection, ProtectedFlow, Vip, VipRole,
};
use crate::policy::assign::{self, PolicyState, ReadDocument, VipPolicy};
use crate::policy::routing::RoutingRule;
use crate::policy::{self, ConnectionSpec, Identities, SecretKey};
use crate::store::policies::{PolicySet, PolicyStore, StoredPolicy};

/// What this node holds of the stored policies, for `vipsec policy show`.
#[derive(Debug, Clone)]
pub struct PolicyView {
    pub vips: Vec<VipPolicy>,
    pub documents: Vec<DocumentView>,
    /// The store was read at least once.
    pub synced: bool,
}

#[derive(Debug, Clone)]
pub struct DocumentView {
    pub stored: StoredPolicy,
    /// Why this version cannot apply it, if it cannot.
    pub problem: Option<String>,
    pub unknown_fields: Vec<String>,
}

struct State {
    docs: Vec<ReadDocument>,
    vips: BTreeMap<Vip, VipPolicy>,
    accepting: BTreeSet<Vip>,
    synced: bool,
    /// VIPs whose policy disappeared while their last flows stay guarded.
    kept_guarded: BTreeSet<Vip>,
}

/// What charon and the kernel were given, so that only changes are sent.
#[derive(Default)]
struct Applied {
    conns: BTreeMap<Vip, ConnectionSpec>,
    /// Connections loaded before the keying daemon reconnected: maybe still in charon
    /// (the daemon did not restart), so unloaded when no longer wanted.
    maybe_loaded: BTreeMap<Vip, String>,
    rules: BTreeMap<Vip, Vec<RoutingRule>>,
    psk_loaded: bool,
    /// charon's key exchange methods, read once per connection to it.
    methods: Option<Vec<String>>,
    flows: BTreeMap<Vip, Vec<ProtectedFlow>>,
}

struct Inner {
    config: Arc<Config>,
    keying: Arc<dyn Keying>,
    kernel: Arc<dyn Kernel>,
    store: Arc<dyn PolicyStore>,
    psk: SecretKey,
    sink: EventSink,
    /// The owner of record per peer VIP (its IKE identity is its node name).
    knowledge: KnowledgeReader,
    /// The managed VIPs and this node's role for each.
    roles: Vec<(Vip, VipRole)>,
    /// Keep a partial policy's other traffic out of kernel-libipsec's TUN.
    route_rules: bool,
    state: Mutex<State>,
    /// Held while charon or the kernel is changed: one change at a time, in order.
    applied: tokio::sync::Mutex<Applied>,
}

#[derive(Clone)]
pub struct Policies {
    inner: Arc<Inner>,
}

impl Policies {
    pub(crate) fn new(
        config: Arc<Config>,
        keying: Arc<dyn Keying>,
        kernel: Arc<dyn Kernel>,
        store: Arc<dyn PolicyStore>,
        psk: SecretKey,
        sink: EventSink,
        knowledge: KnowledgeReader,
    ) -> Policies {
        let roles: Vec<(Vip, VipRole)> = config
            .hosted_vips
            .iter()
            .map(|h| (h.address, VipRole::Hosted))
            .chain(config.peer_vips.iter().map(|p| (p.address, VipRole::Peer)))
            .filter(|(v, _)| config.policy_managed(*v))
            .collect();
        let route_rules = config
            .policy
            .route_rules
            .unwrap_or_else(|| !crate::host::probe().has_esp());
        Policies {
            inner: Arc::new(Inner {
                route_rules,
                config,
                keying,
                kernel,
                store,
                psk,
                sink,
                knowledge,
                roles,
                state: Mutex::new(State {
                    docs: Vec::new(),
                    vips: BTreeMap::new(),
                    accepting: BTreeSet::new(),
                    synced: false,
                    kept_guarded: BTreeSet::new(),
                }),
                applied: tokio::sync::Mutex::new(Applied::default()),
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn store(&self) -> &Arc<dyn PolicyStore> {
        &self.inner.store
    }

    /// Follows the store and applies every change until cancelled.
    pub async fn run(&self, cancel: CancellationToken) {
        let (tx, mut rx) = watch::channel::<PolicySet>(None);
        let follower = {
            let (store, c) = (self.inner.store.clone(), cancel.clone());
            tokio::spawn(async move { store.run(tx, c).await })
        };
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                changed = rx.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let set = rx.borrow_and_update().clone();
                    if let Some(set) = set {
                        self.update(set.into_values().collect());
                        self.apply_all().await;
                    }
                }
            }
        }
        let _ = follower.await;
    }

    fn update(&self, stored: Vec<StoredPolicy>) {
        let docs: Vec<ReadDocument> = stored.iter().map(assign::read).collect();
        let mut st = self.state();
        let vips = assign::assign(&docs, &self.inner.roles, &st.vips);
        for (vip, vp) in &vips {
            let before = st.vips.get(vip);
            let changed = before.is_none_or(|b| b.state != vp.state || b.stored != vp.stored);
            if !changed {
                continue;
            }
            let name = vp
                .stored
                .as_ref()
                .map_or("-".into(), |(n, v)| format!("{n} version {v}"));
            match &vp.state {
                PolicyState::Applied => {
                    info!(%vip, policy = %name, source = %vp.source, "policy in force");
                    self.inner.sink.emit(
                        Notice::new(NoticeKind::PolicyApplied, Some(*vip))
                            .detail(format!("{name} from {}", vp.source)),
                    );
                }
                other => {
                    warn!(%vip, policy = %name, reason = %other.detail(), "policy not applied");
                    self.inner.sink.emit(
                        Notice::new(NoticeKind::PolicyRefused, Some(*vip))
                            .detail(format!("{name}: {}", other.detail())),
                    );
                }
            }
        }
        st.docs = docs;
        st.vips = vips;
        st.synced = true;
    }

    /// The keying daemon (re)connected: it may have restarted with nothing loaded.
    pub async fn keying_up(&self) {
        {
            let mut a = self.inner.applied.lock().await;
            let before = std::mem::take(&mut a.conns);
            for (vip, spec) in before {
                a.maybe_loaded.insert(vip, spec.name);
            }
            a.psk_loaded = false;
            a.methods = None;
        }
        self.apply_all().await;
    }

    /// The core decided whether this node may accept SAs for a hosted VIP.
    pub async fn set_accepting(&self, vip: Vip, accept: bool) {
        {
            let mut st = self.state();
            if accept {
                st.accepting.insert(vip);
            } else {
                st.accepting.remove(&vip);
            }
        }
        let _ = self.apply_vip(vip).await;
    }

    /// Loads the front-end connection toward `vip`, requiring the owner of record (none
    /// known: whoever answers) as the peer, and names what to initiate.
    pub async fn prepare_initiate(&self, vip: Vip) -> Result<PeerConnection, String> {
        self.apply_vip(vip).await?;
        if let Some(spec) = self.inner.applied.lock().await.conns.get(&vip) {
            return Ok(PeerConnection {
                connection: spec.name.clone(),
                child: spec.child().to_string(),
            });
        }
        let st = self.state();
        Err(match st.vips.get(&vip) {
            Some(vp) => format!("no policy in force for {vip}: {}", vp.state.detail()),
            None if !st.synced => format!("no policy for {vip} yet: the store was not read"),
            None => format!("no policy for {vip}"),
        })
    }

    /// Deletes an SA the VIP's policy forbids (NAT where the policy allows none).
    pub async fn check_sa(&self, vip: Vip, role: VipRole, ike_id: IkeId) {
        let Some(p) = self.state().vips.get(&vip).and_then(|v| v.policy.clone()) else {
            return;
        };
        let sas = match self.inner.keying.list_sas().await {
            Ok(s) => s,
            Err(e) => {
                debug!(%vip, error = %e, "cannot list SAs for the NAT check");
                return;
            }
        };
        let Some(sa) = sas.iter().find(|s| s.unique_id == ike_id) else {
            return;
        };
        if let Err(why) = policy::nat_allowed(&p, role, sa.nat_local, sa.nat_remote) {
            warn!(%vip, ike_id, %why, "SA refused by its policy's NAT rule");
            self.inner.sink.emit(
                Notice::new(NoticeKind::SaRefused, Some(vip))
                    .detail(format!("IKE_SA #{ike_id}: {why}")),
            );
            if let Err(e) = self.inner.keying.terminate_sa(ike_id).await {
                self.failed(
                    vip,
                    format!("delete IKE_SA #{ike_id} refused by NAT rule: {e}"),
                );
            }
        }
    }

    pub fn view(&self) -> PolicyView {
        let st = self.state();
        PolicyView {
            vips: st.vips.values().cloned().collect(),
            documents: st
                .docs
                .iter()
                .map(|d| DocumentView {
                    stored: d.stored.clone(),
                    problem: d.parsed.as_ref().err().cloned(),
                    unknown_fields: d
                        .parsed
                        .as_ref()
                        .map(|p| p.unknown_fields.clone())
                        .unwrap_or_default(),
                })
                .collect(),
            synced: st.synced,
        }
    }

    /// Where a policy-managed VIP's guarded flows come from: its policy, or the last one
    /// it had ("policy-missing").
    pub fn guard_source(&self, vip: Vip) -> &'static str {
        if self.state().kept_guarded.contains(&vip) {
            "policy-missing"
        } else {
            "policy"
        }
    }

    /// Reports, once, that a VIP's policy is gone and its last flows stay guarded.
    fn note_missing(&self, vip: Vip) {
        if self.state().kept_guarded.insert(vip) {
            warn!(%vip, "the VIP's policy disappeared; its last protected flows stay guarded (vipsec guard remove unprotects)");
            self.inner.sink.emit(
                Notice::new(NoticeKind::FailSecureEngaged, Some(vip)).detail(
                    "policy missing: the last protected flows stay guarded until `vipsec guard remove`",
                ),
            );
        }
    }

    fn failed(&self, vip: Vip, what: String) {
        self.inner.sink.emit(
            Notice::new(NoticeKind::ActionFailed, Some(vip)).detail(format!("policy: {what}")),
        );
    }

    /// `ip rule add|del`; a rule already there (add) or already gone (del) is fine.
    async fn ip_rule(&self, vip: Vip, verb: &str, rule: &RoutingRule) -> bool {
        let family = if vip.is_ipv6() { "-6" } else { "-4" };
        let out = tokio::process::Command::new("ip")
            .arg(family)
            .args(["rule", verb])
            .args(rule.ip_args())
            .output()
            .await;
        match out {
            Ok(o) if o.status.success() => {
                debug!(%vip, verb, %rule, "routing rule");
                true
            }
            Ok(o) => {
                let err = String::from_utf8_lossy(&o.stderr).trim().to_string();
                if (verb == "add" && err.contains("File exists"))
                    || (verb == "del" && err.contains("No such file"))
                {
                    return true;
                }
                self.failed(vip, format!("ip rule {verb} {rule}: {err}"));
                false
            }
            Err(e) => {
                self.failed(vip, format!("ip rule {verb} {rule}: {e}"));
                false
            }
        }
    }

    async fn apply_all(&self) {
        let vips: Vec<Vip> = self.inner.roles.iter().map(|(v, _)| *v).collect();
        for vip in vips {
            let _ = self.apply_vip(vip).await;
        }
    }

    /// The flows to block for a VIP: its policy's, or all of its traffic while no policy
    /// is known (nothing says which ports may go in clear text).
    fn flows(&self, vip: Vip, role: VipRole, vp: Option<&VipPolicy>) -> Vec<ProtectedFlow> {
        match vp.and_then(|v| v.policy.as_ref()) {
            Some(p) => p.flows(vip, role),
            None => vec![ProtectedFlow {
                vip,
                protocol: FlowProtocol::Any,
                port: None,
                direction: match role {
                    VipRole::Peer => FlowDirection::ToVip,
                    VipRole::Hosted => FlowDirection::FromVip,
                },
            }],
        }
    }

    /// Brings charon and the kernel in line with the VIP's policy.
    async fn apply_vip(&self, vip: Vip) -> Result<(), String> {
        let Some(&(_, role)) = self.inner.roles.iter().find(|(v, _)| *v == vip) else {
            return Err(format!("{vip} is not policy-managed here"));
        };
        let mut applied = self.inner.applied.lock().await;
        let (vp, accepting, owner) = {
            let st = self.state();
            (
                st.vips.get(&vip).cloned(),
                st.accepting.contains(&vip),
                // A front-end requires the owner of record as its peer; a back-end's own
                // connection accepts any front-end.
                match role {
                    VipRole::Peer => self.inner.knowledge.owner(vip),
                    VipRole::Hosted => None,
                },
            )
        };
        let guarded = match role {
            VipRole::Hosted => self.inner.config.hosted_protected(vip),
            VipRole::Peer => self.inner.config.peer_protected(vip),
        };
        // A policy that disappears (deleted, or no longer listing the VIP) does not
        // unprotect: the last flows stay guarded until an operator removes the guard.
        let lost = vp.as_ref().and_then(|v| v.policy.as_ref()).is_none()
            && applied.flows.contains_key(&vip);
        if lost {
            self.note_missing(vip);
        } else {
            self.state().kept_guarded.remove(&vip);
        }
        if guarded && !lost {
            let flows = self.flows(vip, role, vp.as_ref());
            if applied.flows.get(&vip) != Some(&flows) {
                match self.inner.kernel.set_flows(vip, flows.clone()).await {
                    Ok(()) => {
                        applied.flows.insert(vip, flows);
                    }
                    Err(e) => self.failed(vip, format!("fail-secure flows: {e}")),
                }
            }
        }
        if self.inner.route_rules && !lost {
            let rules = vp
                .as_ref()
                .and_then(|v| v.policy.as_ref())
                .map(|p| policy::routing::routing_rules(p, vip, role))
                .unwrap_or_default();
            let old = applied.rules.get(&vip).cloned().unwrap_or_default();
            if rules != old {
                // New rules first, in priority order, stopping at the first failure: the
                // rule that lets the VIP's other traffic out by the main table comes last,
                // so it is never in place without the ones keeping protected flows in.
                let mut ok = true;
                for r in rules.iter().filter(|r| !old.contains(r)) {
                    if !self.ip_rule(vip, "add", r).await {
                        ok = false;
                        break;
                    }
                }
                // Old ones only once the new are all in, the main-table rule first.
                if ok {
                    for r in old.iter().rev().filter(|r| !rules.contains(r)) {
                        ok &= self.ip_rule(vip, "del", r).await;
                    }
                }
                if ok {
                    applied.rules.insert(vip, rules);
                }
            }
        }
        let mut ids = Identities::psk(&self.inner.config.ike_identity());
        ids.remote_id = owner.clone();
        let wanted = match (&vp.as_ref().and_then(|v| v.policy.as_ref()), role) {
            (Some(p), VipRole::Peer) => {
                Some(policy::connection(p, vip, role, &ids).map(|mut c| {
                    // One connection per owner: the next owner's is loaded before the last
                    // one's goes, so the trap covering the flows never has a gap (a reload
                    // under the same name removes the trap before installing it again).
                    if let Some(o) = &owner {
                        c.name = format!("{}-to-{o}", c.name);
                    }
                    c
                }))
            }
            (Some(p), VipRole::Hosted) if accepting => Some(policy::connection(p, vip, role, &ids)),
            _ => None,
        };
        match wanted {
            Some(Err(e)) => {
                let e = format!("render: {e}");
                self.failed(vip, e.clone());
                Err(e)
            }
            Some(Ok(spec)) => {
                if applied.conns.get(&vip) == Some(&spec) {
                    return Ok(());
                }
                // A group charon lacks would load and only fail at the first IKE_SA_INIT:
                // refuse it here, where the operator sees why.
                if applied.methods.is_none() {
                    applied.methods = self.inner.keying.key_exchange_methods().await.ok();
                }
                if let (Some(methods), Some(p)) = (
                    &applied.methods,
                    vp.as_ref().and_then(|v| v.policy.as_ref()),
                ) && let Err(e) = p.check_supported(methods)
                {
                    let e = format!("policy {:?} not loaded: {e}", p.name);
                    warn!(%vip, error = %e, "policy refused by this node's charon");
                    self.inner
                        .sink
                        .emit(Notice::new(NoticeKind::PolicyRefused, Some(vip)).detail(e.clone()));
                    return Err(e);
                }
                if !applied.psk_loaded {
                    self.inner
                        .keying
                        .load_psk(&self.inner.psk)
                        .await
                        .map_err(|e| e.to_string())?;
                    applied.psk_loaded = true;
                }
                let old_name = applied
                    .conns
                    .get(&vip)
                    .map(|o| o.name.clone())
                    .or_else(|| applied.maybe_loaded.get(&vip).cloned())
                    .filter(|n| *n != spec.name);
                // What the SAs carry changed (not merely whom a front-end expects): the
                // SAs up now were built on the old policy and must be rebuilt on the new.
                let rebuild = role == VipRole::Peer
                    && applied.conns.get(&vip).is_some_and(|old| {
                        let mut old = old.clone();
                        old.name = spec.name.clone();
                        old.body.remote.id = spec.body.remote.id.clone();
                        old != spec
                    });
                match self.inner.keying.load_connection(&spec).await {
                    Ok(()) => {
                        info!(%vip, connection = %spec.name, remote_id = %spec.body.remote.id, rebuild, "connection loaded from policy");
                        applied.conns.insert(vip, spec);
                        applied.maybe_loaded.remove(&vip);
                        if let Some(old) = old_name
                            && let Err(e) = self.inner.keying.unload_connection(&old).await
                        {
                            self.failed(vip, format!("unload-conn {old}: {e}"));
                            applied.maybe_loaded.insert(vip, old);
                        }
                        if rebuild {
                            // Deleted gracefully; the core sees the SA go and initiates on
                            // the new connection at once.
                            match self.inner.keying.delete_sas(vip, role).await {
                                Ok(n) => info!(%vip, deleted = n, "SAs of the old policy deleted"),
                                Err(e) => {
                                    self.failed(vip, format!("delete SAs of the old policy: {e}"))
                                }
                            }
                        }
                        Ok(())
                    }
                    Err(e) => {
                        let e = format!("load-conn {}: {e}", spec.name);
                        self.failed(vip, e.clone());
                        Err(e)
                    }
                }
            }
            None => {
                if let Some(name) = applied.maybe_loaded.remove(&vip)
                    && let Err(e) = self.inner.keying.unload_connection(&name).await
                {
                    self.failed(vip, format!("unload-conn {name}: {e}"));
                    applied.maybe_loaded.insert(vip, name);
                    return Err(e.to_string());
                }
                if let Some(old) = applied.conns.remove(&vip) {
                    match self.inner.keying.unload_connection(&old.name).await {
                        Ok(()) => info!(%vip, connection = %old.name, "connection unloaded"),
                        Err(e) => {
                            // Keep trying next time: charon must not answer for the VIP.
                            self.failed(vip, format!("unload-conn {}: {e}", old.name));
                            applied.conns.insert(vip, old);
                            return Err(e.to_string());
                        }
                    }
                }
                Ok(())
            }
        }
    }
}
