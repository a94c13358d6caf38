//! Dumps: a connection's whole stored record (current entries and every
//! kept revision) as one NDJSON line, the unit of `highwater export` and
//! `highwater import`.
//!
//! A line reproduces the connection exactly on any backend: the same
//! revision numbers, the same stream order, the same blob bytes. Blobs are
//! embedded as raw JSON, never re-encoded.
//!
//! ```text
//! {"connectionId":"…","stateType":"stream","revision":2,"nextSeq":2,
//!  "entries":[{"key":"stream:[\"a\",null]","seq":0,"revision":1}, …],
//!  "revisions":[{"revision":1,"createdAtMs":…,"stateType":"stream","actor":"…","reason":"…"}, …],
//!  "changes":[{"revision":1,"key":"stream:[\"a\",null]","seq":0,"blob":{"cursor":1}}, …]}
//! ```
//! A change without `blob` deleted its entry; `"blob":null` set a literal
//! null. After retention pruning, changes older than the oldest kept
//! revision remain where they are still part of a kept state.

use std::collections::HashSet;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;

use crate::state::{Blob, ConnectionId, EntryKey, StateType};

/// A connection's complete stored record.
#[derive(Debug, Clone, PartialEq)]
pub struct ConnectionDump {
    pub id: ConnectionId,
    pub state_type: Option<StateType>,
    pub revision: u64,
    pub next_seq: i64,
    /// Current entries: (encoded key, seq, revision holding the blob).
    pub entries: Vec<(String, i64, u64)>,
    pub revisions: Vec<RevisionDump>,
    pub changes: Vec<ChangeDump>,
}

/// One kept revision.
#[derive(Debug, Clone, PartialEq)]
pub struct RevisionDump {
    pub revision: u64,
    pub created_at_ms: i64,
    pub state_type: Option<StateType>,
    pub actor: Option<String>,
    pub reason: Option<String>,
}

/// One stored change: the new blob and position, or `None` for a delete.
#[derive(Debug, Clone, PartialEq)]
pub struct ChangeDump {
    pub revision: u64,
    pub key: String,
    pub blob: Option<Blob>,
    pub seq: Option<i64>,
}

/// Why a dump line cannot be imported.
#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    #[error("not a dump line: {0}")]
    Syntax(String),
    #[error("inconsistent dump of {id}: {problem}")]
    Inconsistent { id: String, problem: String },
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Line {
    connection_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    state_type: Option<String>,
    revision: u64,
    next_seq: i64,
    entries: Vec<EntryLine>,
    revisions: Vec<RevisionLine>,
    changes: Vec<ChangeLine>,
}

#[derive(Serialize, Deserialize)]
struct EntryLine {
    key: String,
    seq: i64,
    revision: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RevisionLine {
    revision: u64,
    created_at_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    state_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    actor: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct ChangeLine {
    revision: u64,
    key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    seq: Option<i64>,
    /// Present (even as `null`) for a set, absent for a delete.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "present_raw")]
    blob: Option<Box<RawValue>>,
}

/// Keeps a literal `null` as a value instead of reading it as "absent".
fn present_raw<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Box<RawValue>>, D::Error> {
    Box::<RawValue>::deserialize(deserializer).map(Some)
}

impl ConnectionDump {
    /// Encodes the dump as one line of JSON, without the newline.
    pub fn to_line(&self) -> Result<String, DumpError> {
        let changes = self
            .changes
            .iter()
            .map(|c| {
                let blob = c
                    .blob
                    .as_ref()
                    .map(|blob| RawValue::from_string(blob.as_str().to_owned()))
                    .transpose()
                    .map_err(|e| DumpError::Syntax(format!("stored blob is not JSON: {e}")))?;
                Ok(ChangeLine { revision: c.revision, key: c.key.clone(), seq: c.seq, blob })
            })
            .collect::<Result<_, DumpError>>()?;
        let line = Line {
            connection_id: self.id.to_string(),
            state_type: self.state_type.map(|t| t.as_str().to_owned()),
            revision: self.revision,
            next_seq: self.next_seq,
            entries: self
                .entries
                .iter()
                .map(|(key, seq, revision)| EntryLine { key: key.clone(), seq: *seq, revision: *revision })
                .collect(),
            revisions: self
                .revisions
                .iter()
                .map(|r| RevisionLine {
                    revision: r.revision,
                    created_at_ms: r.created_at_ms,
                    state_type: r.state_type.map(|t| t.as_str().to_owned()),
                    actor: r.actor.clone(),
                    reason: r.reason.clone(),
                })
                .collect(),
            changes,
        };
        serde_json::to_string(&line).map_err(|e| DumpError::Syntax(e.to_string()))
    }

    /// Decodes and checks one line.
    pub fn from_line(text: &str) -> Result<Self, DumpError> {
        let line: Line = serde_json::from_str(text).map_err(|e| DumpError::Syntax(e.to_string()))?;
        let id = ConnectionId::parse(&line.connection_id).ok_or_else(|| DumpError::Inconsistent {
            id: line.connection_id.clone(),
            problem: "connectionId is not a UUID".to_owned(),
        })?;
        let bad = |problem: String| DumpError::Inconsistent { id: id.to_string(), problem };
        let state_type = |text: Option<String>| match text {
            None => Ok(None),
            Some(t) => StateType::parse(&t).map(Some).ok_or_else(|| bad(format!("unknown state type {t:?}"))),
        };
        let mut revisions = Vec::with_capacity(line.revisions.len());
        for r in line.revisions {
            revisions.push(RevisionDump {
                revision: r.revision,
                created_at_ms: r.created_at_ms,
                state_type: state_type(r.state_type)?,
                actor: r.actor,
                reason: r.reason,
            });
        }
        let changes = line
            .changes
            .into_iter()
            .map(|c| ChangeDump {
                revision: c.revision,
                key: c.key,
                seq: c.seq,
                blob: c.blob.map(|raw| Blob::from_json(raw.get())),
            })
            .collect();
        let dump = Self {
            id,
            state_type: state_type(line.state_type)?,
            revision: line.revision,
            next_seq: line.next_seq,
            entries: line.entries.into_iter().map(|e| (e.key, e.seq, e.revision)).collect(),
            revisions,
            changes,
        };
        dump.check().map_err(bad)?;
        Ok(dump)
    }

    /// Checks the record hangs together, so an import never stores a state
    /// that cannot be read back.
    fn check(&self) -> Result<(), String> {
        let mut sets = HashSet::new();
        let mut listed = HashSet::new();
        for r in &self.revisions {
            if r.revision == 0 || r.revision > self.revision {
                return Err(format!("revision {} is outside 1..={}", r.revision, self.revision));
            }
            if !listed.insert(r.revision) {
                return Err(format!("revision {} is listed twice", r.revision));
            }
        }
        for c in &self.changes {
            if c.revision == 0 || c.revision > self.revision {
                return Err(format!("a change at revision {} is outside 1..={}", c.revision, self.revision));
            }
            EntryKey::decode(&c.key).ok_or_else(|| format!("undecodable key {:?}", c.key))?;
            if c.blob.is_some() != c.seq.is_some() {
                return Err(format!("change of {:?} at {} has a blob without a position", c.key, c.revision));
            }
            if c.blob.is_some() {
                sets.insert((c.key.as_str(), c.revision));
            }
        }
        let mut seqs = HashSet::new();
        for (key, seq, revision) in &self.entries {
            if !sets.contains(&(key.as_str(), *revision)) {
                return Err(format!("entry {key:?} points at revision {revision}, which does not set it"));
            }
            if *seq >= self.next_seq || !seqs.insert(*seq) {
                return Err(format!("entry {key:?} has a bad position {seq}"));
            }
        }
        if self.entries.is_empty() != self.state_type.is_none() {
            return Err("the state type does not match the entries".to_owned());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ConnectionDump {
        let key = |name: &str| {
            EntryKey::stream(crate::state::StreamDescriptor { name: name.to_owned(), namespace: None }).encode()
        };
        let revision = |revision, actor: Option<&str>| RevisionDump {
            revision,
            created_at_ms: 1_700_000_000_000 + revision as i64,
            state_type: Some(StateType::Stream),
            actor: actor.map(str::to_owned),
            reason: None,
        };
        let change = |revision, name: &str, blob: Option<&str>, seq| ChangeDump {
            revision,
            key: key(name),
            blob: blob.map(Blob::from_json),
            seq,
        };
        ConnectionDump {
            id: ConnectionId::random(),
            state_type: Some(StateType::Stream),
            revision: 2,
            next_seq: 2,
            entries: vec![(key("b"), 1, 2)],
            revisions: vec![revision(1, Some("sync")), revision(2, None)],
            changes: vec![
                change(1, "a", Some("null"), Some(0)),
                change(2, "a", None, None),
                change(2, "b", Some(r#"{"z":1.50,"a":1e3}"#), Some(1)),
            ],
        }
    }

    #[test]
    fn a_dump_round_trips_through_its_line_with_blobs_and_nulls_intact() {
        let dump = sample();
        let line = dump.to_line().unwrap();
        assert!(line.contains(r#""blob":{"z":1.50,"a":1e3}"#), "{line}");
        assert!(line.contains(r#""blob":null"#), "{line}");
        assert_eq!(ConnectionDump::from_line(&line).unwrap(), dump);
    }

    #[test]
    fn an_entry_pointing_at_a_revision_that_does_not_set_it_is_refused() {
        let mut dump = sample();
        dump.entries[0].2 = 1;
        let line = dump.to_line().unwrap();
        assert!(matches!(ConnectionDump::from_line(&line), Err(DumpError::Inconsistent { .. })));
    }

    #[test]
    fn a_revision_listed_twice_is_refused() {
        let mut dump = sample();
        let again = dump.revisions[0].clone();
        dump.revisions.push(again);
        let line = dump.to_line().unwrap();
        assert!(matches!(ConnectionDump::from_line(&line), Err(DumpError::Inconsistent { .. })));
    }

    #[test]
    fn a_line_that_is_not_json_is_refused() {
        assert!(matches!(ConnectionDump::from_line("{"), Err(DumpError::Syntax(_))));
    }
}
