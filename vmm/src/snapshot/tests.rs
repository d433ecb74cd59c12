use std::os::unix::fs::MetadataExt;

use vm_memory::Bytes;

use super::*;

fn spec() -> MachineSpec {
    MachineSpec {
        dinv: "1.0".into(),
        memory: 64 << 20,
        vcpus: 1,
        cmdline: "console=ttyS0".into(),
        devices: vec!["blk rw 1024 bytes".into()],
        cpuid: vec![[0, 0, 1, 2, 3, 4]],
    }
}

#[test]
fn memory_round_trips_with_holes_and_stays_private() {
    let dir = tempfile::tempdir().unwrap();
    let layout = [(GuestAddress(0), 1 << 20), (GuestAddress(4 << 20), 2 << 20)];
    let mem = GuestMemoryMmap::from_ranges(&layout).unwrap();
    mem.write_obj(0xdead_beef_u32, GuestAddress(0x1234)).unwrap();
    mem.write_obj(0x1122_3344_u32, GuestAddress((6 << 20) - 4)).unwrap();
    let path = dir.path().join(MEMORY_FILE);
    let (regions, data) = write_memory(&mem, &path).unwrap();
    assert_eq!(data, 2 * CHUNK as u64);
    assert_eq!(regions, vec![(0, 1 << 20), (4 << 20, 2 << 20)]);
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.len(), 3 << 20);
    assert!(meta.blocks() * 512 <= 2 * CHUNK as u64 + 8192, "zero chunks were written: {} blocks", meta.blocks());

    let restored = map_memory(&path, &regions).unwrap();
    assert_eq!(restored.read_obj::<u32>(GuestAddress(0x1234)).unwrap(), 0xdead_beef);
    assert_eq!(restored.read_obj::<u32>(GuestAddress((6 << 20) - 4)).unwrap(), 0x1122_3344);
    assert_eq!(restored.read_obj::<u64>(GuestAddress(5 << 20)).unwrap(), 0);
    // Copy-on-write: the guest's writes never reach the snapshot.
    restored.write_obj(7u32, GuestAddress(0x1234)).unwrap();
    let again = map_memory(&path, &regions).unwrap();
    assert_eq!(again.read_obj::<u32>(GuestAddress(0x1234)).unwrap(), 0xdead_beef);
}

#[test]
fn memory_file_of_the_wrong_size_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(MEMORY_FILE);
    std::fs::write(&path, [0u8; 4096]).unwrap();
    let err = map_memory(&path, &[(0, 8192)]).unwrap_err();
    assert!(matches!(err, SnapshotError::Format { .. }), "{err}");
}

#[test]
fn sparse_copy_keeps_data_and_holes() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    let f = File::create(&src).unwrap();
    f.set_len(64 << 20).unwrap();
    f.write_all_at(b"head", 0).unwrap();
    f.write_all_at(&[7u8; 100_000], 32 << 20).unwrap();
    f.write_all_at(b"tail", (64 << 20) - 4).unwrap();
    drop(f);
    let dst = dir.path().join("dst.img");
    copy_sparse(&src, &dst).unwrap();
    let (a, b) = (std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
    assert!(a == b, "contents differ");
    assert!(std::fs::metadata(&dst).unwrap().blocks() * 512 < 4 << 20, "holes were filled");
    // Never over an existing file.
    assert_eq!(copy_sparse(&src, &dst).unwrap_err().kind(), io::ErrorKind::AlreadyExists);
}

#[test]
fn state_file_checks_its_format_version() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(STATE_FILE);
    std::fs::write(&path, bincode::serialize(&(FORMAT_VERSION + 1)).unwrap()).unwrap();
    let err = Snapshot::load(dir.path()).unwrap_err();
    assert!(err.to_string().contains("format"), "{err}");
    std::fs::write(&path, b"garbage").unwrap();
    assert!(matches!(Snapshot::load(dir.path()).unwrap_err(), SnapshotError::Format { .. }));
    // Truncated: the version is right, the rest is missing.
    std::fs::write(&path, bincode::serialize(&FORMAT_VERSION).unwrap()).unwrap();
    assert!(matches!(Snapshot::load(dir.path()).unwrap_err(), SnapshotError::Format { .. }));
    assert!(matches!(Snapshot::load(&dir.path().join("none")).unwrap_err(), SnapshotError::Io { .. }));
    // A length prefix claiming 2^60 elements is refused, not allocated.
    let mut huge = bincode::serialize(&FORMAT_VERSION).unwrap();
    huge.extend_from_slice(&(1u64 << 60).to_le_bytes());
    std::fs::write(&path, huge).unwrap();
    assert!(matches!(Snapshot::load(dir.path()).unwrap_err(), SnapshotError::Format { .. }));
}

#[test]
fn state_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let snap = Snapshot {
        version: FORMAT_VERSION,
        machine: spec(),
        regions: vec![(0, 64 << 20)],
        vcpus: Vec::new(),
        vm: VmState {
            irqchips: [kvm_bindings::kvm_irqchip::default(); 3],
            pit: kvm_bindings::kvm_pit_state2::default(),
            clock: kvm_bindings::kvm_clock_data { clock: 42, ..Default::default() },
        },
        serial: SerialSnapshot { line_control: 3, in_buffer: vec![1, 2], ..Default::default() },
        transports: Vec::new(),
        saved_disks: vec![1, 2],
    };
    snap.store(dir.path()).unwrap();
    let back = Snapshot::load(dir.path()).unwrap();
    assert_eq!(back.machine, snap.machine);
    assert_eq!((back.regions, back.saved_disks, back.vm.clock.clock), (snap.regions, snap.saved_disks, 42));
    assert_eq!(back.serial, snap.serial);
}

#[test]
fn machine_spec_names_the_first_difference() {
    let ours = spec();
    assert!(ours.check(&spec()).is_ok());
    type Change = fn(&mut MachineSpec);
    let cases: [(&str, Change); 6] = [
        ("dinv version", |s| s.dinv = "0.9".into()),
        ("memory size", |s| s.memory *= 2),
        ("vCPU count", |s| s.vcpus = 2),
        ("kernel command line", |s| s.cmdline.push_str(" quiet")),
        ("device list", |s| s.devices.push("vsock".into())),
        ("host CPU", |s| s.cpuid[0][2] ^= 1),
    ];
    for (what, change) in cases {
        let mut theirs = spec();
        change(&mut theirs);
        let err = ours.check(&theirs).unwrap_err();
        assert!(err.to_string().contains(what), "{what}: {err}");
    }
}

#[test]
fn read_only_disks_are_identified_by_size_and_mtime() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("root.img");
    std::fs::write(&path, [0u8; 512]).unwrap();
    let ro = describe_disk(&path, true).unwrap();
    assert!(ro.starts_with("blk ro 512 bytes mtime "), "{ro}");
    assert_eq!(describe_disk(&path, false).unwrap(), "blk rw 512 bytes");
    let earlier = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
    File::options().write(true).open(&path).unwrap().set_modified(earlier).unwrap();
    assert_ne!(describe_disk(&path, true).unwrap(), ro, "a rebuilt image must not match");
}
