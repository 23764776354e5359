//! A planned move's first step, end to end: `vipsec drain VIP` on the back-end agent deletes
//! its SAs with an IKE DELETE that the front-end's charon receives; the front-end agent sees
//! the SA go and renegotiates at once; the draining back-end refuses the new SAs for its
//! drain hold, the front-end backs off instead of sending a new IKE_SA every few
//! milliseconds, and once the hold ends (the VIP stayed) it gets its SA back. Also checks
//! that `vipsec sas --json` shows what charon itself lists.

use std::time::{Duration, Instant};

use vipsec_testbed::charon::TwoNodeLab;
use vipsec_testbed::process::wait_for;

mod common;
use common::AgentProc;

fn sa_ids(json: &serde_json::Value) -> Vec<u64> {
    json["vips"][0]["sas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["unique_id"].as_u64().unwrap())
        .collect()
}

#[test]
fn drain_deletes_with_a_delete_the_peer_sees_and_the_front_end_recovers() {
    let lab = TwoNodeLab::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let be = AgentProc::start(
        Some(&lab.be),
        dir.path(),
        "be1",
        &format!(
            "[store]\nbackend = \"embedded\"\n[keying]\nbackend = \"strongswan\"\nvici_socket = \"{}\"\n[failover]\ndrain_hold = \"3s\"\n[[hosted_vip]]\naddress = \"{}\"\n",
            lab.be_charon.vici_socket().display(),
            TwoNodeLab::VIP
        ),
    );
    let fe = AgentProc::start(
        Some(&lab.fe),
        dir.path(),
        "fe1",
        &format!(
            "[store]\nbackend = \"embedded\"\n[keying]\nbackend = \"strongswan\"\nvici_socket = \"{}\"\n[failover]\nmode = \"fast\"\n[[peer_vip]]\naddress = \"{}\"\nconnection = \"{}\"\n",
            lab.fe_charon.vici_socket().display(),
            TwoNodeLab::VIP,
            TwoNodeLab::CONN
        ),
    );
    // The front-end agent brings the tunnel up itself.
    fe.wait_status("the SA up", Duration::from_secs(20), |s| {
        s["peer_vips"][0]["ike_state"] == "established"
    });
    be.wait_status(
        "the back-end to hold the VIP",
        Duration::from_secs(10),
        |s| s["hosted_vips"][0]["present_locally"] == true,
    );

    // `vipsec sas --json` agrees with charon's own list, on both sides.
    let be_sas = be.cli(&["sas", "--json"]);
    assert!(be_sas.status.success());
    let be_json: serde_json::Value = serde_json::from_slice(&be_sas.stdout).unwrap();
    assert_eq!(be_json["vips"][0]["role"], "hosted");
    let be_sa = &be_json["vips"][0]["sas"][0];
    assert_eq!(be_sa["local_host"], TwoNodeLab::VIP);
    assert_eq!(be_sa["remote_host"], TwoNodeLab::FE_ADDR);
    let raw = lab.be_charon.swanctl(&["--list-sas", "--raw"]).unwrap();
    let spi_in = be_sa["children"][0]["spi_in"].as_str().unwrap().to_string();
    assert!(
        raw.contains(&spi_in),
        "SPI {spi_in} not in swanctl's list:\n{raw}"
    );
    let fe_json: serde_json::Value =
        serde_json::from_slice(&fe.cli(&["sas", "--json"]).stdout).unwrap();
    assert_eq!(fe_json["vips"][0]["role"], "peer");
    let before = sa_ids(&fe_json);
    assert_eq!(before.len(), 1);

    // Drain on the back-end.
    let t = Instant::now();
    let out = be.cli(&["drain", TwoNodeLab::VIP]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("1 IKE_SA(s) deleted"), "{text}");

    // The front-end's charon got the DELETE: the old IKE_SA is gone and the front-end
    // agent renegotiated at once (the VIP is still here).
    fe.wait_status(
        "the front-end to renegotiate after the DELETE",
        Duration::from_secs(10),
        |s| {
            s["peer_vips"][0]["last_failover"]["reason"]
                .as_str()
                .is_some_and(|r| r.contains("SA deleted"))
        },
    );
    // The draining back-end refuses what the front-end brings during the hold.
    wait_for(
        "a refused SA on the back-end",
        Duration::from_secs(10),
        || {
            be.log_text()
                .contains("refused IKE_SA deleted")
                .then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", be.log_text()));
    wait_for("the drain hold to end", Duration::from_secs(15), || {
        be.log_text()
            .contains("still here after the drain hold")
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", be.log_text()));
    let refused = be.log_text().matches("refused IKE_SA deleted").count();
    eprintln!("SAs refused during the 3 s drain hold: {refused}");
    // The retry backoff (50 ms doubling to 1 s) allows about 7 in 3 s; without it the
    // front-end brought one every 15-200 ms.
    assert!(
        refused <= 10,
        "the front-end kept bringing new SAs to a back-end that refused them: {refused}\n{}",
        fe.log_text()
    );

    // The VIP stayed: the back-end accepts again and the front-end's SA comes back, one that
    // outlives the refusals (older than a second).
    let s = wait_for(
        "the front-end to keep an SA after the drain hold",
        Duration::from_secs(10),
        || {
            fe.status().filter(|s| {
                let p = &s["peer_vips"][0];
                p["last_failover"]["outcome"] == "recovered"
                    && p["ike_state"] == "established"
                    && p["established_since"]
                        .as_str()
                        .and_then(|t| humantime::parse_rfc3339_weak(t).ok())
                        .and_then(|t| t.elapsed().ok())
                        .is_some_and(|age| age > Duration::from_secs(1))
            })
        },
    )
    .unwrap_or_else(|e| {
        panic!(
            "{e}\n--- be1 ---\n{}\n--- fe1 ---\n{}",
            be.log_text(),
            fe.log_text()
        )
    });
    eprintln!(
        "drain -> front-end kept an SA after {:?} (drain hold 3 s)",
        t.elapsed()
    );
    assert!(
        s["peer_vips"][0]["last_failover"]["reason"]
            .as_str()
            .unwrap()
            .contains("SA deleted"),
        "{s:#}"
    );
    let fe_json: serde_json::Value =
        serde_json::from_slice(&fe.cli(&["sas", "--json"]).stdout).unwrap();
    let after = sa_ids(&fe_json);
    assert!(
        !after.contains(&before[0]),
        "old IKE_SA {} still listed: {after:?}",
        before[0]
    );
    let fe_raw = lab.fe_charon.swanctl(&["--list-sas", "--raw"]).unwrap();
    assert!(
        fe_raw.matches("ESTABLISHED").count() <= 1,
        "exactly one IKE_SA toward the VIP after recovery:\n{fe_raw}"
    );
    assert!(
        be.log_text().contains("SAs deleted gracefully"),
        "{}",
        be.log_text()
    );
}
