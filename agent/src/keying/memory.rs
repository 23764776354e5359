//! A keying daemon in memory: it keeps SAs in a list, records every call, and can hold a
//! kind of call until released. For in-process runtime tests and simulations, where the
//! question is what the agent asked for and in which order, not what charon did with it.

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{Initiated, Keying, KeyingError};
use crate::InputSink;
use crate::failover::{Input, SaRef};
use crate::model::{IkeId, IkeSaInfo, PeerConnection, Vip, VipRole};
use crate::policy::{ConnectionSpec, SecretKey};

/// One call the agent made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyingCall {
    Initiate { vip: Vip, connection: String },
    DeleteSas { vip: Vip, role: VipRole },
    DropSas { vip: Vip },
    Terminate(IkeId),
    LoadConnection(String),
    UnloadConnection(String),
    LoadPsk,
}

/// The IKE daemon on the other side: by default an initiation is answered at once; a
/// simulation puts a model of the new owner's charon here (a cost per IKE_SA, so many at
/// once). It works through every initiation handed to it, also those the initiator stopped
/// waiting for, as a real responder does.
pub trait Responder: Send + Sync + 'static {
    /// Starts establishing an IKE_SA toward `vip`; the receiver fires when it is up.
    fn submit(&self, vip: Vip) -> tokio::sync::oneshot::Receiver<()>;
}

/// The kinds of call that can be held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Hold {
    Initiate,
    DeleteSas,
    DropSas,
}

#[derive(Default)]
struct State {
    sas: Vec<SaRef>,
    next_id: IkeId,
    sink: Option<InputSink>,
    connections: BTreeSet<String>,
}

pub struct MemoryKeying {
    state: Mutex<State>,
    responder: Option<std::sync::Arc<dyn Responder>>,
    /// Follow an initiation past its timeout for one more, as the strongSwan backend does
    /// (a responder under load often completes it).
    follow_late: bool,
    calls: watch::Sender<Vec<KeyingCall>>,
    held: watch::Sender<BTreeSet<Hold>>,
}

impl Default for MemoryKeying {
    fn default() -> Self {
        MemoryKeying::new(Vec::new())
    }
}

impl MemoryKeying {
    /// A daemon holding `sas` when the agent connects.
    pub fn new(sas: Vec<SaRef>) -> MemoryKeying {
        let next_id = sas.iter().map(|s| s.ike_id).max().unwrap_or(0) + 1;
        MemoryKeying {
            state: Mutex::new(State {
                sas,
                next_id,
                ..State::default()
            }),
            calls: watch::channel(Vec::new()).0,
            held: watch::channel(BTreeSet::new()).0,
            responder: None,
            follow_late: true,
        }
    }

    /// Initiations are answered by `responder`; one it has not answered within the
    /// timeout is followed for one more timeout when `follow_late`.
    pub fn answered_by(
        mut self,
        responder: std::sync::Arc<dyn Responder>,
        follow_late: bool,
    ) -> Self {
        self.responder = Some(responder);
        self.follow_late = follow_late;
        self
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every call so far, in order.
    pub fn calls(&self) -> Vec<KeyingCall> {
        self.calls.borrow().clone()
    }

    /// Waits until a call satisfies `f`, up to `timeout`; returns it.
    pub async fn wait_call(
        &self,
        timeout: Duration,
        f: impl Fn(&KeyingCall) -> bool,
    ) -> Option<KeyingCall> {
        let mut rx = self.calls.subscribe();
        tokio::time::timeout(timeout, async {
            loop {
                if let Some(c) = rx.borrow_and_update().iter().find(|c| f(c)) {
                    return Some(c.clone());
                }
                rx.changed().await.ok()?;
            }
        })
        .await
        .ok()
        .flatten()
    }

    /// Calls of this kind wait from now on until [`release`](Self::release).
    pub fn hold(&self, kind: Hold) {
        self.held.send_modify(|h| {
            h.insert(kind);
        });
    }

    pub fn release(&self, kind: Hold) {
        self.held.send_modify(|h| {
            h.remove(&kind);
        });
    }

    /// The SAs the daemon holds now.
    pub fn sas(&self) -> Vec<SaRef> {
        self.state().sas.clone()
    }

    /// The connections loaded now.
    pub fn connections(&self) -> BTreeSet<String> {
        self.state().connections.clone()
    }

    async fn record(&self, call: KeyingCall, kind: Option<Hold>) {
        self.calls.send_modify(|c| c.push(call));
        if let Some(kind) = kind {
            let mut rx = self.held.subscribe();
            let _ = rx.wait_for(|h| !h.contains(&kind)).await;
        }
    }

    /// An IKE_SA a peer brought up on its own (a front-end initiating toward this node).
    pub async fn bring_up(&self, sa: SaRef) {
        self.state().sas.push(sa);
        self.tell(Input::SaUp(sa)).await;
    }

    async fn tell(&self, input: Input) {
        let sink = self.state().sink.clone();
        if let Some(sink) = sink {
            let _ = sink.send(input).await;
        }
    }

    /// Removes the SAs matching `f` and tells the agent they went.
    async fn remove(&self, f: impl Fn(&SaRef) -> bool, reason: &str) -> u32 {
        let gone: Vec<SaRef> = {
            let mut st = self.state();
            let (gone, kept) = st.sas.drain(..).partition(|s| f(s));
            st.sas = kept;
            gone
        };
        for sa in &gone {
            self.tell(Input::SaDown {
                sa: *sa,
                reason: reason.to_string(),
            })
            .await;
        }
        gone.len() as u32
    }
}

#[async_trait]
impl Keying for MemoryKeying {
    fn kind(&self) -> &'static str {
        "memory"
    }

    async fn run(&self, sink: InputSink, cancel: CancellationToken) {
        let established = {
            let mut st = self.state();
            st.sink = Some(sink.clone());
            st.sas.clone()
        };
        let _ = sink.send(Input::KeyingUp { established }).await;
        cancel.cancelled().await;
    }

    async fn list_sas(&self) -> Result<Vec<IkeSaInfo>, KeyingError> {
        Ok(Vec::new())
    }

    async fn delete_sas(&self, vip: Vip, role: VipRole) -> Result<u32, KeyingError> {
        self.record(KeyingCall::DeleteSas { vip, role }, Some(Hold::DeleteSas))
            .await;
        Ok(self
            .remove(|s| s.vip == vip && s.role == role, "deleted")
            .await)
    }

    async fn drop_sas(&self, vip: Vip, spare: &super::SpareSa<'_>) -> Result<u32, KeyingError> {
        self.record(KeyingCall::DropSas { vip }, Some(Hold::DropSas))
            .await;
        Ok(self
            .remove(
                |s| {
                    s.vip == vip
                        && s.role == VipRole::Peer
                        && !spare(super::DropCandidate {
                            ike_id: s.ike_id,
                            answered: false,
                        })
                },
                "dropped",
            )
            .await)
    }

    async fn initiate(
        &self,
        vip: Vip,
        conn: &PeerConnection,
        timeout: Duration,
    ) -> Result<Initiated, KeyingError> {
        let call = KeyingCall::Initiate {
            vip,
            connection: conn.connection.clone(),
        };
        self.record(call, Some(Hold::Initiate)).await;
        if let Some(responder) = &self.responder {
            let done = responder.submit(vip);
            let waits = if self.follow_late { 2 } else { 1 };
            let deadline = tokio::time::Instant::now() + timeout * waits;
            // A responder that dropped the request (its queue full) is silence, as a lost
            // IKE_SA_INIT is: the initiator only learns it from its timeout.
            let answered = matches!(tokio::time::timeout_at(deadline, done).await, Ok(Ok(())));
            if !answered {
                tokio::time::sleep_until(deadline).await;
                return Err(KeyingError::Timeout {
                    command: format!("initiate {}", conn.child),
                    after: timeout,
                });
            }
        }
        let sa = {
            let mut st = self.state();
            let sa = SaRef {
                vip,
                role: VipRole::Peer,
                ike_id: st.next_id,
            };
            st.next_id += 1;
            st.sas.push(sa);
            sa
        };
        self.tell(Input::SaUp(sa)).await;
        Ok(Initiated::Answered)
    }

    async fn terminate_sa(&self, ike_id: IkeId) -> Result<(), KeyingError> {
        self.record(KeyingCall::Terminate(ike_id), None).await;
        self.remove(|s| s.ike_id == ike_id, "terminated").await;
        Ok(())
    }

    async fn load_connection(&self, spec: &ConnectionSpec) -> Result<(), KeyingError> {
        self.record(KeyingCall::LoadConnection(spec.name.clone()), None)
            .await;
        self.state().connections.insert(spec.name.clone());
        Ok(())
    }

    async fn unload_connection(&self, name: &str) -> Result<(), KeyingError> {
        self.record(KeyingCall::UnloadConnection(name.to_string()), None)
            .await;
        self.state().connections.remove(name);
        Ok(())
    }

    async fn load_psk(&self, _key: &SecretKey) -> Result<(), KeyingError> {
        self.record(KeyingCall::LoadPsk, None).await;
        Ok(())
    }

    async fn key_exchange_methods(&self) -> Result<Vec<String>, KeyingError> {
        Ok([
            "MODP_2048",
            "MODP_3072",
            "ECP_256",
            "ECP_384",
            "CURVE_25519",
        ]
        .map(String::from)
        .to_vec())
    }
}

/// The IKE ports of peer VIPs in memory: a test says which VIPs answer and counts the
/// probes. A silent VIP takes the probe's whole window, as on a real link.
#[derive(Default)]
pub struct MemoryIkeProbe {
    answering: watch::Sender<BTreeSet<Vip>>,
    asked: Mutex<u32>,
}

impl MemoryIkeProbe {
    /// Starts or stops answering for `vip` (a holder taking the VIP, or leaving it).
    pub fn set_answering(&self, vip: Vip, answering: bool) {
        self.answering.send_modify(|a| {
            if answering {
                a.insert(vip);
            } else {
                a.remove(&vip);
            }
        });
    }

    /// Probes sent so far.
    pub fn asked(&self) -> u32 {
        *self.asked.lock().unwrap()
    }
}

#[async_trait]
impl super::ike_probe::IkeProbe for MemoryIkeProbe {
    async fn answers(&self, vip: Vip, window: Duration) -> super::ike_probe::ProbeAnswer {
        use super::ike_probe::ProbeAnswer;
        *self.asked.lock().unwrap() += 1;
        let mut rx = self.answering.subscribe();
        // A holder arriving within the window answers this probe, as it would on a link.
        let answered = tokio::time::timeout(window, rx.wait_for(|a| a.contains(&vip))).await;
        match answered {
            Ok(Ok(_)) => ProbeAnswer::Answered(Duration::ZERO),
            _ => ProbeAnswer::Silent(format!("nobody answers for {vip} in memory")),
        }
    }
}
