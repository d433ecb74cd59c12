use super::*;
use std::io::Write;

fn image(bytes: &[(usize, &[u8])], len: usize) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.as_file().set_len(len as u64).unwrap();
    for (off, data) in bytes {
        use std::io::{Seek, SeekFrom};
        f.as_file_mut().seek(SeekFrom::Start(*off as u64)).unwrap();
        f.write_all(data).unwrap();
    }
    f
}

#[test]
fn sparse_file_is_blank() {
    let f = image(&[], 4 << 20);
    assert_eq!(probe(f.path()).unwrap(), DiskState::Blank);
}

#[test]
fn ext_magic_detected() {
    let f = image(&[(EXT_MAGIC_OFFSET, &[0x53, 0xEF])], 4 << 20);
    assert_eq!(probe(f.path()).unwrap(), DiskState::Ext4);
    // Wrong byte order is not ext.
    let f = image(&[(EXT_MAGIC_OFFSET, &[0xEF, 0x53])], 4 << 20);
    assert_eq!(probe(f.path()).unwrap(), DiskState::Foreign);
}

#[test]
fn other_data_is_foreign() {
    // An MBR boot signature, an XFS superblock, data near the end of the probe area.
    for (off, data) in [
        (510usize, &b"\x55\xAA"[..]),
        (0, b"XFSB"),
        (PROBE_LEN - 1, b"x"),
    ] {
        let f = image(&[(off, data)], 4 << 20);
        assert_eq!(probe(f.path()).unwrap(), DiskState::Foreign, "offset {off}");
    }
    // Data beyond the probe area does not count.
    let f = image(&[(PROBE_LEN, b"x")], 4 << 20);
    assert_eq!(probe(f.path()).unwrap(), DiskState::Blank);
}

#[test]
fn short_devices() {
    assert_eq!(classify(&[]), DiskState::Blank);
    assert_eq!(classify(&[0; 16]), DiskState::Blank);
    let f = image(&[], 100);
    assert_eq!(probe(f.path()).unwrap(), DiskState::Blank);
}

#[test]
fn real_mkfs_is_detected() {
    // The shared arguments on the test host's mkfs.ext4 (e2fsprogs is a CI prerequisite).
    assert!(Path::new("/sbin/mkfs.ext4").exists(), "install e2fsprogs");
    let f = image(&[], 8 << 20);
    format(f.path(), "dinvtest").unwrap();
    assert_eq!(probe(f.path()).unwrap(), DiskState::Ext4);
}
