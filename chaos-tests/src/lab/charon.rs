//! One strongSwan charon per node, with kernel-libipsec (the kernel has no ESP): forced UDP
//! encapsulation, fwmark 0x42 so IKE bypasses charon's routing table 220, its own tmpfs
//! /run (pid file), and its VICI socket in the run directory on the host so that the lab
//! and the vipsec agent reach it from outside the node's mount namespace.

use std::fmt::Write as _;
use std::net::IpAddr;

use super::topology::{Family, host_cidr};
use std::path::{Path, PathBuf};

/// The ports the lab protects (IMAP, POP3, HTTP).
pub const PROTECTED_PORTS: [u16; 3] = [143, 110, 80];
const PSK: &str = "vipsec-lab-not-a-secret";

/// How charon behaves when a peer goes silent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Liveness {
    /// DPD every second with restart actions on the front-end.
    pub dpd: bool,
    /// Short IKE retransmissions (0.5 s, base 1.2, 3 tries: about 2.7 s in all) instead of
    /// the default ~165 s.
    pub short_retransmits: bool,
    /// The vipsec agent starts the tunnel (and re-starts it); charon only keeps the trap,
    /// so two initiators never race each other into duplicate IKE_SAs.
    pub agent_initiates: bool,
}

/// How a front-end's connection to a VIP is written: its `start_action` (and, for the
/// form users copy from strongSwan's examples, its `keyingtries`). The lab runs each
/// style so that the agent's guard is shown to hold however the operator wrote them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FrontEndStyle {
    /// `start_action = trap`: the trap covers the protected ports between SAs and the
    /// agent initiates. A set-up without an agent initiating (the strongSwan baselines)
    /// gets `trap|start`, since under kernel-libipsec a trap alone never starts a tunnel.
    #[default]
    Trap,
    /// `start_action = trap|start`: charon covers the ports and initiates at load.
    TrapStart,
    /// `start_action = start` with `keyingtries` and `mobike` left at strongSwan's
    /// defaults (one try; MOBIKE on): no trap, the form most strongSwan examples use and a
    /// new user writes.
    Start,
    /// No `start_action` line: charon neither traps nor initiates; only the agent does.
    None,
}

impl FrontEndStyle {
    pub fn name(self) -> &'static str {
        match self {
            FrontEndStyle::Trap => "trap",
            FrontEndStyle::TrapStart => "trap|start",
            FrontEndStyle::Start => "start",
            FrontEndStyle::None => "none",
        }
    }

    /// The `start_action` value written, if any.
    fn start_action(self, liveness: Liveness) -> Option<&'static str> {
        match self {
            FrontEndStyle::Trap if liveness.agent_initiates => Some("trap"),
            FrontEndStyle::Trap | FrontEndStyle::TrapStart => Some("trap|start"),
            FrontEndStyle::Start => Some("start"),
            FrontEndStyle::None => Option::None,
        }
    }

    /// Whether `keyingtries = 0` is written: every style but the example-copied one.
    fn retries_forever(self) -> bool {
        self != FrontEndStyle::Start
    }

    /// Whether `mobike = no` is written (here and on the back-ends): every style but the
    /// example-copied one.
    pub fn mobike_off(self) -> bool {
        self != FrontEndStyle::Start
    }
}

/// The connection name for a VIP: `vip100` for 192.0.2.100 and for 2001:db8:1::100 (the
/// last group's hex digits, which the lab's plan makes the same as the IPv4 octet).
pub fn connection_name(vip: IpAddr) -> String {
    match vip {
        IpAddr::V4(a) => format!("vip{}", a.octets()[3]),
        IpAddr::V6(a) => format!("vip{:x}", a.segments()[7]),
    }
}

pub fn strongswan_conf(dir: &Path, liveness: Liveness) -> String {
    let mut s = String::new();
    s += "charon {\n";
    s += "load = random nonce openssl pem pkcs1 x509 revocation constraints pubkey sha1 sha2 hmac aes kdf gmp vici kernel-libipsec kernel-netlink socket-default updown\n";
    s += "install_routes = yes\n";
    if liveness.short_retransmits {
        s += "retransmit_timeout = 0.5\n";
        s += "retransmit_base = 1.2\n";
        s += "retransmit_tries = 3\n";
    }
    s += "filelog {\n";
    s += "lab {\n";
    let _ = writeln!(
        s,
        "path = {}",
        vipsec_testbed::charon::log_in(dir).display()
    );
    s += "time_format = %H:%M:%S\n";
    // Whole lines on disk as they happen: the tests quote a scenario's lines from the
    // offset the log had when it started.
    s += "flush_line = yes\n";
    // charon 5.9's name for milliseconds after the seconds.
    s += "time_add_ms = yes\n";
    s += "default = 1\n";
    s += "ike = 1\n";
    s += "}\n";
    s += "}\n";
    s += "plugins {\n";
    s += "socket-default {\n";
    s += "fwmark = 0x42\n";
    s += "}\n";
    s += "kernel-netlink {\n";
    s += "fwmark = !0x42\n";
    s += "}\n";
    s += "kernel-libipsec {\n";
    s += "allow_peer_ts = yes\n";
    s += "}\n";
    s += "vici {\n";
    let _ = writeln!(s, "socket = unix://{}", vici_path(dir).display());
    s += "}\n";
    s += "}\n";
    s += "}\n";
    // As deploy/examples/strongswan's files set it: DH exponents sized to the group's
    // strength, not as long as the prime (several times less work per IKE_SA with gmp).
    s += "libstrongswan {\n";
    s += "dh_exponent_ansi_x9_42 = no\n";
    s += "}\n";
    s
}

fn protected_ts(vip: IpAddr) -> String {
    let host = host_cidr(vip);
    PROTECTED_PORTS
        .iter()
        .map(|p| format!("{host}[tcp/{p}]"))
        .collect::<Vec<_>>()
        .join(",")
}

/// A front-end initiates to each VIP. Traffic selectors cover only the protected ports so
/// the tunnel (and table 220) leave other traffic alone; with a trap style the trap keeps
/// those ports covered between SAs so nothing leaves in clear text; `keyingtries = 0`
/// keeps retrying while the VIP has no owner yet. `style` says how much of this the
/// operator wrote (see [`FrontEndStyle`]).
pub fn swanctl_frontend(
    node: &str,
    local: IpAddr,
    vips: &[IpAddr],
    liveness: Liveness,
    style: FrontEndStyle,
) -> String {
    let mut s = String::from("connections {\n");
    for &vip in vips {
        let name = connection_name(vip);
        let _ = writeln!(s, "{name} {{");
        s += "version = 2\n";
        let _ = writeln!(s, "local_addrs = {local}");
        let _ = writeln!(s, "remote_addrs = {vip}");
        s += "encap = yes\n";
        if style.mobike_off() {
            s += "mobike = no\n";
        }
        // No `proposals` or `esp_proposals`: strongSwan's defaults, as in a file written by
        // hand. With the OpenSSL plugin (Debian installs it with strongSwan unless told not
        // to) they negotiate AES-CBC/SHA-256/Curve25519 for IKE and AES-GCM for ESP.
        if style.retries_forever() {
            s += "keyingtries = 0\n";
        }
        if liveness.dpd {
            s += "dpd_delay = 1s\n";
        }
        s += "local {\n";
        s += "auth = psk\n";
        let _ = writeln!(s, "id = {node}");
        s += "}\n";
        s += "remote {\n";
        s += "auth = psk\n";
        s += "id = %any\n";
        s += "}\n";
        s += "children {\n";
        let _ = writeln!(s, "{name} {{");
        let _ = writeln!(s, "local_ts = {}[tcp]", host_cidr(local));
        let _ = writeln!(s, "remote_ts = {}", protected_ts(vip));
        s += "mode = tunnel\n";
        // kernel-libipsec sends no acquires (a packet hitting a trap policy without SA is
        // only dropped), so the trap cannot start the tunnel: `start` (or the agent) does,
        // and the trap keeps the protected ports covered whenever no CHILD_SA is up.
        if let Some(action) = style.start_action(liveness) {
            let _ = writeln!(s, "start_action = {action}");
        }
        if liveness.dpd {
            s += "dpd_action = restart\n";
            s += "close_action = start\n";
        }
        s += "}\n";
        s += "}\n";
        s += "}\n";
    }
    s += "}\n";
    s += &secrets();
    s
}

/// A back-end answers on each VIP it may host (`local_addrs` is the VIP, never its own
/// address). `mobike`: left at strongSwan's default (on), as in a file written by hand
/// beside the front-ends' [`FrontEndStyle::Start`]; otherwise off, so there is nothing for
/// a MOBIKE update to move to.
pub fn swanctl_backend(vips: &[IpAddr], liveness: Liveness, mobike: bool) -> String {
    let mut s = String::from("connections {\n");
    for &vip in vips {
        let name = connection_name(vip);
        let _ = writeln!(s, "{name} {{");
        s += "version = 2\n";
        if !mobike {
            let _ = writeln!(s, "local_addrs = {vip}");
        }
        s += "remote_addrs = %any\n";
        s += "encap = yes\n";
        if !mobike {
            s += "mobike = no\n";
        }
        // strongSwan's default proposals, as the front-ends'.
        if liveness.dpd {
            s += "dpd_delay = 1s\n";
        }
        s += "local {\n";
        s += "auth = psk\n";
        let _ = writeln!(s, "id = {vip}");
        s += "}\n";
        s += "remote {\n";
        s += "auth = psk\n";
        s += "id = %any\n";
        s += "}\n";
        s += "children {\n";
        let _ = writeln!(s, "{name} {{");
        let _ = writeln!(s, "local_ts = {}", protected_ts(vip));
        // Front-ends propose their own /32 (/128); a front-end behind the lab's NAT uses
        // 198.51.100.x. An IPv6 lab has no NAT.
        if vip.is_ipv4() {
            s += "remote_ts = 192.0.2.0/24[tcp],198.51.100.0/24[tcp]\n";
        } else {
            let _ = writeln!(s, "remote_ts = {}[tcp]", Family::V6.subnet());
        }
        s += "mode = tunnel\n";
        if liveness.dpd {
            s += "dpd_action = clear\n";
        }
        s += "}\n";
        s += "}\n";
        s += "}\n";
    }
    s += "}\n";
    s += &secrets();
    s
}

/// A charon with nothing configured: the agent loads connections and the key from the
/// cluster policy.
pub fn swanctl_empty() -> String {
    "connections {\n}\n".to_string()
}

/// The lab's cluster policy: the mail ports of every VIP, front-ends from the lab's
/// networks (a NATed front-end's inner address is 198.51.100.x), NAT allowed on the
/// front-end side only.
pub fn lab_policy(vips: &[IpAddr]) -> String {
    let vips: Vec<String> = vips.iter().map(|v| format!("\"{v}\"")).collect();
    let mut s = String::new();
    s += "name = \"lab\"\n";
    let _ = writeln!(s, "vips = [{}]", vips.join(", "));
    s += "template = \"mail\"\n";
    s += "nat-traversal = \"client\"\n";
    s += "frontend-networks = [\"192.0.2.0/24\", \"198.51.100.0/24\"]\n";
    s
}

/// The pre-shared key every lab node uses.
pub fn lab_psk() -> &'static str {
    PSK
}

fn secrets() -> String {
    format!("secrets {{\nike-lab {{\nsecret = \"{PSK}\"\n}}\n}}\n")
}

pub fn vici_path(dir: &Path) -> PathBuf {
    vipsec_testbed::charon::vici_socket_in(dir)
}

/// A node's charon: the testbed's, started with the configs above in the node's directory
/// ([`Charon::start_in`]).
pub use vipsec_testbed::charon::Charon;

#[cfg(test)]
mod tests {
    use super::*;

    const DPD: Liveness = Liveness {
        dpd: true,
        short_retransmits: true,
        agent_initiates: false,
    };

    /// What the vipsec set-ups use: charon's own liveness checks off, the agent initiates.
    const AGENT: Liveness = Liveness {
        dpd: false,
        short_retransmits: false,
        agent_initiates: true,
    };

    /// swanctl.conf and strongswan.conf want one setting per line.
    fn one_setting_per_line(text: &str) {
        for line in text.lines() {
            assert!(line.matches(" = ").count() <= 1, "two settings on {line:?}");
            assert!(!(line.contains('=') && line.contains('{')), "{line:?}");
        }
        assert_eq!(text.matches('{').count(), text.matches('}').count());
    }

    #[test]
    fn front_end_connection_is_trapped_restricted_and_retries_forever() {
        let vip = Family::V4.host(100);
        let text = swanctl_frontend(
            "fe1",
            Family::V4.host(11),
            &[vip],
            DPD,
            FrontEndStyle::default(),
        );
        one_setting_per_line(&text);
        for want in [
            "remote_addrs = 192.0.2.100",
            "encap = yes",
            "mobike = no",
            "keyingtries = 0",
            "start_action = trap|start",
            "dpd_delay = 1s",
            "dpd_action = restart",
            "local_ts = 192.0.2.11/32[tcp]",
            "remote_ts = 192.0.2.100/32[tcp/143],192.0.2.100/32[tcp/110],192.0.2.100/32[tcp/80]",
        ] {
            assert!(text.lines().any(|l| l == want), "{want} missing:\n{text}");
        }
        let plain = swanctl_frontend(
            "fe1",
            Family::V4.host(11),
            &[vip],
            AGENT,
            FrontEndStyle::default(),
        );
        assert!(!plain.contains("dpd"), "{plain}");
        assert!(plain.lines().any(|l| l == "start_action = trap"), "{plain}");
    }

    /// The start_action, keyingtries and mobike lines each style writes (with an agent
    /// initiating).
    #[test]
    fn front_end_styles_write_their_start_action() {
        let vip = Family::V4.host(100);
        let cases = [
            (FrontEndStyle::Trap, Some("trap"), true),
            (FrontEndStyle::TrapStart, Some("trap|start"), true),
            (FrontEndStyle::Start, Some("start"), false),
            (FrontEndStyle::None, None, true),
        ];
        for (style, action, retries_forever) in cases {
            let text = swanctl_frontend("fe1", Family::V4.host(11), &[vip], AGENT, style);
            one_setting_per_line(&text);
            let actions: Vec<&str> = text
                .lines()
                .filter_map(|l| l.strip_prefix("start_action = "))
                .collect();
            assert_eq!(actions, action.into_iter().collect::<Vec<_>>(), "{text}");
            assert_eq!(
                text.contains("keyingtries"),
                retries_forever,
                "{style:?}:\n{text}"
            );
            assert_eq!(
                text.contains("mobike = no"),
                retries_forever,
                "{style:?}:\n{text}"
            );
        }
    }

    #[test]
    fn back_end_answers_on_the_vip_only() {
        let vips = crate::lab::topology::vips(2);
        let text = swanctl_backend(&vips, DPD, false);
        one_setting_per_line(&text);
        assert!(text.contains("local_addrs = 192.0.2.100\n"));
        assert!(text.contains("local_addrs = 192.0.2.101\n"));
        assert!(
            !text.contains("192.0.2.21"),
            "own address must not be a local address"
        );
    }

    #[test]
    fn ipv6_connections_use_128_selectors_and_the_v6_network() {
        let vips = crate::lab::topology::vips_of(Family::V6, 2);
        assert_eq!(connection_name(vips[0]), "vip100");
        assert_eq!(connection_name(vips[1]), "vip101");
        let fe = swanctl_frontend(
            "fe1",
            Family::V6.host(11),
            &vips[..1],
            DPD,
            FrontEndStyle::default(),
        );
        one_setting_per_line(&fe);
        for want in [
            "local_addrs = 2001:db8:1::11",
            "remote_addrs = 2001:db8:1::100",
            "local_ts = 2001:db8:1::11/128[tcp]",
            "remote_ts = 2001:db8:1::100/128[tcp/143],2001:db8:1::100/128[tcp/110],2001:db8:1::100/128[tcp/80]",
        ] {
            assert!(fe.lines().any(|l| l == want), "{want} missing:\n{fe}");
        }
        assert!(!fe.contains("/32"), "{fe}");
        let be = swanctl_backend(&vips, DPD, false);
        one_setting_per_line(&be);
        for want in [
            "local_addrs = 2001:db8:1::100",
            "local_addrs = 2001:db8:1::101",
            "id = 2001:db8:1::100",
            "local_ts = 2001:db8:1::101/128[tcp/143],2001:db8:1::101/128[tcp/110],2001:db8:1::101/128[tcp/80]",
            "remote_ts = 2001:db8:1::/64[tcp]",
        ] {
            assert!(be.lines().any(|l| l == want), "{want} missing:\n{be}");
        }
        assert!(
            !be.contains("192.0.2.") && !be.contains("198.51.100."),
            "{be}"
        );
    }

    #[test]
    fn strongswan_conf_uses_libipsec_with_fwmarks() {
        let text = strongswan_conf(Path::new("/tmp/lab/fe1"), DPD);
        one_setting_per_line(&text);
        for want in [
            "fwmark = 0x42",
            "fwmark = !0x42",
            "install_routes = yes",
            "socket = unix:///tmp/lab/fe1/charon.vici",
            "retransmit_timeout = 0.5",
        ] {
            assert!(text.lines().any(|l| l == want), "{want} missing:\n{text}");
        }
        assert!(text.contains(" kernel-libipsec "));
    }
}
