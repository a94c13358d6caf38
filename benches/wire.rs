//! Micro-benchmarks of the pure parts of a request: decoding a write,
//! rendering a state, the merge planning, blob minification, and looking
//! up a write's entries in a cached state.
//!
//! ```text
//! cargo bench --bench wire                 # all
//! cargo bench --bench wire -- render       # those whose name contains "render"
//! ```
//!
//! Kept lean (10 samples, about 2 s each) so the whole file runs in well
//! under a minute; `bench/run` measures the service end to end.

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use highwater::state::wire::{
    decode_create_or_update, render_state, render_state_from, render_state_laid_out, DecodeLimits,
};
use highwater::state::{
    changes, plan_write, Blob, ConnectionId, EntryKey, EntryOp, StateType, StateWrite, StoredState, StreamDescriptor,
};
use highwater::store::cache::{Cached, StateCache, Version};

const CONNECTION: &str = "00000000-0000-4000-8000-000000000010";

fn stream_blob(i: usize, version: usize) -> String {
    format!(r#"{{"cursor":"2024-06-01T00:00:00Z","offset":{}}}"#, 1_000_000 + i + version)
}

fn descriptor(i: usize) -> StreamDescriptor {
    StreamDescriptor { name: format!("table_{i:05}"), namespace: Some("public".to_owned()) }
}

/// A `create_or_update` body writing `streams` streams, as a client sends it
/// (pretty-printed blobs, so minification has work to do).
fn write_body(streams: usize) -> Vec<u8> {
    let items: Vec<String> = (0..streams)
        .map(|i| {
            format!(
                r#"{{"streamDescriptor": {{"name": "table_{i:05}", "namespace": "public"}}, "streamState": {{"cursor": "2024-06-01T00:00:00Z", "offset": {}}}}}"#,
                1_000_000 + i
            )
        })
        .collect();
    format!(
        r#"{{"connectionId": "{CONNECTION}", "connectionState": {{"stateType": "stream", "connectionId": "{CONNECTION}", "streamState": [{}]}}}}"#,
        items.join(", ")
    )
    .into_bytes()
}

fn stored_state(streams: usize) -> StoredState {
    StoredState {
        state_type: Some(StateType::Stream),
        revision: 7,
        entries: (0..streams)
            .map(|i| (EntryKey::stream(descriptor(i)), Blob::from_stored(stream_blob(i, 0))))
            .collect(),
    }
}

fn decode(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode_create_or_update");
    for streams in [1, 10, 10_000] {
        let body = write_body(streams);
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_with_input(BenchmarkId::from_parameter(streams), &body, |b, body| {
            b.iter(|| decode_create_or_update(black_box(body), DecodeLimits::default()).expect("valid body"))
        });
    }
    group.finish();
}

fn render(c: &mut Criterion) {
    let id = ConnectionId::parse(CONNECTION).expect("a UUID");
    let mut group = c.benchmark_group("render_state");
    for streams in [10, 10_000] {
        let state = stored_state(streams);
        let size = render_state(id, &state).len();
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::from_parameter(streams), &state, |b, state| {
            b.iter(|| render_state(id, black_box(state)))
        });
    }
    group.finish();

    // The next state after a write of one stream, made from the body before.
    let mut group = c.benchmark_group("render_state_from");
    let before = stored_state(10_000);
    let (body, layout) = render_state_laid_out(id, &before);
    let layout = layout.expect("a layout");
    let mut after = before.clone();
    after.entries = after.entries.with(&[(5_000, &Blob::from_json(&stream_blob(5_000, 1)))], []);
    group.throughput(Throughput::Bytes(body.len() as u64));
    group.bench_function(BenchmarkId::from_parameter(10_000), |b| {
        b.iter(|| render_state_from(&before, &body, &layout, black_box(&after)).expect("same keys"))
    });
    group.finish();
}

/// The merge logic for a 10,000-op write against a 10,000-entry state in
/// which every other entry changes: type rules, then the per-key diff.
fn merge(c: &mut Criterion) {
    const OPS: usize = 10_000;
    let write = StateWrite {
        state_type: StateType::Stream,
        ops: (0..OPS)
            .map(|i| EntryOp {
                key: EntryKey::stream(descriptor(i)),
                blob: Some(Blob::from_stored(stream_blob(i, i % 2))),
            })
            .collect(),
    };
    let stored: HashMap<String, (String, i64)> =
        (0..OPS).map(|i| (EntryKey::stream(descriptor(i)).encode(), (stream_blob(i, 0), i as i64))).collect();
    let pinned = HashMap::new();

    let mut group = c.benchmark_group("merge");
    group.throughput(Throughput::Elements(OPS as u64));
    group.bench_function("plan_write_10000", |b| {
        b.iter(|| plan_write(black_box(Some(StateType::Stream)), black_box(&write)).expect("same type"))
    });
    let ops = plan_write(Some(StateType::Stream), &write).expect("same type");
    group.bench_function("changes_10000", |b| {
        b.iter(|| {
            let changed = changes(black_box(&ops), &pinned, black_box(&stored));
            assert_eq!(changed.len(), OPS / 2);
            changed.len()
        })
    });
    group.bench_function("plan_write_and_changes_10000", |b| {
        b.iter(|| {
            let ops = plan_write(Some(StateType::Stream), black_box(&write)).expect("same type");
            changes(&ops, &pinned, black_box(&stored)).len()
        })
    });
    group.finish();
}

/// What a one-stream write to a 10,000-stream connection looks up in the
/// cache before it is batched on PostgreSQL: its stream (the last one, so
/// the whole state is scanned) and the legacy entry it may replace.
fn cache_lookup(c: &mut Criterion) {
    const STREAMS: usize = 10_000;
    let cache = StateCache::new(64 << 20);
    let id = ConnectionId::parse(CONNECTION).expect("a UUID");
    let version = Version { revision: 7, epoch: 0, next_seq: STREAMS as i64 };
    let state = Arc::new(stored_state(STREAMS));
    cache.put(id, version, Cached { state, positions: Arc::new((0..STREAMS as i64).collect()) });
    let wanted = EntryKey::stream(descriptor(STREAMS - 1));
    let keys = [&wanted, &EntryKey::Legacy];

    let mut group = c.benchmark_group("cache_stored");
    group.bench_function(BenchmarkId::from_parameter(STREAMS), |b| {
        b.iter(|| {
            let (_, found) = cache.stored(id, black_box(&keys), usize::MAX).expect("cached");
            assert_eq!(found.len(), 1);
            found
        })
    });
    group.finish();
}

/// `Blob::from_json` of a 1 MB blob, compact and pretty-printed.
fn blob(c: &mut Criterion) {
    let items: Vec<String> = (0..15_000)
        .map(|i| format!(r#"{{"table": "table_{i:05}", "cursor": "2024-06-01T00:00:00Z", "lsn": {}}}"#, i * 7919))
        .collect();
    let pretty =
        format!(r#"{{"cdc": {{"offsets": [{}], "note": "escaped \"quote\" and \\ backslash"}}}}"#, items.join(",\n  "));
    let compact = Blob::from_json(&pretty).into_string();
    let mut group = c.benchmark_group("blob_from_json_1mb");
    for (name, text) in [("compact", compact), ("pretty", pretty)] {
        group.throughput(Throughput::Bytes(text.len() as u64));
        group.bench_with_input(BenchmarkId::from_parameter(name), &text, |b, text| {
            b.iter(|| Blob::from_json(black_box(text)))
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = decode, render, merge, blob, cache_lookup
}
criterion_main!(benches);
