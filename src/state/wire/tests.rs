use super::json::nesting_exceeds;
use super::*;
use crate::state::Blob;

const LIMITS: DecodeLimits =
    DecodeLimits { max_depth: 128, max_streams: 1000, max_blob_bytes: 1 << 20, max_name_chars: 100 };
const ID: &str = "5b9a7c1e-0f6a-4e1d-9c11-3f0b8d2a4e77";

fn write(state: &str) -> Result<(ConnectionId, StateWrite), DecodeError> {
    let body = format!(r#"{{"connectionId":"{ID}","connectionState":{state}}}"#);
    decode_create_or_update(body.as_bytes(), LIMITS)
}

fn field_errors(result: Result<(ConnectionId, StateWrite), DecodeError>) -> Vec<(String, Option<String>)> {
    match result {
        Err(DecodeError::Invalid(errors)) => errors.into_iter().map(|e| (e.property_path, e.invalid_value)).collect(),
        other => panic!("expected a schema error, got {other:?}"),
    }
}

fn stream_key(name: &str, namespace: Option<&str>) -> EntryKey {
    EntryKey::stream(StreamDescriptor { name: name.to_owned(), namespace: namespace.map(str::to_owned) })
}

#[test]
fn a_stream_write_keeps_blobs_as_sent_and_absent_blobs_delete() {
    let (id, write) = write(
        r#"{"stateType":"stream","streamState":[
            {"streamDescriptor":{"name":"a","namespace":"public"},"streamState":{"z":1.50,"a":1e3}},
            {"streamDescriptor":{"name":"b"}},
            {"streamDescriptor":{"name":"c","namespace":null},"streamState":null}]}"#,
    )
    .unwrap();
    assert_eq!(id.to_string(), ID);
    assert_eq!(write.state_type, StateType::Stream);
    assert_eq!(
        write.ops,
        vec![
            EntryOp { key: stream_key("a", Some("public")), blob: Some(Blob::from_json(r#"{"z":1.50,"a":1e3}"#)) },
            EntryOp { key: stream_key("b", None), blob: None },
            EntryOp { key: stream_key("c", None), blob: Some(Blob::from_json("null")) },
        ]
    );
}

#[test]
fn a_legacy_write_without_state_deletes_the_legacy_blob() {
    let (_, write) = write(r#"{"stateType":"legacy"}"#).unwrap();
    assert_eq!(write.ops, vec![EntryOp { key: EntryKey::Legacy, blob: None }]);
}

#[test]
fn a_global_write_accepts_the_camel_case_shared_state_alias() {
    let (_, write) = write(r#"{"stateType":"global","globalState":{"sharedState":{"x":1}}}"#).unwrap();
    assert_eq!(write.ops, vec![EntryOp { key: EntryKey::Shared, blob: Some(Blob::from_json(r#"{"x":1}"#)) }]);
}

#[test]
fn a_global_write_without_shared_state_deletes_it() {
    let (_, write) = write(r#"{"stateType":"global","globalState":{"streamStates":null}}"#).unwrap();
    assert_eq!(write.ops, vec![EntryOp { key: EntryKey::Shared, blob: None }]);
}

#[test]
fn both_spellings_of_shared_state_are_refused() {
    let errors = field_errors(write(
        r#"{"stateType":"global","globalState":{"shared_state":1,"sharedState":2,"streamStates":[]}}"#,
    ));
    assert_eq!(errors, vec![("connectionState.globalState.sharedState".to_owned(), Some("2".to_owned()))]);
}

#[test]
fn unknown_properties_are_ignored_at_every_level() {
    let result = write(
        r#"{"stateType":"stream","extra":1,"state":{"ignored":true},
            "streamState":[{"streamDescriptor":{"name":"a","x":[]},"streamState":1,"y":2}]}"#,
    );
    assert_eq!(result.unwrap().1.ops.len(), 1);
}

#[test]
fn the_same_stream_twice_is_refused_with_both_places_named() {
    let result = write(
        r#"{"stateType":"stream","streamState":[
            {"streamDescriptor":{"name":"a"},"streamState":1},
            {"streamDescriptor":{"name":"a","namespace":null},"streamState":2}]}"#,
    );
    let Err(DecodeError::Invalid(errors)) = result else {
        panic!("expected a schema error");
    };
    assert_eq!(errors[0].property_path, "connectionState.streamState[1].streamDescriptor");
    assert!(errors[0].message.contains("connectionState.streamState[0].streamDescriptor"));
}

#[test]
fn a_repeated_member_outside_a_blob_is_refused() {
    let body = format!(r#"{{"connectionId":"{ID}","connectionId":"{ID}"}}"#);
    let Err(DecodeError::Invalid(errors)) = decode_connection_id_request(body.as_bytes(), LIMITS) else {
        panic!("expected a schema error");
    };
    assert_eq!(errors[0].property_path, "connectionId");
}

#[test]
fn a_repeated_member_inside_a_blob_is_kept() {
    let (_, write) = write(r#"{"stateType":"legacy","state":{"a":1,"a":2}}"#).unwrap();
    assert_eq!(write.ops[0].blob, Some(Blob::from_json(r#"{"a":1,"a":2}"#)));
}

#[test]
fn schema_errors_name_every_bad_field() {
    let errors = field_errors(write(
        r#"{"stateType":"stream","streamState":[
            {"streamState":1},
            {"streamDescriptor":{"name":7,"namespace":false}},
            "nope"]}"#,
    ));
    assert_eq!(
        errors,
        vec![
            ("connectionState.streamState[0].streamDescriptor".to_owned(), None),
            ("connectionState.streamState[1].streamDescriptor.name".to_owned(), Some("7".to_owned())),
            ("connectionState.streamState[1].streamDescriptor.namespace".to_owned(), Some("false".to_owned())),
            ("connectionState.streamState[2]".to_owned(), Some("nope".to_owned())),
        ]
    );
}

#[test]
fn state_types_are_exact_lower_case() {
    for bad in [r#""Stream""#, r#""STREAM""#, "1", "null"] {
        let errors = field_errors(write(&format!(r#"{{"stateType":{bad}}}"#)));
        assert_eq!(errors[0].0, "connectionState.stateType");
    }
}

#[test]
fn not_set_cannot_be_written() {
    let errors = field_errors(write(r#"{"stateType":"not_set"}"#));
    assert_eq!(errors, vec![("connectionState.stateType".to_owned(), Some("not_set".to_owned()))]);
}

#[test]
fn a_missing_connection_id_and_state_are_both_reported() {
    let result = decode_create_or_update(b"{}", LIMITS);
    let paths: Vec<_> = field_errors(result).into_iter().map(|(p, _)| p).collect();
    assert_eq!(paths, ["connectionId", "connectionState"]);
}

#[test]
fn a_body_that_is_not_json_is_a_syntax_error() {
    for body in [&b"{"[..], b"", b"{\"a\":1}x", b"\xff\xfe", b"nul"] {
        let result = decode_connection_id_request(body, LIMITS);
        assert!(matches!(result, Err(DecodeError::Syntax(_))), "{body:?}: {result:?}");
    }
}

#[test]
fn a_body_that_is_json_but_not_an_object_is_a_schema_error() {
    let result = decode_connection_id_request(b"[1]", LIMITS);
    assert!(matches!(result, Err(DecodeError::Invalid(_))));
}

#[test]
fn nesting_is_counted_outside_strings_only() {
    assert!(!nesting_exceeds(br#"[["[[[[[[["]]"#, 2));
    assert!(nesting_exceeds(b"[[[]]]", 2));
    assert!(!nesting_exceeds(br#"["\"[[["]"#, 1));
}

#[test]
fn a_deep_blob_is_refused_before_parsing() {
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let result = write(&format!(r#"{{"stateType":"legacy","state":{deep}}}"#));
    assert_eq!(result.unwrap_err(), DecodeError::TooDeep { limit: 128 });
}

#[test]
fn a_depth_above_serde_jsons_default_can_be_configured() {
    let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
    let body = format!(r#"{{"connectionId":"{ID}","connectionState":{{"stateType":"legacy","state":{deep}}}}}"#);
    let limits = DecodeLimits { max_depth: 300, ..LIMITS };
    assert!(decode_create_or_update(body.as_bytes(), limits).is_ok());
}

#[test]
fn too_many_streams_are_refused() {
    let items: Vec<String> = (0..3).map(|i| format!(r#"{{"streamDescriptor":{{"name":"s{i}"}}}}"#)).collect();
    let body = format!(
        r#"{{"connectionId":"{ID}","connectionState":{{"stateType":"stream","streamState":[{}]}}}}"#,
        items.join(",")
    );
    let limits = DecodeLimits { max_streams: 2, ..LIMITS };
    let result = decode_create_or_update(body.as_bytes(), limits);
    assert_eq!(result.unwrap_err(), DecodeError::TooManyStreams { count: 3, limit: 2 });
}

#[test]
fn states_render_in_the_documented_field_order() {
    let id = ConnectionId::parse(ID).unwrap();
    let state = StoredState {
        state_type: Some(StateType::Global),
        revision: 3,
        entries: vec![
            (stream_key("b", Some("ns")), Blob::from_json("{\"c\":1}")),
            (EntryKey::Shared, Blob::from_json("null")),
            (stream_key("a\"", None), Blob::from_json("2")),
        ]
        .into(),
    };
    let expected = format!(
        r#"{{"stateType":"global","connectionId":"{ID}","globalState":{{"shared_state":null,"streamStates":[{{"streamDescriptor":{{"name":"b","namespace":"ns"}},"streamState":{{"c":1}}}},{{"streamDescriptor":{{"name":"a\""}},"streamState":2}}]}}}}"#
    );
    assert_eq!(String::from_utf8(render_state(id, &state)).unwrap(), expected);
}

#[test]
fn an_empty_state_renders_as_not_set() {
    let id = ConnectionId::parse(ID).unwrap();
    let text = String::from_utf8(render_state(id, &StoredState::default())).unwrap();
    assert_eq!(text, format!(r#"{{"stateType":"not_set","connectionId":"{ID}"}}"#));
}

#[test]
fn names_are_rendered_as_serde_json_escapes_them() {
    let names =
        ["plain", "quo\"te", "back\\slash", "tab\tnew\nline", "nul\u{0}bell\u{7}", "ünïcode ✓", "del\u{7f}", ""];
    let entries = names.iter().map(|name| (stream_key(name, Some(name)), Blob::from_json("1"))).collect();
    let state = StoredState { state_type: Some(StateType::Stream), revision: 1, entries };
    let id = ConnectionId::parse(ID).unwrap();
    let rendered = String::from_utf8(render_state(id, &state)).unwrap();
    let streams: Vec<String> = names
        .iter()
        .map(|name| {
            let name = serde_json::to_string(name).unwrap();
            format!(r#"{{"streamDescriptor":{{"name":{name},"namespace":{name}}},"streamState":1}}"#)
        })
        .collect();
    let expected = format!(r#"{{"stateType":"stream","connectionId":"{ID}","streamState":[{}]}}"#, streams.join(","));
    assert_eq!(rendered, expected);
    // And in the spelling JSON readers expect, whatever serde_json does.
    for spelled in
        [r#""quo\"te""#, r#""back\\slash""#, r#""tab\tnew\nline""#, r#""nul\u0000bell\u0007""#, "\"ünïcode ✓\""]
    {
        assert!(rendered.contains(spelled), "{spelled} in {rendered}");
    }
}

/// A state of `keys` entries (the last is the global's shared blob when
/// the type is global), blob `i` being `blobs[i]`.
fn state_of(state_type: StateType, keys: &[EntryKey], blobs: &[Blob]) -> StoredState {
    let entries = keys.iter().cloned().zip(blobs.iter().cloned()).collect();
    StoredState { state_type: Some(state_type), revision: 1, entries }
}

fn keys_for(state_type: StateType, streams: usize) -> Vec<EntryKey> {
    let mut keys: Vec<EntryKey> = (0..streams).map(|i| stream_key(&format!("s\"{i}"), Some("public"))).collect();
    match state_type {
        StateType::Legacy => vec![EntryKey::Legacy],
        StateType::Global => {
            // The shared blob need not come first among the entries.
            keys.insert(streams / 2, EntryKey::Shared);
            keys
        }
        StateType::Stream => keys,
    }
}

proptest::proptest! {
    /// However blobs change between two states with the same keys, the body
    /// made from the first's is the second's rendering, with its layout,
    /// and so is the next made from that one.
    #[test]
    fn a_body_made_from_the_one_before_is_rendered_as_anew(
        kind in 0u8..3,
        streams in 0usize..40,
        changes in proptest::collection::vec(proptest::collection::vec((0usize..41, 0usize..200, proptest::bool::ANY), 0..8), 1..4),
    ) {
        let state_type = [StateType::Legacy, StateType::Global, StateType::Stream][kind as usize];
        let id = ConnectionId::parse(ID).unwrap();
        let keys = keys_for(state_type, streams);
        let mut blobs: Vec<Blob> = (0..keys.len()).map(|i| Blob::from_json(&format!("{{\"v\":{i}}}"))).collect();
        let mut before = state_of(state_type, &keys, &blobs);
        let (mut body, layout) = render_state_laid_out(id, &before);
        let mut layout = layout.unwrap();
        proptest::prop_assert_eq!(&body, &render_state(id, &before));
        for round in changes {
            for (at, size, same_text) in round {
                if keys.is_empty() {
                    break;
                }
                let at = at % keys.len();
                // A new blob object, with the same text or another length.
                blobs[at] = if same_text {
                    Blob::from_json(blobs[at].as_str())
                } else {
                    Blob::from_json(&format!("\"{}\"", "x".repeat(size)))
                };
            }
            let after = state_of(state_type, &keys, &blobs);
            let made = render_state_from(&before, &body, &layout, &after);
            let (made_body, made_layout) = made.expect("same keys: made from the body before");
            let (fresh_body, fresh_layout) = render_state_laid_out(id, &after);
            proptest::prop_assert_eq!(&made_body, &fresh_body);
            proptest::prop_assert_eq!(Some(&made_layout), fresh_layout.as_ref());
            (before, body, layout) = (after, made_body, made_layout);
        }
    }
}

#[test]
fn a_body_is_made_anew_when_the_keys_or_the_type_differ() {
    let id = ConnectionId::parse(ID).unwrap();
    let keys = keys_for(StateType::Stream, 3);
    let blobs: Vec<Blob> = (0..3).map(|i| Blob::from_json(&i.to_string())).collect();
    let before = state_of(StateType::Stream, &keys, &blobs);
    let (body, layout) = render_state_laid_out(id, &before);
    let layout = layout.unwrap();
    let reordered = state_of(StateType::Stream, &[keys[1].clone(), keys[0].clone(), keys[2].clone()], &blobs);
    assert!(render_state_from(&before, &body, &layout, &reordered).is_none());
    assert!(render_state_from(&before, &body, &layout, &state_of(StateType::Stream, &keys[..2], &blobs)).is_none());
    assert!(render_state_from(&before, &body, &layout, &state_of(StateType::Global, &keys, &blobs)).is_none());
    // Equal keys that are not the same objects still match.
    let copied = keys_for(StateType::Stream, 3);
    let (made, _) = render_state_from(&before, &body, &layout, &state_of(StateType::Stream, &copied, &blobs)).unwrap();
    assert_eq!(made, body);
}
