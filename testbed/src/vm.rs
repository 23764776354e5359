//! A throw-away QEMU VM for tests that need kernel features this host lacks (kernel ESP).
//!
//! The guest boots Debian's `linux-image-amd64` under QEMU's software CPU (TCG; /dev/kvm
//! here cannot boot a stock kernel), sees the host's `/` read-only over 9p, and runs one
//! shell script with the host's programs. A second, writable 9p share carries the script
//! in and its output and exit code out. Boot takes a few seconds because the kernel is
//! decompressed once to an ELF and booted through its PVH entry point, skipping the
//! in-guest decompression that makes a bzImage boot slow under emulation.
//!
//! Packages: qemu-system-x86, linux-image-amd64, busybox-static (and xz-utils, which
//! unpacks the kernel once).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::process::ProcessGuard;

pub const INSTALL_HINT: &str = "install qemu-system-x86 linux-image-amd64 busybox-static";

/// Modules the initramfs loads (with what they depend on) to mount the 9p shares.
const INITRAMFS_MODULES: &[&str] = &["virtio_pci", "9pnet_virtio", "9p"];

/// Modules the guest loads (from the host's /lib/modules) before the script runs.
const GUEST_MODULES: &str = "veth esp4 esp6 xfrm_user xfrm_algo authenc af_key";

/// Runs inside the initramfs as PID 1: mounts the host root and the I/O share, then
/// hands over to the stage-two script on the host root.
const INIT: &str = r#"#!/bin/busybox sh
B=/bin/busybox
$B mkdir -p /proc /dev /newroot
$B mount -t proc proc /proc
$B mount -t devtmpfs dev /dev
for m in $($B cat /modules.list); do
  $B insmod "/modules/$($B basename "$m")" || echo "vm-init: insmod $m failed"
done
OPTS=trans=virtio,version=9p2000.L,msize=512000
$B mount -t 9p -o $OPTS,ro,cache=loose hostroot /newroot || { echo "vm-init: mount host root failed"; $B poweroff -f; }
$B mount -t tmpfs -o mode=0755 tmpfs /newroot/run
$B mount -t tmpfs -o mode=1777 tmpfs /newroot/tmp
$B mkdir -p /newroot/run/vm-io
$B mount -t 9p -o $OPTS vmio /newroot/run/vm-io || echo "vm-init: mount vmio failed"
$B mount --move /dev /newroot/dev
$B mount --move /proc /newroot/proc
exec $B switch_root /newroot /bin/sh /run/vm-io/stage2.sh
"#;

/// The directories directly under the host's /tmp that the guest must see through its
/// private /tmp: those that hold `paths` (the test binary, the checkout, the working
/// directory), when they live there (a newcomer's clone in /tmp).
fn host_tmp_entries(paths: &[PathBuf]) -> Vec<String> {
    let mut out = Vec::new();
    for p in paths {
        let Ok(rest) = p.strip_prefix("/tmp") else {
            continue;
        };
        if let Some(first) = rest.components().next() {
            let name = first.as_os_str().to_string_lossy().into_owned();
            if !out.contains(&name) {
                out.push(name);
            }
        }
    }
    out
}

/// `s` as one shell word.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Runs on the host root (as PID 1) and powers the VM off when the script is done.
fn stage2(script_timeout: Duration, busybox: &Path, tmp_entries: &[String]) -> String {
    let entries: Vec<String> = tmp_entries.iter().map(|e| shell_quote(e)).collect();
    let entries = entries.join(" ");
    format!(
        r#"#!/bin/sh
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/tmp
mount -t sysfs sysfs /sys
mkdir -p /dev/shm /dev/pts && mount -t tmpfs tmpfs /dev/shm
# The guest's /tmp is private; what the test runs from under the host's /tmp is bound
# back in (read-only) from a plain bind of the root, which does not carry the tmpfs.
mkdir -p /run/hostroot && mount --bind / /run/hostroot
for e in {entries}; do
  [ -d "/run/hostroot/tmp/$e" ] && mkdir -p "/tmp/$e" && mount --bind "/run/hostroot/tmp/$e" "/tmp/$e"
done
ip link set lo up
for m in {GUEST_MODULES}; do modprobe "$m" || echo "stage2: modprobe $m failed"; done
cd /run/vm-io
echo "stage2: script starts at $(cut -d' ' -f1 /proc/uptime) s uptime" > console-marks
timeout -s KILL {secs} sh ./script.sh > output.log 2>&1
echo $? > exit_code.tmp && mv exit_code.tmp exit_code
sync
{busybox} poweroff -f
"#,
        secs = script_timeout.as_secs().max(1),
        busybox = busybox.display()
    )
}

/// What the VM tier needs, found on this machine.
#[derive(Debug, Clone)]
pub struct VmTier {
    qemu: PathBuf,
    vmlinuz: PathBuf,
    kernel_version: String,
    busybox: PathBuf,
}

/// The outcome of one VM run.
#[derive(Debug)]
pub struct VmRun {
    /// The script's exit code; `None` if the VM ended without writing one.
    pub exit_code: Option<i32>,
    /// The script's stdout and stderr.
    pub output: String,
    /// The guest's serial console (kernel log, init messages).
    pub console: String,
    /// From starting QEMU to its exit.
    pub wall: Duration,
}

impl VmTier {
    /// Finds QEMU, a kernel image with its modules, and a static busybox; `Err` says what
    /// is missing.
    pub fn locate() -> Result<VmTier, String> {
        let qemu = which("qemu-system-x86_64").ok_or("qemu-system-x86_64 not found")?;
        let busybox = ["/bin/busybox", "/usr/bin/busybox"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .ok_or("busybox not found")?;
        let mut kernels: Vec<(String, PathBuf)> = fs::read_dir("/boot")
            .map_err(|e| format!("/boot: {e}"))?
            .filter_map(|e| {
                let name = e.ok()?.file_name().into_string().ok()?;
                let version = name.strip_prefix("vmlinuz-")?.to_string();
                Path::new("/usr/lib/modules")
                    .join(&version)
                    .join("modules.dep")
                    .exists()
                    .then(|| (version, Path::new("/boot").join(name)))
            })
            .collect();
        kernels.sort();
        let (kernel_version, vmlinuz) = kernels
            .pop()
            .ok_or("no /boot/vmlinuz-* with modules in /usr/lib/modules")?;
        Ok(VmTier {
            qemu,
            vmlinuz,
            kernel_version,
            busybox,
        })
    }

    /// The uncompressed kernel and the initramfs, built once per kernel version.
    fn boot_files(&self) -> anyhow::Result<(PathBuf, PathBuf)> {
        let dir = PathBuf::from(format!("/var/tmp/vipsec-vm-{}", self.kernel_version));
        fs::create_dir_all(&dir)?;
        let vmlinux = dir.join("vmlinux");
        if !vmlinux.exists() {
            let elf = extract_elf(&fs::read(&self.vmlinuz)?)?;
            write_atomically(&vmlinux, &elf)?;
        }
        let initrd = dir.join("initrd.cpio");
        if !initrd.exists() {
            write_atomically(&initrd, &self.initramfs()?)?;
        }
        Ok((vmlinux, initrd))
    }

    fn initramfs(&self) -> anyhow::Result<Vec<u8>> {
        let modules = Path::new("/usr/lib/modules").join(&self.kernel_version);
        let mut cpio = Cpio::default();
        for d in ["bin", "modules"] {
            cpio.dir(d);
        }
        cpio.file("init", INIT.as_bytes());
        cpio.file("bin/busybox", &fs::read(&self.busybox)?);
        let mut list = String::new();
        for m in module_load_order(&modules, INITRAMFS_MODULES)? {
            let m = m.as_str();
            let data = fs::read(modules.join(m))
                .map_err(|e| anyhow::anyhow!("{}: {e}", modules.join(m).display()))?;
            let name = Path::new(m).file_name().unwrap().to_string_lossy();
            cpio.file(&format!("modules/{name}"), &data);
            list.push_str(&name);
            list.push('\n');
        }
        cpio.file("modules.list", list.as_bytes());
        Ok(cpio.finish())
    }

    /// Boots a VM, runs `script` (sh) on the host's file system inside it, and powers off.
    /// `timeout` bounds the whole run; the script is killed a little before.
    pub fn run_script(&self, script: &str, timeout: Duration) -> anyhow::Result<VmRun> {
        self.run(script, timeout, &[])
    }

    /// [`VmTier::run_script`], with `extra_paths` on the host that the guest must see
    /// (besides this process's executable and working directory, and the checkout).
    fn run(
        &self,
        script: &str,
        timeout: Duration,
        extra_paths: &[PathBuf],
    ) -> anyhow::Result<VmRun> {
        let (vmlinux, initrd) = self.boot_files()?;
        let io = tempfile::Builder::new().prefix("vipsec-vm-io-").tempdir()?;
        let script_timeout = timeout.saturating_sub(Duration::from_secs(15));
        let seen: Vec<PathBuf> = [
            std::env::current_exe().ok(),
            std::env::current_dir().ok(),
            Some(PathBuf::from(env!("CARGO_MANIFEST_DIR"))),
        ]
        .into_iter()
        .flatten()
        .chain(extra_paths.iter().cloned())
        .collect();
        fs::write(
            io.path().join("stage2.sh"),
            stage2(script_timeout, &self.busybox, &host_tmp_entries(&seen)),
        )?;
        fs::write(io.path().join("script.sh"), script)?;
        let console = io.path().join("console.log");
        let fsdev = |id: &str, path: &Path, ro: bool| {
            format!(
                "local,id={id},path={},security_model=none,multidevs=remap{}",
                path.display(),
                if ro { ",readonly=on" } else { "" }
            )
        };
        let mut cmd = Command::new(&self.qemu);
        cmd.args(["-accel", "tcg,thread=multi", "-M", "pc", "-cpu", "max"])
            .args(["-smp", "2", "-m", "512", "-no-user-config", "-nodefaults"])
            .args(["-display", "none", "-monitor", "none", "-vga", "none"])
            .args(["-no-reboot", "-net", "none"])
            .arg("-kernel")
            .arg(&vmlinux)
            .arg("-initrd")
            .arg(&initrd)
            .args([
                "-append",
                "console=ttyS0 panic=-1 quiet loglevel=4 mitigations=off",
            ])
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .arg("-fsdev")
            .arg(fsdev("hostroot", Path::new("/"), true))
            .args(["-device", "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot"])
            .arg("-fsdev")
            .arg(fsdev("vmio", io.path(), false))
            .args(["-device", "virtio-9p-pci,fsdev=vmio,mount_tag=vmio"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(io.path().join("qemu.stderr"))?);
        let start = Instant::now();
        let mut qemu = ProcessGuard::spawn("qemu", &mut cmd)?;
        let exited = qemu.wait_exit(timeout);
        let wall = start.elapsed();
        qemu.kill();
        let read = |name: &str| fs::read_to_string(io.path().join(name)).unwrap_or_default();
        let run = VmRun {
            exit_code: read("exit_code").trim().parse().ok(),
            output: read("output.log"),
            console: format!(
                "{}{}{}",
                read("qemu.stderr"),
                read("console.log"),
                read("console-marks")
            ),
            wall,
        };
        if exited.is_none() {
            anyhow::bail!(
                "VM did not finish within {timeout:?}\n--- console ---\n{}\n--- output ---\n{}",
                run.console,
                run.output
            );
        }
        Ok(run)
    }

    /// Runs one test of a test binary (normally `std::env::current_exe()`) inside the VM,
    /// with `env` set; the binary sees the host's files at the same paths.
    pub fn run_test(
        &self,
        test_binary: &Path,
        test_name: &str,
        env: &[(&str, &str)],
        timeout: Duration,
    ) -> anyhow::Result<VmRun> {
        let mut script = String::from("set -e\n");
        for (k, v) in env {
            script.push_str(&format!("export {k}='{v}'\n"));
        }
        script.push_str(&format!(
            "exec {} --exact {} --nocapture --test-threads=1\n",
            shell_quote(&test_binary.display().to_string()),
            shell_quote(test_name)
        ));
        self.run(&script, timeout, &[test_binary.to_path_buf()])
    }
}

/// Set in the guest for the test binary the host side of [`test_in_vm`] starts there.
pub const GUEST_ENV: &str = "VIPSEC_VM_GUEST";

/// One VM at a time in a test process: two software-emulated guests on two cores would
/// slow each other.
static ONE_VM: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The body of a VM-tier test named `test_name`. In the guest (this same test binary,
/// started with [`GUEST_ENV`] set) it runs `guest`; on the host it boots the VM, runs the
/// test there within `timeout`, shows the guest's output and panics unless the guest side
/// passed. Panics naming what is missing when the VM tier cannot run on this machine.
pub fn test_in_vm(test_name: &str, timeout: Duration, guest: impl FnOnce()) {
    if std::env::var_os(GUEST_ENV).is_some() {
        guest();
        return;
    }
    let tier = VmTier::locate()
        .unwrap_or_else(|why| panic!("the VM tier cannot run here: {why} ({INSTALL_HINT})"));
    let exe = std::env::current_exe().expect("this test binary's path");
    let _one = ONE_VM.lock().unwrap_or_else(|e| e.into_inner());
    let run = tier
        .run_test(
            &exe,
            test_name,
            &[(GUEST_ENV, "1"), ("RUST_BACKTRACE", "1")],
            timeout,
        )
        .unwrap_or_else(|e| panic!("{test_name} in the VM: {e}"));
    eprintln!("--- guest output ---\n{}", run.output);
    eprintln!("VM tier wall time (boot, test, power-off): {:?}", run.wall);
    assert_eq!(
        run.exit_code,
        Some(0),
        "{test_name} failed in the VM\n--- console ---\n{}",
        run.console
    );
}

/// The module files (relative to `modules`) that `wanted` need, dependencies first, as
/// `modules.dep` lists them.
fn module_load_order(modules: &Path, wanted: &[&str]) -> anyhow::Result<Vec<String>> {
    let dep = fs::read_to_string(modules.join("modules.dep"))?;
    let deps: std::collections::HashMap<&str, Vec<&str>> = dep
        .lines()
        .filter_map(|l| {
            let (m, d) = l.split_once(':')?;
            Some((m, d.split_whitespace().collect()))
        })
        .collect();
    fn visit<'a>(
        m: &'a str,
        deps: &std::collections::HashMap<&'a str, Vec<&'a str>>,
        order: &mut Vec<String>,
    ) {
        if order.iter().any(|o| o == m) {
            return;
        }
        for d in deps.get(m).into_iter().flatten() {
            visit(d, deps, order);
        }
        order.push(m.to_string());
    }
    let mut order = Vec::new();
    for w in wanted {
        let file = format!("/{w}.ko");
        let m = deps
            .keys()
            .find(|k| k.ends_with(&file))
            .ok_or_else(|| anyhow::anyhow!("module {w} not in {}", modules.display()))?;
        visit(m, &deps, &mut order);
    }
    Ok(order)
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(program))
        .find(|p| p.is_file())
}

fn write_atomically(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    fs::write(&tmp, data)?;
    fs::rename(&tmp, path)?;
    Ok(())
}

/// The kernel ELF inside a bzImage: the payload is compressed with one of a few formats;
/// try each place where a known magic appears until one decompresses to an ELF.
fn extract_elf(bzimage: &[u8]) -> anyhow::Result<Vec<u8>> {
    const FORMATS: &[(&[u8], &[&str])] = &[
        (b"\xfd7zXZ\x00", &["xz", "-dc", "--single-stream"]),
        (b"\x28\xb5\x2f\xfd", &["zstd", "-dcq"]),
        (b"\x1f\x8b\x08", &["gzip", "-dcq"]),
    ];
    for (magic, tool) in FORMATS {
        let mut at = 0;
        while let Some(pos) = find(&bzimage[at..], magic) {
            let start = at + pos;
            at = start + 1;
            let Ok(mut child) = Command::new(tool[0])
                .args(&tool[1..])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
            else {
                continue;
            };
            let mut stdin = child.stdin.take().unwrap();
            let input = bzimage[start..].to_vec();
            let writer = std::thread::spawn(move || {
                let _ = stdin.write_all(&input);
            });
            let out = child.wait_with_output()?;
            let _ = writer.join();
            if out.stdout.starts_with(b"\x7fELF") {
                return Ok(out.stdout);
            }
        }
    }
    anyhow::bail!("no ELF kernel found inside the bzImage (is xz-utils installed?)")
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// A cpio archive in the "newc" format the kernel unpacks as initramfs.
#[derive(Default)]
struct Cpio {
    out: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.ino += 1;
        let header = format!(
            "070701{:08x}{mode:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino,
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            0,
            0,
            name.len() + 1,
            0
        );
        self.out.extend_from_slice(header.as_bytes());
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, &[]);
    }

    fn file(&mut self, name: &str, data: &[u8]) {
        self.entry(name, 0o100755, data);
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[]);
        self.out
    }
}

// ----- For other guests of the VM tier (systemd_vm boots a whole Debian root) -----

impl VmTier {
    pub(crate) fn qemu(&self) -> &Path {
        &self.qemu
    }

    /// The kernel decompressed to an ELF (PVH boot), built once per kernel version.
    pub(crate) fn vmlinux(&self) -> anyhow::Result<PathBuf> {
        Ok(self.boot_files()?.0)
    }

    /// An initramfs of busybox, `init` as /init, and `modules` (with their dependencies)
    /// under /modules, listed in load order in /modules.list.
    pub(crate) fn initramfs_with(&self, init: &str, modules: &[&str]) -> anyhow::Result<Vec<u8>> {
        let dir = Path::new("/usr/lib/modules").join(&self.kernel_version);
        let mut cpio = Cpio::default();
        for d in ["bin", "modules"] {
            cpio.dir(d);
        }
        cpio.file("init", init.as_bytes());
        cpio.file("bin/busybox", &fs::read(&self.busybox)?);
        let mut list = String::new();
        for m in module_load_order(&dir, modules)? {
            let data = fs::read(dir.join(&m))
                .map_err(|e| anyhow::anyhow!("{}: {e}", dir.join(&m).display()))?;
            let name = Path::new(&m).file_name().unwrap().to_string_lossy();
            cpio.file(&format!("modules/{name}"), &data);
            list.push_str(&name);
            list.push('\n');
        }
        cpio.file("modules.list", list.as_bytes());
        Ok(cpio.finish())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_lives_under_the_hosts_tmp_is_named_once_by_its_first_component() {
        let paths = [
            PathBuf::from("/tmp/a clone/target/debug/deps/t-123"),
            PathBuf::from("/work/main/testbed"),
            PathBuf::from("/tmp/a clone/testbed"),
            PathBuf::from("/tmp/it's/x"),
            PathBuf::from("/tmpfoo/x"),
        ];
        assert_eq!(host_tmp_entries(&paths), ["a clone", "it's"]);
    }

    #[test]
    fn a_bound_back_name_reaches_the_guest_as_one_shell_word() {
        let script = stage2(
            Duration::from_secs(60),
            Path::new("/bin/busybox"),
            &["a clone".into(), "it's".into()],
        );
        assert!(
            script.contains(r#"for e in 'a clone' 'it'\''s'; do"#),
            "{script}"
        );
        let out = Command::new("sh")
            .args([
                "-c",
                &format!("for e in {}; do echo \"[$e]\"; done", shell_quote("it's a")),
            ])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "[it's a]\n");
    }
}
