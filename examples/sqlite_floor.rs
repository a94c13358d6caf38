//! The durable-write floor of SQLite for the benchmark suite (`bench/run`):
//! one `INSERT … ON CONFLICT DO UPDATE` of a small JSON state per
//! transaction, in WAL mode with `synchronous=FULL`, on a fresh file, in a
//! loop for a fixed time. Prints the transactions per second.
//!
//! ```text
//! cargo run --release --example sqlite_floor -- /tmp/floor.db 10
//! ```
//!
//! Output: one line `tx_per_sec=<float> transactions=<n> seconds=<float>`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use rusqlite::{params, Connection};

/// Rows the upserts land on, chosen at random.
const ROWS: u64 = 1000;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let path = PathBuf::from(args.next().unwrap_or_else(|| "/tmp/sqlite_floor.db".to_owned()));
    let seconds: f64 = args.next().map_or(Ok(10.0), |s| s.parse())?;

    // A fresh file every run.
    for suffix in ["", "-wal", "-shm"] {
        let mut file = path.clone().into_os_string();
        file.push(suffix);
        let _ = std::fs::remove_file(file);
    }
    let mut conn = Connection::open(&path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    let mode: String = conn.pragma_query_value(None, "journal_mode", |r| r.get(0))?;
    let sync: i64 = conn.pragma_query_value(None, "synchronous", |r| r.get(0))?;
    anyhow::ensure!(mode == "wal" && sync == 2, "expected WAL and synchronous=FULL, got {mode} and {sync}");
    conn.execute_batch("CREATE TABLE s (id INTEGER PRIMARY KEY, state TEXT NOT NULL)")?;

    let mut rng = 0x9E37_79B9_7F4A_7C15_u64 ^ u64::from(std::process::id());
    let mut next = move || {
        // xorshift64*
        rng ^= rng >> 12;
        rng ^= rng << 25;
        rng ^= rng >> 27;
        rng.wrapping_mul(0x2545_F491_4F6C_DD1D)
    };

    let limit = Duration::from_secs_f64(seconds);
    let start = Instant::now();
    let mut transactions: u64 = 0;
    while start.elapsed() < limit {
        let id = (next() % ROWS) as i64;
        let state = format!(r#"{{"cursor":"2024-06-01T00:00:00Z","offset":{transactions}}}"#);
        let tx = conn.transaction()?;
        tx.prepare_cached(
            "INSERT INTO s (id, state) VALUES (?1, ?2) ON CONFLICT(id) DO UPDATE SET state = excluded.state",
        )?
        .execute(params![id, state])?;
        tx.commit()?;
        transactions += 1;
    }
    let elapsed = start.elapsed().as_secs_f64();
    println!("tx_per_sec={:.1} transactions={transactions} seconds={elapsed:.3}", transactions as f64 / elapsed);
    Ok(())
}
