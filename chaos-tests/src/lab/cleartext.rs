//! The clear-text detector: counters on the hub's bridge. Protected traffic crosses the
//! wire only as ESP in UDP 4500, so any TCP packet to or from a protected port on the bridge
//! is clear text. The same table holds the chain where network faults are added.

use vipsec_testbed::netns::Netns;

use super::charon::PROTECTED_PORTS;
use super::topology::nft;

pub const TABLE: &str = "vipsec_lab";
pub const FAULT_CHAIN: &str = "faults";

/// Installs the counters and an empty fault chain in the hub.
pub fn install(hub: &Netns) -> anyhow::Result<()> {
    let ports = PROTECTED_PORTS
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    // Counting runs before the faults chain so packets a fault drops were still on the wire.
    let script = format!(
        "table bridge {TABLE} {{\n\
         counter cleartext_to {{\n}}\n\
         counter cleartext_from {{\n}}\n\
         chain count {{\n\
         type filter hook forward priority -200; policy accept;\n\
         tcp dport {{ {ports} }} counter name \"cleartext_to\"\n\
         tcp sport {{ {ports} }} counter name \"cleartext_from\"\n\
         }}\n\
         chain {FAULT_CHAIN} {{\n\
         type filter hook forward priority 0; policy accept;\n\
         }}\n\
         }}\n"
    );
    nft(hub, &script)
}

/// Clear-text packets seen so far: (to the protected ports, from them).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ClearText {
    pub to_server: u64,
    pub from_server: u64,
}

impl ClearText {
    pub fn total(&self) -> u64 {
        self.to_server + self.from_server
    }

    pub fn minus(&self, earlier: ClearText) -> ClearText {
        ClearText {
            to_server: self.to_server - earlier.to_server,
            from_server: self.from_server - earlier.from_server,
        }
    }
}

pub fn read(hub: &Netns) -> anyhow::Result<ClearText> {
    Ok(ClearText {
        to_server: counter(hub, "cleartext_to")?,
        from_server: counter(hub, "cleartext_from")?,
    })
}

fn counter(hub: &Netns, name: &str) -> anyhow::Result<u64> {
    let out = hub.sh(&format!("nft list counter bridge {TABLE} {name}"))?;
    // "packets 12 bytes 900"
    let mut words = out.split_whitespace();
    while let Some(w) = words.next() {
        if w == "packets" {
            return Ok(words.next().unwrap_or("0").parse()?);
        }
    }
    anyhow::bail!("no packet count in: {out}")
}

/// tcpdump on every hub port for the protected ports, one text line per packet, so a
/// non-zero counter comes with the packets themselves (time, addresses, flags).
pub struct Capture {
    _guard: vipsec_testbed::process::ProcessGuard,
    pub path: std::path::PathBuf,
}

impl Capture {
    pub fn start(hub: &Netns, dir: &std::path::Path) -> anyhow::Result<Capture> {
        let tcpdump = vipsec_testbed::require_program("tcpdump")?;
        let path = dir.join("cleartext.txt");
        let out = std::fs::File::create(&path)?;
        let err = std::fs::File::create(dir.join("tcpdump.log"))?;
        let filter = PROTECTED_PORTS
            .iter()
            .map(|p| format!("port {p}"))
            .collect::<Vec<_>>()
            .join(" or ");
        let guard = vipsec_testbed::process::ProcessGuard::spawn(
            "tcpdump",
            hub.command(&tcpdump.display().to_string())
                .args(["-i", "any", "-l", "-nn", "-tt", "-Q", "in"])
                .arg(format!("tcp and ({filter})"))
                .stdin(std::process::Stdio::null())
                .stdout(out)
                .stderr(err),
        )?;
        Ok(Capture {
            _guard: guard,
            path,
        })
    }

    /// Captured lines stamped at or after `since` (seconds since the epoch).
    pub fn lines_since(&self, since: f64) -> Vec<String> {
        std::fs::read_to_string(&self.path)
            .unwrap_or_default()
            .lines()
            .filter(|l| {
                l.split_whitespace()
                    .next()
                    .and_then(|t| t.parse::<f64>().ok())
                    .is_some_and(|t| t >= since)
            })
            .map(str::to_string)
            .collect()
    }
}
