//! The VM: KVM objects, guest memory, devices, vCPU threads and the device event loop.
//!
//! [`VmBuilder::build`] does all the set-up that can fail (so errors surface before anything
//! runs); [`Vm::run`] starts one thread per vCPU, runs the device event loop on the calling
//! thread, and returns the [`VmExit`] once the guest resets, faults, or a [`VmHandle`] stops it.

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{IoEventAddress, Kvm, VcpuFd, VmFd};
use vm_device::device_manager::IoManager;
use vm_device::resources::Resource;
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::Killable;

use boot::layout::{self, COM1_IRQ, COM1_PORT, I8042_DATA_PORT};
use boot::loader::{self, EntryPreference};
use boot::GuestMemoryMmap;
use devices::legacy::i8042::{I8042, I8042_PORT_COUNT};
use devices::legacy::serial::{SerialDevice, SERIAL_PORT_COUNT};
use devices::legacy::EventFdTrigger;
use devices::virtio::block::{Block, BlockConfig};
use devices::virtio::mmio::{MmioTransport, NOTIFY_REG_OFFSET};
use devices::virtio::net::{Net, NetConfig};
use devices::virtio::p9::{P9Config, P9Device};
use devices::virtio::vsock::{Vsock, VsockConfig};
use devices::virtio::SharedDevice;

use crate::console::{Console, ConsoleWriter};
use crate::pvm::PvmMode;
use crate::vcpu::{vcpu_kick_signal, ExitState, Vcpu};
use crate::snapshot::{self, MachineSpec, Snapshot, SnapshotError, SnapshotInfo};
use crate::{Error, Result, VmExit};

mod snap;

// Virtio devices get windows and IRQs in this order: disks, vsock, net, 9p shares.

/// Where KVM on Intel puts the real-mode TSS (three pages just below the BIOS area).
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
/// Kernel parameters every dinv guest gets.
///
/// `random.trust_cpu=on`: credit RDRAND/RDSEED so the kernel's CRNG is ready at boot. Without
/// it (6.1 `allnoconfig` leaves `RANDOM_TRUST_CPU` off) the CRNG waited for interrupt and jitter
/// entropy: measured 460–920 s on PVM, and every `getrandom()` (Go's crypto/rand: containerd,
/// dockerd) and every early `/dev/urandom` read stalled until then.
pub const BASE_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 pci=off nomodule io_delay=none i8042.noaux \
     i8042.nomux i8042.dumbkbd tsc=reliable random.trust_cpu=on";
/// How long `run` waits for vCPU threads to leave `KVM_RUN` after the VM ended.
const VCPU_STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// A raw disk image attached as virtio-blk (`/dev/vda`, `/dev/vdb`, … in attach order).
pub type DiskConfig = BlockConfig;

/// Builds a [`Vm`].
#[derive(Debug)]
pub struct VmBuilder {
    kernel: Option<PathBuf>,
    cmdline: String,
    vcpus: u8,
    memory: u64,
    disks: Vec<DiskConfig>,
    vsock: Option<VsockConfig>,
    net: Option<NetConfig>,
    shares: Vec<P9Config>,
    console: Console,
    entry: EntryPreference,
    pvm: PvmMode,
    profile: Option<PathBuf>,
    relocate_after: Option<Duration>,
    restore: Option<PathBuf>,
}

impl Default for VmBuilder {
    fn default() -> Self {
        Self {
            kernel: None,
            cmdline: String::new(),
            vcpus: 1,
            memory: 256 << 20,
            disks: Vec::new(),
            vsock: None,
            net: None,
            shares: Vec::new(),
            console: Console::Stdout,
            entry: EntryPreference::default(),
            pvm: PvmMode::Auto,
            profile: None,
            relocate_after: None,
            restore: None,
        }
    }
}

impl VmBuilder {
    /// The kernel image: an ELF `vmlinux` or a `bzImage`.
    pub fn kernel(mut self, path: impl Into<PathBuf>) -> Self {
        self.kernel = Some(path.into());
        self
    }

    /// Extra kernel parameters (appended after dinv's own).
    pub fn cmdline(mut self, extra: impl Into<String>) -> Self {
        self.cmdline = extra.into();
        self
    }

    /// Number of vCPUs (default 1).
    pub fn vcpus(mut self, n: u8) -> Self {
        self.vcpus = n;
        self
    }

    /// Guest memory in bytes (default 256 MiB).
    pub fn memory(mut self, bytes: u64) -> Self {
        self.memory = bytes;
        self
    }

    /// Attaches a disk; the first is `/dev/vda`.
    pub fn disk(mut self, disk: DiskConfig) -> Self {
        self.disks.push(disk);
        self
    }

    /// Adds a virtio-vsock device whose host side is a unix-socket muxer.
    pub fn vsock(mut self, vsock: VsockConfig) -> Self {
        self.vsock = Some(vsock);
        self
    }

    /// Adds a virtio-net device (the guest's `eth0`) over `net`'s backend, e.g. the netstack.
    pub fn net(mut self, net: NetConfig) -> Self {
        self.net = Some(net);
        self
    }

    /// Shares a host directory over virtio-9p under the mount tag in `share`.
    pub fn share(mut self, share: P9Config) -> Self {
        self.shares.push(share);
        self
    }

    /// Where the serial console goes (default: stdout).
    pub fn console(mut self, console: Console) -> Self {
        self.console = console;
        self
    }

    /// Preferred entry point for ELF kernels.
    pub fn entry(mut self, entry: EntryPreference) -> Self {
        self.entry = entry;
        self
    }

    /// Whether to apply the PVM compatibility profile (default: when the host is PVM).
    pub fn pvm(mut self, mode: PvmMode) -> Self {
        self.pvm = mode;
        self
    }

    /// Sample where the guest spends its (wall-clock) time and write the histogram to `path`
    /// (see [`crate::profile`]; a debugging aid).
    pub fn guest_profile(mut self, path: impl Into<PathBuf>) -> Self {
        self.profile = Some(path.into());
        self
    }

    /// Debugging the snapshot path: after `after`, pause the guest, capture its KVM state and
    /// go on in a fresh KVM VM restored from it (same memory and devices). A guest that keeps
    /// running normally proves that this host's KVM restores everything the guest relies on.
    pub fn relocate_after(mut self, after: Duration) -> Self {
        self.relocate_after = Some(after);
        self
    }

    /// Resume the snapshot in `dir` (see [`crate::snapshot`]) instead of booting: the rest of
    /// the configuration must describe the machine the snapshot was taken of, and writable
    /// disks must hold the snapshot's copies ([`crate::snapshot::install_disk`]). The kernel
    /// image is not read.
    pub fn restore_from(mut self, dir: impl Into<PathBuf>) -> Self {
        self.restore = Some(dir.into());
        self
    }

    /// Creates the VM, loads the kernel and wires the devices. Nothing runs yet.
    pub fn build(self) -> Result<Vm> {
        Vm::new(self)
    }

    /// Whether the snapshot in `dir` can resume on the machine this builder describes (with
    /// the writable disks as they are now); the reason if not. Nothing is created.
    pub fn check_snapshot(&self, dir: &std::path::Path) -> Result<()> {
        let snap = Snapshot::load(dir)?;
        let kvm = Kvm::new().map_err(Error::Kvm)?;
        let (_, spec) = self.plan(&kvm)?;
        spec.check(&snap.machine)?;
        Ok(())
    }

    /// The vCPU count after the PVM profile (one vCPU), and whether the profile applies.
    fn vcpu_count(&self) -> Result<(u8, bool)> {
        if self.vcpus == 0 {
            return Err(Error::Config("vCPU count must be at least 1".into()));
        }
        let pvm = self.pvm.enabled();
        Ok((if pvm { 1 } else { self.vcpus }, pvm))
    }

    /// The guest kernel command line and the machine description (what a snapshot of this VM
    /// records and a restore must match). Virtio devices get MMIO windows and IRQs in attach
    /// order: disks, vsock, net, 9p shares.
    fn plan(&self, kvm: &Kvm) -> Result<(String, MachineSpec)> {
        let (vcpu_count, pvm) = self.vcpu_count()?;
        let mut cmdline = String::from(BASE_CMDLINE);
        let mut devices = Vec::new();
        for disk in &self.disks {
            devices.push(
                snapshot::describe_disk(&disk.path, disk.read_only)
                    .map_err(|e| Error::Device(format!("disk {}: {e}", disk.path.display())))?,
            );
        }
        if let Some(vsock) = &self.vsock {
            devices.push(format!("vsock cid {}", vsock.guest_cid));
        }
        if self.net.is_some() {
            devices.push("net".to_string());
        }
        for share in &self.shares {
            // The tag is what the guest mounted; the host directory may differ between runs
            // (fids are saved as paths below it), its writability may not.
            let mode = if share.server.read_only { "ro" } else { "rw" };
            devices.push(format!("9p {} {mode}", share.tag));
        }
        for index in 0..devices.len() {
            let base = layout::virtio_mmio_window(index);
            let irq = layout::virtio_irq(index).ok_or(Error::TooManyDevices)?;
            cmdline.push_str(&format!(" virtio_mmio.device=4K@{base:#x}:{irq}"));
        }
        if pvm {
            cmdline.push(' ');
            cmdline.push_str(&crate::pvm::cmdline_additions());
        }
        if !self.cmdline.is_empty() {
            cmdline.push(' ');
            cmdline.push_str(&self.cmdline);
        }
        let mut cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(Error::Kvm)?;
        boot::cpu::filter_cpuid(&mut cpuid, 0, vcpu_count);
        let spec = MachineSpec {
            dinv: env!("CARGO_PKG_VERSION").to_string(),
            memory: self.memory,
            vcpus: vcpu_count,
            cmdline: cmdline.clone(),
            devices,
            cpuid: cpuid.as_slice().iter().map(|e| [e.function, e.index, e.eax, e.ebx, e.ecx, e.edx]).collect(),
        };
        Ok((cmdline, spec))
    }
}

/// Controls a running [`Vm`] from another thread.
#[derive(Clone, Debug)]
pub struct VmHandle {
    exit: Arc<ExitState>,
    requests: Arc<Mutex<Vec<snap::Request>>>,
}

impl VmHandle {
    /// Ends the VM now (no guest shutdown): `run` returns [`VmExit::Stopped`].
    pub fn stop(&self) {
        self.exit.finish(VmExit::Stopped);
    }

    /// Pauses the guest, writes a snapshot to the new directory `dir` (see
    /// [`crate::snapshot`]) and resumes it. Blocks until done; fails if the VM is not running.
    pub fn snapshot(&self, dir: impl Into<PathBuf>) -> std::result::Result<SnapshotInfo, SnapshotError> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(snap::Request { dir: dir.into(), reply: tx });
        // Wakes the run loop (the exit watcher only drains it).
        let _ = self.exit.evt.write(1);
        rx.recv()
            .unwrap_or_else(|_| Err(SnapshotError::Unsupported("the VM is not running".into())))
    }
}

/// Watches the i8042 reset line and the vCPUs' exit event.
struct ExitWatcher {
    reset: EventFd,
    exit: Arc<ExitState>,
}

impl MutEventSubscriber for ExitWatcher {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.fd() == self.reset.as_raw_fd() {
            let _ = self.reset.read();
            tracing::info!("guest requested a reset through the i8042");
            self.exit.finish(VmExit::Reset);
        } else {
            let _ = self.exit.evt.read();
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        for fd in [&self.reset, &self.exit.evt] {
            if let Err(e) = ops.add(Events::new(fd, EventSet::IN)) {
                tracing::error!("cannot watch exit events: {e}");
            }
        }
    }
}

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// How the devices' eventfds are tied to a KVM VM: irqfds (a device raises a guest interrupt
/// line) and ioeventfds (a guest queue notification wakes a device). Kept so that a fresh KVM
/// VM (a restore) is wired exactly like the first.
#[derive(Debug, Default)]
struct Wiring {
    irqfds: Vec<(EventFd, u32)>,
    ioevents: Vec<(EventFd, u64, u32)>,
}

impl Wiring {
    fn irqfd(&mut self, vm: &VmFd, evt: &EventFd, gsi: u32) -> Result<()> {
        vm.register_irqfd(evt, gsi).map_err(Error::Kvm)?;
        self.irqfds.push((evt.try_clone().map_err(Error::EventFd)?, gsi));
        Ok(())
    }

    fn ioevent(&mut self, vm: &VmFd, evt: &EventFd, addr: u64, datamatch: u32) -> Result<()> {
        vm.register_ioevent(evt, &IoEventAddress::Mmio(addr), datamatch).map_err(Error::Kvm)?;
        self.ioevents.push((evt.try_clone().map_err(Error::EventFd)?, addr, datamatch));
        Ok(())
    }

    /// Registers everything on `vm`, a fresh VM.
    fn apply(&self, vm: &VmFd) -> Result<()> {
        for (evt, gsi) in &self.irqfds {
            vm.register_irqfd(evt, *gsi).map_err(Error::Kvm)?;
        }
        for (evt, addr, datamatch) in &self.ioevents {
            vm.register_ioevent(evt, &IoEventAddress::Mmio(*addr), *datamatch).map_err(Error::Kvm)?;
        }
        Ok(())
    }
}

/// A KVM VM over `mem` with the in-kernel irqchip and PIT; no vCPUs, no devices yet.
fn create_machine(kvm: &Kvm, mem: &GuestMemoryMmap) -> Result<VmFd> {
    let vm = kvm.create_vm().map_err(Error::Kvm)?;
    for (slot, region) in mem.iter().enumerate() {
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(|e| Error::Memory(e.to_string()))?;
        let region = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: host as u64,
            flags: 0,
        };
        // SAFETY: the mapping belongs to `mem`, which `Vm` keeps alive for as long as the
        // VM fd exists, and slots do not overlap.
        unsafe { vm.set_user_memory_region(region) }.map_err(Error::Kvm)?;
    }
    if let Err(e) = vm.set_tss_address(KVM_TSS_ADDRESS) {
        tracing::debug!("KVM_SET_TSS_ADDR: {e} (not needed on this host)");
    }
    vm.create_irq_chip().map_err(Error::Kvm)?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(Error::Kvm)?;
    Ok(vm)
}

/// vCPU `id` of `count`, with its CPUID set (the rest of its state is the caller's).
fn create_vcpu(vm: &VmFd, supported: &CpuId, id: u8, count: u8) -> Result<VcpuFd> {
    let vcpu = vm.create_vcpu(u64::from(id)).map_err(Error::Kvm)?;
    let mut cpuid = supported.clone();
    boot::cpu::filter_cpuid(&mut cpuid, id, count);
    vcpu.set_cpuid2(&cpuid).map_err(Error::Kvm)?;
    Ok(vcpu)
}

/// A built VM, ready to [`run`](Vm::run).
pub struct Vm {
    kvm: Kvm,
    /// `None` only while a relocation replaces it.
    vm: Option<VmFd>,
    wiring: Wiring,
    cpuid: CpuId,
    vcpu_count: u8,
    relocate_after: Option<Duration>,
    spec: MachineSpec,
    /// Disk images in attach order, with whether each is read-only.
    disks: Vec<(PathBuf, bool)>,
    serial: Arc<Mutex<SerialDevice<ConsoleWriter>>>,
    requests: Arc<Mutex<Vec<snap::Request>>>,
    mem: GuestMemoryMmap,
    vcpus: Vec<VcpuFd>,
    io: Arc<IoManager>,
    events: EventManager<Subscriber>,
    exit: Arc<ExitState>,
    panicked: Arc<AtomicBool>,
    profile: Option<(PathBuf, Arc<crate::profile::Profile>)>,
    /// Also referenced by the I/O manager.
    transports: Vec<Arc<Mutex<MmioTransport>>>,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("vcpus", &self.vcpus.len())
            .finish_non_exhaustive()
    }
}

impl Vm {
    /// Starts describing a VM.
    pub fn builder() -> VmBuilder {
        VmBuilder::default()
    }

    /// A handle that can stop the VM while [`run`](Vm::run) blocks.
    pub fn handle(&self) -> VmHandle {
        VmHandle {
            exit: self.exit.clone(),
            requests: self.requests.clone(),
        }
    }

    fn new(cfg: VmBuilder) -> Result<Self> {
        let saved = match &cfg.restore {
            Some(dir) => Some(Snapshot::load(dir)?),
            None => None,
        };
        let kernel_path = match (&cfg.kernel, &saved) {
            (Some(k), _) => k.clone(),
            (None, Some(_)) => PathBuf::new(),
            (None, None) => return Err(Error::NoKernel),
        };
        let (vcpu_count, pvm) = cfg.vcpu_count()?;
        if pvm {
            tracing::info!("PVM detected: applying the PVM compatibility profile (kernel parameters, 1 vCPU)");
            if cfg.vcpus > 1 {
                tracing::warn!("PVM: using 1 vCPU instead of {}", cfg.vcpus);
            }
        }

        let kvm = Kvm::new().map_err(Error::Kvm)?;
        let (cmdline, spec) = cfg.plan(&kvm)?;
        if let Some(snap) = &saved {
            spec.check(&snap.machine)?;
        }
        let mem = match (&saved, &cfg.restore) {
            (Some(snap), Some(dir)) => {
                snapshot::map_memory(&dir.join(snapshot::MEMORY_FILE), &snap.regions)?
            }
            _ => GuestMemoryMmap::from_ranges(&layout::ram_regions(cfg.memory)?)
                .map_err(|e| Error::Memory(e.to_string()))?,
        };
        for region in mem.iter().filter(|_| saved.is_none()) {
            let host = mem
                .get_host_address(region.start_addr())
                .map_err(|e| Error::Memory(e.to_string()))?;
            // Back guest RAM with transparent huge pages where the host allows it: far fewer
            // host page faults while the guest first touches its memory (costly under PVM).
            // SAFETY: the range is exactly this region's live mapping; MADV_HUGEPAGE only
            // changes how the kernel backs it.
            let ret = unsafe {
                libc::madvise(host.cast(), region.len() as usize, libc::MADV_HUGEPAGE)
            };
            if ret != 0 {
                tracing::debug!("MADV_HUGEPAGE: {}", std::io::Error::last_os_error());
            }
        }
        let vm = create_machine(&kvm, &mem)?;
        let mut wiring = Wiring::default();

        let exit = Arc::new(ExitState::new().map_err(Error::EventFd)?);
        let panicked = Arc::new(AtomicBool::new(false));
        let mut io = IoManager::new();
        let mut events: EventManager<Subscriber> = EventManager::new().map_err(Error::EventManager)?;

        // Legacy devices: COM1 and the i8042 reset line.
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)?;
        wiring.irqfd(&vm, &serial_irq, COM1_IRQ)?;
        let console = ConsoleWriter::open(cfg.console, panicked.clone()).map_err(Error::Console)?;
        let serial = match &saved {
            Some(snap) => SerialDevice::from_snapshot(&snap.serial, EventFdTrigger::new(serial_irq), console)
                .map_err(|e| Error::Device(format!("serial: {e}")))?,
            None => SerialDevice::new(EventFdTrigger::new(serial_irq), console),
        };
        let serial = Arc::new(Mutex::new(serial));
        io.register_pio_resources(
            serial.clone(),
            &[Resource::PioAddressRange { base: COM1_PORT, size: SERIAL_PORT_COUNT }],
        )
        .map_err(|e| Error::Device(format!("serial: {e:?}")))?;
        let reset = EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)?;
        let i8042 = I8042::new(EventFdTrigger::new(reset.try_clone().map_err(Error::EventFd)?));
        io.register_pio_resources(
            Arc::new(Mutex::new(i8042)),
            &[Resource::PioAddressRange { base: I8042_DATA_PORT, size: I8042_PORT_COUNT }],
        )
        .map_err(|e| Error::Device(format!("i8042: {e:?}")))?;
        events.add_subscriber(Arc::new(Mutex::new(ExitWatcher { reset, exit: exit.clone() })));

        // Virtio devices, announced on the command line (see `plan`).
        let mut transports = Vec::new();
        let mut virtio: Vec<(SharedDevice, Subscriber)> = Vec::new();
        let mut disks = Vec::new();
        for disk in cfg.disks {
            let path = disk.path.clone();
            disks.push((path.clone(), disk.read_only));
            let block = Block::new(disk).map_err(|source| Error::Disk { path, source })?;
            let block = Arc::new(Mutex::new(block));
            virtio.push((block.clone(), block));
        }
        if let Some(vsock) = cfg.vsock {
            let vsock = Arc::new(Mutex::new(Vsock::new(vsock).map_err(|e| Error::Device(format!("vsock: {e}")))?));
            virtio.push((vsock.clone(), vsock));
        }
        if let Some(net) = cfg.net {
            let net = Arc::new(Mutex::new(Net::new(net).map_err(|e| Error::Device(format!("virtio-net: {e}")))?));
            virtio.push((net.clone(), net));
        }
        for share in cfg.shares {
            let tag = share.tag.clone();
            let dev = P9Device::new(share).map_err(|e| Error::Device(format!("virtio-9p {tag}: {e}")))?;
            let dev = Arc::new(Mutex::new(dev));
            virtio.push((dev.clone(), dev));
        }
        for (index, (device, subscriber)) in virtio.into_iter().enumerate() {
            let base = layout::virtio_mmio_window(index);
            let irq = layout::virtio_irq(index).ok_or(Error::TooManyDevices)?;
            let transport = MmioTransport::new(mem.clone(), device)
                .map_err(|e| Error::Device(format!("virtio-mmio: {e}")))?;
            wiring.irqfd(&vm, transport.interrupt_evt(), irq)?;
            for (queue, evt) in transport.queue_evts().iter().enumerate() {
                wiring.ioevent(&vm, evt, base + NOTIFY_REG_OFFSET, queue as u32)?;
            }
            let transport = Arc::new(Mutex::new(transport));
            io.register_mmio_resources(
                transport.clone(),
                &[Resource::MmioAddressRange { base, size: layout::VIRTIO_MMIO_SIZE }],
            )
            .map_err(|e| Error::Device(format!("virtio-mmio: {e:?}")))?;
            events.add_subscriber(subscriber);
            transports.push(transport);
        }

        let supported = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(Error::Kvm)?;
        let vcpus = match saved {
            Some(snap) => {
                let vcpus = snap::restore_machine(&vm, &supported, &transports, &snap)?;
                tracing::info!(
                    "resumed the snapshot in {} ({} vCPU(s), {} MiB)",
                    cfg.restore.as_deref().unwrap_or(std::path::Path::new("")).display(),
                    vcpu_count,
                    cfg.memory >> 20
                );
                vcpus
            }
            None => boot_vcpus(&vm, &mem, &supported, &kernel_path, cfg.entry, &cmdline, vcpu_count)?,
        };

        Ok(Vm {
            kvm,
            vm: Some(vm),
            wiring,
            cpuid: supported,
            vcpu_count,
            relocate_after: cfg.relocate_after,
            spec,
            disks,
            serial,
            requests: Arc::default(),
            mem,
            vcpus,
            io: Arc::new(io),
            events,
            exit,
            panicked,
            profile: cfg.profile.map(|p| (p, Arc::default())),
            transports,
        })
    }

    /// Runs the guest until it ends; returns why it ended.
    pub fn run(mut self) -> Result<VmExit> {
        extern "C" fn noop(_: i32, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
        vmm_sys_util::signal::register_signal_handler(vcpu_kick_signal(), noop)
            .map_err(|e| Error::Signal(e.to_string()))?;

        let fds: Vec<VcpuFd> = self.vcpus.drain(..).collect();
        let mut threads = self.spawn_vcpus(fds)?;

        let sampler_stop = Arc::new(AtomicBool::new(false));
        let sampler = match &self.profile {
            Some((path, profile)) => {
                use std::os::unix::thread::JoinHandleExt;
                let ids = threads.iter().map(|t| t.as_pthread_t()).collect();
                crate::profile::start_sampler(profile.clone(), path.clone(), ids, sampler_stop.clone())
                    .map_err(|e| tracing::error!("guest profiler not started: {e}"))
                    .ok()
            }
            None => None,
        };

        let started = Instant::now();
        let mut relocate_after = self.relocate_after.take();
        while !self.exit.stop.load(Ordering::SeqCst) {
            if let Err(e) = self.events.run_with_timeout(100) {
                tracing::error!("device event loop: {e:?}");
            }
            let requests = std::mem::take(&mut *self.requests.lock().unwrap_or_else(|e| e.into_inner()));
            for request in requests {
                let result = self.take_snapshot(&mut threads, &request.dir);
                match &result {
                    Ok(info) => tracing::info!("snapshot written to {}: {info}", request.dir.display()),
                    Err(e) => tracing::error!("snapshot to {} failed: {e}", request.dir.display()),
                }
                let _ = request.reply.send(result);
            }
            if relocate_after.is_some_and(|after| started.elapsed() >= after) {
                relocate_after = None;
                match self.relocate(&mut threads) {
                    Ok(took) => tracing::info!("guest moved into a fresh KVM VM from its captured state in {took:?}"),
                    Err(e) => self.exit.finish(VmExit::Fault {
                        vcpu: 0,
                        reason: "relocation into a fresh KVM VM failed".into(),
                        detail: e.to_string(),
                    }),
                }
            }
        }
        sampler_stop.store(true, Ordering::SeqCst);
        if let Some(sampler) = sampler {
            let _ = sampler.join();
        }

        drop(join_vcpus(threads));

        if let Some((path, profile)) = &self.profile {
            match profile.write(path) {
                Ok(()) => tracing::info!("guest profile written to {}", path.display()),
                Err(e) => tracing::error!("cannot write the guest profile {}: {e}", path.display()),
            }
        }

        let reason = self
            .exit
            .reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .unwrap_or(VmExit::Stopped);
        Ok(match reason {
            VmExit::Reset if self.panicked.load(Ordering::SeqCst) => VmExit::Panic,
            other => other,
        })
    }

    fn spawn_vcpus(&self, fds: Vec<VcpuFd>) -> Result<Vec<JoinHandle<Option<VcpuFd>>>> {
        let mut threads = Vec::with_capacity(fds.len());
        for (id, fd) in fds.into_iter().enumerate() {
            let vcpu = Vcpu {
                id: id as u8,
                fd,
                io: self.io.clone(),
                mem: self.mem.clone(),
                exit: self.exit.clone(),
                profile: self.profile.as_ref().map(|(_, p)| p.clone()),
            };
            let exit = self.exit.clone();
            let thread = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || {
                    // A vCPU thread that dies must end the VM, not leave it hung.
                    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| vcpu.run())) {
                        Ok(fd) => Some(fd),
                        Err(_) => {
                            exit.finish(VmExit::Fault {
                                vcpu: id as u8,
                                reason: "vCPU thread panicked".into(),
                                detail: String::new(),
                            });
                            None
                        }
                    }
                })
                .map_err(Error::Thread)?;
            threads.push(thread);
        }
        Ok(threads)
    }

    /// Guest memory (for embedding programs and tests).
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }
}

/// Loads the kernel, writes the boot information and creates the vCPUs in their boot state.
fn boot_vcpus(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    supported: &CpuId,
    kernel_path: &std::path::Path,
    entry: EntryPreference,
    cmdline: &str,
    vcpu_count: u8,
) -> Result<Vec<VcpuFd>> {
    let kernel = loader::load_kernel(mem, kernel_path, entry)?;
    let cmdline = loader::cmdline_from_str(cmdline)?;
    loader::write_boot_info(mem, &kernel, &cmdline)?;
    boot::mptable::write_mptable(mem, vcpu_count)?;
    tracing::info!(
        "kernel {} entry {:#x} ({:?}), {} vCPU(s), {} MiB",
        kernel_path.display(),
        kernel.entry.raw_value(),
        kernel.protocol,
        vcpu_count,
        mem.iter().map(|r| r.len()).sum::<u64>() >> 20
    );
    let mut vcpus = Vec::with_capacity(vcpu_count as usize);
    for id in 0..vcpu_count {
        let vcpu = create_vcpu(vm, supported, id, vcpu_count)?;
        let entries = boot::cpu::boot_msrs();
        let msrs = Msrs::from_entries(&entries).map_err(|e| Error::Device(format!("MSRs: {e:?}")))?;
        match vcpu.set_msrs(&msrs) {
            Ok(n) if n == entries.len() => {}
            Ok(n) => tracing::debug!("vcpu{id}: KVM took {n} of {} boot MSRs", entries.len()),
            Err(e) => tracing::debug!("vcpu{id}: KVM_SET_MSRS: {e}"),
        }
        vcpu.set_fpu(&boot::cpu::boot_fpu()).map_err(Error::Kvm)?;
        let mut lapic = vcpu.get_lapic().map_err(Error::Kvm)?;
        boot::cpu::set_lint(&mut lapic);
        vcpu.set_lapic(&lapic).map_err(Error::Kvm)?;
        if id == 0 {
            let sregs = vcpu.get_sregs().map_err(Error::Kvm)?;
            let sregs = boot::cpu::boot_sregs(mem, kernel.protocol, sregs)?;
            vcpu.set_sregs(&sregs).map_err(Error::Kvm)?;
            vcpu.set_regs(&boot::cpu::boot_regs(kernel.protocol, kernel.entry)).map_err(Error::Kvm)?;
        }
        vcpus.push(vcpu);
    }
    Ok(vcpus)
}

/// Kicks vCPU threads until every one has left `KVM_RUN` (a kick can race with entry, so it is
/// repeated), then joins them; returns the vCPUs of the threads that ended in time.
fn join_vcpus(threads: Vec<JoinHandle<Option<VcpuFd>>>) -> Vec<VcpuFd> {
    let deadline = Instant::now() + VCPU_STOP_TIMEOUT;
    while threads.iter().any(|t| !t.is_finished()) && Instant::now() < deadline {
        for t in threads.iter().filter(|t| !t.is_finished()) {
            let _ = t.kill(vcpu_kick_signal());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut fds = Vec::with_capacity(threads.len());
    for t in threads {
        if t.is_finished() {
            fds.extend(t.join().ok().flatten());
        } else {
            tracing::warn!("a vCPU thread did not stop in time; leaving it behind");
        }
    }
    fds
}
