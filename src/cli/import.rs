//! `highwater import`: load an export (NDJSON, one connection per line).
//! Each connection is stored atomically; existing connections are left
//! alone unless `--overwrite` is given, and then the run fails so the
//! refusal cannot go unnoticed.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};

use anyhow::Context;

use super::progress;
use crate::config::ImportArgs;
use crate::store::dump::ConnectionDump;
use crate::store::{self, LoadOutcome};

pub async fn run(args: ImportArgs) -> anyhow::Result<()> {
    let url = &args.database.database_url;
    // The input first: a mistyped file name must not create a database.
    let input: Box<dyn Read> = match &args.input {
        Some(path) => Box::new(File::open(path).with_context(|| format!("cannot open {}", path.display()))?),
        None => Box::new(std::io::stdin().lock()),
    };
    // A batch job: the sole-node lease is for serving reads.
    let options = store::OpenOptions { sole_node: false, ..args.database.open_options(true) };
    let store = store::open(url, &options)
        .await
        .with_context(|| format!("cannot open {url} (--database-url / HIGHWATER_DATABASE_URL)"))?;
    let mut reader = BufReader::with_capacity(1 << 20, input);
    let bar = progress::counter("imported");
    let (mut loaded, mut refused) = (0u64, Vec::new());
    let mut line = String::new();
    for number in 1.. {
        line.clear();
        if reader.read_line(&mut line).with_context(|| format!("cannot read line {number}"))? == 0 {
            break;
        }
        if line.trim().is_empty() {
            continue;
        }
        let record = ConnectionDump::from_line(line.trim_end()).with_context(|| format!("line {number}"))?;
        let id = record.id;
        match store.load(record, args.overwrite).await.with_context(|| format!("cannot import connection {id}"))? {
            LoadOutcome::Loaded => loaded += 1,
            LoadOutcome::Exists => refused.push(id),
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    tracing::info!(loaded, refused = refused.len(), database = %url, "import finished");
    if let Some(first) = refused.first() {
        anyhow::bail!(
            "{} connection(s) already exist and were left unchanged (first: {first}); \
             use --overwrite to replace them",
            refused.len()
        );
    }
    Ok(())
}
