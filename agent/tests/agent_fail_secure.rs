//! The whole front-end agent with real parts: charon (kernel-libipsec) in a namespace pair,
//! the VICI keying backend and the XFRM guard. The guard stands from the agent's start:
//! the tunnel passes it, clear text never does (charon dead, the guard flushed by hand and
//! repaired, the agent SIGKILLed and restarted), and the agent never removes it.

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
fn the_guard_stands_through_charon_loss_a_flush_and_an_agent_kill() {
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

    // The guard is in before the agent answers; nobody initiated the tunnel: the agent
    // does, and the tunnel passes the guard.
    let t = Instant::now();
    let up = |s: &serde_json::Value| {
        s["peer_vips"][0]["ike_state"] == "established"
            && s["fail_secure"]["engaged"] == true
            && s["peer_vips"][0]["guard"]["state"] == "held"
    };
    let s = agent.wait_status("the agent to bring the SA up", Duration::from_secs(20), up);
    eprintln!("agent start -> SA up, guard held, in {:?}", t.elapsed());
    assert_eq!(s["keying"]["healthy"], true);
    assert_eq!(s["kernel"]["healthy"], true);
    assert_eq!(s["peer_vips"][0]["guard"]["source"], "config");
    assert_eq!(probe(&lab.fe).unwrap().trim(), "be");
    let served_before = served.load(Ordering::SeqCst);

    // charon dies: the guard was already there, the protected port is refused at once.
    let blocked_before = out_pol_block(&lab.fe);
    lab.fe_charon.kill();
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
    let s = agent.wait_status("keying reported down", Duration::from_secs(10), |s| {
        s["keying"]["healthy"] == false
    });
    assert_eq!(s["fail_secure"]["engaged"], true);

    // Someone flushes the kernel's policies: the guard is back within a second.
    lab.fe.ip(&["xfrm", "policy", "flush"]).unwrap();
    let t = Instant::now();
    // The kernel announces the flush and the agent repairs at once (kernel.guard_check,
    // 2 s, is only the backstop): well inside the second the guard may be missing.
    agent.wait_status("the guard repaired", Duration::from_secs(1), |s| {
        s["peer_vips"][0]["guard"]["state"] == "held"
            && lab
                .fe
                .ip(&["xfrm", "policy", "list"])
                .is_ok_and(|p| p.contains("action block"))
    });
    eprintln!("policies flushed -> guard back in {:?}", t.elapsed());
    let err = probe(&lab.fe).expect_err("guard repaired");
    assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{err}");

    // charon is back: the agent reconnects and renegotiates; the tunnel passes the guard.
    let t = Instant::now();
    lab.fe_charon.restart().unwrap();
    agent.wait_status("the SA back", Duration::from_secs(20), up);
    eprintln!("charon restarted -> SA up in {:?}", t.elapsed());
    assert_eq!(probe(&lab.fe).unwrap().trim(), "be");

    // The agent dies (SIGKILL), then charon: the guard outlives both.
    agent.proc.signal(9).unwrap();
    agent.proc.wait_exit(Duration::from_secs(10));
    lab.fe_charon.kill();
    let served_before = served.load(Ordering::SeqCst);
    for _ in 0..5 {
        let err = probe(&lab.fe).expect_err("no agent, no charon: still refused");
        assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{err}");
    }
    assert_eq!(served.load(Ordering::SeqCst), served_before);

    // A clean stop leaves the guard too: removing it is an explicit act.
    lab.fe_charon.restart().unwrap();
    let mut agent = AgentProc::start(Some(&lab.fe), dir.path(), "fe1", &body);
    agent.wait_status("the restarted agent up", Duration::from_secs(20), up);
    agent.proc.signal(15).unwrap();
    assert_eq!(agent.proc.wait_exit(Duration::from_secs(10)), Some(0));
    let policies = lab.fe.ip(&["xfrm", "policy", "list"]).unwrap();
    assert!(policies.contains("action block"), "{policies}");
}
