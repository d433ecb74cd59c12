//! The Dockerfile stays in step with the repository: every path it copies from the build
//! context exists, every script it runs exists and is executable, it builds with the same
//! scripts CI uses, and the runtime image has what the README promises (dinv as the command,
//! the docker CLI, the four volumes, a HEALTHCHECK that runs `dinv health`).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// Instructions with line continuations joined.
fn instructions(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        let t = line.trim();
        if t.starts_with('#') || (t.is_empty() && cur.is_empty()) {
            continue;
        }
        if let Some(body) = t.strip_suffix('\\') {
            cur.push_str(body);
            cur.push(' ');
        } else {
            cur.push_str(t);
            out.push(std::mem::take(&mut cur));
        }
    }
    out
}

#[test]
fn dockerfile_copies_and_runs_only_what_exists() {
    let text = std::fs::read_to_string(repo().join("Dockerfile")).expect("Dockerfile at the repository root");
    let ins = instructions(&text);
    let mut copied = 0;
    for i in &ins {
        let words: Vec<&str> = i.split_whitespace().collect();
        if words.first() != Some(&"COPY") || words.iter().any(|w| w.starts_with("--from")) {
            continue;
        }
        let sources = &words[1..words.len() - 1];
        for src in sources.iter().filter(|w| !w.starts_with("--")) {
            let p = repo().join(src);
            assert!(p.exists(), "Dockerfile copies {src}, which does not exist");
            copied += 1;
        }
    }
    assert!(copied >= 5, "found only {copied} COPY sources");

    // Scripts it runs: the ones CI runs, present and executable.
    for script in ["guest-image/kernel/build.sh", "guest-image/rootfs/build.sh"] {
        assert!(text.contains(script), "the Dockerfile must build with {script} (one recipe with CI)");
        let mode = std::fs::metadata(repo().join(script)).unwrap().permissions().mode();
        assert!(mode & 0o111 != 0, "{script} is not executable");
        assert!(
            std::fs::read_to_string(repo().join("scripts/setup")).unwrap().contains(script),
            "CI (scripts/setup) no longer runs {script}"
        );
    }
    // Every workspace member's directory is copied (the build compiles the workspace's lockfile).
    let manifest = std::fs::read_to_string(repo().join("Cargo.toml")).unwrap();
    let members = manifest.split("members").nth(1).and_then(|s| s.split(']').next()).unwrap();
    for m in members.split('"').skip(1).step_by(2) {
        let top = m.split('/').next().unwrap();
        assert!(
            ins.iter().any(|i| i.starts_with("COPY ") && i.split_whitespace().nth(1) == Some(top)),
            "workspace member {m} is not copied into the build stage"
        );
    }

    let last_from = ins.iter().rposition(|i| i.starts_with("FROM ")).unwrap();
    let runtime = &ins[last_from..];
    assert!(runtime.iter().any(|i| i == r#"CMD ["dinv"]"#), "runtime command must be dinv");
    assert!(runtime.iter().any(|i| i.starts_with("RUN ") && i.contains("docker-cli")), "docker CLI missing");
    assert!(runtime.iter().any(|i| i.starts_with("VOLUME") && ["/docker", "/volume", "/certs", "/snapshot"].iter().all(|v| i.contains(v))));
    assert!(runtime.iter().any(|i| i.starts_with("HEALTHCHECK") && i.contains(r#""dinv", "health""#)));
}

#[test]
fn dinv_health_fails_without_a_docker_api() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(dinv_tests::dinv_bin())
        .args(["health", "--docker-sock"])
        .arg(dir.path().join("none.sock"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("not ready"), "{out:?}");
}
