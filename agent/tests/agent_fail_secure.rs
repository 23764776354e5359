//! The whole front-end agent with real parts: charon (kernel-libipsec) in a namespace pair,
//! the VICI keying backend and XFRM fail-secure. The agent brings the tunnel up by itself,
//! blocks the protected port in the kernel while charon is dead (no clear text), and
//! unblocks it once charon is back and the SA is up again.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use vipsec_testbed::charon::TwoNodeLab;
use vipsec_testbed::netns::Netns;

mod common;
use common::AgentProc;

/// A TCP exchange with VIP:143 from inside the front-end namespace: Ok(answer) or the
/// OS error of the connect.
fn probe(fe: &Netns) -> Result<String, std::io::Error> {
    fe.run_in(|| {
        let addr: SocketAddr = format!("{}:143", TwoNodeLab::VIP).parse().unwrap();
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut buf = String::new();
        s.read_to_string(&mut buf)?;
        Ok(buf)
    })
    .expect("thread in namespace")
}

fn out_pol_block(fe: &Netns) -> u64 {
    let text = fe.sh("cat /proc/net/xfrm_stat").unwrap();
    text.lines()
        .find_map(|l| {
            l.strip_prefix("XfrmOutPolBlock")
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap()
}

#[test]
fn charon_down_blocks_protected_traffic_and_recovery_unblocks_it() {
    let mut lab = TwoNodeLab::start().unwrap();
    let served = Arc::new(AtomicU32::new(0));
    let listener: TcpListener = lab
        .be
        .run_in(|| TcpListener::bind("192.0.2.100:143"))
        .unwrap()
        .unwrap();
    {
        let served = served.clone();
        std::thread::spawn(move || {
            for mut conn in listener.incoming().flatten() {
                served.fetch_add(1, Ordering::SeqCst);
                let _ = conn.write_all(b"be\n");
            }
        });
    }

    let dir = tempfile::tempdir().unwrap();
    let body = format!(
        r#"[store]
backend = "embedded"
[keying]
backend = "strongswan"
vici_socket = "{vici}"
reconnect_max = "200ms"
[kernel]
backend = "xfrm"
interface = "{iface}"
[failover]
mode = "fast"
[[peer_vip]]
address = "{vip}"
connection = "{conn}"
protect = ["tcp/143"]
"#,
        vici = lab.fe_charon.vici_socket().display(),
        iface = TwoNodeLab::IFACE,
        vip = TwoNodeLab::VIP,
        conn = TwoNodeLab::CONN,
    );
    let mut agent = AgentProc::start(Some(&lab.fe), dir.path(), "fe1", &body);

    // Nobody initiated the tunnel: the agent does, and releases fail-secure once it is up.
    let t = Instant::now();
    let up = |s: &serde_json::Value| {
        s["peer_vips"][0]["ike_state"] == "established" && s["fail_secure"]["engaged"] == false
    };
    let s = agent.wait_status("the agent to bring the SA up", Duration::from_secs(20), up);
    eprintln!(
        "agent start -> SA up and fail-secure released in {:?}",
        t.elapsed()
    );
    assert_eq!(s["keying"]["healthy"], true);
    assert_eq!(probe(&lab.fe).unwrap().trim(), "be");
    let served_before = served.load(Ordering::SeqCst);

    // charon dies: fail-secure engages, the protected port is refused by the kernel.
    let blocked_before = out_pol_block(&lab.fe);
    let t = Instant::now();
    lab.fe_charon.kill();
    let s = agent.wait_status("fail-secure to engage", Duration::from_secs(10), |s| {
        s["fail_secure"]["engaged"] == true
    });
    eprintln!("charon killed -> fail-secure engaged in {:?}", t.elapsed());
    assert_eq!(s["keying"]["healthy"], false);
    assert_eq!(s["fail_secure"]["flows"], 1);
    for _ in 0..5 {
        let err = probe(&lab.fe).expect_err("protected traffic must not flow while charon is down");
        assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{err}");
    }
    assert!(
        out_pol_block(&lab.fe) >= blocked_before + 5,
        "XfrmOutPolBlock must count the refused packets"
    );
    assert_eq!(
        served.load(Ordering::SeqCst),
        served_before,
        "nothing reached the server in clear text"
    );

    // charon is back: the agent reconnects, renegotiates, and only then unblocks.
    let t = Instant::now();
    lab.fe_charon.restart().unwrap();
    agent.wait_status(
        "the SA back and fail-secure released",
        Duration::from_secs(20),
        up,
    );
    eprintln!(
        "charon restarted -> SA up and fail-secure released in {:?}",
        t.elapsed()
    );
    assert_eq!(probe(&lab.fe).unwrap().trim(), "be");

    // The agent stops cleanly; no block policy of its own is left behind after a release.
    agent.proc.signal(15).unwrap();
    assert_eq!(agent.proc.wait_exit(Duration::from_secs(10)), Some(0));
    let policies = lab.fe.ip(&["xfrm", "policy", "list"]).unwrap();
    assert!(!policies.contains("action block"), "{policies}");
}
