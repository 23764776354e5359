//! Does anything answer IKE at a peer VIP? The front-end's question while it renegotiates
//! without an owner record to go by.
//!
//! Without a cluster store a front-end cannot hear that a VIP has a new owner; it only
//! sees its attempts time out while the address is in transit (a planned move's gap, a
//! crash until the cluster manager takes over). Each attempt aimed into that gap costs a
//! full `initiate_timeout`, and the pacer backs off after a few. Instead the front-end
//! asks the VIP's IKE port, every `failover.ike_probe_interval`, and starts its next
//! attempt the moment an answer comes back after silence.
//!
//! The question is an IKE_SA_INIT header of a major version nobody speaks (3.0), with our
//! SPI and no payloads. RFC 7296 §2.5 has a responder drop it and answer with an
//! unauthenticated INVALID_MAJOR_VERSION notify carrying the SPI; charon does so from its
//! receiver thread, before it looks up or creates any IKE_SA, so a probe never counts as
//! a half-open IKE_SA on the responder. The earlier probe, an IKE_SA_INIT with a proposal
//! nobody has configured, did, until a worker thread refused it: with ten VIPs probed
//! every 50 ms a new owner could see three at once from the front-end's address, asked
//! that address for COOKIEs for its calm-down of 10 s and kept asking, so every real
//! attempt paid a COOKIE round trip and some lost their answer to charon 5.9.8 until its
//! retransmission 4 s later (7 of 20 moves of ten VIPs without a cluster store). Any IKE
//! response carrying our SPI counts as an answer; an ICMP error (a host holds the address
//! but no daemon listens) does not.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use async_trait::async_trait;
use tokio::net::UdpSocket;

use crate::model::Vip;

/// Kernel ESP has no mark to find: do not dump the routing rules for every probe.
const LOOK_FOR_MARK_AGAIN: Duration = Duration::from_secs(5);

/// IKE's port, where a peer's daemon takes IKE_SA_INIT.
pub const IKE_PORT: u16 = 500;

#[async_trait]
pub trait IkeProbe: Send + Sync + 'static {
    /// Sends one IKE_SA_INIT probe to the VIP and waits up to `window` for its answer.
    /// A silent VIP takes the whole window, so callers can probe again at once.
    async fn answers(&self, vip: Vip, window: Duration) -> ProbeAnswer;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeAnswer {
    /// An IKE daemon answered, after this long.
    Answered(Duration),
    /// Nothing came back within the window (or only an ICMP error): why, for the log.
    Silent(String),
}

impl ProbeAnswer {
    pub fn answered(&self) -> bool {
        matches!(self, ProbeAnswer::Answered(_))
    }
}

/// Probes over a fresh UDP socket per question (its own ephemeral port, so answers to
/// different probes can never be mixed up, and nothing competes with charon's port 500),
/// let past the tunnel as charon's IKE socket is (`kernel::ike_bypass`).
pub struct UdpIkeProbe {
    pub port: u16,
    /// charon's IKE firewall mark once found (kernel-libipsec), or when it was last looked
    /// for in vain: charon may install its rule after the agent starts.
    mark: std::sync::Mutex<(Option<u32>, Option<std::time::Instant>)>,
}

impl Default for UdpIkeProbe {
    fn default() -> Self {
        UdpIkeProbe::on_port(IKE_PORT)
    }
}

impl UdpIkeProbe {
    pub fn on_port(port: u16) -> Self {
        UdpIkeProbe {
            port,
            mark: std::sync::Mutex::new((None, None)),
        }
    }

    async fn mark(&self) -> Option<u32> {
        let (known, looked) = *self.mark.lock().expect("mark lock");
        if known.is_some() || looked.is_some_and(|t| t.elapsed() < LOOK_FOR_MARK_AGAIN) {
            return known;
        }
        let found = crate::kernel::ike_bypass::charon_ike_mark().await;
        *self.mark.lock().expect("mark lock") = (found, Some(std::time::Instant::now()));
        found
    }
}

#[async_trait]
impl IkeProbe for UdpIkeProbe {
    async fn answers(&self, vip: Vip, window: Duration) -> ProbeAnswer {
        let deadline = tokio::time::Instant::now() + window;
        let started = std::time::Instant::now();
        let mark = self.mark().await;
        let verdict = tokio::time::timeout_at(deadline, ask(vip, self.port, mark)).await;
        match verdict {
            Ok(Ok(())) => ProbeAnswer::Answered(started.elapsed()),
            Ok(Err(why)) => {
                // An immediate error (unreachable, refused) must not turn the caller's
                // loop into a busy one: the window is spent either way.
                tokio::time::sleep_until(deadline).await;
                ProbeAnswer::Silent(why)
            }
            Err(_) => ProbeAnswer::Silent(format!("no answer within {window:?}")),
        }
    }
}

async fn ask(vip: Vip, port: u16, mark: Option<u32>) -> Result<(), String> {
    let local: SocketAddr = match vip {
        IpAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        IpAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local)
        .await
        .map_err(|e| format!("bind {local}: {e}"))?;
    if let Err(e) = crate::kernel::ike_bypass::bypass(&socket, vip.is_ipv6(), mark) {
        // Without it the probe may go into the tunnel and never be answered: a silent
        // probe costs nothing but the attempts it could have hurried.
        tracing::debug!(%vip, error = %e, "IKE probe socket not let past the tunnel");
    }
    // Connected: the kernel drops datagrams from anywhere but the VIP's IKE port.
    socket
        .connect((vip, port))
        .await
        .map_err(|e| format!("connect {vip}:{port}: {e}"))?;
    let spi: [u8; 8] = rand::random();
    socket
        .send(&request(spi))
        .await
        .map_err(|e| format!("send to {vip}:{port}: {e}"))?;
    let mut buf = [0u8; 2048];
    loop {
        let n = socket
            .recv(&mut buf)
            .await
            .map_err(|e| format!("{vip}:{port}: {e}"))?;
        if is_answer(spi, &buf[..n]) {
            return Ok(());
        }
    }
}

const HEADER_LEN: usize = 28;
const EXCHANGE_IKE_SA_INIT: u8 = 34;
const VERSION_2: u8 = 0x20;
/// A major version after IKEv2's (RFC 7296 §2.5): the header says 3.0.
const VERSION_UNSPOKEN: u8 = 0x30;
const FLAG_INITIATOR: u8 = 0x08;
const FLAG_RESPONSE: u8 = 0x20;

/// The probe with initiator SPI `spi`: an IKE_SA_INIT header of major version 3 and
/// nothing after it (next payload none, length 28).
pub fn request(spi: [u8; 8]) -> Vec<u8> {
    let mut msg = Vec::with_capacity(HEADER_LEN);
    msg.extend_from_slice(&spi);
    msg.extend_from_slice(&[0; 8]);
    msg.extend_from_slice(&[0, VERSION_UNSPOKEN, EXCHANGE_IKE_SA_INIT, FLAG_INITIATOR]);
    msg.extend_from_slice(&0u32.to_be_bytes());
    msg.extend_from_slice(&(HEADER_LEN as u32).to_be_bytes());
    msg
}

/// Whether a datagram is an IKEv2 response to the probe with initiator SPI `spi`.
pub fn is_answer(spi: [u8; 8], datagram: &[u8]) -> bool {
    datagram.len() >= HEADER_LEN
        && datagram[..8] == spi
        && datagram[17] & 0xf0 == VERSION_2
        && datagram[19] & FLAG_RESPONSE != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_is_an_ike_sa_init_header_of_an_unspoken_major_version() {
        let msg = request([7; 8]);
        assert_eq!(msg.len(), HEADER_LEN, "the header and nothing else");
        assert_eq!(&msg[..8], &[7; 8]);
        assert_eq!(&msg[8..16], &[0; 8], "no responder SPI yet");
        assert_eq!(msg[16], 0, "no payload follows");
        assert_eq!(msg[17] >> 4, 3, "major version 3");
        assert_eq!(msg[18], EXCHANGE_IKE_SA_INIT);
        assert_eq!(msg[19], FLAG_INITIATOR);
        assert_eq!(&msg[20..24], &[0; 4], "message ID 0");
        assert_eq!(
            u32::from_be_bytes(msg[24..28].try_into().unwrap()) as usize,
            msg.len()
        );
    }

    #[test]
    fn only_a_response_with_our_spi_is_an_answer() {
        let spi = [1, 2, 3, 4, 5, 6, 7, 8];
        let mut response = vec![0u8; HEADER_LEN + 8];
        response[..8].copy_from_slice(&spi);
        response[17] = 0x20;
        response[19] = FLAG_RESPONSE;
        assert!(is_answer(spi, &response));
        assert!(!is_answer([0; 8], &response), "someone else's SPI");
        let mut request = response.clone();
        request[19] = FLAG_INITIATOR;
        assert!(!is_answer(spi, &request), "a request is not an answer");
        let mut ikev1 = response.clone();
        ikev1[17] = 0x10;
        assert!(!is_answer(spi, &ikev1));
        assert!(!is_answer(spi, &response[..20]), "truncated");
    }

    #[tokio::test]
    async fn a_silent_port_takes_the_whole_window_and_says_so() {
        // A bound socket that never answers stands in for a VIP nobody holds.
        let quiet = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let probe = UdpIkeProbe::on_port(quiet.local_addr().unwrap().port());
        let started = std::time::Instant::now();
        let answer = probe
            .answers("127.0.0.1".parse().unwrap(), Duration::from_millis(100))
            .await;
        assert!(!answer.answered(), "{answer:?}");
        assert!(started.elapsed() >= Duration::from_millis(100));
    }

    #[tokio::test]
    async fn a_closed_port_is_silent_for_the_whole_window_too() {
        // ICMP port unreachable comes back at once: a host, but no IKE daemon.
        let port = {
            let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            s.local_addr().unwrap().port()
        };
        let started = std::time::Instant::now();
        let answer = UdpIkeProbe::on_port(port)
            .answers("127.0.0.1".parse().unwrap(), Duration::from_millis(100))
            .await;
        assert!(!answer.answered(), "{answer:?}");
        assert!(started.elapsed() >= Duration::from_millis(100));
    }

    #[tokio::test]
    async fn a_responder_echoing_the_spi_is_an_answer() {
        let responder = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let port = responder.local_addr().unwrap().port();
        let echo = tokio::spawn(async move {
            let mut buf = [0u8; 512];
            let (n, from) = responder.recv_from(&mut buf).await.unwrap();
            // As RFC 7296 §2.5 has it: IKEv2's version, our SPI, a response.
            let mut reply = buf[..HEADER_LEN].to_vec();
            reply[17] = VERSION_2;
            reply[19] = FLAG_RESPONSE;
            responder.send_to(&reply, from).await.unwrap();
            n
        });
        let answer = UdpIkeProbe::on_port(port)
            .answers("127.0.0.1".parse().unwrap(), Duration::from_secs(5))
            .await;
        assert!(answer.answered(), "{answer:?}");
        assert_eq!(echo.await.unwrap(), HEADER_LEN);
    }
}
