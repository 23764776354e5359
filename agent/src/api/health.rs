//! `grpc.health.v1.Health`: what Kubernetes' gRPC probes, load balancers and
//! `grpc_health_probe` ask. Every answer is computed from [`crate::health::parts`] applied
//! to the very status `GetStatus` returns, at the moment of the call, so it can never
//! disagree with `vipsec health`.
//!
//! Services:
//! - `""` and `vipsec.v1.Agent`: SERVING exactly when `vipsec health` passes (no part
//!   unhealthy);
//! - one per part, by its name: `store`, `keying`, `kernel`, `ownership`, `guard`,
//!   `runtime`: SERVING while that part is healthy.
//!
//! Any other name is NOT_FOUND for `Check` and SERVICE_UNKNOWN for `Watch`, as the health
//! protocol asks.

use std::pin::Pin;
use std::time::Duration;

use futures::Stream;
use tonic::{Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_server::Health;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use vipsec_proto::v1 as pb;

use super::convert;
use super::limits::{ClientKey, MAX_HEALTH_SERVICE_LEN, Subscribers, check_len};
use crate::runtime::AgentHandle;

/// The overall service besides `""`: the agent's own gRPC service name.
pub const AGENT_SERVICE: &str = "vipsec.v1.Agent";

/// How often `Watch` re-reads the status besides the core's changes: the runtime part and
/// the store's stuck writes change without a status update.
const WATCH_POLL: Duration = Duration::from_secs(1);

/// The serving status of `service` in `status`, or None for a service this agent does not
/// know.
pub fn serving_status(status: &pb::Status, service: &str) -> Option<ServingStatus> {
    let serving = |ok: bool| {
        if ok {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        }
    };
    if service.is_empty() || service == AGENT_SERVICE {
        return Some(serving(crate::health::problems(status).is_empty()));
    }
    crate::health::parts(status)
        .into_iter()
        .find(|p| p.name == service)
        .map(|p| serving(p.healthy))
}

pub struct HealthService {
    pub handle: AgentHandle,
    pub subscribers: Subscribers,
}

impl HealthService {
    fn current(&self, service: &str) -> Option<ServingStatus> {
        serving_status(&convert::status(&self.handle.status()), service)
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Health for HealthService {
    async fn check(
        &self,
        req: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        let service = req.into_inner().service;
        check_len(
            "service",
            &service,
            "max_health_service_len",
            MAX_HEALTH_SERVICE_LEN,
        )?;
        match self.current(&service) {
            Some(s) => Ok(Response::new(HealthCheckResponse { status: s as i32 })),
            None => Err(Status::not_found(format!(
                "unknown service {service:?}: ask \"\", {AGENT_SERVICE:?} or a part ({})",
                crate::health::PARTS.join(", ")
            ))),
        }
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        req: Request<HealthCheckRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        let slot = self.subscribers.acquire(ClientKey::of(&req))?;
        let service = req.into_inner().service;
        check_len(
            "service",
            &service,
            "max_health_service_len",
            MAX_HEALTH_SERVICE_LEN,
        )?;
        let handle = self.handle.clone();
        let mut changes = handle.status_changes();
        let stream = async_stream(move |tx| async move {
            let _slot = slot;
            let mut last = None;
            loop {
                let now = serving_status(&convert::status(&handle.status()), &service)
                    .unwrap_or(ServingStatus::ServiceUnknown);
                if last != Some(now) {
                    last = Some(now);
                    let reply = HealthCheckResponse { status: now as i32 };
                    if tx.send(Ok(reply)).await.is_err() {
                        return; // the client went away
                    }
                }
                tokio::select! {
                    changed = changes.changed() => if changed.is_err() { return },
                    _ = tokio::time::sleep(WATCH_POLL) => {}
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(stream))
    }
}

/// A stream fed by a task: the task ends when the client drops the stream.
fn async_stream<F, Fut>(f: F) -> WatchStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<HealthCheckResponse, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(f(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(store_ok: bool) -> pb::Status {
        let h = |kind: &str, healthy| {
            Some(pb::BackendHealth {
                kind: kind.into(),
                healthy,
                detail: String::new(),
                since: None,
            })
        };
        pb::Status {
            store: h("etcd", store_ok),
            keying: h("strongswan", true),
            kernel: h("xfrm", true),
            ownership: h("records", true),
            runtime: h("tasks", true),
            ..Default::default()
        }
    }

    #[test]
    fn overall_and_per_part_statuses_follow_the_one_health_verdict() {
        for store_ok in [true, false] {
            let s = status(store_ok);
            let overall = if crate::health::problems(&s).is_empty() {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            assert_eq!(overall == ServingStatus::Serving, store_ok);
            assert_eq!(serving_status(&s, ""), Some(overall));
            assert_eq!(serving_status(&s, AGENT_SERVICE), Some(overall));
            for part in crate::health::parts(&s) {
                let want = if part.healthy {
                    ServingStatus::Serving
                } else {
                    ServingStatus::NotServing
                };
                assert_eq!(serving_status(&s, part.name), Some(want), "{}", part.name);
            }
            assert_eq!(
                serving_status(&s, "store"),
                Some(if store_ok {
                    ServingStatus::Serving
                } else {
                    ServingStatus::NotServing
                })
            );
        }
        assert_eq!(serving_status(&status(true), "vipsec.v1.Other"), None);
    }
}
