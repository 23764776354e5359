//! The gRPC API (`vipsec.v1.Agent`), served on a root-only Unix socket by default, or on
//! TCP with TLS.

pub mod authority;
pub(crate) mod convert;
mod error;
pub mod health;
pub mod limits;
mod policies;

pub use policies::parse as parse_policy;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

use futures::Stream;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::{BroadcastStream, TcpListenerStream, UnixListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status};
use tracing::{info, warn};
use vipsec_proto::v1 as pb;
use vipsec_proto::v1::agent_server::{Agent as AgentApi, AgentServer};

pub use error::ApiError;

use crate::config::{ApiConfig, ApiEndpoint};
use crate::drill::{DrillRequest, Drills};
use crate::model::{Mode, VipRole};
use crate::runtime::AgentHandle;

/// A listening API endpoint, bound before the agent reports itself running.
pub enum BoundApi {
    Unix {
        listener: tokio::net::UnixListener,
        path: PathBuf,
    },
    Tcp {
        listener: tokio::net::TcpListener,
        tls: ServerTlsConfig,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("{key} {endpoint:?}: {reason}")]
    Endpoint {
        key: &'static str,
        endpoint: String,
        reason: String,
    },
    #[error("{path}: {reason}")]
    Socket { path: PathBuf, reason: String },
    #[error("TLS file {path}: {reason}")]
    Tls { path: PathBuf, reason: String },
}

fn read_tls(path: &Path) -> Result<Vec<u8>, BindError> {
    std::fs::read(path).map_err(|e| BindError::Tls {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// Binds every listener: the Unix socket of `api.endpoint`, always, and the TCP listener
/// of `api.tcp` when there is one.
pub async fn bind(api: &ApiConfig) -> Result<Vec<BoundApi>, BindError> {
    let mut bound = vec![bind_one(api, "api.endpoint", &api.endpoint).await?];
    if let Some(tcp) = &api.tcp {
        bound.push(bind_one(api, "api.tcp", tcp).await?);
    }
    Ok(bound)
}

async fn bind_one(api: &ApiConfig, key: &'static str, at: &str) -> Result<BoundApi, BindError> {
    let error = |reason: String| BindError::Endpoint {
        key,
        endpoint: at.to_string(),
        reason,
    };
    match ApiEndpoint::parse(at).map_err(error)? {
        ApiEndpoint::Unix(path) => bind_unix(&path).await,
        ApiEndpoint::Tcp(addr) => {
            let (Some(cert), Some(key)) = (&api.tls_cert, &api.tls_key) else {
                return Err(error("TCP requires api.tls_cert and api.tls_key".into()));
            };
            let mut tls = ServerTlsConfig::new()
                .identity(Identity::from_pem(read_tls(cert)?, read_tls(key)?));
            if let Some(ca) = &api.tls_client_ca {
                tls = tls.client_ca_root(Certificate::from_pem(read_tls(ca)?));
            }
            let listener = tokio::net::TcpListener::bind(&addr)
                .await
                .map_err(|e| error(e.to_string()))?;
            Ok(BoundApi::Tcp { listener, tls })
        }
    }
}

async fn bind_unix(path: &Path) -> Result<BoundApi, BindError> {
    let err = |reason: String| BindError::Socket {
        path: path.to_path_buf(),
        reason,
    };
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| err(format!("cannot create its directory: {e}")))?;
        }
        socket_dir_is_safe(dir).map_err(err)?;
    }
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Err(err("another agent is already listening there".into()));
        }
        std::fs::remove_file(path)
            .map_err(|e| err(format!("cannot remove the stale socket: {e}")))?;
    }
    // Bound under a name of its own, made root-only, then renamed into place: the socket
    // never appears at `path` with the umask's mode, so nobody (a caller polling for it,
    // a test) can find it open for a moment.
    let staging = staging_path(path);
    let listener = tokio::net::UnixListener::bind(&staging).map_err(|e| err(e.to_string()))?;
    let placed = restrict_and_place(&staging, path);
    if placed.is_err() {
        let _ = std::fs::remove_file(&staging);
    }
    placed.map_err(err)?;
    Ok(BoundApi::Unix {
        listener,
        path: path.to_path_buf(),
    })
}

/// A name beside `path` for binding before the socket is made root-only; short, as a
/// socket's path is limited to 107 bytes, and random, as two agents in containers may
/// both be pid 1.
fn staging_path(path: &Path) -> std::path::PathBuf {
    path.with_file_name(format!(".bind-{:08x}", rand::random::<u32>()))
}

fn restrict_and_place(staging: &Path, path: &Path) -> Result<(), String> {
    // connect() needs write permission on the socket: 0600 leaves it to root. The
    // directory was checked to be ours and closed to others, so nobody can have swapped
    // the name for a link between bind and chmod; still, chmod only a socket.
    use std::os::unix::fs::FileTypeExt;
    let meta = std::fs::symlink_metadata(staging).map_err(|e| e.to_string())?;
    if !meta.file_type().is_socket() {
        return Err("what was bound is no longer a socket".into());
    }
    std::fs::set_permissions(staging, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| e.to_string())?;
    // A link, not a rename: it fails if another agent put its socket there meanwhile,
    // as bind(2) at the path itself would.
    std::fs::hard_link(staging, path).map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => "another agent is already listening there".into(),
        _ => format!("cannot move the socket into place: {e}"),
    })?;
    let _ = std::fs::remove_file(staging);
    Ok(())
}

/// The socket's directory must be a real directory (not a link), owned by the agent's
/// user, and writable by nobody else: otherwise another user could replace the socket,
/// or the path, and take the API's callers (keepalived's scripts, the CLI) for itself.
fn socket_dir_is_safe(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(dir)
        .map_err(|e| format!("its directory {}: {e}", dir.display()))?;
    if meta.file_type().is_symlink() {
        return Err(format!(
            "its directory {} is a symbolic link; point api.endpoint at the real directory",
            dir.display()
        ));
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        return Err(format!(
            "its directory {} belongs to uid {}, not to the agent (uid {me})",
            dir.display(),
            meta.uid()
        ));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 == 0 {
        return Ok(());
    }
    if mode & 0o1000 != 0 {
        // Sticky and open to all: a shared scratch directory such as /tmp.
        return Err(format!(
            "its directory {} has mode {mode:04o}: a directory every user can write; \
             use one only the agent's user can write (e.g. /run/vipsec, 0700)",
            dir.display()
        ));
    }
    // Ours, but open (e.g. a Kubernetes emptyDir, created 0777): close it to others.
    let tightened = mode & !0o022;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(tightened)).map_err(|e| {
        format!(
            "its directory {} has mode {mode:04o} (others can write there) and could not be closed: {e}",
            dir.display()
        )
    })?;
    tracing::warn!(dir = %dir.display(), from = format!("{mode:04o}"), to = format!("{tightened:04o}"),
        "the API socket's directory was writable by others; closed it");
    Ok(())
}

/// Removes the socket file at shutdown.
pub fn cleanup(api: &ApiConfig) {
    if let Ok(ApiEndpoint::Unix(path)) = ApiEndpoint::parse(&api.endpoint) {
        let _ = std::fs::remove_file(path);
    }
}

/// Serves until cancelled; an error is the server failing (the runtime then stops the agent:
/// cluster managers and probes depend on the API).
pub async fn serve(
    bound: Vec<BoundApi>,
    handle: AgentHandle,
    cancel: CancellationToken,
) -> Result<(), String> {
    // One drill at a time and one subscriber budget, whichever listener a client uses.
    let subscribers = limits::Subscribers::default();
    let drills = Drills::default();
    let servers = bound.into_iter().map(|b| {
        serve_one(
            b,
            handle.clone(),
            subscribers.clone(),
            drills.clone(),
            cancel.clone(),
        )
    });
    futures::future::try_join_all(servers).await.map(|_| ())
}

async fn serve_one(
    bound: BoundApi,
    handle: AgentHandle,
    subscribers: limits::Subscribers,
    drills: Drills,
    cancel: CancellationToken,
) -> Result<(), String> {
    // Anyone on the root-only socket may change the node; over TCP only a client whose
    // certificate the configured CA signed.
    let changes_allowed = match &bound {
        BoundApi::Unix { .. } => true,
        BoundApi::Tcp { .. } => handle.config().api.tls_client_ca.is_some(),
    };
    let agent = AgentServer::new(AgentService {
        handle: handle.clone(),
        drills,
        subscribers: subscribers.clone(),
        changes_allowed,
    })
    .max_decoding_message_size(limits::MAX_REQUEST_BYTES);
    let health = tonic_health::pb::health_server::HealthServer::new(health::HealthService {
        handle,
        subscribers,
    })
    .max_decoding_message_size(limits::MAX_REQUEST_BYTES);
    // Reflection (grpcurl list/describe, Postman, grpcui): both protocol versions, since
    // older tools only speak v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let (reflection_v1, reflection_v1alpha) =
        match (reflection().build_v1(), reflection().build_v1alpha()) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(e), _) | (_, Err(e)) => return Err(format!("API reflection: {e}")),
        };
    let builder = || Server::builder().max_concurrent_streams(limits::MAX_STREAMS_PER_CONNECTION);
    let shutdown = async move { cancel.cancelled().await };
    let result = match bound {
        BoundApi::Unix { listener, path } => {
            info!(path = %path.display(), "API listening on unix socket");
            // Standard clients name the socket path as :authority; see `authority`.
            let incoming = UnixListenerStream::new(listener)
                .map(|conn| conn.map(authority::AuthorityFix::new));
            builder()
                .add_service(agent)
                .add_service(health)
                .add_service(reflection_v1)
                .add_service(reflection_v1alpha)
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await
        }
        BoundApi::Tcp { listener, tls } => {
            info!(addr = ?listener.local_addr().ok(), "API listening on TCP with TLS");
            match builder().tls_config(tls) {
                Ok(mut b) => {
                    b.add_service(agent)
                        .add_service(health)
                        .add_service(reflection_v1)
                        .add_service(reflection_v1alpha)
                        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
                        .await
                }
                Err(e) => Err(e),
            }
        }
    };
    result.map_err(|e| format!("API server failed: {e}"))
}

pub struct AgentService {
    handle: AgentHandle,
    /// One drill at a time, whichever listener asks.
    drills: Drills,
    /// Open event and health-watch streams, per client.
    subscribers: limits::Subscribers,
    /// This listener takes calls that change the node (see `require_trusted_client`).
    changes_allowed: bool,
}

impl AgentService {
    /// Calls that change the node (drain, mode, log level, policy, drills) need a caller
    /// the agent can trust: anyone on the root-only Unix socket, but over TCP only a
    /// client with a certificate the configured CA signed. A TCP endpoint without
    /// `api.tls_client_ca` serves reads only.
    fn require_trusted_client(&self) -> Result<(), Status> {
        if !self.changes_allowed {
            return Err(Status::permission_denied(
                "changes over TCP need client certificates (set api.tls_client_ca); use the Unix socket on the node",
            ));
        }
        Ok(())
    }
}

fn parse_vip(field: &str, s: &str) -> Result<IpAddr, Status> {
    limits::check_len(field, s, "max_vip_len", limits::MAX_VIP_LEN)?;
    // An IPv6 VIP may come bracketed ("[2001:db8::100]", as copied from a URL or from a
    // flow's text) and an IPv4-mapped one stands for the IPv4 VIP the agent knows.
    let t = s.trim();
    let t = t
        .strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .unwrap_or(t);
    t.parse::<IpAddr>()
        .map(|ip| ip.to_canonical())
        .map_err(|_| {
            ApiError::InvalidArgument(format!("{field} {s:?} is not an IPv4 or IPv6 address"))
                .into()
        })
}

/// The most moves one `ListMoves` returns.
const MAX_MOVES: u32 = 1000;

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::Event, Status>> + Send>>;

#[tonic::async_trait]
impl AgentApi for AgentService {
    async fn get_policies(
        &self,
        _req: Request<pb::GetPoliciesRequest>,
    ) -> Result<Response<pb::GetPoliciesResponse>, Status> {
        Ok(Response::new(policies::get(&self.handle)?))
    }

    async fn apply_policy(
        &self,
        req: Request<pb::ApplyPolicyRequest>,
    ) -> Result<Response<pb::ApplyPolicyResponse>, Status> {
        self.require_trusted_client()?;
        let req = req.into_inner();
        limits::check_len(
            "document",
            &req.document,
            "max_policy_document_len",
            limits::MAX_POLICY_DOCUMENT_LEN,
        )?;
        Ok(Response::new(policies::apply(&self.handle, req).await?))
    }

    async fn get_status(
        &self,
        _req: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::Status>, Status> {
        Ok(Response::new(convert::status(&self.handle.status())))
    }

    async fn list_sas(
        &self,
        req: Request<pb::ListSasRequest>,
    ) -> Result<Response<pb::ListSasResponse>, Status> {
        let req = req.into_inner();
        let only = if req.vip.is_empty() {
            None
        } else {
            Some(parse_vip("vip", &req.vip)?)
        };
        let config = self.handle.config();
        let (hosted, peers) = (config.hosted_addresses(), config.peer_addresses());
        let sas = self.handle.list_sas().await.map_err(ApiError::from)?;
        let mut groups: BTreeMap<(IpAddr, i32), Vec<pb::IkeSa>> = BTreeMap::new();
        for v in &hosted {
            groups.entry((*v, pb::VipRole::Hosted as i32)).or_default();
        }
        for v in &peers {
            groups.entry((*v, pb::VipRole::Peer as i32)).or_default();
        }
        let mut unmapped = Vec::new();
        for sa in &sas {
            match sa.vip_role(&hosted, &peers) {
                Some((vip, role)) => {
                    let role = match role {
                        VipRole::Hosted => pb::VipRole::Hosted,
                        VipRole::Peer => pb::VipRole::Peer,
                    } as i32;
                    groups
                        .entry((vip, role))
                        .or_default()
                        .push(convert::ike_sa(sa));
                }
                None => unmapped.push(convert::ike_sa(sa)),
            }
        }
        let vips = groups
            .into_iter()
            .filter(|((vip, _), _)| only.is_none_or(|o| o == *vip))
            .map(|((vip, role), sas)| pb::VipSas {
                vip: vip.to_string(),
                role,
                sas,
            })
            .collect();
        if only.is_some() {
            unmapped.clear();
        }
        Ok(Response::new(pb::ListSasResponse { vips, unmapped }))
    }

    type WatchEventsStream = EventStream;

    async fn watch_events(
        &self,
        req: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let slot = self.subscribers.acquire(limits::ClientKey::of(&req))?;
        let req = req.into_inner();
        let only = if req.vip.is_empty() {
            None
        } else {
            Some(parse_vip("vip", &req.vip)?)
        };
        let rx = self.handle.subscribe();
        let stream = BroadcastStream::new(rx).filter_map(move |item| match item {
            // The slot lives as long as the stream: the client's count drops when it ends.
            Ok(e) if only.is_none() || e.notice.vip == only => {
                let _ = &slot;
                Some(Ok(convert::event(&e)))
            }
            Ok(_) => None,
            Err(tokio_stream::wrappers::errors::BroadcastStreamRecvError::Lagged(n)) => {
                warn!(missed = n, "event subscriber too slow; events skipped");
                None
            }
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn drain(
        &self,
        req: Request<pb::DrainRequest>,
    ) -> Result<Response<pb::DrainResponse>, Status> {
        self.require_trusted_client()?;
        let vip = parse_vip("vip", &req.into_inner().vip)?;
        let deleted = self.handle.drain(vip).await.map_err(ApiError::from)?;
        Ok(Response::new(pb::DrainResponse { deleted }))
    }

    async fn set_mode(
        &self,
        req: Request<pb::SetModeRequest>,
    ) -> Result<Response<pb::SetModeResponse>, Status> {
        self.require_trusted_client()?;
        let req = req.into_inner();
        let mode = match pb::Mode::try_from(req.mode) {
            Ok(pb::Mode::Normal) => Mode::Normal,
            Ok(pb::Mode::Fast) => Mode::Fast,
            _ => {
                return Err(ApiError::InvalidArgument(format!(
                    "mode {} is not normal (1) or fast (2)",
                    req.mode
                ))
                .into());
            }
        };
        let idle_timeout = match req.idle_timeout {
            None => None,
            Some(d) => {
                let d = Duration::try_from(d).map_err(|_| {
                    ApiError::InvalidArgument("idle_timeout must not be negative".into())
                })?;
                let min = self
                    .handle
                    .config()
                    .keying
                    .sample_interval
                    .saturating_mul(2);
                if d < min {
                    return Err(ApiError::InvalidArgument(format!(
                        "idle_timeout {} is shorter than two counter samples ({})",
                        humantime::format_duration(d),
                        humantime::format_duration(min)
                    ))
                    .into());
                }
                if d > Duration::from_secs(86_400) {
                    return Err(ApiError::InvalidArgument(format!(
                        "idle_timeout {} is longer than a day",
                        humantime::format_duration(d)
                    ))
                    .into());
                }
                Some(d)
            }
        };
        let (mode, timeout) = self
            .handle
            .set_mode(mode, idle_timeout)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(pb::SetModeResponse {
            mode: convert::mode(mode) as i32,
            idle_timeout: Some(convert::duration(timeout)),
        }))
    }

    async fn list_moves(
        &self,
        req: Request<pb::ListMovesRequest>,
    ) -> Result<Response<pb::ListMovesResponse>, Status> {
        let req = req.into_inner();
        let vip = if req.vip.is_empty() {
            None
        } else {
            Some(parse_vip("vip", &req.vip)?)
        };
        if req.limit > MAX_MOVES {
            return Err(ApiError::InvalidArgument(format!(
                "limit {} is above {MAX_MOVES}",
                req.limit
            ))
            .into());
        }
        let limit = if req.limit == 0 {
            20
        } else {
            req.limit as usize
        };
        let mut moves = self.handle.moves(vip).await;
        // The most recent ones, oldest first.
        moves.sort_by_key(|t| (t.first_ms().unwrap_or(0), t.epoch));
        let skip = moves.len().saturating_sub(limit);
        let moves = moves[skip..].iter().map(convert::move_timeline).collect();
        Ok(Response::new(pb::ListMovesResponse { moves }))
    }

    async fn drill(
        &self,
        req: Request<pb::DrillRequest>,
    ) -> Result<Response<pb::DrillReport>, Status> {
        self.require_trusted_client()?;
        let req = req.into_inner();
        let vip = parse_vip("vip", &req.vip)?;
        limits::check_len(
            "to_node",
            &req.to_node,
            "max_node_name_len",
            limits::MAX_NODE_NAME_LEN,
        )?;
        let to = req.to_node.trim().to_string();
        if to.is_empty() {
            return Err(ApiError::InvalidArgument("to_node must name a node".into()).into());
        }
        // The name goes into the cluster manager's commands: only a node name is accepted.
        if !crate::model::valid_node_name(&to) {
            let shown: String = to.chars().take(64).collect();
            return Err(ApiError::InvalidArgument(format!(
                "to_node {shown:?} is not a node name (letters, digits, '-', '_', '.', at most 253)"
            ))
            .into());
        }
        let timeout = match req.timeout {
            None => Duration::from_secs(30),
            Some(d) => Duration::try_from(d)
                .ok()
                .filter(|d| !d.is_zero() && *d <= Duration::from_secs(600))
                .ok_or_else(|| {
                    ApiError::InvalidArgument(
                        "timeout must be above zero and at most 10 minutes".into(),
                    )
                })?,
        };
        let outcome = self
            .drills
            .run(&self.handle, DrillRequest { vip, to, timeout })
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(pb::DrillReport {
            timeline: outcome.timeline.as_ref().map(convert::move_timeline),
            met_target: outcome.met_target,
            target: Some(convert::duration(outcome.target)),
            detail: outcome.detail,
        }))
    }

    async fn set_log_level(
        &self,
        req: Request<pb::SetLogLevelRequest>,
    ) -> Result<Response<pb::SetLogLevelResponse>, Status> {
        self.require_trusted_client()?;
        let filter = req.into_inner().filter;
        limits::check_len(
            "filter",
            &filter,
            "max_log_filter_len",
            limits::MAX_LOG_FILTER_LEN,
        )?;
        if filter.trim().is_empty() {
            return Err(ApiError::InvalidArgument("filter must not be empty".into()).into());
        }
        let filter = self.handle.set_log_level(&filter).map_err(ApiError::from)?;
        Ok(Response::new(pb::SetLogLevelResponse { filter }))
    }
}

#[cfg(test)]
mod vip_argument_tests {
    use super::*;

    #[test]
    fn vip_arguments_accept_ipv6_in_any_spelling_and_refuse_junk() {
        let v6: IpAddr = "2001:db8::100".parse().unwrap();
        for s in ["2001:db8::100", "[2001:db8::100]", " 2001:DB8:0::100 "] {
            assert_eq!(parse_vip("vip", s).unwrap(), v6, "{s:?}");
        }
        assert_eq!(
            parse_vip("vip", "::ffff:192.0.2.100").unwrap(),
            "192.0.2.100".parse::<IpAddr>().unwrap()
        );
        for s in ["[2001:db8::100", "2001:db8::100]", "[192.0.2.100]:1", "vip"] {
            assert!(parse_vip("vip", s).is_err(), "{s:?}");
        }
    }
}

#[cfg(test)]
mod socket_tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[tokio::test]
    async fn the_socket_appears_root_only_and_nothing_is_left_beside_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let path = dir.path().join("agent.sock");
        let bound = bind_unix(&path).await.expect("bound");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["agent.sock".to_string()]);
        tokio::net::UnixStream::connect(&path)
            .await
            .expect("the listener answers at the final path");
        let again = bind_unix(&path)
            .await
            .err()
            .expect("a second agent is refused");
        assert!(again.to_string().contains("already listening"), "{again}");
        drop(bound);
    }

    #[tokio::test]
    async fn a_socket_put_in_place_meanwhile_is_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        // Another agent got there between this one's check and its move into place.
        let _theirs = tokio::net::UnixListener::bind(&path).unwrap();
        let staging = staging_path(&path);
        let _mine = tokio::net::UnixListener::bind(&staging).unwrap();
        let e = restrict_and_place(&staging, &path).unwrap_err();
        assert!(e.contains("already listening"), "{e}");
        tokio::net::UnixStream::connect(&path)
            .await
            .expect("theirs still answers at the path");
    }
}
