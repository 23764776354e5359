//! The Debian package, built by `tools/package` and installed on a clean Debian 12 root
//! (debootstrap, cached by `tools/debian-root`): it installs without starting or enabling
//! anything, its binary runs and checks the shipped examples, its units pass
//! `systemd-analyze verify`, `man vipsec` works, an upgrade in place goes through, and a
//! purge removes the package's files and nothing of the operator's.
//!
//! Needs root, cargo-deb, dpkg-dev and debootstrap (tools/install-deps installs them); it
//! fails, naming what is missing, rather than skip.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod common;
use common::{show, text};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed:\n{}", show(&out));
    out
}

fn on_path(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Everything the test needs, or a panic that names what is missing.
fn require_tools() {
    let mut missing = Vec::new();
    if !nix::unistd::geteuid().is_root() {
        missing.push("root (dpkg in a chroot)".to_string());
    }
    for program in ["debootstrap", "dpkg-deb", "dpkg-shlibdeps", "chroot"] {
        if !on_path(program) {
            missing.push(program.to_string());
        }
    }
    let deb = Command::new("cargo").args(["deb", "--version"]).output();
    if !deb.is_ok_and(|o| o.status.success()) {
        missing.push("cargo-deb".to_string());
    }
    assert!(
        missing.is_empty(),
        "the package test needs {} (run tools/install-deps as root)",
        missing.join(", ")
    );
}

/// A copy of the cached clean root, removed when dropped.
struct Root {
    dir: tempfile::TempDir,
}

impl Root {
    fn fresh() -> Root {
        let out = run(&mut Command::new(repo().join("tools/debian-root")));
        let cached = text(&out.stdout).trim().to_string();
        assert!(Path::new(&cached).join("usr/bin/dpkg").exists(), "{cached}");
        let dir = tempfile::Builder::new()
            .prefix("vipsec-debian-root")
            .tempdir()
            .unwrap();
        run(Command::new("cp")
            .args(["-a", "--reflink=auto"])
            .arg(format!("{cached}/."))
            .arg(dir.path()));
        Root { dir }
    }

    fn path(&self, inside: &str) -> PathBuf {
        self.dir.path().join(inside.trim_start_matches('/'))
    }

    /// A command inside the root, with a clean environment.
    fn sh(&self, script: &str) -> Output {
        Command::new("chroot")
            .arg(self.dir.path())
            .args(["/bin/sh", "-c", script])
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("LANG", "C.UTF-8")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .env("SYSTEMD_LOG_COLOR", "0")
            .output()
            .unwrap()
    }

    fn ok(&self, script: &str) -> Output {
        let out = self.sh(script);
        assert!(
            out.status.success(),
            "in the root: {script}\n{}",
            show(&out)
        );
        out
    }
}

fn build_package() -> PathBuf {
    // The release build shares the workspace's target directory with `tools/package` run
    // by hand; `cargo test` holds only the lock of its own (dev) profile's directory.
    let out = run(&mut Command::new(repo().join("tools/package")));
    let deb = PathBuf::from(text(&out.stdout).trim().lines().last().unwrap_or_default());
    assert!(
        deb.extension().is_some_and(|e| e == "deb") && deb.exists(),
        "tools/package printed no .deb:\n{}",
        show(&out)
    );
    deb
}

#[test]
fn debian_package_installs_on_a_clean_debian_12_root_and_goes_without_a_trace() {
    require_tools();
    let deb = build_package();

    // What is in it, before anything is installed.
    let listing = text(&run(Command::new("dpkg-deb").arg("-c").arg(&deb)).stdout);
    for path in [
        "./usr/bin/vipsec",
        "./lib/systemd/system/vipsec.service",
        "./lib/systemd/system/vipsec-guard.service",
        "./usr/sbin/vipsec-handover",
        "./usr/sbin/vipsec-notify",
        "./usr/lib/ocf/resource.d/vipsec/vipsec",
        "./usr/lib/ocf/resource.d/vipsec/vipsec-drain",
        "./usr/share/man/man1/vipsec.1.gz",
        "./usr/share/man/man1/vipsec-config-show.1.gz",
        "./usr/share/bash-completion/completions/vipsec",
        "./usr/share/zsh/vendor-completions/_vipsec",
        "./usr/share/fish/vendor_completions.d/vipsec.fish",
        "./usr/share/doc/vipsec/README.md",
        "./usr/share/doc/vipsec/production.md",
        "./usr/share/doc/vipsec/config-reference.md",
        "./usr/share/doc/vipsec/alerts.md",
        "./usr/share/doc/vipsec/CHANGELOG.md",
        "./usr/share/doc/vipsec/copyright",
        "./usr/share/doc/vipsec/examples/backend.toml",
        "./usr/share/doc/vipsec/examples/frontend.toml",
        "./usr/share/doc/vipsec/examples/single-node.toml",
        "./usr/share/doc/vipsec/examples/keepalived.conf.example",
        "./usr/share/doc/vipsec/examples/strongswan/frontend-swanctl.conf",
        "./usr/share/doc/vipsec/examples/strongswan/strongswan-libipsec.conf",
        "./usr/share/vipsec/prometheus/vipsec-alerts.yml",
        "./usr/share/vipsec/prometheus/vipsec-alerts.test.yml",
        "./usr/share/vipsec/grafana/vipsec-dashboard.json",
    ] {
        assert!(
            listing.lines().any(|l| l.ends_with(path)),
            "the package lacks {path}:\n{listing}"
        );
    }
    assert!(
        !listing.contains("./etc/"),
        "the package ships no /etc file: the operator writes the config"
    );
    let control = text(&run(Command::new("dpkg-deb").args(["-f"]).arg(&deb)).stdout);
    assert!(control.contains("Package: vipsec"), "{control}");
    assert!(control.contains("Depends: libc6"), "{control}");
    assert!(
        control.contains("Recommends: strongswan-charon"),
        "{control}"
    );

    // The maintainer scripts never start the agent and never take the guard out.
    let scripts = tempfile::tempdir().unwrap();
    run(Command::new("dpkg-deb")
        .arg("-e")
        .arg(&deb)
        .arg(scripts.path().join("DEBIAN")));
    for name in ["postinst", "prerm", "postrm"] {
        let script = std::fs::read_to_string(scripts.path().join("DEBIAN").join(name))
            .unwrap_or_else(|e| panic!("no {name}: {e}"));
        let code: Vec<&str> = script
            .lines()
            .map(str::trim)
            .filter(|l| !l.starts_with('#'))
            .collect();
        for forbidden in [
            "systemctl start",
            "systemctl enable",
            "systemctl restart",
            "try-restart",
            "guard remove",
            "ip rule del",
            "ip xfrm",
            "etcdctl",
        ] {
            assert!(
                !code.iter().any(|l| l.contains(forbidden)),
                "{name} runs {forbidden:?}:\n{script}"
            );
        }
    }

    let root = Root::fresh();
    std::fs::copy(&deb, root.path("/tmp/vipsec.deb")).unwrap();
    root.ok("dpkg -i /tmp/vipsec.deb");

    let version = text(&root.ok("vipsec --version").stdout);
    assert_eq!(
        version.trim(),
        format!("vipsec {}", env!("CARGO_PKG_VERSION"))
    );
    for example in ["backend.toml", "frontend.toml", "single-node.toml"] {
        let out = root.ok(&format!(
            "vipsec config check /usr/share/doc/vipsec/examples/{example}"
        ));
        assert!(text(&out.stdout).contains(": ok"), "{}", show(&out));
    }
    let out =
        root.ok("vipsec config show --effective /usr/share/doc/vipsec/examples/frontend.toml");
    assert!(text(&out.stdout).contains("failover.reconnect.jitter"));

    // The units as installed: their binary where the package puts it, and clean.
    let verify = root.sh(
        "systemd-analyze verify /lib/systemd/system/vipsec.service /lib/systemd/system/vipsec-guard.service",
    );
    assert!(
        verify.status.success() && text(&verify.stderr).trim().is_empty(),
        "systemd-analyze verify:\n{}",
        show(&verify)
    );
    for unit in ["vipsec.service", "vipsec-guard.service"] {
        let unit_text =
            std::fs::read_to_string(root.path("/lib/systemd/system").join(unit)).unwrap();
        assert!(
            unit_text.contains("/usr/bin/vipsec "),
            "{unit}:\n{unit_text}"
        );
        assert!(!unit_text.contains("/usr/local"), "{unit}:\n{unit_text}");
        // Installed, not enabled, not started: that is the operator's step.
        let enabled = root.sh(&format!("systemctl is-enabled {unit}"));
        assert_eq!(
            text(&enabled.stdout).trim(),
            "disabled",
            "{}",
            show(&enabled)
        );
    }
    for script in [
        "/usr/sbin/vipsec-handover",
        "/usr/lib/ocf/resource.d/vipsec/vipsec",
    ] {
        let body = std::fs::read_to_string(root.path(script)).unwrap();
        assert!(
            !body.contains("/usr/local"),
            "{script} still points to /usr/local"
        );
    }
    let keepalived = std::fs::read_to_string(
        root.path("/usr/share/doc/vipsec/examples/keepalived.conf.example"),
    )
    .unwrap();
    assert!(keepalived.contains("/usr/bin/vipsec health -q"));
    assert!(keepalived.contains("/usr/sbin/vipsec-notify"));

    let man = root.ok("MANPAGER=cat MANWIDTH=100 man vipsec");
    let page = text(&man.stdout);
    assert!(
        page.contains("VIPSEC_ENDPOINT") && page.contains("doctor"),
        "man vipsec:\n{page}"
    );
    root.ok("MANPAGER=cat man vipsec-config-show | grep -q effective");
    let etc = std::fs::metadata(root.path("/etc/vipsec")).unwrap();
    assert!(etc.is_dir());
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&etc.permissions()) & 0o777,
        0o750
    );

    // An upgrade in place (the same version again runs the upgrade path of every script).
    std::fs::write(root.path("/etc/vipsec/agent.toml"), "node = \"be1\"\n").unwrap();
    root.ok("dpkg -i /tmp/vipsec.deb");
    root.ok("vipsec config check /etc/vipsec/agent.toml");

    // Purge: the package's files go, the operator's config stays.
    root.ok("dpkg --purge vipsec");
    for gone in [
        "/usr/bin/vipsec",
        "/lib/systemd/system/vipsec.service",
        "/usr/share/man/man1/vipsec.1.gz",
        "/usr/share/doc/vipsec",
        "/usr/share/vipsec",
    ] {
        assert!(!root.path(gone).exists(), "{gone} outlived the purge");
    }
    assert!(root.path("/etc/vipsec/agent.toml").exists());
    // Without an operator file, purge leaves no directory behind either.
    std::fs::remove_file(root.path("/etc/vipsec/agent.toml")).unwrap();
    root.ok("dpkg -i /tmp/vipsec.deb && dpkg --purge vipsec");
    assert!(!root.path("/etc/vipsec").exists());
}
