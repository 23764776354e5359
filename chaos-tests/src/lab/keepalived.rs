//! keepalived (VRRP, one advert a second unless the lab asks for faster) on the back-ends,
//! owning the VIPs. Every
//! instance starts as BACKUP with `nopreempt`, so a restarted node never takes the VIP back:
//! each fault in a series moves the VIP away from whichever node holds it.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use vipsec_testbed::netns::Netns;
use vipsec_testbed::process::ProcessGuard;

use super::topology::NODE_IF;

/// An IPv6 VIP list makes an IPv6 instance, which keepalived always runs as VRRPv3 over
/// IPv6 (adverts from eth0's link-local address to ff02::12). keepalived adds IPv6 VIPs
/// with `nodad` unless an address says `-nodad` (RFC 5798 asks routers not to run DAD on
/// a virtual address); the lab writes `-nodad` so the kernel runs DAD on the VIP, as it
/// does for every address a cluster manager adds with plain `ip addr add`. keepalived also
/// adds a /128 as deprecated (`preferred_lft 0`) unless told `preferred_lft forever`, and
/// charon skips deprecated addresses when it looks for the local address of a traffic
/// selector: kernel-libipsec then cannot install the CHILD_SA's route ("error installing
/// route with policy") and no CHILD_SA comes up on the VIP.
pub fn config(node: &str, priority: u8, vips: &[IpAddr], advert: Duration) -> String {
    let mut s = String::new();
    s += "global_defs {\n";
    let _ = writeln!(s, "  router_id {node}");
    s += "  vrrp_garp_master_repeat 2\n";
    if advert < Duration::from_secs(1) {
        // VRRPv2 counts adverts in whole seconds; version 3 in hundredths.
        s += "  vrrp_version 3\n";
    }
    s += "}\n";
    s += "vrrp_instance lab {\n";
    s += "  state BACKUP\n";
    let _ = writeln!(s, "  interface {NODE_IF}");
    s += "  virtual_router_id 51\n";
    let _ = writeln!(s, "  priority {priority}");
    let _ = writeln!(s, "  advert_int {}", advert.as_secs_f64());
    s += "  nopreempt\n";
    // A VRRP advert lists the instance's addresses; past 20 keepalived warns, and 100 IPv6
    // addresses would not fit one packet. The rest move with the instance just the same as
    // excluded addresses, which adverts do not carry.
    let (advertised, excluded) = vips.split_at(vips.len().min(ADVERTISED_VIPS));
    address_block(&mut s, "virtual_ipaddress", advertised);
    if !excluded.is_empty() {
        address_block(&mut s, "virtual_ipaddress_excluded", excluded);
    }
    s += "}\n";
    s
}

/// How many VIPs an instance's adverts carry; the rest are excluded addresses.
const ADVERTISED_VIPS: usize = 20;

fn address_block(s: &mut String, name: &str, vips: &[IpAddr]) {
    let _ = writeln!(s, "  {name} {{");
    for vip in vips {
        match vip {
            IpAddr::V4(_) => {
                let _ = writeln!(s, "    {vip}/32 dev {NODE_IF}");
            }
            IpAddr::V6(_) => {
                let _ = writeln!(
                    s,
                    "    {vip}/128 dev {NODE_IF} -nodad preferred_lft forever"
                );
            }
        }
    }
    *s += "  }\n";
}

pub struct Keepalived {
    guard: ProcessGuard,
    stopping: bool,
}

impl Keepalived {
    pub fn start(
        ns: &Netns,
        dir: &Path,
        node: &str,
        priority: u8,
        vips: &[IpAddr],
        advert: Duration,
    ) -> anyhow::Result<Keepalived> {
        let program = vipsec_testbed::require_program("keepalived")?;
        std::fs::create_dir_all(dir)?;
        let conf = dir.join("keepalived.conf");
        std::fs::write(&conf, config(node, priority, vips, advert))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("keepalived.log"))?;
        // Own /run (keepalived keeps state there) and pid files in the run directory, so
        // two lab nodes, or a lab and the host, never see each other's instance.
        let (pid, vrrp_pid) = (dir.join("keepalived.pid"), dir.join("keepalived-vrrp.pid"));
        // Only called once the last instance is gone; its pid files outlive it when it was
        // killed (a crash), as a real machine's /run does not outlive its reboot. Left in
        // place, keepalived takes a pid in them that is still taken (the killed VRRP
        // child not yet reaped, or the pid reused) for a running instance and exits
        // ("daemon is already running"): the node then never took the VIP in the next
        // run, which crashed the other back-end soon after (100 ms adverts).
        for stale in [&pid, &vrrp_pid] {
            let _ = std::fs::remove_file(stale);
        }
        let command = format!(
            "{} --dont-fork --log-console --log-detail --vrrp \
             --use-file {} --pid {} --vrrp_pid {}",
            program.display(),
            conf.display(),
            pid.display(),
            vrrp_pid.display(),
        );
        let guard = crate::nsexec::spawn_with_private_run(ns, "keepalived", &command, log)?;
        Ok(Keepalived {
            guard,
            stopping: false,
        })
    }

    /// SIGTERM: keepalived sends a priority-0 advert and drops the VIP (a planned move).
    /// Returns at once; keepalived takes about a second to exit, and the VIP moves meanwhile.
    pub fn stop_gracefully(&mut self) -> anyhow::Result<()> {
        self.stopping = true;
        self.guard.signal(libc::SIGTERM)
    }

    /// Its process id, for a stop command run by someone else (the handover script).
    pub fn pid(&self) -> Option<u32> {
        self.guard.pid()
    }

    /// Records that something else told it to stop (so `restore` starts a new one).
    pub fn mark_stopping(&mut self) {
        self.stopping = true;
    }

    /// Whether it was told to stop.
    pub fn stopping(&self) -> bool {
        self.stopping
    }

    pub fn is_running(&mut self) -> bool {
        self.guard.is_running()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::topology::{Family, vips_of};

    #[test]
    fn ipv4_config_is_unchanged_and_ipv6_keeps_dad() {
        let second = Duration::from_secs(1);
        let v4 = config("be1", 150, &vips_of(Family::V4, 1), second);
        assert!(v4.contains("    192.0.2.100/32 dev eth0\n"), "{v4}");
        assert!(!v4.contains("nodad"), "{v4}");
        assert!(
            v4.contains("  advert_int 1\n") && !v4.contains("vrrp_version"),
            "{v4}"
        );
        let v6 = config("be1", 150, &vips_of(Family::V6, 2), second);
        for vip in ["2001:db8:1::100", "2001:db8:1::101"] {
            let want = format!("    {vip}/128 dev eth0 -nodad preferred_lft forever\n");
            assert!(v6.contains(&want), "{v6}");
        }
    }

    #[test]
    fn many_vips_past_twenty_are_excluded_from_the_adverts() {
        let vips = vips_of(Family::V4, 100);
        let text = config("be1", 150, &vips, Duration::from_secs(1));
        let (advertised, excluded) = text
            .split_once("  virtual_ipaddress_excluded {\n")
            .expect("an excluded block");
        assert_eq!(advertised.matches("/32 dev eth0").count(), 20, "{text}");
        assert_eq!(excluded.matches("/32 dev eth0").count(), 80, "{text}");
        assert!(excluded.contains("192.0.2.199/32"), "{text}");
        let few = config("be1", 150, &vips_of(Family::V4, 11), Duration::from_secs(1));
        assert!(!few.contains("excluded"), "{few}");
    }

    #[test]
    fn sub_second_adverts_use_vrrp_version_3() {
        let fast = config(
            "be1",
            150,
            &vips_of(Family::V4, 1),
            Duration::from_millis(100),
        );
        assert!(fast.contains("  vrrp_version 3\n"), "{fast}");
        assert!(fast.contains("  advert_int 0.1\n"), "{fast}");
    }
}
