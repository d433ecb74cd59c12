//! Detection of PVM (software nested virtualization behind `/dev/kvm`) and the compatibility
//! profile dinv applies on it.
//!
//! PVM runs the guest kernel deprivileged and emulates what traps. A guest sees the host's CPUID
//! directly, so features PVM cannot emulate are hidden with kernel command-line parameters,
//! and the guest is limited to one vCPU (the guest kernel's text-poke patch only avoids INT3
//! when a single CPU is online). See `guest-image/kernel/cmdline-pvm.txt` for what each
//! parameter is for and how it was measured.

use std::path::Path;

/// Where the kvm_pvm module shows up when loaded.
const PVM_MODULE_PATH: &str = "/sys/module/kvm_pvm";

/// The measured command-line profile (comment lines start with `#`).
const PVM_CMDLINE_FILE: &str = include_str!("../../guest-image/kernel/cmdline-pvm.txt");

/// Whether to apply the PVM compatibility profile.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PvmMode {
    /// Apply it when `/sys/module/kvm_pvm` exists.
    #[default]
    Auto,
    /// Always apply it.
    On,
    /// Never apply it.
    Off,
}

impl PvmMode {
    /// Resolves `Auto` against this host.
    pub fn enabled(self) -> bool {
        match self {
            PvmMode::Auto => host_is_pvm(),
            PvmMode::On => true,
            PvmMode::Off => false,
        }
    }
}

/// True when this host's `/dev/kvm` is provided by PVM.
pub fn host_is_pvm() -> bool {
    Path::new(PVM_MODULE_PATH).exists()
}

/// Kernel parameters added on PVM.
pub fn cmdline_additions() -> String {
    PVM_CMDLINE_FILE
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    #[test]
    fn profile_hides_the_features_pvm_cannot_emulate() {
        let params = super::cmdline_additions();
        assert!(params.contains("noxsave"), "{params}");
        assert!(params.contains("clearcpuid="), "{params}");
        assert!(!params.contains('#'));
    }
}
