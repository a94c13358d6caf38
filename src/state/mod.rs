//! The connection-state domain: identifiers, entries, blobs and the type and
//! merge rules of STATE-API.md §4.
//!
//! Owns what a state *is* and how a write changes it. It knows nothing of
//! HTTP (see `api`) or SQL (see `store`): the wire format lives in [`wire`],
//! and a store applies the [`EntryOp`]s that [`plan_write`] returns.

pub mod blob;
pub mod entries;
pub mod history;
pub mod ops;
pub mod wire;

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use uuid::Uuid;

pub use blob::Blob;
pub use entries::{Entries, Entry};

/// A connection's identifier: any UUID names a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnectionId(Uuid);

impl ConnectionId {
    /// Parses the canonical 36-character form, hex digits of either case.
    pub fn parse(text: &str) -> Option<Self> {
        if text.len() != 36 {
            return None;
        }
        Uuid::try_parse(text).ok().map(Self)
    }

    /// The 128 bits, for lock keys and hashing.
    pub fn as_u128(self) -> u128 {
        self.0.as_u128()
    }

    /// The 16 bytes, big-endian: SQLite's key for the connection.
    pub fn to_bytes(self) -> [u8; 16] {
        self.0.into_bytes()
    }

    /// The inverse of [`ConnectionId::to_bytes`].
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(Uuid::from_bytes(bytes))
    }

    /// A random identifier, for tests and tools.
    pub fn random() -> Self {
        Self(Uuid::new_v4())
    }
}

impl fmt::Display for ConnectionId {
    /// Always the lower-case hyphenated form, as responses require.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

/// The type of a stored state. A connection with no entries has none
/// (`not_set` on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StateType {
    Legacy,
    Global,
    Stream,
}

impl StateType {
    /// The wire and storage spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Legacy => "legacy",
            Self::Global => "global",
            Self::Stream => "stream",
        }
    }

    /// The inverse of [`StateType::as_str`].
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "legacy" => Some(Self::Legacy),
            "global" => Some(Self::Global),
            "stream" => Some(Self::Stream),
            _ => None,
        }
    }
}

/// Spells an optional type the way the API does: `None` is `not_set`.
pub fn type_name(state_type: Option<StateType>) -> &'static str {
    state_type.map_or("not_set", StateType::as_str)
}

/// Names a stream: a name and an optional namespace. An absent namespace
/// and an empty one are different streams.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamDescriptor {
    pub name: String,
    pub namespace: Option<String>,
}

/// The key of one entry of a state.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum EntryKey {
    /// The one blob of a legacy state.
    Legacy,
    /// The shared blob of a global state.
    Shared,
    /// One stream's blob, in a stream or a global state. Shared, so that
    /// the state after a write shares its keys with the state before it
    /// instead of copying them: `create_or_update` of one stream of a
    /// 10,000-stream state spent a third of its time copying and freeing
    /// names (callgrind, `bench/profile update10k`).
    Stream(Arc<StreamDescriptor>),
}

const STREAM_KEY_PREFIX: &str = "stream:";

impl EntryKey {
    /// The key of the stream `descriptor` names.
    pub fn stream(descriptor: StreamDescriptor) -> Self {
        Self::Stream(Arc::new(descriptor))
    }

    /// A stable text form, unique per key, used as the storage key.
    pub fn encode(&self) -> String {
        match self {
            Self::Legacy => "legacy".to_owned(),
            Self::Shared => "shared".to_owned(),
            Self::Stream(d) => {
                let pair = (&d.name, &d.namespace);
                // Serialising a pair of strings cannot fail.
                let json = serde_json::to_string(&pair).unwrap_or_default();
                format!("{STREAM_KEY_PREFIX}{json}")
            }
        }
    }

    /// The inverse of [`EntryKey::encode`]; `None` for text it never produced.
    pub fn decode(text: &str) -> Option<Self> {
        match text {
            "legacy" => Some(Self::Legacy),
            "shared" => Some(Self::Shared),
            _ => {
                let json = text.strip_prefix(STREAM_KEY_PREFIX)?;
                let (name, namespace) = serde_json::from_str(json).ok()?;
                Some(Self::stream(StreamDescriptor { name, namespace }))
            }
        }
    }
}

/// One change a write asks for: `Some` upserts the blob, `None` deletes the
/// entry.
#[derive(Debug, Clone, PartialEq)]
pub struct EntryOp {
    pub key: EntryKey,
    pub blob: Option<Blob>,
}

/// A validated `create_or_update`: the incoming type and one op per key
/// mentioned (keys are unique, in request order).
#[derive(Debug, Clone, PartialEq)]
pub struct StateWrite {
    pub state_type: StateType,
    pub ops: Vec<EntryOp>,
}

/// A connection's state as stored: its type, its revision (0 before the
/// first write) and its entries in first-insertion order.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StoredState {
    pub state_type: Option<StateType>,
    pub revision: u64,
    pub entries: Entries,
}

/// What one revision did to one entry: its new blob and position, or
/// `None` when it was deleted.
pub type Effect = (EntryKey, Option<(Blob, i64)>);

/// The state after a revision, computed from the state before it (with the
/// entries' positions, in order) and the revision's effects; when effects
/// of several revisions are given in order, the later one for a key wins.
/// Returns the new state and its entries' positions.
///
/// A write of a few streams to a state of thousands finds its entries by
/// position (one that keeps its place) or by a scan, and only many effects
/// pay for an index of the whole state. When it only sets blobs in place
/// and adds entries after the last, the new state shares every chunk of
/// entries it leaves alone with the old one ([`Entries::with`]); any other
/// write lays the state out anew in one pass.
pub fn advance(
    before: &StoredState,
    positions: &[i64],
    effects: &[Effect],
    revision: u64,
    state_type: Option<StateType>,
) -> (StoredState, Vec<i64>) {
    let entries = &before.entries;
    let finder = EntryFinder::new(entries, effects.len());
    // An entry that keeps its place is found by it (positions ascend).
    let find = |key: &EntryKey, seq: Option<i64>| {
        seq.and_then(|seq| positions.binary_search(&seq).ok())
            .filter(|&at| entries.get(at).is_some_and(|(held, _)| held == key))
            .or_else(|| finder.find(key))
    };
    // What the effects do to entries held before (by index) and which
    // entries they add; the last effect for a key is the one kept.
    let mut touched: Vec<(usize, Option<(i64, &Blob)>)> = Vec::with_capacity(effects.len());
    let mut added: HashMap<&EntryKey, Option<(i64, &Blob)>> = HashMap::new();
    for (key, effect) in effects {
        let effect = effect.as_ref().map(|(blob, seq)| (*seq, blob));
        match find(key, effect.map(|(seq, _)| seq)) {
            Some(at) => touched.push((at, effect)),
            None => {
                added.insert(key, effect);
            }
        }
    }
    touched.sort_by_key(|(at, _)| *at); // stable: the last effect of a run wins

    // The common write: blobs set in place and entries added after the
    // last, which leaves every untouched chunk of entries shared.
    let in_place =
        touched.iter().all(|(at, effect)| matches!(effect, Some((seq, _)) if positions.get(*at) == Some(seq)));
    let mut replaced: Vec<(usize, &Blob)> = Vec::with_capacity(touched.len());
    for (at, effect) in touched.iter().filter(|_| in_place) {
        if let Some((_, blob)) = effect {
            match replaced.last_mut() {
                Some(last) if last.0 == *at => last.1 = blob,
                _ => replaced.push((*at, blob)),
            }
        }
    }
    let mut appended: Vec<(i64, &EntryKey, &Blob)> =
        added.iter().filter_map(|(key, effect)| effect.map(|(seq, blob)| (seq, *key, blob))).collect();
    appended.sort_unstable_by_key(|(seq, _, _)| *seq);
    let last = positions.last().copied();
    if in_place && appended.first().is_none_or(|(seq, _, _)| last.is_none_or(|last| *seq > last)) {
        let mut after = Vec::with_capacity(positions.len() + appended.len());
        after.extend_from_slice(positions);
        after.extend(appended.iter().map(|(seq, _, _)| *seq));
        let entries = entries.with(&replaced, appended.into_iter().map(|(_, key, blob)| (key.clone(), blob.clone())));
        return (StoredState { state_type, revision, entries }, after);
    }
    let mut touched = touched.into_iter().peekable();
    let mut rows: Vec<(i64, &EntryKey, &Blob)> = Vec::with_capacity(entries.len() + added.len());
    for (at, ((key, blob), seq)) in entries.iter().zip(positions).enumerate() {
        let mut row = Some((*seq, blob));
        while let Some((_, effect)) = touched.next_if(|(touched_at, _)| *touched_at == at) {
            row = effect;
        }
        if let Some((seq, blob)) = row {
            rows.push((seq, key, blob));
        }
    }
    rows.extend(appended);
    // Untouched entries keep their order; only moved and added ones can
    // break it.
    if !rows.is_sorted_by_key(|(seq, _, _)| *seq) {
        rows.sort_unstable_by_key(|(seq, _, _)| *seq);
    }
    let positions = rows.iter().map(|(seq, _, _)| *seq).collect();
    let entries = rows.into_iter().map(|(_, key, blob)| (key.clone(), blob.clone())).collect();
    (StoredState { state_type, revision, entries }, positions)
}

/// Finds entries of a state by key: a few lookups scan the entries, many
/// go through a map of them built once.
pub struct EntryFinder<'a> {
    entries: &'a Entries,
    index: Option<HashMap<&'a EntryKey, usize>>,
}

impl<'a> EntryFinder<'a> {
    /// A finder for about `lookups` lookups in `entries`.
    pub fn new(entries: &'a Entries, lookups: usize) -> Self {
        let index = (lookups > 8).then(|| entries.iter().enumerate().map(|(at, (key, _))| (key, at)).collect());
        Self { entries, index }
    }

    /// Where `key` is among the entries, if there.
    pub fn find(&self, key: &EntryKey) -> Option<usize> {
        match &self.index {
            Some(index) => index.get(key).copied(),
            None => self.entries.iter().position(|(held, _)| held == key),
        }
    }
}

/// Why a write was refused by the type rules (STATE-API.md §4.1).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "cannot write a {incoming} state: the connection holds a {stored} state. \
     A connection's state type can only change after its state is reset: \
     delete its entries with a {stored} write, then write the {incoming} state"
)]
pub struct TypeConflict {
    pub stored: &'static str,
    pub incoming: &'static str,
}

/// Applies the type rules to a write against the stored type and returns
/// the entry ops to apply, in order.
///
/// A legacy state gives way to any other type: its entry is deleted before
/// the new entries are written. Global and stream states only accept writes
/// of their own type.
pub fn plan_write(stored: Option<StateType>, write: &StateWrite) -> Result<Vec<EntryOp>, TypeConflict> {
    use StateType::*;
    let replaces_legacy = match (stored, write.state_type) {
        (None, _) | (Some(Legacy), Legacy) | (Some(Global), Global) | (Some(Stream), Stream) => false,
        (Some(Legacy), Global | Stream) => true,
        (Some(stored), incoming) => return Err(TypeConflict { stored: stored.as_str(), incoming: incoming.as_str() }),
    };
    let mut ops = Vec::with_capacity(write.ops.len() + usize::from(replaces_legacy));
    if replaces_legacy {
        ops.push(EntryOp { key: EntryKey::Legacy, blob: None });
    }
    ops.extend(write.ops.iter().cloned());
    Ok(ops)
}

/// One entry change a write really makes: an op whose blob (or pinned
/// position) differs from what is stored, or that deletes an entry that
/// exists.
#[derive(Debug, Clone, PartialEq)]
pub struct Change<'a> {
    /// The entry's encoded key ([`EntryKey::encode`]).
    pub key: String,
    /// The new blob, or `None` to delete the entry.
    pub blob: Option<&'a Blob>,
    /// Whether the entry exists before the change.
    pub existed: bool,
    /// The position the entry takes: pinned by the plan, else the one it
    /// has; `None` for a new entry (it goes last) or a delete.
    pub seq: Option<i64>,
}

/// Compares the planned ops with what is stored for the keys they touch
/// (`stored`: blob and position by encoded key) and keeps only the ops that
/// change something, in order. `pinned` gives positions an entry must take.
/// An empty result means the write changes nothing and takes no revision.
pub fn changes<'a, S: AsRef<str>>(
    ops: &'a [EntryOp],
    pinned: &HashMap<String, i64>,
    stored: &HashMap<String, (S, i64)>,
) -> Vec<Change<'a>> {
    ops.iter()
        .filter_map(|op| {
            let key = op.key.encode();
            let old = stored.get(&key);
            let pin = pinned.get(&key).copied();
            let differs = match (old, &op.blob) {
                (None, None) => false,
                (Some((blob, seq)), Some(new)) => blob.as_ref() != new.as_str() || pin.is_some_and(|p| p != *seq),
                _ => true,
            };
            let seq = op.blob.as_ref().and(pin.or(old.map(|(_, seq)| *seq)));
            differs.then(|| Change { existed: old.is_some(), key, blob: op.blob.as_ref(), seq })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(name: &str, namespace: Option<&str>) -> EntryKey {
        EntryKey::stream(StreamDescriptor { name: name.to_owned(), namespace: namespace.map(str::to_owned) })
    }

    fn write(state_type: StateType) -> StateWrite {
        StateWrite { state_type, ops: vec![EntryOp { key: stream("a", None), blob: Some(Blob::from_json("1")) }] }
    }

    #[test]
    fn entry_keys_round_trip_through_their_text_form() {
        let keys = [
            EntryKey::Legacy,
            EntryKey::Shared,
            stream("users", None),
            stream("users", Some("")),
            stream("we\"ird\u{0}", Some("ns:1")),
        ];
        for key in keys {
            assert_eq!(EntryKey::decode(&key.encode()), Some(key));
        }
    }

    #[test]
    fn absent_and_empty_namespaces_are_different_keys() {
        assert_ne!(stream("a", None).encode(), stream("a", Some("")).encode());
    }

    #[test]
    fn foreign_key_text_does_not_decode() {
        assert_eq!(EntryKey::decode("stream:nonsense"), None);
        assert_eq!(EntryKey::decode("other"), None);
    }

    #[test]
    fn connection_ids_parse_either_case_and_print_lower_case() {
        let id = ConnectionId::parse("5B9A7C1E-0F6A-4E1D-9C11-3F0B8D2A4E77").unwrap();
        assert_eq!(id.to_string(), "5b9a7c1e-0f6a-4e1d-9c11-3f0b8d2a4e77");
    }

    #[test]
    fn connection_ids_must_be_in_canonical_form() {
        assert!(ConnectionId::parse("5b9a7c1e0f6a4e1d9c113f0b8d2a4e77").is_none());
        assert!(ConnectionId::parse("{5b9a7c1e-0f6a-4e1d-9c11-3f0b8d2a4e77}").is_none());
        assert!(ConnectionId::parse("5b9a7c1e-0f6a-4e1d-9c11-3f0b8d2a4e7g").is_none());
    }

    #[test]
    fn any_type_may_be_written_over_no_state() {
        for t in [StateType::Legacy, StateType::Global, StateType::Stream] {
            assert_eq!(plan_write(None, &write(t)).unwrap(), write(t).ops);
        }
    }

    #[test]
    fn a_legacy_state_is_deleted_before_another_type_is_written() {
        let ops = plan_write(Some(StateType::Legacy), &write(StateType::Global)).unwrap();
        assert_eq!(ops[0], EntryOp { key: EntryKey::Legacy, blob: None });
        assert_eq!(&ops[1..], &write(StateType::Global).ops[..]);
    }

    #[test]
    fn global_and_stream_states_refuse_other_types() {
        use StateType::*;
        for (stored, incoming) in [(Global, Legacy), (Global, Stream), (Stream, Legacy), (Stream, Global)] {
            let err = plan_write(Some(stored), &write(incoming)).unwrap_err();
            assert_eq!(err.stored, stored.as_str());
            assert_eq!(err.incoming, incoming.as_str());
        }
    }

    #[test]
    fn only_ops_that_change_something_are_changes() {
        let stored: HashMap<String, (String, i64)> = [
            (stream("same", None).encode(), ("1".to_owned(), 0)),
            (stream("other", None).encode(), ("1".to_owned(), 1)),
            (stream("gone", None).encode(), ("1".to_owned(), 2)),
            (stream("moved", None).encode(), ("1".to_owned(), 3)),
        ]
        .into();
        let pinned: HashMap<String, i64> = [(stream("moved", None).encode(), 9)].into();
        let op = |name: &str, blob: Option<&str>| EntryOp { key: stream(name, None), blob: blob.map(Blob::from_json) };
        let ops = [
            op("same", Some("1")),
            op("other", Some("2")),
            op("gone", None),
            op("absent", None),
            op("new", Some("null")),
            op("moved", Some("1")),
        ];
        let found: Vec<(String, bool, bool, Option<i64>)> =
            changes(&ops, &pinned, &stored).into_iter().map(|c| (c.key, c.blob.is_some(), c.existed, c.seq)).collect();
        let key = |name: &str| stream(name, None).encode();
        assert_eq!(
            found,
            [
                (key("other"), true, true, Some(1)),
                (key("gone"), false, true, None),
                (key("new"), true, false, None),
                (key("moved"), true, true, Some(9)),
            ]
        );
    }

    #[test]
    fn advancing_a_state_applies_sets_deletes_and_moves_in_position_order() {
        let blob = Blob::from_json;
        let before = StoredState {
            state_type: Some(StateType::Stream),
            revision: 4,
            entries: vec![
                (stream("a", None), blob("1")),
                (stream("b", None), blob("2")),
                (stream("c", None), blob("3")),
            ]
            .into(),
        };
        let effects = vec![
            (stream("a", None), None),
            (stream("b", None), Some((blob("20"), 1))),
            (stream("d", None), Some((blob("4"), 7))),
            (stream("c", None), Some((blob("3"), 0))),
        ];
        let (after, positions) = advance(&before, &[0, 1, 5], &effects, 5, Some(StateType::Stream));
        let names: Vec<String> = after.entries.iter().map(|(k, b)| format!("{k:?}={}", b.as_str())).collect();
        assert_eq!(after.revision, 5);
        assert_eq!(positions, [0, 1, 7]);
        assert_eq!(names.len(), 3);
        assert!(names[0].contains("\"c\"") && names[1].contains("\"b\"") && names[2].contains("\"d\""), "{names:?}");
        assert_eq!(after.entries[1].1.as_str(), "20");
    }

    /// The plain fold `advance` must agree with: every entry by key, the
    /// effects applied in order, then sorted by position.
    fn advance_by_map(before: &StoredState, positions: &[i64], effects: &[Effect]) -> Vec<(i64, String, String)> {
        let mut by_key: HashMap<&EntryKey, (i64, &Blob)> =
            before.entries.iter().zip(positions).map(|((key, blob), seq)| (key, (*seq, blob))).collect();
        for (key, effect) in effects {
            match effect {
                Some((blob, seq)) => by_key.insert(key, (*seq, blob)),
                None => by_key.remove(key),
            };
        }
        let mut rows: Vec<_> =
            by_key.into_iter().map(|(key, (seq, blob))| (seq, key.encode(), blob.as_str().to_owned())).collect();
        rows.sort();
        rows
    }

    proptest::proptest! {
        #[test]
        fn advancing_agrees_with_a_fold_by_key(
            held in 0usize..40,
            effects in proptest::collection::vec((0usize..50, proptest::option::of(0i64..60), 0u8..3), 0..20),
        ) {
            let before = StoredState {
                state_type: Some(StateType::Stream),
                revision: 1,
                entries: (0..held).map(|n| (stream(&format!("s{n}"), None), Blob::from_json(&n.to_string()))).collect(),
            };
            // Entries at every other position, so a write can keep, move or
            // add past them.
            let positions: Vec<i64> = (0..held as i64).map(|n| n * 2).collect();
            let mut next = held as i64 * 2;
            let effects: Vec<Effect> = effects
                .into_iter()
                .map(|(name, seq, how)| {
                    let key = stream(&format!("s{name}"), None);
                    let at = (name < held).then(|| name as i64 * 2);
                    let seq = match (how, at, seq) {
                        // A set that keeps the entry's place, or a new one last.
                        (0, Some(at), _) => Some(at),
                        (0, None, _) => { next += 1; Some(next) }
                        // A delete.
                        (1, _, _) => None,
                        // A move to an odd (free) position.
                        (_, _, seq) => seq.map(|seq| seq * 2 + 1),
                    };
                    (key, seq.map(|seq| (Blob::from_json(&format!("{}", seq + 1000)), seq)))
                })
                .collect();
            // Positions stay unique among the entries a write leaves.
            let expected = advance_by_map(&before, &positions, &effects);
            let seqs: std::collections::HashSet<i64> = expected.iter().map(|row| row.0).collect();
            proptest::prop_assume!(seqs.len() == expected.len());
            let (after, after_positions) = advance(&before, &positions, &effects, 2, Some(StateType::Stream));
            let got: Vec<(i64, String, String)> = after
                .entries
                .iter()
                .zip(&after_positions)
                .map(|((key, blob), seq)| (*seq, key.encode(), blob.as_str().to_owned()))
                .collect();
            proptest::prop_assert_eq!(got, expected);
        }
    }

    #[test]
    fn same_type_writes_merge() {
        use StateType::*;
        for t in [Legacy, Global, Stream] {
            assert_eq!(plan_write(Some(t), &write(t)).unwrap(), write(t).ops);
        }
    }
}
