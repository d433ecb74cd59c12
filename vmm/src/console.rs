//! Console sinks for the guest's serial output, and the watcher that notices a kernel panic.
//!
//! dinv guests run with `panic=-1 reboot=k`: a panicking kernel resets the machine at once, which
//! looks exactly like a requested reboot. [`ConsoleWriter`] scans the console stream for the
//! kernel's panic banner so the VMM can report a panic as a failure, not a clean exit.

use std::fs::File;
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Where the guest console goes.
#[derive(Default)]
pub enum Console {
    /// The VMM's standard output.
    #[default]
    Stdout,
    /// A file, created or truncated.
    File(PathBuf),
    /// Any writer.
    Writer(Box<dyn Write + Send>),
    /// Discarded (still watched for panics).
    Null,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Console::Stdout => f.write_str("Stdout"),
            Console::File(p) => f.debug_tuple("File").field(p).finish(),
            Console::Writer(_) => f.write_str("Writer(..)"),
            Console::Null => f.write_str("Null"),
        }
    }
}

/// The banner `panic()` prints before anything else.
const PANIC_BANNER: &[u8] = b"Kernel panic - not syncing";

/// A console sink that remembers whether the guest kernel panicked.
pub struct ConsoleWriter {
    out: Box<dyn Write + Send>,
    line: Vec<u8>,
    panicked: Arc<AtomicBool>,
}

impl std::fmt::Debug for ConsoleWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleWriter").finish_non_exhaustive()
    }
}

impl ConsoleWriter {
    /// Opens `console`; `panicked` is set once a panic banner passes through.
    pub fn open(console: Console, panicked: Arc<AtomicBool>) -> io::Result<Self> {
        let out: Box<dyn Write + Send> = match console {
            Console::Stdout => Box::new(io::stdout()),
            Console::File(path) => Box::new(File::create(path)?),
            Console::Writer(w) => w,
            Console::Null => Box::new(io::sink()),
        };
        Ok(Self {
            out,
            line: Vec::with_capacity(256),
            panicked,
        })
    }

    fn scan(&mut self, byte: u8) {
        if byte == b'\n' {
            self.line.clear();
            return;
        }
        if self.line.len() < 256 {
            self.line.push(byte);
        }
        if self.line.ends_with(PANIC_BANNER) {
            self.panicked.store(true, Ordering::SeqCst);
        }
    }
}

impl Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        for b in buf {
            self.scan(*b);
        }
        self.out.write_all(buf)?;
        if buf.contains(&b'\n') {
            self.out.flush()?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notices_the_panic_banner_split_across_writes() {
        let flag = Arc::new(AtomicBool::new(false));
        let mut w = ConsoleWriter::open(Console::Null, flag.clone()).unwrap();
        w.write_all(b"[ 1.0] ok\n[ 2.0] Kernel pan").unwrap();
        assert!(!flag.load(Ordering::SeqCst));
        w.write_all(b"ic - not syncing: VFS\n").unwrap();
        assert!(flag.load(Ordering::SeqCst));
    }

    #[test]
    fn ordinary_output_is_not_a_panic() {
        let flag = Arc::new(AtomicBool::new(false));
        let mut w = ConsoleWriter::open(Console::Null, flag.clone()).unwrap();
        w.write_all(b"Kernel panic handling configured\nnot syncing\n").unwrap();
        assert!(!flag.load(Ordering::SeqCst));
    }
}
