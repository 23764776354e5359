//! A real strongSwan charon inside a network namespace, killed when its guard drops.
//!
//! Each charon gets its own tmpfs `/run` (`unshare -m`), so several can run side by side,
//! and its VICI socket lives in a host temp dir that the test process (in the root
//! namespace) reaches directly: the namespace's private `/run` is invisible from outside.
//!
//! The settings are the ones that work on a kernel without ESP: `kernel-libipsec` (userspace
//! ESP over a TUN device), IKE sockets marked 0x42 so they bypass charon's own routes, and
//! forced UDP encapsulation in the connections (`encap = yes`).

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::netns::{Netns, unique_name};
use crate::process::{ProcessGuard, wait_for};

/// How long charon may take to open its VICI socket.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// A running charon. Drop kills it (SIGKILL) and removes its temp dir (a directory the
/// caller gave to [`Charon::start_in`] stays).
pub struct Charon {
    pub name: String,
    ns: String,
    dir: PathBuf,
    _temp: Option<tempfile::TempDir>,
    swanctl_conf: String,
    process: Option<ProcessGuard>,
}

/// Where a charon whose files live in `dir` opens its VICI socket.
pub fn vici_socket_in(dir: &Path) -> PathBuf {
    dir.join("charon.vici")
}

/// Where a charon whose files live in `dir` writes its log (the `filelog` path its
/// strongswan.conf names).
pub fn log_in(dir: &Path) -> PathBuf {
    dir.join("charon.log")
}

impl Charon {
    /// Starts charon in `ns` and loads `swanctl_conf` (swanctl.conf syntax, one setting a
    /// line) with `swanctl --load-all`.
    pub fn start(ns: &Netns, name: &str, swanctl_conf: &str) -> anyhow::Result<Charon> {
        Self::start_with(ns, name, swanctl_conf, strongswan_conf)
    }

    /// Like [`Charon::start`], without the `openssl` plugin: MODP groups from `gmp` and no
    /// ECP or Curve25519, as Debian's strongSwan is without its recommended
    /// libstrongswan-standard-plugins. For tests of a group charon lacks.
    pub fn start_without_openssl(
        ns: &Netns,
        name: &str,
        swanctl_conf: &str,
    ) -> anyhow::Result<Charon> {
        Self::start_with(ns, name, swanctl_conf, strongswan_conf_without_openssl)
    }

    /// Like [`Charon::start`], but with the kernel's own ESP: charon's normal
    /// `kernel-netlink` backend without `kernel-libipsec`, so SAs and policies are the
    /// kernel's (no TUN device, no fwmark, no forced encapsulation needed). Only for a
    /// kernel that has ESP, such as the VM tier's guest.
    pub fn start_kernel_esp(ns: &Netns, name: &str, swanctl_conf: &str) -> anyhow::Result<Charon> {
        Self::start_with(ns, name, swanctl_conf, strongswan_conf_kernel_esp)
    }

    fn start_with(
        ns: &Netns,
        name: &str,
        swanctl_conf: &str,
        strongswan: fn(&Path, &Path) -> String,
    ) -> anyhow::Result<Charon> {
        let temp = tempfile::Builder::new()
            .prefix(&format!("{}-", unique_name(name)))
            .tempdir()?;
        let dir = temp.path().to_path_buf();
        let conf = strongswan(&vici_socket_in(&dir), &log_in(&dir));
        let mut charon = Self::start_in(ns, name, &dir, &conf, swanctl_conf)?;
        charon._temp = Some(temp);
        Ok(charon)
    }

    /// Starts charon in `ns` with its files in `dir`, which the caller keeps (a lab's run
    /// directory): `strongswan_conf` as written, which must open the VICI socket at
    /// [`vici_socket_in`]`(dir)`, and `swanctl_conf`, loaded with `swanctl --load-all`.
    pub fn start_in(
        ns: &Netns,
        name: &str,
        dir: &Path,
        strongswan_conf: &str,
        swanctl_conf: &str,
    ) -> anyhow::Result<Charon> {
        crate::require_program("charon")?;
        crate::require_program("swanctl")?;
        crate::require_program("unshare")?;
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("swanctl.conf"), swanctl_conf)?;
        std::fs::write(dir.join("strongswan.conf"), strongswan_conf)?;
        let mut charon = Charon {
            name: name.to_string(),
            ns: ns.name.clone(),
            dir: dir.to_path_buf(),
            _temp: None,
            swanctl_conf: swanctl_conf.to_string(),
            process: None,
        };
        charon.launch()?;
        Ok(charon)
    }

    /// Path of the VICI socket, reachable from the host.
    pub fn vici_socket(&self) -> PathBuf {
        vici_socket_in(&self.dir)
    }

    /// `unix://` URI of the VICI socket, as swanctl's `--uri` wants it.
    pub fn vici_uri(&self) -> String {
        format!("unix://{}", self.vici_socket().display())
    }

    /// charon's log file (level 1, IKE level 2), for debugging a failed test.
    pub fn log_path(&self) -> PathBuf {
        log_in(&self.dir)
    }

    /// The swanctl.conf this charon loads.
    pub fn swanctl_conf(&self) -> &str {
        &self.swanctl_conf
    }

    /// Runs `swanctl ARGS --uri <this charon>` and returns its stdout.
    pub fn swanctl(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new("swanctl")
            .args(args)
            .args(["--uri", &self.vici_uri()])
            .output()?;
        if !out.status.success() {
            anyhow::bail!(
                "swanctl {} ({}) failed: {}{}",
                args.join(" "),
                self.name,
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The charon process's id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().and_then(|p| p.pid())
    }

    /// Whether the charon process still runs.
    pub fn is_running(&mut self) -> bool {
        self.process.as_mut().is_some_and(|p| p.is_running())
    }

    /// Kills charon at once (SIGKILL): no DELETE is sent, the VICI socket goes dead.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.kill();
        }
    }

    /// Kills charon if it runs, then starts it again with the same configuration.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.launch()
    }

    fn launch(&mut self) -> anyhow::Result<()> {
        let socket = self.vici_socket();
        let _ = std::fs::remove_file(&socket);
        let conf = self.dir.join("strongswan.conf");
        let stderr = self.dir.join("charon.stderr");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&stderr)?;
        let command = format!(
            "env STRONGSWAN_CONF={} {}",
            conf.display(),
            crate::require_program("charon")?.display()
        );
        let mut process = crate::process::spawn_with_private_run(
            &self.ns,
            &format!("charon {}", self.name),
            &command,
            log,
        )?;
        // Ready once it accepts on the socket: the file appears at bind, before listen.
        let started = wait_for(
            &format!("charon {} to open {}", self.name, socket.display()),
            START_TIMEOUT,
            || {
                if !process.is_running() {
                    return Some(false);
                }
                UnixStream::connect(&socket).ok().map(|_| true)
            },
        )?;
        if !started {
            anyhow::bail!(
                "charon {} exited at start; see {}",
                self.name,
                stderr.display()
            );
        }
        self.process = Some(process);
        let conf = self.dir.join("swanctl.conf");
        self.swanctl(&[
            "--load-all",
            "--noprompt",
            "--file",
            &conf.display().to_string(),
        ])?;
        anyhow::ensure!(
            self.is_running(),
            "charon {} exited after loading its connections; see {}",
            self.name,
            stderr.display()
        );
        Ok(())
    }
}

impl Drop for Charon {
    fn drop(&mut self) {
        self.kill();
    }
}

fn strongswan_conf(socket: &Path, log: &Path) -> String {
    render_strongswan_conf(true, socket, log)
}

fn strongswan_conf_without_openssl(socket: &Path, log: &Path) -> String {
    strongswan_conf(socket, log).replacen(" openssl ", " ", 1)
}

fn strongswan_conf_kernel_esp(socket: &Path, log: &Path) -> String {
    render_strongswan_conf(false, socket, log)
}

/// strongswan.conf with kernel-libipsec (userspace ESP over a TUN device, IKE sockets
/// marked 0x42, routes in table 220) or for kernel ESP: no kernel-libipsec, and no routes
/// in table 220 (a host-to-host tunnel between addresses the kernel already routes needs
/// none).
fn render_strongswan_conf(libipsec: bool, socket: &Path, log: &Path) -> String {
    let (load_libipsec, install_routes, libipsec_plugins) = if libipsec {
        (
            " kernel-libipsec",
            "yes",
            r#"    socket-default {
      fwmark = 0x42
    }
    kernel-netlink {
      fwmark = !0x42
    }
    kernel-libipsec {
      allow_peer_ts = yes
    }
"#,
        )
    } else {
        ("", "no", "")
    };
    format!(
        r#"charon {{
  load = random nonce openssl pem pkcs1 x509 revocation constraints pubkey sha1 sha2 hmac aes kdf gmp vici{load_libipsec} kernel-netlink socket-default updown
  install_routes = {install_routes}
  install_virtual_ip = no
  plugins {{
{libipsec_plugins}    vici {{
      socket = unix://{socket}
    }}
  }}
  filelog {{
    charon {{
      path = {log}
      default = 1
      ike = 2
      time_format = %T
      flush_line = yes
    }}
  }}
}}
"#,
        socket = socket.display(),
        log = log.display()
    )
}

/// A host-to-host tunnel toward `remote` (one IKE connection `name` with one child of the
/// same name), PSK-authenticated, with the settings a VIP needs: `encap = yes` (required
/// by kernel-libipsec), `mobike = no` (MOBIKE would move the tunnel off the VIP) and
/// `keyingtries = 0`.
pub struct TunnelConf<'a> {
    pub name: &'a str,
    pub local: &'a str,
    pub remote: &'a str,
    pub psk: &'a str,
    /// swanctl `start_action` of the child: `none`, `trap` or `start`.
    pub start_action: &'a str,
}

impl TunnelConf<'_> {
    /// The swanctl.conf text, one setting a line.
    pub fn render(&self) -> String {
        let TunnelConf {
            name,
            local,
            remote,
            psk,
            start_action,
        } = self;
        format!(
            r#"connections {{
  {name} {{
    version = 2
    local_addrs = {local}
    remote_addrs = {remote}
    proposals = aes256-sha256-modp2048
    encap = yes
    mobike = no
    keyingtries = 0
    local {{
      auth = psk
      id = {local}
    }}
    remote {{
      auth = psk
      id = {remote}
    }}
    children {{
      {name} {{
        mode = tunnel
        local_ts = {local}/32
        remote_ts = {remote}/32
        esp_proposals = aes256-sha256
        start_action = {start_action}
      }}
    }}
  }}
}}
secrets {{
  ike-{name} {{
    id-a = {local}
    id-b = {remote}
    secret = "{psk}"
  }}
}}
"#
        )
    }
}

/// Two namespaces joined by a veth: a front-end (192.0.2.1) and a back-end (192.0.2.2)
/// that holds the VIP 192.0.2.100/32 (and, with [`TwoNodeLab::with_vips`], more VIPs
/// 192.0.2.101, ...), a charon in each, and one host-to-host tunnel per VIP between the
/// front-end and that VIP (not started; call [`TwoNodeLab::connect`]). The first VIP's
/// connection and child are named `vip`, the others `vip1`, `vip2`, ...
pub struct TwoNodeLab {
    // Charons first: they must die before their namespaces go.
    pub fe_charon: Charon,
    pub be_charon: Charon,
    pub fe: Netns,
    pub be: Netns,
    vip_count: usize,
}

impl TwoNodeLab {
    pub const FE_ADDR: &'static str = "192.0.2.1";
    pub const BE_ADDR: &'static str = "192.0.2.2";
    pub const VIP: &'static str = "192.0.2.100";
    pub const CONN: &'static str = "vip";
    /// Interface name of the veth end in each namespace.
    pub const IFACE: &'static str = "eth0";
    /// VIPs run from .100 to .249 of 192.0.2.0/24.
    pub const MAX_VIPS: usize = 150;

    /// The lab with one VIP (192.0.2.100, connection `vip`).
    pub fn start() -> anyhow::Result<TwoNodeLab> {
        Self::with_vips(1)
    }

    /// The lab with `count` VIPs on the back-end and one connection to each.
    pub fn with_vips(count: usize) -> anyhow::Result<TwoNodeLab> {
        anyhow::ensure!(
            (1..=Self::MAX_VIPS).contains(&count),
            "a TwoNodeLab holds 1 to {} VIPs",
            Self::MAX_VIPS
        );
        let fe = Netns::new("fe")?;
        let be = Netns::new("be")?;
        fe.veth_to(
            Self::IFACE,
            &format!("{}/24", Self::FE_ADDR),
            &be,
            Self::IFACE,
            &format!("{}/24", Self::BE_ADDR),
        )?;
        let psk = "vipsec-lab-secret-0123456789";
        let mut fe_conf = String::new();
        let mut be_conf = String::new();
        for i in 0..count {
            let vip = Self::vip_addr(i);
            let name = Self::conn_name(i);
            be.ip(&["addr", "add", &format!("{vip}/32"), "dev", Self::IFACE])?;
            // Repeated `connections`/`secrets` sections are merged by charon's parser.
            fe_conf.push_str(
                &TunnelConf {
                    name: &name,
                    local: Self::FE_ADDR,
                    remote: &vip,
                    psk,
                    start_action: "none",
                }
                .render(),
            );
            be_conf.push_str(
                &TunnelConf {
                    name: &name,
                    local: &vip,
                    remote: Self::FE_ADDR,
                    psk,
                    start_action: "none",
                }
                .render(),
            );
        }
        let be_charon = Charon::start(&be, "be", &be_conf)?;
        let fe_charon = Charon::start(&fe, "fe", &fe_conf)?;
        Ok(TwoNodeLab {
            fe_charon,
            be_charon,
            fe,
            be,
            vip_count: count,
        })
    }

    /// Address of VIP number `i` (0 is [`TwoNodeLab::VIP`]).
    pub fn vip_addr(i: usize) -> String {
        format!("192.0.2.{}", 100 + i)
    }

    /// Connection (and child) name toward VIP number `i`.
    pub fn conn_name(i: usize) -> String {
        if i == 0 {
            Self::CONN.to_string()
        } else {
            format!("{}{i}", Self::CONN)
        }
    }

    pub fn vip_count(&self) -> usize {
        self.vip_count
    }

    /// Brings the first VIP's tunnel up from the front-end with `swanctl --initiate`.
    pub fn connect(&self) -> anyhow::Result<()> {
        self.fe_charon.swanctl(&[
            "--initiate",
            "--child",
            Self::CONN,
            "--ike",
            Self::CONN,
            "--timeout",
            "10",
        ])?;
        Ok(())
    }
}
