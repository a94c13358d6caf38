//! Rendering the answers of Highwater's own operations. Blobs are embedded
//! as the raw text stored, never re-encoded.

use serde::Serialize;
use serde_json::value::RawValue;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::render_state;
use crate::state::history::{EntryDiff, History};
use crate::state::ops::Lease;
use crate::state::{type_name, Blob, ConnectionId, EntryKey, StateType, StoredState, StreamDescriptor};

/// Why a response could not be rendered: a stored blob that is not JSON,
/// which only damaged storage can cause.
#[derive(Debug, thiserror::Error)]
#[error("cannot render a response: {0}")]
pub struct RenderError(String);

#[derive(Serialize)]
struct Descriptor<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    namespace: Option<&'a str>,
}

impl<'a> From<&'a StreamDescriptor> for Descriptor<'a> {
    fn from(d: &'a StreamDescriptor) -> Self {
        Self { name: &d.name, namespace: d.namespace.as_deref() }
    }
}

fn raw(text: &str) -> Result<&RawValue, RenderError> {
    serde_json::from_str(text).map_err(|e| RenderError(e.to_string()))
}

fn to_vec(value: &impl Serialize) -> Result<Vec<u8>, RenderError> {
    serde_json::to_vec(value).map_err(|e| RenderError(e.to_string()))
}

/// Unix milliseconds as RFC 3339 (UTC).
pub fn timestamp(ms: i64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_default()
}

/// `StateWriteResult`: the revision and the whole state after a write.
pub fn write_result(id: ConnectionId, revision: u64, state: &StoredState) -> Result<Vec<u8>, RenderError> {
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Out<'a> {
        connection_id: String,
        revision: u64,
        connection_state: &'a RawValue,
    }
    let rendered = String::from_utf8(render_state(id, state)).map_err(|e| RenderError(e.to_string()))?;
    to_vec(&Out { connection_id: id.to_string(), revision, connection_state: raw(&rendered)? })
}

/// `StreamStateResult`: one stream's blob (absent when it has none).
pub fn stream_result(
    id: ConnectionId,
    revision: u64,
    stream: &StreamDescriptor,
    blob: Option<&Blob>,
) -> Result<Vec<u8>, RenderError> {
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Out<'a> {
        connection_id: String,
        revision: u64,
        stream_descriptor: Descriptor<'a>,
        #[serde(skip_serializing_if = "Option::is_none")]
        stream_state: Option<&'a RawValue>,
    }
    let stream_state = blob.map(|b| raw(b.as_str())).transpose()?;
    to_vec(&Out { connection_id: id.to_string(), revision, stream_descriptor: stream.into(), stream_state })
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct EntryRef<'a> {
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_descriptor: Option<Descriptor<'a>>,
}

fn entry_ref(key: &EntryKey) -> EntryRef<'_> {
    match key {
        EntryKey::Legacy => EntryRef { kind: "legacy", stream_descriptor: None },
        EntryKey::Shared => EntryRef { kind: "shared", stream_descriptor: None },
        EntryKey::Stream(d) => EntryRef { kind: "stream", stream_descriptor: Some(d.as_ref().into()) },
    }
}

/// `StateHistory`: a page of revisions, newest first.
pub fn history(id: ConnectionId, history: &History, limit: usize) -> Result<Vec<u8>, RenderError> {
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Change<'a> {
        #[serde(flatten)]
        entry: EntryRef<'a>,
        op: &'static str,
        #[serde(skip_serializing_if = "Option::is_none")]
        size: Option<u64>,
    }
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Revision<'a> {
        revision: u64,
        created_at: String,
        state_type: &'static str,
        #[serde(skip_serializing_if = "Option::is_none")]
        actor: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<&'a str>,
        changes: Vec<Change<'a>>,
    }
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Out<'a> {
        connection_id: String,
        revision: u64,
        oldest_revision: Option<u64>,
        revisions: Vec<Revision<'a>>,
        #[serde(skip_serializing_if = "Option::is_none")]
        next_before_revision: Option<u64>,
    }
    let revisions = history
        .revisions
        .iter()
        .map(|r| Revision {
            revision: r.revision,
            created_at: timestamp(r.created_at_ms),
            state_type: type_name(r.state_type),
            actor: r.actor.as_deref(),
            reason: r.reason.as_deref(),
            changes: r
                .changes
                .iter()
                .map(|(key, size)| Change {
                    entry: entry_ref(key),
                    op: if size.is_some() { "set" } else { "delete" },
                    size: *size,
                })
                .collect(),
        })
        .collect();
    let last = history.revisions.last().map(|r| r.revision);
    let more = history.revisions.len() == limit && last.zip(history.oldest).is_some_and(|(l, o)| l > o);
    to_vec(&Out {
        connection_id: id.to_string(),
        revision: history.revision,
        oldest_revision: history.oldest,
        revisions,
        next_before_revision: if more { last } else { None },
    })
}

/// `StateDiff`: how the state at `to` differs from the state at `from`.
pub fn diff(
    id: ConnectionId,
    (from, to): (u64, u64),
    types: (Option<StateType>, Option<StateType>),
    changes: &[EntryDiff],
) -> Result<Vec<u8>, RenderError> {
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Change<'a> {
        #[serde(flatten)]
        entry: EntryRef<'a>,
        op: &'static str,
        #[serde(skip_serializing_if = "Option::is_none")]
        from: Option<&'a RawValue>,
        #[serde(skip_serializing_if = "Option::is_none")]
        to: Option<&'a RawValue>,
    }
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Out<'a> {
        connection_id: String,
        from_revision: u64,
        to_revision: u64,
        from_state_type: &'static str,
        to_state_type: &'static str,
        changes: Vec<Change<'a>>,
    }
    let changes = changes
        .iter()
        .map(|change| {
            Ok(match change {
                EntryDiff::Added { key, to } => {
                    Change { entry: entry_ref(key), op: "added", from: None, to: Some(raw(to.as_str())?) }
                }
                EntryDiff::Removed { key, from } => {
                    Change { entry: entry_ref(key), op: "removed", from: Some(raw(from.as_str())?), to: None }
                }
                EntryDiff::Changed { key, from, to } => Change {
                    entry: entry_ref(key),
                    op: "changed",
                    from: Some(raw(from.as_str())?),
                    to: Some(raw(to.as_str())?),
                },
            })
        })
        .collect::<Result<_, RenderError>>()?;
    to_vec(&Out {
        connection_id: id.to_string(),
        from_revision: from,
        to_revision: to,
        from_state_type: type_name(types.0),
        to_state_type: type_name(types.1),
        changes,
    })
}

/// `Lease`: what a sync needs to write under its lease.
pub fn lease(id: ConnectionId, lease: &Lease) -> Result<Vec<u8>, RenderError> {
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Out<'a> {
        connection_id: String,
        holder: &'a str,
        token: &'a str,
        expires_at: String,
    }
    to_vec(&Out {
        connection_id: id.to_string(),
        holder: &lease.holder,
        token: &lease.token,
        expires_at: timestamp(lease.expires_at_ms),
    })
}

/// The answer to a release.
pub fn released(id: ConnectionId) -> Result<Vec<u8>, RenderError> {
    to_vec(&serde_json::json!({ "connectionId": id.to_string(), "released": true }))
}

/// The live leases, without their tokens.
pub fn lease_list(leases: &[(ConnectionId, Lease)]) -> Result<Vec<u8>, RenderError> {
    #[derive(Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Item<'a> {
        connection_id: String,
        holder: &'a str,
        expires_at: String,
    }
    #[derive(Serialize)]
    struct Out<'a> {
        leases: Vec<Item<'a>>,
    }
    let leases = leases
        .iter()
        .map(|(id, lease)| Item {
            connection_id: id.to_string(),
            holder: &lease.holder,
            expires_at: timestamp(lease.expires_at_ms),
        })
        .collect();
    to_vec(&Out { leases })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_in_utc() {
        assert_eq!(timestamp(0), "1970-01-01T00:00:00Z");
        assert_eq!(timestamp(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
    }

    #[test]
    fn a_stream_result_embeds_the_blob_as_stored() {
        let id = ConnectionId::parse("5b9a7c1e-0f6a-4e1d-9c11-3f0b8d2a4e77").unwrap();
        let stream = StreamDescriptor { name: "a".to_owned(), namespace: None };
        let out = stream_result(id, 3, &stream, Some(&Blob::from_json(r#"{"z":1.50,"a":1e3}"#))).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"connectionId":"5b9a7c1e-0f6a-4e1d-9c11-3f0b8d2a4e77","revision":3,"streamDescriptor":{"name":"a"},"streamState":{"z":1.50,"a":1e3}}"#
        );
    }
}
