//! Property tests. (1) Random sequences of writes go through the real
//! `Store` and through a small model of STATE-API.md §4 (a list of entries
//! in insertion order, a type and a revision); after every write both must
//! agree. (2) Any valid `create_or_update` body, rendered from generated
//! values, decodes to exactly those values, blobs byte for byte.

#[path = "support/mod.rs"]
mod support;

use highwater::state::ops::Refusal;
use highwater::state::wire::{decode_create_or_update, DecodeLimits};
use highwater::state::{Blob, ConnectionId, EntryKey, EntryOp, StateType, StateWrite, StoredState, StreamDescriptor};
use highwater::store::{Store, StoreError};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

// ---------------------------------------------------------------------------
// (1) The store against a model of §4.

/// STATE-API.md §4 as plainly as possible: no SQL, no plan.
#[derive(Debug, Default)]
struct Model {
    entries: Vec<(EntryKey, Blob)>,
    state_type: Option<StateType>,
    revision: u64,
}

impl Model {
    /// Applies a write; `Err` when §4.1 refuses the type change.
    fn apply(&mut self, write: &StateWrite) -> Result<(), ()> {
        use StateType::*;
        let incoming = write.state_type;
        match (self.state_type, incoming) {
            (None, _) | (Some(Legacy), _) => {}
            (Some(stored), incoming) if stored == incoming => {}
            _ => return Err(()),
        }
        let mut changed = false;
        if self.state_type == Some(Legacy) && incoming != Legacy {
            changed |= self.delete(&EntryKey::Legacy);
        }
        for op in &write.ops {
            changed |= match &op.blob {
                Some(blob) => self.upsert(&op.key, blob),
                None => self.delete(&op.key),
            };
        }
        if changed {
            self.revision += 1;
            self.state_type = if self.entries.is_empty() { None } else { Some(incoming) };
        }
        Ok(())
    }

    fn upsert(&mut self, key: &EntryKey, blob: &Blob) -> bool {
        match self.entries.iter_mut().find(|(k, _)| k == key) {
            Some((_, old)) if old == blob => false,
            Some((_, old)) => {
                *old = blob.clone();
                true
            }
            None => {
                self.entries.push((key.clone(), blob.clone()));
                true
            }
        }
    }

    fn delete(&mut self, key: &EntryKey) -> bool {
        let before = self.entries.len();
        self.entries.retain(|(k, _)| k != key);
        self.entries.len() != before
    }

    fn check(&self, stored: &StoredState) -> Result<(), TestCaseError> {
        prop_assert_eq!(stored.entries.iter().cloned().collect::<Vec<_>>(), self.entries.clone());
        prop_assert_eq!(stored.state_type, self.state_type);
        prop_assert_eq!(stored.revision, self.revision);
        Ok(())
    }
}

/// A small pool of stream keys, so that writes hit the same streams again.
fn stream_key() -> impl Strategy<Value = EntryKey> {
    let name = prop::sample::select(vec!["a", "b", "c"]);
    let namespace = prop::sample::select(vec![None, Some(""), Some("x")]);
    (name, namespace).prop_map(|(name, namespace)| {
        EntryKey::stream(StreamDescriptor { name: name.to_owned(), namespace: namespace.map(str::to_owned) })
    })
}

/// A present blob from a small set (so some writes change nothing), or an
/// absent one (a delete). `null` is a present blob.
fn small_blob() -> impl Strategy<Value = Option<Blob>> {
    let texts = vec!["1", "2", "null", r#"{"c":1}"#, "[1,2]", r#""x""#, "1.50"];
    prop::option::weighted(0.75, prop::sample::select(texts).prop_map(Blob::from_json))
}

fn state_write() -> impl Strategy<Value = StateWrite> {
    let state_type = prop::sample::select(vec![StateType::Legacy, StateType::Global, StateType::Stream]);
    let streams = prop::collection::vec((stream_key(), small_blob()), 0..5);
    (state_type, small_blob(), streams).prop_map(|(state_type, blob, streams)| {
        let mut ops = match state_type {
            StateType::Legacy => return StateWrite { state_type, ops: vec![EntryOp { key: EntryKey::Legacy, blob }] },
            StateType::Global => vec![EntryOp { key: EntryKey::Shared, blob }],
            StateType::Stream => Vec::new(),
        };
        for (key, blob) in streams {
            // The decoder refuses a key named twice; a write never holds one.
            if !ops.iter().any(|op| op.key == key) {
                ops.push(EntryOp { key, blob });
            }
        }
        StateWrite { state_type, ops }
    })
}

async fn run_sequence(store: &dyn Store, writes: Vec<StateWrite>) -> Result<(), TestCaseError> {
    let id = ConnectionId::random();
    let mut model = Model::default();
    for (step, write) in writes.into_iter().enumerate() {
        let expected = model.apply(&write);
        let outcome = store.write(id, write.clone()).await;
        match (&expected, outcome) {
            (Ok(()), Ok(answered)) => model.check(&answered)?,
            (Err(()), Err(StoreError::Refused(Refusal::TypeConflict(_)))) => {}
            (expected, outcome) => {
                return Err(TestCaseError::fail(format!(
                    "step {step}: {write:?}: model says {expected:?}, store says {outcome:?}"
                )))
            }
        }
        let read = store.read(id).await.map_err(|e| TestCaseError::fail(format!("read: {e}")))?;
        model.check(&read)?;
    }
    Ok(())
}

#[test]
fn random_write_sequences_leave_the_store_exactly_where_the_model_of_section_4_says() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let (_database, store) = runtime.block_on(async {
        let database = support::TestDatabase::new().await;
        let store = database.open().await;
        (database, store)
    });
    let config = Config { cases: 256, failure_persistence: None, ..Config::default() };
    let mut runner = TestRunner::new(config);
    let sequences = prop::collection::vec(state_write(), 1..=20);
    let outcome = runner.run(&sequences, |writes| runtime.block_on(run_sequence(store.as_ref(), writes)));
    if let Err(failure) = outcome {
        panic!("{failure}");
    }
}

// ---------------------------------------------------------------------------
// (2) The decoder against generated requests.

/// A JSON value whose text is kept as spelled: numbers and strings are
/// literal JSON text.
#[derive(Debug, Clone)]
enum Json {
    Literal(String),
    Array(Vec<Json>),
    Object(Vec<(String, Json)>),
}

impl Json {
    /// The text, with `gap` between every two tokens.
    fn render(&self, gap: &str) -> String {
        match self {
            Json::Literal(text) => text.clone(),
            Json::Array(items) => {
                let items: Vec<String> = items.iter().map(|item| item.render(gap)).collect();
                format!("[{gap}{}{gap}]", items.join(&format!("{gap},{gap}")))
            }
            Json::Object(members) => {
                let members: Vec<String> =
                    members.iter().map(|(name, value)| format!("{name}{gap}:{gap}{}", value.render(gap))).collect();
                format!("{{{gap}{}{gap}}}", members.join(&format!("{gap},{gap}")))
            }
        }
    }
}

fn number() -> impl Strategy<Value = String> {
    let integer = prop_oneof![Just("0".to_owned()), "[1-9][0-9]{0,40}"];
    let fraction = prop::option::of("\\.[0-9]{1,20}");
    let exponent = prop::option::of("[eE][+-]?[0-9]{1,7}");
    (any::<bool>(), integer, fraction, exponent).prop_map(|(negative, integer, fraction, exponent)| {
        format!(
            "{}{integer}{}{}",
            if negative { "-" } else { "" },
            fraction.unwrap_or_default(),
            exponent.unwrap_or_default()
        )
    })
}

/// A JSON string literal: any text through serde_json, or a spelling
/// serde_json would never produce.
fn string_literal() -> impl Strategy<Value = String> {
    let odd = vec![r#""\u00e9""#, r#""\/""#, r#""\ud800""#, r#""\u0000 \" \\""#, r#""\uD83D\uDE00""#, r#""""#];
    prop_oneof![
        3 => any::<String>().prop_map(|s| serde_json::to_string(&s).expect("a string serialises")),
        1 => prop::sample::select(odd).prop_map(str::to_owned),
    ]
}

fn json() -> impl Strategy<Value = Json> {
    let leaf = prop_oneof![
        prop::sample::select(vec!["null", "true", "false"]).prop_map(|s| Json::Literal(s.to_owned())),
        number().prop_map(Json::Literal),
        string_literal().prop_map(Json::Literal),
    ];
    leaf.prop_recursive(4, 32, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Json::Array),
            // Member names may repeat: a blob keeps duplicates.
            prop::collection::vec((string_literal(), inner), 0..5).prop_map(Json::Object),
        ]
    })
}

/// A generated request: what the decoder must find in it.
#[derive(Debug, Clone)]
struct Request {
    id: ConnectionId,
    upper_case_id: bool,
    state_type: StateType,
    /// The legacy `state` or the global shared blob.
    blob: Option<Json>,
    camel_case_shared: bool,
    streams: Vec<(StreamDescriptor, Option<Json>)>,
    gap: &'static str,
}

impl Request {
    fn member(&self, name: &str, value: &str) -> String {
        let gap = self.gap;
        format!("{gap}\"{name}\"{gap}:{gap}{value}")
    }

    fn blob_member(&self, name: &str, value: &Option<Json>) -> Option<String> {
        value.as_ref().map(|v| self.member(name, &v.render(self.gap)))
    }

    fn render_streams(&self) -> String {
        let quoted = |text: &str| serde_json::to_string(text).expect("a string serialises");
        let items: Vec<String> = self
            .streams
            .iter()
            .map(|(d, value)| {
                let mut descriptor = vec![self.member("name", &quoted(&d.name))];
                descriptor.extend(d.namespace.as_deref().map(|ns| self.member("namespace", &quoted(ns))));
                let mut item = vec![self.member("streamDescriptor", &format!("{{{}}}", descriptor.join(",")))];
                item.extend(self.blob_member("streamState", value));
                format!("{{{}}}", item.join(","))
            })
            .collect();
        format!("[{}]", items.join(","))
    }

    fn render(&self) -> String {
        let id = if self.upper_case_id { self.id.to_string().to_uppercase() } else { self.id.to_string() };
        let mut state = vec![self.member("stateType", &format!("\"{}\"", self.state_type.as_str()))];
        match self.state_type {
            StateType::Legacy => state.extend(self.blob_member("state", &self.blob)),
            StateType::Stream => state.push(self.member("streamState", &self.render_streams())),
            StateType::Global => {
                let shared = if self.camel_case_shared { "sharedState" } else { "shared_state" };
                let mut global: Vec<String> = self.blob_member(shared, &self.blob).into_iter().collect();
                global.push(self.member("streamStates", &self.render_streams()));
                state.push(self.member("globalState", &format!("{{{}}}", global.join(","))));
            }
        }
        let connection_state = format!("{{{}}}", state.join(","));
        format!(
            "{{{},{}}}",
            self.member("connectionId", &format!("\"{id}\"")),
            self.member("connectionState", &connection_state)
        )
    }

    /// The ops the decoder must return, blobs from the compact rendering.
    fn expected_ops(&self) -> Vec<EntryOp> {
        let compact = |value: &Option<Json>| value.as_ref().map(|v| Blob::from_json(&v.render("")));
        let streams = self.streams.iter().map(|(d, v)| EntryOp { key: EntryKey::stream(d.clone()), blob: compact(v) });
        match self.state_type {
            StateType::Legacy => vec![EntryOp { key: EntryKey::Legacy, blob: compact(&self.blob) }],
            StateType::Stream => streams.collect(),
            StateType::Global => {
                std::iter::once(EntryOp { key: EntryKey::Shared, blob: compact(&self.blob) }).chain(streams).collect()
            }
        }
    }
}

fn request() -> impl Strategy<Value = Request> {
    let descriptor = (any::<String>(), prop::option::of(any::<String>()))
        .prop_map(|(name, namespace)| StreamDescriptor { name, namespace });
    // A stream named twice is a 422; a valid request names each once.
    let streams = prop::collection::vec((descriptor, prop::option::of(json())), 0..4).prop_map(|items| {
        let mut unique: Vec<(StreamDescriptor, Option<Json>)> = Vec::new();
        for (descriptor, blob) in items {
            if !unique.iter().any(|(d, _)| *d == descriptor) {
                unique.push((descriptor, blob));
            }
        }
        unique
    });
    let state_type = prop::sample::select(vec![StateType::Legacy, StateType::Global, StateType::Stream]);
    let gap = prop::sample::select(vec!["", " ", "\n\t ", "\r\n"]);
    (any::<u128>(), any::<bool>(), state_type, prop::option::of(json()), any::<bool>(), streams, gap).prop_map(
        |(bits, upper_case_id, state_type, blob, camel_case_shared, streams, gap)| Request {
            id: ConnectionId::parse(&uuid::Uuid::from_u128(bits).to_string()).expect("a UUID"),
            upper_case_id,
            state_type,
            blob,
            camel_case_shared,
            streams,
            gap,
        },
    )
}

proptest! {
    #![proptest_config(Config { cases: 256, failure_persistence: None, ..Config::default() })]

    #[test]
    fn any_valid_request_decodes_to_what_it_says_with_blobs_kept_byte_for_byte(request in request()) {
        let body = request.render();
        let decoded = decode_create_or_update(body.as_bytes(), DecodeLimits::default());
        let (id, write) = decoded.map_err(|e| TestCaseError::fail(format!("{e:?} for {body}")))?;
        prop_assert_eq!(id, request.id);
        prop_assert_eq!(write.state_type, request.state_type);
        prop_assert_eq!(&write.ops, &request.expected_ops());
    }

    #[test]
    fn a_blob_is_its_compact_text(value in json(), gap in prop::sample::select(vec![" ", "\n", "\t \r\n"])) {
        let compact = value.render("");
        prop_assert_eq!(Blob::from_json(&value.render(gap)).into_string(), compact.clone());
        prop_assert_eq!(Blob::from_json(&compact).into_string(), compact);
    }
}
