//! The control channel: a newline-delimited text connection from the agent to the host
//! (vsock CID 2, port [`CONTROL_PORT`]).
//!
//! Guest → host: `hello dinv-agent <version>` (first line of every connection), `ready` (dockerd's
//! `/_ping` answered `OK`), `stopping` (shutdown began), `error <text>` (e.g.
//! `error dockerd exited exit code 1`). Host → guest: `shutdown`; `time <secs>.<nanos>` (the
//! host's wall clock: set on every connection, it puts a guest resumed from a snapshot back in
//! the present); `seed <64 hex digits>` (fresh host randomness, mixed into the guest's pool
//! and forcing a reseed, so guests resumed from the same snapshot do not share random
//! streams). Unknown or malformed host lines are logged and ignored.
//!
//! The client connects in its own thread and retries every second while the host side is absent,
//! so it never blocks the boot. On (re)connection it replays the current state (`ready`,
//! `stopping`, past errors) after `hello`.

use std::io::{BufRead, BufReader, Write};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::vsock::{VsockStream, HOST_CID};

/// Host-side control port.
pub const CONTROL_PORT: u32 = 1024;
/// Agent version sent in `hello`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// A message from the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostMessage {
    /// Begin graceful shutdown.
    Shutdown,
    /// Set the wall clock: seconds and nanoseconds since the Unix epoch.
    Time(i64, i64),
    /// Randomness to credit to the guest's pool (32 bytes).
    Seed(Vec<u8>),
    /// Anything else (logged, ignored).
    Unknown(String),
}

/// Parses one line from the host (trailing `\r`/whitespace ignored). Empty lines yield `None`.
pub fn parse_host_line(line: &str) -> Option<HostMessage> {
    let t = line.trim();
    if t.is_empty() {
        return None;
    }
    let unknown = || HostMessage::Unknown(t.to_string());
    Some(match t.split_once(' ') {
        None if t == "shutdown" => HostMessage::Shutdown,
        Some(("time", v)) => parse_time(v).map_or_else(unknown, |(s, n)| HostMessage::Time(s, n)),
        Some(("seed", v)) => parse_hex32(v).map_or_else(unknown, HostMessage::Seed),
        _ => unknown(),
    })
}

/// `<secs>.<9-digit nanos>`, both non-negative.
fn parse_time(v: &str) -> Option<(i64, i64)> {
    let (s, n) = v.split_once('.')?;
    if n.len() != 9 || !s.bytes().chain(n.bytes()).all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((s.parse().ok()?, n.parse().ok()?))
}

/// Exactly 64 hex digits.
fn parse_hex32(v: &str) -> Option<Vec<u8>> {
    if v.len() != 64 || !v.is_ascii() {
        return None;
    }
    (0..32).map(|i| u8::from_str_radix(v.get(2 * i..2 * i + 2)?, 16).ok()).collect()
}

/// A message to the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentMessage {
    /// First line of every connection.
    Hello,
    /// Docker API ready.
    Ready,
    /// Shutdown began.
    Stopping,
    /// Something went wrong (free text, single line).
    Error(String),
}

impl AgentMessage {
    /// The wire form, including the trailing newline.
    pub fn to_line(&self) -> String {
        match self {
            AgentMessage::Hello => format!("hello dinv-agent {VERSION}\n"),
            AgentMessage::Ready => "ready\n".to_string(),
            AgentMessage::Stopping => "stopping\n".to_string(),
            AgentMessage::Error(t) => {
                let t: String = t
                    .chars()
                    .map(|c| if c == '\n' || c == '\r' { ' ' } else { c })
                    .collect();
                format!("error {t}\n")
            }
        }
    }
}

#[derive(Debug, Default)]
struct State {
    /// Messages sent so far (replayed on reconnection, after `hello`).
    history: Vec<AgentMessage>,
    /// The live connection, if any.
    conn: Option<VsockStream>,
}

/// Handle used by the rest of the agent to report to the host.
#[derive(Debug, Clone, Default)]
pub struct Control {
    state: Arc<Mutex<State>>,
}

impl Control {
    /// Records `msg` and sends it if connected (a failed write drops the connection; the
    /// reconnection replays it).
    pub fn send(&self, msg: AgentMessage) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if !st.history.contains(&msg) {
            st.history.push(msg.clone());
        }
        if let Some(c) = st.conn.as_ref() {
            if (&*c).write_all(msg.to_line().as_bytes()).is_err() {
                let _ = c.shutdown(std::net::Shutdown::Both);
                st.conn = None;
            }
        }
    }

    /// Starts the client thread. Host messages go to `events` (the main loop is woken after each).
    pub fn start(&self, events: Sender<crate::Event>) {
        let me = self.clone();
        let r = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || me.run(events));
        if let Err(e) = r {
            crate::info!("cannot start control thread: {e}");
        }
    }

    fn run(&self, events: Sender<crate::Event>) {
        // Log the first failure, then one in 60 (once a minute) to keep the console readable.
        let mut quiet: u32 = 0;
        loop {
            match VsockStream::connect(HOST_CID, CONTROL_PORT) {
                Ok(conn) => {
                    quiet = 0;
                    crate::info!("control channel connected (host port {CONTROL_PORT})");
                    if let Err(e) = self.serve(conn, &events) {
                        crate::info!("control channel: {e}");
                    }
                    crate::info!("control channel closed; reconnecting");
                    // A closed channel (e.g. the transport reset of a resumed snapshot) is
                    // worth retrying at once: the host is there.
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
                Err(e) => {
                    if quiet == 0 {
                        crate::info!(
                            "control channel: connect to host port {CONTROL_PORT}: {e} (retrying every second)"
                        );
                        quiet = 60;
                    }
                    quiet -= 1;
                }
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    fn serve(&self, conn: VsockStream, events: &Sender<crate::Event>) -> std::io::Result<()> {
        let reader = conn.try_clone()?;
        {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let mut out = AgentMessage::Hello.to_line();
            for m in &st.history {
                out.push_str(&m.to_line());
            }
            (&conn).write_all(out.as_bytes())?;
            st.conn = Some(conn);
        }
        let mut lines = BufReader::new(reader);
        let mut line = String::new();
        let res = loop {
            line.clear();
            match lines.read_line(&mut line) {
                Ok(0) => break Ok(()),
                Ok(_) => match parse_host_line(&line) {
                    Some(HostMessage::Shutdown) => {
                        crate::info!("host requested shutdown");
                        let _ = events.send(crate::Event::Shutdown("host request".into()));
                        crate::sys::wake_main();
                    }
                    Some(HostMessage::Time(secs, nanos)) => {
                        if let Err(e) = crate::sys::set_realtime(secs, nanos) {
                            crate::info!("control: cannot set the clock: {e}");
                        }
                    }
                    Some(HostMessage::Seed(bytes)) => {
                        if let Err(e) = crate::sys::add_entropy(&bytes) {
                            crate::info!("control: cannot add host entropy: {e}");
                        }
                    }
                    Some(HostMessage::Unknown(t)) => {
                        crate::info!("control: unknown host message '{t}'")
                    }
                    None => {}
                },
                Err(e) => break Err(e),
            }
        };
        self.state.lock().unwrap_or_else(|p| p.into_inner()).conn = None;
        res
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_lines() {
        assert_eq!(parse_host_line("shutdown\n"), Some(HostMessage::Shutdown));
        assert_eq!(
            parse_host_line("  shutdown\r\n"),
            Some(HostMessage::Shutdown)
        );
        assert_eq!(parse_host_line("\n"), None);
        assert_eq!(
            parse_host_line("reboot now\n"),
            Some(HostMessage::Unknown("reboot now".into()))
        );
        assert_eq!(
            parse_host_line("SHUTDOWN"),
            Some(HostMessage::Unknown("SHUTDOWN".into()))
        );
        assert_eq!(
            parse_host_line("time 1764662400.000000042\n"),
            Some(HostMessage::Time(1_764_662_400, 42))
        );
        let hex = "00ff".repeat(16);
        assert_eq!(
            parse_host_line(&format!("seed {hex}")),
            Some(HostMessage::Seed([0u8, 0xff].repeat(16)))
        );
        // Malformed values are unknown lines, never a wrong clock or a short seed.
        for bad in [
            "time 17646624",
            "time 1764662400.42",
            "time -1.000000000",
            "time 1.0000000001",
            "time x.000000000",
            "seed 00ff",
            "seed zz",
            &format!("seed {}", "g".repeat(64)),
            &format!("seed {}é", "0".repeat(62)),
            "shutdown now",
        ] {
            assert_eq!(
                parse_host_line(bad),
                Some(HostMessage::Unknown(bad.to_string())),
                "{bad}"
            );
        }
    }

    #[test]
    fn agent_lines() {
        assert_eq!(
            AgentMessage::Hello.to_line(),
            format!("hello dinv-agent {VERSION}\n")
        );
        assert_eq!(AgentMessage::Ready.to_line(), "ready\n");
        assert_eq!(AgentMessage::Stopping.to_line(), "stopping\n");
        assert_eq!(
            AgentMessage::Error("dockerd exited\nexit code 1".into()).to_line(),
            "error dockerd exited exit code 1\n"
        );
    }

    #[test]
    fn history_without_connection() {
        let c = Control::default();
        c.send(AgentMessage::Ready);
        c.send(AgentMessage::Ready);
        c.send(AgentMessage::Stopping);
        assert_eq!(
            c.state.lock().unwrap().history,
            vec![AgentMessage::Ready, AgentMessage::Stopping]
        );
    }
}
