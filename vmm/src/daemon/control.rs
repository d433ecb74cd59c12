//! The host end of the guest agent's control channel.
//!
//! The agent connects to host vsock port [`CONTROL_PORT`]; the vsock muxer turns that into a
//! connection to a unix socket the daemon listens on. The protocol is newline-delimited text:
//!
//! | from the guest | meaning |
//! |---|---|
//! | `hello dinv-agent <version>` | the agent is up |
//! | `ready` | dockerd answers `GET /_ping` |
//! | `stopping` | the agent began shutting down |
//! | `error <text>` | something failed in the guest (e.g. dockerd exited) |
//!
//! | from the host | meaning |
//! |---|---|
//! | `time <secs>.<nanos>` | set the guest's wall clock (sent on every connection: a guest resumed from a snapshot wakes up in the past) |
//! | `seed <64 hex digits>` | credit 32 bytes of host randomness and reseed (guests resumed from one snapshot must not share random streams) |
//! | `shutdown` | stop dockerd (within `dinv.shutdown_timeout`), sync, unmount, power off |

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};

/// Host vsock port the agent connects to.
pub const CONTROL_PORT: u32 = 1024;
/// Guest vsock port the agent serves the docker API on.
pub const DOCKER_PORT: u32 = 2375;

/// A message from the agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AgentEvent {
    /// `hello …`
    Hello(String),
    /// `ready`
    Ready,
    /// `stopping`
    Stopping,
    /// `error …`
    Error(String),
    /// Anything else (logged, ignored).
    Unknown(String),
}

impl AgentEvent {
    /// Parses one line.
    pub fn parse(line: &str) -> AgentEvent {
        let line = line.trim_end_matches(['\r', '\n']);
        let (word, rest) = line.split_once(' ').unwrap_or((line, ""));
        match word {
            "hello" => AgentEvent::Hello(rest.to_string()),
            "ready" => AgentEvent::Ready,
            "stopping" => AgentEvent::Stopping,
            "error" => AgentEvent::Error(rest.to_string()),
            _ => AgentEvent::Unknown(line.to_string()),
        }
    }
}

/// The current connection to the agent, if any (the agent reconnects after a drop).
#[derive(Clone, Debug, Default)]
pub struct AgentLink {
    stream: Arc<Mutex<Option<UnixStream>>>,
}

impl AgentLink {
    /// Asks the agent to shut the guest down. False if no agent is connected.
    pub fn request_shutdown(&self) -> bool {
        let mut guard = self.stream.lock().unwrap_or_else(|e| e.into_inner());
        match guard.as_mut().map(|s| s.write_all(b"shutdown\n")) {
            Some(Ok(())) => true,
            Some(Err(e)) => {
                tracing::warn!("cannot send shutdown to the guest agent: {e}");
                *guard = None;
                false
            }
            None => false,
        }
    }

    /// Accepts agent connections on `listener` forever (run on its own thread), passing each
    /// event to `on_event`.
    pub fn serve(&self, listener: UnixListener, mut on_event: impl FnMut(AgentEvent)) {
        for conn in listener.incoming() {
            let conn = match conn {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("control channel accept: {e}");
                    continue;
                }
            };
            let reader = match conn.try_clone() {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!("control channel: {e}");
                    continue;
                }
            };
            let mut conn = conn;
            if let Err(e) = conn.write_all(greeting().as_bytes()) {
                tracing::warn!("control channel: cannot send the time and seed: {e}");
            }
            *self.stream.lock().unwrap_or_else(|e| e.into_inner()) = Some(conn);
            for line in BufReader::new(reader).lines() {
                match line {
                    Ok(line) => on_event(AgentEvent::parse(&line)),
                    Err(e) => {
                        tracing::warn!("control channel read: {e}");
                        break;
                    }
                }
            }
            tracing::debug!("guest agent disconnected from the control channel");
        }
    }
}

/// What the host tells every new agent connection: its wall clock and a fresh seed.
fn greeting() -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let mut seed = [0u8; 32];
    // SAFETY: getrandom writes at most `seed.len()` bytes into `seed`.
    let n = unsafe { libc::getrandom(seed.as_mut_ptr().cast(), seed.len(), 0) };
    let mut out = format!("time {}.{:09}\n", now.as_secs(), now.subsec_nanos());
    if usize::try_from(n).ok() == Some(seed.len()) {
        out.push_str("seed ");
        for b in seed {
            out.push_str(&format!("{b:02x}"));
        }
        out.push('\n');
    } else {
        tracing::warn!("getrandom: {}", std::io::Error::last_os_error());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_agent_lines() {
        assert_eq!(AgentEvent::parse("hello dinv-agent 0.1.0\n"), AgentEvent::Hello("dinv-agent 0.1.0".into()));
        assert_eq!(AgentEvent::parse("ready"), AgentEvent::Ready);
        assert_eq!(AgentEvent::parse("stopping\r\n"), AgentEvent::Stopping);
        assert_eq!(AgentEvent::parse("error dockerd exited 1"), AgentEvent::Error("dockerd exited 1".into()));
        assert_eq!(AgentEvent::parse("bogus x"), AgentEvent::Unknown("bogus x".into()));
        assert_eq!(AgentEvent::parse(""), AgentEvent::Unknown(String::new()));
    }

    #[test]
    fn shutdown_reaches_the_connected_agent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let link = AgentLink::default();
        assert!(!link.request_shutdown(), "no agent yet");
        let server = link.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || server.serve(listener, move |ev| tx.send(ev).unwrap()));
        let mut agent = UnixStream::connect(&path).unwrap();
        agent.write_all(b"hello dinv-agent test\nready\n").unwrap();
        assert_eq!(rx.recv().unwrap(), AgentEvent::Hello("dinv-agent test".into()));
        assert_eq!(rx.recv().unwrap(), AgentEvent::Ready);
        assert!(link.request_shutdown());
        let mut lines = BufReader::new(agent).lines().map(Result::unwrap);
        // Every connection starts with the host's clock and a fresh seed.
        let time = lines.next().unwrap();
        let secs: u64 = time.strip_prefix("time ").unwrap().split_once('.').unwrap().0.parse().unwrap();
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        assert!(now.abs_diff(secs) < 60, "{time}");
        let seed = lines.next().unwrap();
        let hex = seed.strip_prefix("seed ").unwrap();
        assert!(hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()), "{seed}");
        let seed_of = |g: String| g.lines().nth(1).map(str::to_string);
        assert_ne!(seed_of(greeting()), seed_of(greeting()), "seeds repeat");
        assert_eq!(lines.next().unwrap(), "shutdown");
    }
}
