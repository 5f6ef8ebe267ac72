//! Log output: tracing's `fmt` layer (text or JSON, levels from `RUST_LOG`) on standard error.
//!
//! Access-log lines (target `stowage::access`, one per request) go through a non-blocking
//! writer: each is formatted on the worker thread that served the request and handed to one
//! writer thread, which writes what has queued meanwhile in one `write` call (a 64 KiB buffer,
//! flushed whenever the queue is empty), so a worker never waits for the log's file, pipe or
//! journal, and a busy server makes one write per batch instead of one per request. At most
//! [`QUEUED_LINES`] lines wait; beyond that access lines are dropped rather than stall requests
//! (counted in `stowage_log_lines_dropped_total`), which only happens when whatever reads
//! standard error stops reading. Every other line (start-up, warnings, errors) is written
//! synchronously, so it is out before the process can crash or exit; the two kinds may
//! interleave slightly out of order.
//!
//! [`flush`] writes out the queued access lines: call it before the process exits (statics are
//! not dropped at exit, so nothing else would).

use std::sync::Mutex;

use tracing_appender::non_blocking::{ErrorCounter, NonBlocking, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::fmt::writer::EitherWriter;

use crate::config::LogFormat;

/// Lines that may wait for the writer thread: about a second of access lines at the request
/// rates measured here, and 512 KiB of queue slots, which the channel allocates (and touches)
/// whole at start-up (65,536 slots held 2 MiB of the idle server's memory).
pub const QUEUED_LINES: usize = 16 * 1024;

static GUARD: Mutex<Option<WorkerGuard>> = Mutex::new(None);
static DROPPED: Mutex<Option<ErrorCounter>> = Mutex::new(None);

/// Installs the global subscriber. `RUST_LOG` sets the levels (default `info`).
pub fn init(format: LogFormat) {
    let rust_log = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned());
    // actix logs every unparseable request (a TLS hello on the plain port, a scanner) as an
    // error; that is noise, not a server failure. RUST_LOG=actix_http=… brings it back.
    let directives = if rust_log.contains("actix_http") {
        rust_log
    } else {
        format!("{rust_log},actix_http::h1::dispatcher=off")
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&directives)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,actix_http::h1::dispatcher=off"));
    // Colours only for a person at a terminal, never into a file or a log collector.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(QUEUED_LINES)
        .thread_name("stowage-log")
        .finish(std::io::BufWriter::with_capacity(64 * 1024, std::io::stderr()));
    if let Ok(mut d) = DROPPED.lock() {
        *d = Some(writer.error_counter());
    }
    if let Ok(mut g) = GUARD.lock() {
        *g = Some(guard);
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(Split { access: writer })
        .with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Access lines to the non-blocking writer, the rest straight to standard error.
struct Split {
    access: NonBlocking,
}

impl<'a> MakeWriter<'a> for Split {
    type Writer = EitherWriter<NonBlocking, std::io::Stderr>;

    fn make_writer(&'a self) -> Self::Writer {
        EitherWriter::B(std::io::stderr())
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> Self::Writer {
        if meta.target() == crate::http::ACCESS_TARGET {
            EitherWriter::A(self.access.clone())
        } else {
            EitherWriter::B(std::io::stderr())
        }
    }
}

/// Lines dropped because the writer thread fell [`QUEUED_LINES`] behind.
pub fn dropped_lines() -> u64 {
    DROPPED
        .lock()
        .ok()
        .and_then(|d| d.as_ref().map(|c| c.dropped_lines() as u64))
        .unwrap_or(0)
}

/// Writes out every queued line and stops the writer thread; later lines are discarded. Call
/// before the process exits.
pub fn flush() {
    let guard = GUARD.lock().ok().and_then(|mut g| g.take());
    drop(guard);
}
