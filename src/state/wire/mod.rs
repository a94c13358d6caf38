//! The JSON wire format of STATE-API.md §2: decoding requests into domain
//! values and rendering states back.
//!
//! Decoding never builds a tree of a blob: each level of the envelope is read
//! as a list of members whose values stay raw text, so blobs pass through
//! byte for byte. Every schema problem becomes a [`FieldError`] whose path
//! uses Airbyte's notation (`connectionState.streamState[1].streamDescriptor.name`).

pub mod highwater;
mod json;
pub mod responses;

use std::collections::HashMap;
use std::fmt;

use serde_json::value::RawValue;

use super::{Blob, ConnectionId, EntryKey, EntryOp, StateType, StateWrite, StoredState, StreamDescriptor};
use json::{array, is_null, nesting_exceeds, object, parse, shown, string, Errors, Members, Object};

/// Limits applied while decoding a request.
#[derive(Debug, Clone, Copy)]
pub struct DecodeLimits {
    /// Deepest nesting of arrays and objects allowed, blobs included.
    pub max_depth: usize,
    /// Most stream items one request may carry.
    pub max_streams: usize,
    /// Largest single blob, in bytes.
    pub max_blob_bytes: usize,
    /// Longest stream name or namespace, in characters.
    pub max_name_chars: usize,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        Self { max_depth: 128, max_streams: 100_000, max_blob_bytes: 128 * 1024 * 1024, max_name_chars: 1024 }
    }
}

/// Why a request body was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    /// Not JSON at all (STATE-API.md §4.3: 400).
    #[error("the request body is not valid JSON: {0}")]
    Syntax(String),
    /// Nested deeper than the limit allows (422).
    #[error("the request body nests deeper than {limit} levels")]
    TooDeep { limit: usize },
    /// More stream items than the limit allows (422).
    #[error("the request carries {count} streams, more than the limit of {limit}")]
    TooManyStreams { count: usize, limit: usize },
    /// A blob larger than the limit (422).
    #[error("{path} is {size} bytes, more than the limit of {limit}")]
    BlobTooLarge { path: String, size: usize, limit: usize },
    /// A stream name or namespace longer than the limit (422).
    #[error("{path} is longer than {limit} characters")]
    NameTooLong { path: String, limit: usize },
    /// Well-formed JSON that breaks the schema (422).
    #[error("the request body is invalid: {}", .0.first().map(ToString::to_string).unwrap_or_default())]
    Invalid(Vec<FieldError>),
}

/// One schema violation, as Airbyte's `InvalidInputProperty`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub property_path: String,
    pub invalid_value: Option<String>,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.property_path.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.property_path, self.message)
        }
    }
}

/// Decodes a `ConnectionIdRequestBody`.
pub fn decode_connection_id_request(body: &[u8], limits: DecodeLimits) -> Result<ConnectionId, DecodeError> {
    let top = decode_top(body, limits)?;
    let mut errors = Errors::new(limits);
    let id = top.and_then(|top| connection_id(&top, &mut errors));
    errors.finish(id)
}

/// Decodes a `ConnectionStateCreateOrUpdate`.
pub fn decode_create_or_update(body: &[u8], limits: DecodeLimits) -> Result<(ConnectionId, StateWrite), DecodeError> {
    highwater::decode_write(body, limits).map(|decoded| (decoded.id, decoded.body))
}

/// Checks the body is UTF-8 JSON within the depth limit, and reads the top
/// object. `Ok(None)` means a schema error was already recorded.
fn decode_top(body: &[u8], limits: DecodeLimits) -> Result<Option<Object<'_>>, DecodeError> {
    let text = std::str::from_utf8(body)
        .map_err(|e| DecodeError::Syntax(format!("invalid UTF-8 at byte {}", e.valid_up_to())))?;
    if nesting_exceeds(text.as_bytes(), limits.max_depth) {
        return Err(DecodeError::TooDeep { limit: limits.max_depth });
    }
    if text.trim_start().starts_with('{') {
        let members: Members<'_> = parse(text).map_err(|e| DecodeError::Syntax(e.to_string()))?;
        let mut errors = Errors::new(limits);
        let top = Object::new(members, "", &mut errors);
        return errors.finish(Some(top)).map(Some);
    }
    let raw: &RawValue = parse(text).map_err(|e| DecodeError::Syntax(e.to_string()))?;
    Err(DecodeError::Invalid(vec![FieldError {
        property_path: String::new(),
        invalid_value: Some(shown(raw)),
        message: "the request body must be a JSON object".to_owned(),
    }]))
}

fn connection_id(top: &Object<'_>, errors: &mut Errors) -> Option<ConnectionId> {
    let Some(raw) = top.get("connectionId") else {
        errors.push("connectionId", None, "is required");
        return None;
    };
    let id = string(raw).as_deref().and_then(ConnectionId::parse);
    if id.is_none() {
        errors.push("connectionId", Some(raw), "must be a UUID in its 36-character form");
    }
    id
}

fn state_write(state: &Object<'_>, limits: DecodeLimits, errors: &mut Errors) -> Option<StateWrite> {
    const PATH: &str = "connectionState.stateType";
    let state_type = match state.get("stateType") {
        None => {
            errors.push(PATH, None, "is required");
            return None;
        }
        Some(raw) => match string(raw).as_deref() {
            Some("not_set") => {
                errors.push(
                    PATH,
                    Some(raw),
                    "not_set cannot be written; to clear a state, delete its entries with a write of its own type",
                );
                return None;
            }
            name => match name.and_then(StateType::parse) {
                Some(state_type) => state_type,
                None => {
                    errors.push(PATH, Some(raw), "must be one of legacy, global, stream, not_set");
                    return None;
                }
            },
        },
    };
    let mut streams = StreamItems::new(limits);
    let ops = match state_type {
        StateType::Legacy => vec![EntryOp {
            key: EntryKey::Legacy,
            blob: state.get("state").and_then(|raw| errors.blob(raw, "connectionState.state")),
        }],
        StateType::Stream => {
            let path = "connectionState.streamState";
            streams.read(state.get("streamState"), path, errors);
            streams.ops
        }
        StateType::Global => global_ops(state, &mut streams, errors),
    };
    Some(StateWrite { state_type, ops })
}

fn global_ops(state: &Object<'_>, streams: &mut StreamItems, errors: &mut Errors) -> Vec<EntryOp> {
    const PATH: &str = "connectionState.globalState";
    let Some(raw) = state.get("globalState") else {
        errors.push(PATH, None, "is required for a global state");
        return Vec::new();
    };
    let Some(global) = object(raw, PATH, errors) else {
        return Vec::new();
    };
    let shared = match (global.get("shared_state"), global.get("sharedState")) {
        (Some(_), Some(alias)) => {
            let path = "connectionState.globalState.sharedState";
            errors.push(path, Some(alias), "must not be sent together with shared_state");
            None
        }
        (snake, camel) => snake.or(camel).and_then(|raw| errors.blob(raw, "connectionState.globalState.shared_state")),
    };
    let mut ops = vec![EntryOp { key: EntryKey::Shared, blob: shared }];
    let path = "connectionState.globalState.streamStates";
    streams.read(global.get("streamStates"), path, errors);
    ops.append(&mut streams.ops);
    ops
}

/// Collects stream items, refusing a stream named twice.
struct StreamItems {
    limits: DecodeLimits,
    ops: Vec<EntryOp>,
    seen: HashMap<EntryKey, String>,
}

impl StreamItems {
    fn new(limits: DecodeLimits) -> Self {
        Self { limits, ops: Vec::new(), seen: HashMap::new() }
    }

    fn read(&mut self, raw: Option<&RawValue>, path: &str, errors: &mut Errors) {
        let Some(raw) = raw.filter(|raw| !is_null(raw)) else {
            return;
        };
        let Some(items) = array(raw, path, errors) else {
            return;
        };
        if items.len() > self.limits.max_streams {
            errors.exceed(DecodeError::TooManyStreams { count: items.len(), limit: self.limits.max_streams });
            return;
        }
        self.ops.reserve(items.len());
        for (i, item) in items.into_iter().enumerate() {
            let item_path = format!("{path}[{i}]");
            let Some(item) = object(item, &item_path, errors) else {
                continue;
            };
            let descriptor_path = format!("{item_path}.streamDescriptor");
            let Some(descriptor) = descriptor(item.get("streamDescriptor"), &descriptor_path, errors) else {
                continue;
            };
            let key = EntryKey::stream(descriptor);
            if let Some(first) = self.seen.get(&key) {
                let message = format!("names the same stream as {first}");
                errors.push(&descriptor_path, item.get("streamDescriptor"), &message);
                continue;
            }
            self.seen.insert(key.clone(), descriptor_path);
            let blob = item.get("streamState").and_then(|raw| errors.blob(raw, &format!("{item_path}.streamState")));
            self.ops.push(EntryOp { key, blob });
        }
    }
}

fn descriptor(raw: Option<&RawValue>, path: &str, errors: &mut Errors) -> Option<StreamDescriptor> {
    let Some(raw) = raw else {
        errors.push(path, None, "is required");
        return None;
    };
    let descriptor = object(raw, path, errors)?;
    let name_path = format!("{path}.name");
    let name = match descriptor.get("name") {
        None => {
            errors.push(&name_path, None, "is required");
            None
        }
        Some(raw) => match string(raw) {
            Some(name) => errors.name(name, &name_path),
            None => {
                errors.push(&name_path, Some(raw), "must be a string");
                None
            }
        },
    };
    let namespace = match descriptor.get("namespace").filter(|raw| !is_null(raw)) {
        None => Some(None),
        Some(raw) => {
            let namespace_path = format!("{path}.namespace");
            match string(raw) {
                Some(namespace) => errors.name(namespace, &namespace_path).map(Some),
                None => {
                    errors.push(&namespace_path, Some(raw), "must be a string");
                    None
                }
            }
        }
    };
    Some(StreamDescriptor { name: name?, namespace: namespace? })
}

/// Renders a state as Airbyte's `ConnectionState`, fields in the order of
/// STATE-API.md §2, absent fields left out.
pub fn render_state(id: ConnectionId, state: &StoredState) -> Vec<u8> {
    render(id, state, &mut Placing::Off)
}

/// [`render_state`], and where the body holds each blob, for
/// [`render_state_from`]; the layout is `None` when the body is too large
/// for one (4 GiB).
pub fn render_state_laid_out(id: ConnectionId, state: &StoredState) -> (Vec<u8>, Option<Layout>) {
    let mut placing = Placing::On(Vec::with_capacity(state.entries.len()));
    let body = render(id, state, &mut placing);
    (body, placing.into_layout())
}

/// Where a rendered body holds the blob of each entry it shows, in the
/// order of the body.
#[derive(Debug, Clone, PartialEq)]
pub struct Layout(Vec<Placed>);

/// One blob's place: its entry's index, and its first and past-the-end byte.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Placed {
    entry: u32,
    start: u32,
    end: u32,
}

impl Layout {
    /// The bytes the layout itself takes.
    pub fn size(&self) -> usize {
        self.0.len() * std::mem::size_of::<Placed>()
    }
}

/// Whether [`render`] records where it puts each blob.
enum Placing {
    Off,
    On(Vec<Placed>),
    /// The body outgrew `u32` offsets.
    TooLarge,
}

impl Placing {
    fn blob(&mut self, out: &mut Vec<u8>, entry: usize, blob: &Blob) {
        let start = out.len();
        out.extend_from_slice(blob.as_str().as_bytes());
        if let Self::On(placed) = self {
            match (u32::try_from(entry), u32::try_from(start), u32::try_from(out.len())) {
                (Ok(entry), Ok(start), Ok(end)) => placed.push(Placed { entry, start, end }),
                _ => *self = Self::TooLarge,
            }
        }
    }

    fn into_layout(self) -> Option<Layout> {
        match self {
            Self::On(placed) => Some(Layout(placed)),
            Self::Off | Self::TooLarge => None,
        }
    }
}

fn render(id: ConnectionId, state: &StoredState, placing: &mut Placing) -> Vec<u8> {
    let blob_bytes: usize = state.entries.iter().map(|(_, b)| b.len() + 64).sum();
    let mut out = Vec::with_capacity(96 + blob_bytes);
    out.extend_from_slice(b"{\"stateType\":\"");
    out.extend_from_slice(super::type_name(state.state_type).as_bytes());
    out.extend_from_slice(b"\",\"connectionId\":\"");
    out.extend_from_slice(id.to_string().as_bytes());
    out.push(b'"');
    let find = |wanted: EntryKey| state.entries.iter().position(|(key, _)| *key == wanted);
    match state.state_type {
        None => {}
        Some(StateType::Legacy) => {
            if let Some(at) = find(EntryKey::Legacy) {
                out.extend_from_slice(b",\"state\":");
                placing.blob(&mut out, at, &state.entries[at].1);
            }
        }
        Some(StateType::Stream) => {
            out.extend_from_slice(b",\"streamState\":");
            render_streams(&mut out, state, placing);
        }
        Some(StateType::Global) => {
            out.extend_from_slice(b",\"globalState\":{");
            if let Some(at) = find(EntryKey::Shared) {
                out.extend_from_slice(b"\"shared_state\":");
                placing.blob(&mut out, at, &state.entries[at].1);
                out.push(b',');
            }
            out.extend_from_slice(b"\"streamStates\":");
            render_streams(&mut out, state, placing);
            out.push(b'}');
        }
    }
    out.push(b'}');
    out
}

fn render_streams(out: &mut Vec<u8>, state: &StoredState, placing: &mut Placing) {
    out.push(b'[');
    let streams = state.entries.iter().enumerate().filter_map(|(at, (key, blob))| match key {
        EntryKey::Stream(d) => Some((at, d, blob)),
        _ => None,
    });
    for (i, (at, descriptor, blob)) in streams.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"streamDescriptor\":{\"name\":");
        write_json_string(out, &descriptor.name);
        if let Some(namespace) = &descriptor.namespace {
            out.extend_from_slice(b",\"namespace\":");
            write_json_string(out, namespace);
        }
        out.extend_from_slice(b"},\"streamState\":");
        placing.blob(out, at, blob);
        out.push(b'}');
    }
    out.push(b']');
}

/// The body of `state`, made from `body`, the rendering of `before` for the
/// same connection laid out as `layout`: the text around the blobs is
/// copied, and so is every blob `state` shares with `before`; only the
/// others are written anew. A write of one stream of a 10,000-stream state
/// so costs one copy of the body, in two runs around the new blob, instead
/// of a pass over every stream, its name escaped and its blob fetched from
/// wherever it lies.
///
/// `None` unless the two states render the same text around their blobs:
/// the same type and the same keys in the same order.
pub fn render_state_from(
    before: &StoredState,
    body: &[u8],
    layout: &Layout,
    state: &StoredState,
) -> Option<(Vec<u8>, Layout)> {
    if before.state_type != state.state_type || !before.entries.same_keys(&state.entries) {
        return None;
    }
    let changed = |placed: &Placed| {
        let at = placed.entry as usize;
        if state.entries.shares(&before.entries, at) {
            return Some(None);
        }
        let (old, new) = (&before.entries.get(at)?.1, &state.entries.get(at)?.1);
        Some((!old.same(new)).then_some(new))
    };
    let mut grown = 0;
    for placed in &layout.0 {
        if let Some(blob) = changed(placed)? {
            grown += blob.len();
        }
    }
    let mut out = Vec::with_capacity(body.len() + grown);
    let mut placing = Placing::On(Vec::with_capacity(layout.0.len()));
    // `body[copied..]` goes to the output unchanged up to the next new blob.
    let mut copied = 0;
    for placed in &layout.0 {
        let (start, end) = (placed.start as usize, placed.end as usize);
        match changed(placed)? {
            Some(blob) => {
                out.extend_from_slice(body.get(copied..start)?);
                placing.blob(&mut out, placed.entry as usize, blob);
                copied = end;
            }
            None => {
                // Where it will be once the run it is in is copied.
                let moved = out.len() + start.checked_sub(copied)?;
                let end = moved + (end - start);
                if let Placing::On(list) = &mut placing {
                    match (u32::try_from(moved), u32::try_from(end)) {
                        (Ok(start), Ok(end)) => list.push(Placed { entry: placed.entry, start, end }),
                        _ => placing = Placing::TooLarge,
                    }
                }
            }
        }
    }
    out.extend_from_slice(body.get(copied..)?);
    Some((out, placing.into_layout()?))
}

/// Renders a state type as the bare JSON string `get_type` answers.
pub fn render_type(state_type: Option<StateType>) -> Vec<u8> {
    format!("\"{}\"", super::type_name(state_type)).into_bytes()
}

fn write_json_string(out: &mut Vec<u8>, text: &str) {
    // Writing a &str into a Vec cannot fail.
    let _ = serde_json::to_writer(out, text);
}

#[cfg(test)]
mod tests;
