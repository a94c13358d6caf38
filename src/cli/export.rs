//! `highwater export`: every connection's whole record (current state and
//! kept history) as NDJSON, one connection per line, in id order. Memory
//! stays bounded by the largest single connection.

use std::fs::File;
use std::io::{BufWriter, Write};

use anyhow::Context;

use super::progress;
use crate::config::ExportArgs;
use crate::store::{self, DatabaseUrl};

/// Connection ids fetched per page.
const PAGE: usize = 500;

pub async fn run(args: ExportArgs) -> anyhow::Result<()> {
    let url = &args.database.database_url;
    if let DatabaseUrl::Sqlite(path) = url {
        anyhow::ensure!(path.exists(), "there is no database at {} to export", path.display());
    }
    // Reads only, so it runs beside a server on the same file; and does not
    // last long enough for the sole-node lease to be worth taking.
    let options = store::OpenOptions { exclusive: false, sole_node: false, ..args.database.open_options(false) };
    let store = store::open(url, &options)
        .await
        .with_context(|| format!("cannot open {url} (--database-url / HIGHWATER_DATABASE_URL)"))?;
    let mut out: Box<dyn Write> = match &args.output {
        Some(path) => {
            Box::new(BufWriter::new(File::create(path).with_context(|| format!("cannot create {}", path.display()))?))
        }
        None => Box::new(BufWriter::new(std::io::stdout().lock())),
    };
    let bar = progress::counter("exported");
    let mut after = None;
    let mut exported = 0u64;
    loop {
        let ids = store.list_connections(after, PAGE).await.context("cannot list connections")?;
        let Some(last) = ids.last().copied() else {
            break;
        };
        for id in ids {
            let Some(record) = store.dump(id).await.with_context(|| format!("cannot read connection {id}"))? else {
                continue;
            };
            let line = record.to_line().with_context(|| format!("cannot encode connection {id}"))?;
            out.write_all(line.as_bytes()).and_then(|()| out.write_all(b"\n")).context("cannot write the export")?;
            exported += 1;
            bar.inc(1);
        }
        after = Some(last);
    }
    out.flush().context("cannot write the export")?;
    drop(out);
    if let Some(path) = &args.output {
        File::open(path).and_then(|f| f.sync_all()).with_context(|| format!("cannot sync {}", path.display()))?;
    }
    bar.finish_and_clear();
    tracing::info!(connections = exported, database = %url, "export finished");
    Ok(())
}
