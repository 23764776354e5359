//! A QEMU guest that boots a whole Debian 12 root with systemd as PID 1, for tests of what
//! only a real init shows: unit ordering at boot, restarts, stops, sandboxes.
//!
//! The root is a directory (a copy of a `tools/debian-root` root that the test has filled
//! in); it becomes an ext4 image (`mkfs.ext4 -d`, no mount needed) on a virtio disk. The
//! kernel is the VM tier's (Debian's `linux-image-amd64`, booted as an ELF through PVH),
//! with a busybox initramfs that loads the disk, ext4, 9p and network modules (and the
//! test's own), mounts the image as the root, mounts a tmpfs `/run` with a writable 9p
//! share at `/run/vm-io`, and hands over to `/lib/systemd/systemd`. The guest has no
//! `/lib/modules`: what it needs is loaded before systemd starts.
//!
//! One unit added to the root, `vm-script.service`, runs the test's shell script once the
//! boot is done (after multi-user.target), writes its output and exit code to the share,
//! and powers the guest off with a normal systemd shutdown. The guest's network cards (if
//! asked for) sit on one QEMU hub with nothing else on it: they reach each other and
//! nothing outside, and with `net.ifnames=0` they are eth0, eth1, ...
//!
//! Packages: those of the VM tier (qemu-system-x86, linux-image-amd64, busybox-static,
//! xz-utils) and e2fsprogs (mkfs.ext4 with `-d`).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::process::ProcessGuard;
use crate::vm::{VmRun, VmTier};

pub const INSTALL_HINT: &str =
    "install qemu-system-x86 linux-image-amd64 busybox-static xz-utils e2fsprogs";

/// What the initramfs loads for every guest: the disk, its file system (ext4 wants crc32c
/// and does not say so in modules.dep), the 9p share and the network cards.
const BOOT_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_blk",
    "crc32c_generic",
    "ext4",
    "9pnet_virtio",
    "9p",
    "virtio_net",
    "autofs4",
];

/// PID 1 of the initramfs.
const INIT: &str = r#"#!/bin/busybox sh
B=/bin/busybox
$B mkdir -p /proc /dev /newroot
$B mount -t proc proc /proc
$B mount -t devtmpfs dev /dev
for m in $($B cat /modules.list); do
  $B insmod "/modules/$m" || echo "vm-init: insmod $m failed"
done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 200 ]; do $B usleep 50000; i=$((i + 1)); done
$B mount -t ext4 -o rw /dev/vda /newroot || { echo "vm-init: mount /dev/vda failed"; $B poweroff -f; }
# systemd keeps a /run that is already mounted; the share lives in it.
$B mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /newroot/run
$B mkdir -p /newroot/run/vm-io
$B mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 vmio /newroot/run/vm-io || echo "vm-init: mount vmio failed"
$B umount /proc
$B mount --move /dev /newroot/dev
exec $B switch_root /newroot /lib/systemd/systemd
"#;

/// Runs the script once the boot is done, then shuts the guest down the normal way.
fn script_unit(script_timeout: Duration) -> String {
    format!(
        r#"[Unit]
Description=VM tier: the test's script
After=multi-user.target
SuccessAction=poweroff
FailureAction=poweroff

[Service]
# Not oneshot: the boot counts as finished once the script has started, so the script
# may wait for it (`systemctl is-system-running --wait`) and read `systemd-analyze`.
Type=exec
Environment=SYSTEMD_LOG_COLOR=0 SYSTEMD_PAGER= LANG=C.UTF-8
ExecStart=/bin/sh -c 'echo "vm-script: starts at $(cut -d" " -f1 /proc/uptime) s uptime" >/run/vm-io/console-marks; timeout -s KILL {secs} sh /run/vm-io/script.sh >/run/vm-io/output.log 2>&1; echo $? >/run/vm-io/exit_code.tmp; mv /run/vm-io/exit_code.tmp /run/vm-io/exit_code'
"#,
        secs = script_timeout.as_secs().max(1)
    )
}

/// What booting a systemd guest needs, found on this machine.
#[derive(Debug, Clone)]
pub struct SystemdVm {
    tier: VmTier,
    mkfs: PathBuf,
}

/// How one guest boots.
#[derive(Debug, Clone)]
pub struct GuestSpec<'a> {
    /// The root directory to boot (it gets `vm-script.service` and a machine id).
    pub root: &'a Path,
    /// Run as `sh` once the boot is done, with output and exit code collected.
    pub script: &'a str,
    /// Kernel modules loaded before systemd starts (the guest has no /lib/modules).
    pub modules: &'a [&'a str],
    /// Network cards on a hub of their own: eth0, eth1, ...
    pub nics: usize,
    /// Bounds boot, script and shutdown together; the script is killed a little before.
    pub timeout: Duration,
}

impl SystemdVm {
    /// Finds the VM tier and mkfs.ext4; `Err` says what is missing.
    pub fn locate() -> Result<SystemdVm, String> {
        let tier = VmTier::locate()?;
        let mkfs = ["/usr/sbin/mkfs.ext4", "/sbin/mkfs.ext4"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .ok_or("mkfs.ext4 not found")?;
        Ok(SystemdVm { tier, mkfs })
    }

    /// Boots `spec.root` under systemd, runs the script, and waits for the power-off.
    pub fn run(&self, spec: &GuestSpec) -> anyhow::Result<VmRun> {
        let root = spec.root;
        let script_timeout = spec.timeout.saturating_sub(Duration::from_secs(30));
        let units = root.join("etc/systemd/system");
        fs::create_dir_all(units.join("multi-user.target.wants"))?;
        fs::write(units.join("vm-script.service"), script_unit(script_timeout))?;
        let wants = units.join("multi-user.target.wants/vm-script.service");
        if !wants.exists() {
            std::os::unix::fs::symlink("/etc/systemd/system/vm-script.service", wants)?;
        }
        // Without a machine id systemd counts this as a first boot and may ask questions
        // on the console (systemd-firstboot).
        let machine_id = root.join("etc/machine-id");
        if fs::read_to_string(&machine_id)
            .map(|s| s.trim().len() != 32)
            .unwrap_or(true)
        {
            let uuid = fs::read_to_string("/proc/sys/kernel/random/uuid")?;
            let id: String = uuid.trim().chars().filter(|c| *c != '-').collect();
            fs::write(&machine_id, format!("{id}\n"))?;
        }

        let work = tempfile::Builder::new()
            .prefix("vipsec-systemd-vm-")
            .tempdir_in("/var/tmp")?;
        let io = work.path().join("io");
        fs::create_dir(&io)?;
        fs::write(io.join("script.sh"), spec.script)?;

        // The image: the root's size and room to spare (journal, the agent's files).
        let image = work.path().join("root.ext4");
        let used = du_bytes(root)?;
        let size_mb = used / (1 << 20) + 512;
        let started = Instant::now();
        let out = Command::new(&self.mkfs)
            .args([
                "-q",
                "-F",
                "-t",
                "ext4",
                "-L",
                "vm-root",
                "-E",
                "root_owner=0:0",
                "-d",
            ])
            .arg(root)
            .arg(&image)
            .arg(format!("{size_mb}M"))
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "mkfs.ext4 -d {}: {}",
            root.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let mkfs_time = started.elapsed();

        let vmlinux = self.tier.vmlinux()?;
        let initrd = work.path().join("initrd.cpio");
        let mut modules: Vec<&str> = BOOT_MODULES.to_vec();
        modules.extend_from_slice(spec.modules);
        fs::write(&initrd, self.tier.initramfs_with(INIT, &modules)?)?;

        let console = io.join("console.log");
        let mut cmd = Command::new(self.tier.qemu());
        cmd.args(["-accel", "tcg,thread=multi", "-M", "pc", "-cpu", "max"])
            .args(["-smp", "2", "-m", "1024", "-no-user-config", "-nodefaults"])
            .args(["-display", "none", "-monitor", "none", "-vga", "none"])
            .arg("-no-reboot")
            .arg("-kernel")
            .arg(&vmlinux)
            .arg("-initrd")
            .arg(&initrd)
            .args([
                "-append",
                "console=ttyS0 panic=-1 quiet loglevel=4 mitigations=off net.ifnames=0 \
                 systemd.show_status=error systemd.log_color=0",
            ])
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .arg("-drive")
            .arg(format!(
                "file={},if=virtio,format=raw,cache=unsafe",
                image.display()
            ))
            .arg("-fsdev")
            .arg(format!(
                "local,id=vmio,path={},security_model=none,multidevs=remap",
                io.display()
            ))
            .args(["-device", "virtio-9p-pci,fsdev=vmio,mount_tag=vmio"]);
        if spec.nics > 0 {
            // A hub holds a sender's packet back while no other port can take it (a card
            // that is down, or moving to a namespace): QEMU's user network, restricted so
            // that nothing leaves, is a port that always can, and drops what it gets.
            cmd.args(["-netdev", "user,id=sink,restrict=on"])
                .args(["-netdev", "hubport,id=sinkport,hubid=0,netdev=sink"]);
        }
        for i in 0..spec.nics {
            // One hub: the guest's own cards and the sink.
            cmd.arg("-netdev")
                .arg(format!("hubport,id=n{i},hubid=0"))
                .arg("-device")
                .arg(format!(
                    "virtio-net-pci,netdev=n{i},mac=52:54:00:12:34:{:02x}",
                    0x10 + i
                ));
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(io.join("qemu.stderr"))?);
        let start = Instant::now();
        let mut qemu = ProcessGuard::spawn("qemu", &mut cmd)?;
        let exited = qemu.wait_exit(spec.timeout);
        let wall = start.elapsed();
        qemu.kill();
        let read = |name: &str| fs::read_to_string(io.join(name)).unwrap_or_default();
        let run = VmRun {
            exit_code: read("exit_code").trim().parse().ok(),
            output: read("output.log"),
            console: format!(
                "{}{}{}mkfs.ext4 of {} MiB: {mkfs_time:?}\n",
                read("qemu.stderr"),
                read("console.log"),
                read("console-marks"),
                used >> 20
            ),
            wall,
        };
        if exited.is_none() {
            anyhow::bail!(
                "systemd guest did not power off within {:?}\n--- console ---\n{}\n--- output ---\n{}",
                spec.timeout,
                run.console,
                run.output
            );
        }
        Ok(run)
    }
}

fn du_bytes(dir: &Path) -> anyhow::Result<u64> {
    let out = Command::new("du").args(["-sxb"]).arg(dir).output()?;
    anyhow::ensure!(out.status.success(), "du {}", dir.display());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("du {}: no size", dir.display()))
}
