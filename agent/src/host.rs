//! What this machine's kernel offers for IPsec, read from /proc and /sys. A leaf: the
//! config's defaults, the doctor and the runtime all ask it, and it asks nothing of them.

use std::path::Path;

/// What the kernel shows of XFRM and ESP.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelFacts {
    /// `/proc/net/xfrm_stat` exists: the kernel has XFRM.
    pub xfrm: bool,
    /// esp4 is loaded or built in (`/sys/module/esp4`, or its symbols in `/proc/kallsyms`).
    pub esp_loaded: bool,
    /// esp4 exists as a module the kernel can load on demand.
    pub esp_module: bool,
}

impl KernelFacts {
    pub fn has_esp(&self) -> bool {
        self.esp_loaded || self.esp_module
    }
}

pub fn probe() -> KernelFacts {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let module_dir = Path::new("/lib/modules")
        .join(release.trim())
        .join("kernel/net/ipv4");
    let esp_module = std::fs::read_dir(&module_dir)
        .map(|d| {
            d.flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("esp4.ko"))
        })
        .unwrap_or(false);
    // A built-in esp4 without parameters has no /sys/module entry; its symbols show.
    let esp_loaded = Path::new("/sys/module/esp4").exists()
        || std::fs::read_to_string("/proc/kallsyms")
            .map(|s| {
                s.lines()
                    .any(|l| l.ends_with(" esp_input") || l.contains(" esp_input\t"))
            })
            .unwrap_or(false);
    KernelFacts {
        xfrm: Path::new("/proc/net/xfrm_stat").exists(),
        esp_loaded,
        esp_module,
    }
}
