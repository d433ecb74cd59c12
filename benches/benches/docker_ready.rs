//! Time from exec to a docker API that answers, dinv vs QEMU booting the same kernel and rootfs
//! the way the original DinV did: dockerd on TCP 2375 in the guest, reached through
//! `-netdev user,hostfwd=...`, readiness = `GET /_ping` answers `OK`.
//!
//! Both guests get a fresh sparse docker disk (first boot: the agent formats it), 512 MiB,
//! 1 vCPU and the same kernel parameters (dinv's base line + the PVM profile on PVM hosts).
//! dinv is measured twice: a boot that also saves a snapshot (`DINV_SNAPSHOT`), and a start
//! with a new docker disk that resumes that snapshot — what every start after the first does.
//! `scripts/bench docker_ready`; `DINV_BENCH_RUNS` repeats (default 1: ~10 min per boot on PVM).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use dinv_tests::{artifact, Running};

const MEMORY: &str = "512M";
const READY_TIMEOUT: Duration = Duration::from_secs(40 * 60);

fn sparse(path: &Path, size: u64) {
    std::fs::File::create(path).and_then(|f| f.set_len(size)).expect("docker disk");
}

fn ping(port: u16) -> bool {
    let Ok(mut c) = TcpStream::connect(("127.0.0.1", port)) else { return false };
    let _ = c.set_read_timeout(Some(Duration::from_secs(30)));
    if c.write_all(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n").is_err() {
        return false;
    }
    let mut resp = String::new();
    let _ = c.read_to_string(&mut resp);
    resp.starts_with("HTTP/1.") && resp.contains(" 200 ") && resp.ends_with("OK")
}

fn dinv_run(dir: &Path, snapshot: &Path, name: &str) -> f64 {
    let sock = dir.join(format!("{name}.sock"));
    let img = dir.join(format!("{name}-docker.img"));
    let mut vm = Running::spawn([
        "--kernel".as_ref(),
        artifact("DINV_KERNEL").as_os_str(),
        "--rootfs".as_ref(),
        artifact("DINV_ROOTFS").as_os_str(),
        "--docker-image".as_ref(),
        img.as_os_str(),
        "--docker-size".as_ref(),
        "8G".as_ref(),
        "--docker-sock".as_ref(),
        sock.as_os_str(),
        "--memory".as_ref(),
        MEMORY.as_ref(),
        "--snapshot".as_ref(),
        snapshot.as_os_str(),
    ]);
    vm.wait_for("docker API ready", READY_TIMEOUT);
    // The API must answer, not just be announced.
    let out = std::process::Command::new("docker")
        .env("DOCKER_HOST", format!("unix://{}", sock.display()))
        .args(["version", "--format", "{{.Server.Version}}"])
        .output()
        .expect("docker CLI");
    assert!(out.status.success(), "{name}: docker version failed: {out:?}\n{}", vm.tail());
    let secs = vm.elapsed().as_secs_f64();
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(vm.pid() as i32, libc::SIGTERM) };
    vm.wait_exit(Duration::from_secs(300));
    secs
}

fn qemu_run(dir: &Path) -> f64 {
    let img = dir.join("qemu-docker.img");
    sparse(&img, 8 << 30);
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let append = format!(
        "{} root=/dev/vda ro init=/sbin/dinv-agent dinv.docker_disk=/dev/vdb dinv.docker_tcp=2375 \
         dinv.ip=10.0.2.15/24 dinv.gw=10.0.2.2 dinv.dns=10.0.2.3",
        dinv_benches::dinv_params()
    );
    let mut args =
        dinv_benches::qemu_microvm(&artifact("DINV_KERNEL"), MEMORY, &append, &artifact("DINV_ROOTFS"));
    args.extend([
        "-drive".to_string(),
        format!("id=docker,file={},format=raw,if=none", img.display()),
        "-device".to_string(),
        "virtio-blk-device,drive=docker".to_string(),
        "-netdev".to_string(),
        format!("user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:2375"),
        "-device".to_string(),
        "virtio-net-device,netdev=n0".to_string(),
    ]);
    let mut vm = Running::spawn_program("qemu-system-x86_64", args);
    let deadline = Instant::now() + READY_TIMEOUT;
    while !ping(port) {
        assert!(Instant::now() < deadline, "QEMU guest: no /_ping within {READY_TIMEOUT:?}\n{}", vm.tail());
        std::thread::sleep(Duration::from_millis(500));
    }
    let secs = vm.elapsed().as_secs_f64();
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(vm.pid() as i32, libc::SIGKILL) };
    vm.wait_exit(Duration::from_secs(60));
    secs
}

fn main() {
    let runs: usize = std::env::var("DINV_BENCH_RUNS").ok().and_then(|s| s.parse().ok()).unwrap_or(1);
    let mut ours = Vec::new();
    let mut resumed = Vec::new();
    let mut qemu = Vec::new();
    for run in 0..runs {
        let dir = tempfile::tempdir().expect("tempdir");
        let snapshot = dir.path().join("snapshot");
        eprintln!("run {}/{runs}: dinv, boot + snapshot", run + 1);
        ours.push(dinv_run(dir.path(), &snapshot, "boot"));
        eprintln!("run {}/{runs}: dinv, resume", run + 1);
        resumed.push(dinv_run(dir.path(), &snapshot, "resume"));
        eprintln!("run {}/{runs}: qemu", run + 1);
        qemu.push(qemu_run(dir.path()));
    }
    let avg = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    println!("docker-ready benchmark ({runs} run(s), {MEMORY} guest, 1 vCPU, same kernel + rootfs, fresh docker disk)");
    println!("{:<22} {:>22} {:>10}", "vmm", "exec->/_ping OK (s)", "vs qemu");
    let row = |name: &str, v: &[f64]| println!("{name:<22} {:>22.1} {:>10.3}", avg(v), avg(v) / avg(&qemu));
    row("dinv boot (+snapshot)", &ours);
    row("dinv resumed snapshot", &resumed);
    row("qemu", &qemu);
    println!(
        "ratio dinv/qemu: boot {:.2}, resumed {:.3} (target <= 0.50)",
        avg(&ours) / avg(&qemu),
        avg(&resumed) / avg(&qemu)
    );
}
