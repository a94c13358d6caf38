//! Log set-up: text lines for people, JSON lines for collectors, both on
//! standard error so standard output stays free for command output.
//!
//! Lines are written by a thread of their own, never by the threads that
//! answer requests: when whatever reads standard error stops reading (a
//! stuck collector, a full pipe), a blocking write on every request would
//! stop the service with it (seen: an unread pipe stopped all answers after
//! ~280 requests). Up to [`BUFFERED_LINES`] lines wait for that thread;
//! beyond, lines are dropped and counted, and the count is logged once the
//! output takes lines again.

use std::io::{BufWriter, IsTerminal, Stderr};
use std::time::Duration;

use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;

use crate::config::{LogArgs, LogFormat};

/// Lines that may wait for the log thread before new ones are dropped: a
/// few seconds of one line per request at the rates bench/ measures, and a
/// few MiB at most.
const BUFFERED_LINES: usize = 16 * 1024;

/// How often the count of dropped lines is looked at.
const DROPS_CHECKED_EVERY: Duration = Duration::from_secs(5);

/// The running log thread. Dropping it writes out what is still waiting
/// (for at most about a second if the output does not take it).
pub struct Logging {
    _flushed_on_drop: WorkerGuard,
}

/// Installs the global subscriber and starts the log thread, and a task
/// that reports dropped lines; call it inside the Tokio runtime. Fails on a
/// filter that does not parse.
pub fn init(args: &LogArgs) -> anyhow::Result<Logging> {
    let filter = EnvFilter::try_new(&args.log_level)
        .map_err(|e| anyhow::anyhow!("invalid --log-level / HIGHWATER_LOG_LEVEL {:?}: {e}", args.log_level))?;
    // Buffered: the log thread writes what it finds waiting with one
    // write, not one per line, and flushes before it waits again.
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(BUFFERED_LINES)
        .thread_name("hw-log")
        .finish(BufWriter::<Stderr>::new(std::io::stderr()));
    let dropped = writer.error_counter();
    // Colours only for a person at a terminal: in a file, a pipe or a
    // journal, escape codes are noise around every field.
    let colours = std::io::stderr().is_terminal();
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(colours).with_writer(writer);
    match args.log_format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    }
    .map_err(|e| anyhow::anyhow!("cannot install the logger: {e}"))?;
    tokio::spawn(report_dropped(dropped));
    Ok(Logging { _flushed_on_drop: guard })
}

/// Logs how many lines were dropped since the last such line that was
/// not dropped itself, whenever there are any.
async fn report_dropped(dropped: ErrorCounter) {
    let mut reported = 0;
    let mut every = tokio::time::interval(DROPS_CHECKED_EVERY);
    loop {
        every.tick().await;
        let now = dropped.dropped_lines();
        if now > reported {
            tracing::warn!(
                dropped = now - reported,
                "log lines dropped: whatever reads Highwater's standard error did not keep up"
            );
            // While the output takes nothing, this line is dropped too (or
            // another one just then): its count goes into the next one.
            if dropped.dropped_lines() == now {
                reported = now;
            }
        }
    }
}
