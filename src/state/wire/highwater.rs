//! Decoding the bodies of Highwater's own operations (STATE-API.md §7) and
//! the fields every write may carry. Same conventions as the Airbyte
//! routes: unknown properties ignored, every problem a [`FieldError`].

use std::ops::RangeInclusive;

use super::json::{array, is_null, string, Errors, Object};
use super::{connection_id, decode_top, descriptor, state_write, DecodeError, DecodeLimits};
use crate::state::ops::{LeaseOp, Meta};
use crate::state::{Blob, ConnectionId, StateWrite, StreamDescriptor};

/// Longest `reason` kept in the history, in characters.
pub const MAX_REASON_CHARS: usize = 1000;
/// Longest `actor` or lease `holder`, in characters.
pub const MAX_NAME_CHARS: usize = 200;
/// Longest lease, in seconds.
pub const MAX_TTL_SECONDS: u64 = 86_400;

/// Any non-negative integer.
const ANY: RangeInclusive<u64> = 0..=u64::MAX;

/// The optional fields every write accepts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteFields {
    pub expected_revision: Option<u64>,
    pub lease_token: Option<String>,
    pub meta: Meta,
}

/// A decoded request: the connection, what the operation needs, and the
/// write fields (empty for reads).
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded<T> {
    pub id: ConnectionId,
    pub body: T,
    pub fields: WriteFields,
}

/// The body of `state/history`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryQuery {
    pub limit: usize,
    pub before: Option<u64>,
}

/// The body of `state/reset`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResetQuery {
    pub streams: Option<Vec<StreamDescriptor>>,
    pub include_shared: bool,
}

/// Decodes a request through `read`, which reads the operation's own fields
/// from the top object; `write` says whether the write fields apply.
fn decode<T>(
    body: &[u8],
    limits: DecodeLimits,
    write: bool,
    read: impl FnOnce(&Object<'_>, &mut Errors) -> Option<T>,
) -> Result<Decoded<T>, DecodeError> {
    let top = decode_top(body, limits)?;
    let mut errors = Errors::new(limits);
    let Some(top) = top else {
        return errors.finish(None);
    };
    let id = connection_id(&top, &mut errors);
    let fields = if write { write_fields(&top, &mut errors) } else { WriteFields::default() };
    let body = read(&top, &mut errors);
    errors.finish(id.zip(body)).map(|(id, body)| Decoded { id, body, fields })
}

/// `expectedRevision`, `leaseToken`, `reason` and `actor`.
fn write_fields(top: &Object<'_>, errors: &mut Errors) -> WriteFields {
    WriteFields {
        expected_revision: number(top, "expectedRevision", errors, false, ANY),
        lease_token: text(top, "leaseToken", errors, false, MAX_NAME_CHARS),
        meta: Meta {
            actor: text(top, "actor", errors, false, MAX_NAME_CHARS),
            reason: text(top, "reason", errors, false, MAX_REASON_CHARS),
        },
    }
}

/// `state/get`'s optional `revision`.
fn revision_field(top: &Object<'_>, errors: &mut Errors) -> Option<Option<u64>> {
    let before = errors.len();
    let revision = number(top, "revision", errors, false, ANY);
    (errors.len() == before).then_some(revision)
}

/// `{limit?, beforeRevision?}`.
fn history_query(top: &Object<'_>, errors: &mut Errors) -> Option<HistoryQuery> {
    let before = errors.len();
    let limit = number(top, "limit", errors, false, 1..=1000).unwrap_or(100);
    let before_revision = number(top, "beforeRevision", errors, false, 1..=u64::MAX);
    (errors.len() == before).then_some(HistoryQuery { limit: limit as usize, before: before_revision })
}

/// `{fromRevision, toRevision}`.
fn diff_query(top: &Object<'_>, errors: &mut Errors) -> Option<(u64, u64)> {
    let from = number(top, "fromRevision", errors, true, ANY);
    let to = number(top, "toRevision", errors, true, ANY);
    from.zip(to)
}

/// `{revision}` of a restore.
fn restore_query(top: &Object<'_>, errors: &mut Errors) -> Option<u64> {
    number(top, "revision", errors, true, ANY)
}

/// `{streams?, includeShared?}` of a reset.
fn reset_query(top: &Object<'_>, errors: &mut Errors) -> Option<ResetQuery> {
    let before = errors.len();
    let include_shared = match top.get("includeShared").filter(|raw| !is_null(raw)) {
        None => false,
        Some(raw) => match raw.get() {
            "true" => true,
            "false" => false,
            _ => {
                errors.push("includeShared", Some(raw), "must be a boolean");
                false
            }
        },
    };
    let streams = match top.get("streams").filter(|raw| !is_null(raw)) {
        None => None,
        Some(raw) => array(raw, "streams", errors).map(|items| {
            items
                .into_iter()
                .enumerate()
                .filter_map(|(i, item)| descriptor(Some(item), &format!("streams[{i}]"), errors))
                .collect()
        }),
    };
    (errors.len() == before).then_some(ResetQuery { streams, include_shared })
}

/// `{streamDescriptor}`.
fn stream_query(top: &Object<'_>, errors: &mut Errors) -> Option<StreamDescriptor> {
    descriptor(top.get("streamDescriptor"), "streamDescriptor", errors)
}

/// `{streamDescriptor, streamState}` of a per-stream set; the blob is
/// required (a literal `null` is a blob).
fn stream_set_query(top: &Object<'_>, errors: &mut Errors) -> Option<(StreamDescriptor, Blob)> {
    let stream = stream_query(top, errors);
    let state = top.get("streamState").and_then(|raw| errors.blob(raw, "streamState"));
    if top.get("streamState").is_none() {
        errors.push("streamState", None, "is required (send null to store a literal null)");
    }
    stream.zip(state)
}

/// `{holder, ttlSeconds}`, `{token, ttlSeconds}` or `{token}`.
fn lease_query(top: &Object<'_>, errors: &mut Errors, kind: LeaseKind) -> Option<LeaseOp> {
    let ttl_ms =
        |errors: &mut Errors| number(top, "ttlSeconds", errors, true, 1..=MAX_TTL_SECONDS).map(|s| s as i64 * 1000);
    match kind {
        LeaseKind::Acquire => {
            let holder = text(top, "holder", errors, true, MAX_NAME_CHARS);
            holder.zip(ttl_ms(errors)).map(|(holder, ttl_ms)| LeaseOp::Acquire { holder, ttl_ms })
        }
        LeaseKind::Renew => {
            let token = text(top, "token", errors, true, MAX_NAME_CHARS);
            token.zip(ttl_ms(errors)).map(|(token, ttl_ms)| LeaseOp::Renew { token, ttl_ms })
        }
        LeaseKind::Release => text(top, "token", errors, true, MAX_NAME_CHARS).map(|token| LeaseOp::Release { token }),
    }
}

/// Which lease request a body is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseKind {
    Acquire,
    Renew,
    Release,
}

/// Decodes `state/lease/list`: `{connectionId?}`.
pub fn decode_lease_list(body: &[u8], limits: DecodeLimits) -> Result<Option<ConnectionId>, DecodeError> {
    let top = decode_top(body, limits)?;
    let mut errors = Errors::new(limits);
    let Some(top) = top else {
        return errors.finish(None);
    };
    let id = match top.get("connectionId").filter(|raw| !is_null(raw)) {
        None => Some(None),
        Some(_) => connection_id(&top, &mut errors).map(Some),
    };
    errors.finish(id)
}

/// A non-negative integer member no larger than `max`.
/// An integer member within `range`.
fn number(
    top: &Object<'_>,
    name: &str,
    errors: &mut Errors,
    required: bool,
    range: RangeInclusive<u64>,
) -> Option<u64> {
    let Some(raw) = top.get(name).filter(|raw| !is_null(raw)) else {
        if required {
            errors.push(name, None, "is required");
        }
        return None;
    };
    let value = raw.get().parse::<u64>().ok().filter(|v| range.contains(v));
    if value.is_none() {
        let message = match (*range.start(), *range.end()) {
            (0, u64::MAX) => "must be a non-negative integer".to_owned(),
            (min, u64::MAX) => format!("must be an integer of at least {min}"),
            (min, max) => format!("must be an integer between {min} and {max}"),
        };
        errors.push(name, Some(raw), &message);
    }
    value
}

/// A string member of at most `max_chars` characters.
fn text(top: &Object<'_>, name: &str, errors: &mut Errors, required: bool, max_chars: usize) -> Option<String> {
    let Some(raw) = top.get(name).filter(|raw| !is_null(raw)) else {
        if required {
            errors.push(name, None, "is required");
        }
        return None;
    };
    match string(raw) {
        // Stored as text by every backend; PostgreSQL text cannot hold NUL.
        Some(value) if value.contains('\0') => {
            errors.push(name, Some(raw), "must not contain the NUL character");
            None
        }
        Some(value) if value.chars().count() <= max_chars && !(required && value.is_empty()) => Some(value),
        Some(_) => {
            errors.push(name, Some(raw), &format!("must be 1 to {max_chars} characters"));
            None
        }
        None => {
            errors.push(name, Some(raw), "must be a string");
            None
        }
    }
}

/// `state/create_or_update(_safe)`: the Airbyte body plus the write fields.
pub fn decode_write(body: &[u8], limits: DecodeLimits) -> Result<Decoded<StateWrite>, DecodeError> {
    decode(body, limits, true, |top, errors| match top.get("connectionState") {
        None => {
            errors.push("connectionState", None, "is required");
            None
        }
        Some(raw) => {
            super::json::object(raw, "connectionState", errors).and_then(|state| state_write(&state, limits, errors))
        }
    })
}

/// `state/get`: `{connectionId, revision?}`.
pub fn decode_get(body: &[u8], limits: DecodeLimits) -> Result<Decoded<Option<u64>>, DecodeError> {
    decode(body, limits, false, revision_field)
}

/// `state/history`.
pub fn decode_history(body: &[u8], limits: DecodeLimits) -> Result<Decoded<HistoryQuery>, DecodeError> {
    decode(body, limits, false, history_query)
}

/// `state/diff`.
pub fn decode_diff(body: &[u8], limits: DecodeLimits) -> Result<Decoded<(u64, u64)>, DecodeError> {
    decode(body, limits, false, diff_query)
}

/// `state/restore`.
pub fn decode_restore(body: &[u8], limits: DecodeLimits) -> Result<Decoded<u64>, DecodeError> {
    decode(body, limits, true, restore_query)
}

/// `state/reset`.
pub fn decode_reset(body: &[u8], limits: DecodeLimits) -> Result<Decoded<ResetQuery>, DecodeError> {
    decode(body, limits, true, reset_query)
}

/// `state/stream/get`.
pub fn decode_stream_get(body: &[u8], limits: DecodeLimits) -> Result<Decoded<StreamDescriptor>, DecodeError> {
    decode(body, limits, false, stream_query)
}

/// `state/stream/set`.
pub fn decode_stream_set(body: &[u8], limits: DecodeLimits) -> Result<Decoded<(StreamDescriptor, Blob)>, DecodeError> {
    decode(body, limits, true, stream_set_query)
}

/// `state/stream/delete`.
pub fn decode_stream_delete(body: &[u8], limits: DecodeLimits) -> Result<Decoded<StreamDescriptor>, DecodeError> {
    decode(body, limits, true, stream_query)
}

/// `state/lease/acquire`, `renew` or `release`.
pub fn decode_lease(body: &[u8], limits: DecodeLimits, kind: LeaseKind) -> Result<Decoded<LeaseOp>, DecodeError> {
    decode(body, limits, false, |top, errors| lease_query(top, errors, kind))
}
