//! JSON plumbing shared by the decoders: reading an object level by level
//! with raw member values, recording field errors, and the depth pre-check.

use std::collections::HashSet;
use std::fmt;

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::value::RawValue;

use super::{DecodeError, DecodeLimits, FieldError};
use crate::state::blob::StringTracker;
use crate::state::Blob;

/// Whether any array or object nests deeper than `limit`, found by one pass
/// over the bytes before anything recursive sees them.
pub(super) fn nesting_exceeds(bytes: &[u8], limit: usize) -> bool {
    let mut strings = StringTracker::default();
    let mut depth = 0usize;
    for &b in bytes {
        if strings.inside(b) {
            continue;
        }
        match b {
            b'[' | b'{' => {
                depth += 1;
                if depth > limit {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// Parses a whole text; the depth was bounded by [`nesting_exceeds`], so
/// serde_json's own recursion limit would only get in the way of a
/// configured depth above its default.
pub(super) fn parse<'a, T: Deserialize<'a>>(text: &'a str) -> serde_json::Result<T> {
    let mut de = serde_json::Deserializer::from_str(text);
    de.disable_recursion_limit();
    let value = T::deserialize(&mut de)?;
    de.end()?;
    Ok(value)
}

pub(super) fn is_null(raw: &RawValue) -> bool {
    raw.get() == "null"
}

pub(super) fn string(raw: &RawValue) -> Option<String> {
    if raw.get().starts_with('"') {
        parse(raw.get()).ok()
    } else {
        None
    }
}

pub(super) fn array<'a>(raw: &'a RawValue, path: &str, errors: &mut Errors) -> Option<Vec<&'a RawValue>> {
    if !raw.get().starts_with('[') {
        errors.push(path, Some(raw), "must be an array");
        return None;
    }
    parse(raw.get()).map_err(|e| errors.unreadable(path, &e)).ok()
}

pub(super) fn object<'a>(raw: &'a RawValue, path: &str, errors: &mut Errors) -> Option<Object<'a>> {
    if !raw.get().starts_with('{') {
        errors.push(path, Some(raw), "must be an object");
        return None;
    }
    let members = parse(raw.get()).map_err(|e| errors.unreadable(path, &e)).ok()?;
    Some(Object::new(members, path, errors))
}

/// How a refused value is echoed in `invalidValue`: strings as their text,
/// anything else as JSON, cut to a readable length.
pub(super) fn shown(raw: &RawValue) -> String {
    const MAX_CHARS: usize = 200;
    let text = string(raw).unwrap_or_else(|| raw.get().to_owned());
    match text.char_indices().nth(MAX_CHARS) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text,
    }
}

/// An object of the envelope: its members in order, values still raw.
pub(super) struct Object<'a> {
    members: Vec<(String, &'a RawValue)>,
}

impl<'a> Object<'a> {
    /// Wraps the members, recording an error for each repeated name.
    pub(super) fn new(members: Members<'a>, path: &str, errors: &mut Errors) -> Self {
        let mut seen = HashSet::with_capacity(members.0.len());
        for (name, _) in &members.0 {
            if !seen.insert(name.as_str()) {
                let member_path = if path.is_empty() { name.clone() } else { format!("{path}.{name}") };
                errors.push(&member_path, None, "appears more than once");
            }
        }
        Self { members: members.0 }
    }

    pub(super) fn get(&self, name: &str) -> Option<&'a RawValue> {
        self.members.iter().find(|(n, _)| n == name).map(|(_, v)| *v)
    }
}

/// A JSON object read as an ordered list of members with raw values.
pub(super) struct Members<'a>(pub(super) Vec<(String, &'a RawValue)>);

impl<'de> Deserialize<'de> for Members<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MembersVisitor;
        impl<'de> Visitor<'de> for MembersVisitor {
            type Value = Members<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut members = Vec::new();
                while let Some(name) = map.next_key::<String>()? {
                    members.push((name, map.next_value::<&'de RawValue>()?));
                }
                Ok(Members(members))
            }
        }
        deserializer.deserialize_map(MembersVisitor)
    }
}

/// Collects what is wrong with a request, and applies the size limits.
pub(super) struct Errors {
    found: Vec<FieldError>,
    limits: DecodeLimits,
    /// A limit that was exceeded, or unreadable JSON: reported instead of
    /// the field errors.
    exceeded: Option<DecodeError>,
}

impl Errors {
    pub(super) fn new(limits: DecodeLimits) -> Self {
        Self { found: Vec::new(), limits, exceeded: None }
    }

    pub(super) fn push(&mut self, path: &str, value: Option<&RawValue>, message: &str) {
        self.found.push(FieldError {
            property_path: path.to_owned(),
            invalid_value: value.map(shown),
            message: message.to_owned(),
        });
    }

    /// How many problems are recorded.
    pub(super) fn len(&self) -> usize {
        self.found.len() + usize::from(self.exceeded.is_some())
    }

    /// Records an exceeded limit; reported instead of any field error.
    pub(super) fn exceed(&mut self, limit: DecodeError) {
        self.exceeded.get_or_insert(limit);
    }

    /// Records JSON that the first pass accepted but that cannot be read
    /// (a member name with a lone surrogate escape, say): a syntax error.
    pub(super) fn unreadable(&mut self, path: &str, error: &serde_json::Error) {
        let at = if path.is_empty() { String::new() } else { format!(" in {path}") };
        self.exceed(DecodeError::Syntax(format!("{error}{at}")));
    }

    /// A blob, unless it is larger than the limit.
    pub(super) fn blob(&mut self, raw: &RawValue, path: &str) -> Option<Blob> {
        let size = raw.get().len();
        let limit = self.limits.max_blob_bytes;
        if size > limit {
            self.exceed(DecodeError::BlobTooLarge { path: path.to_owned(), size, limit });
            return None;
        }
        Some(Blob::from_json(raw.get()))
    }

    /// A stream name or namespace, unless it is longer than the limit.
    pub(super) fn name(&mut self, text: String, path: &str) -> Option<String> {
        let limit = self.limits.max_name_chars;
        if text.chars().count() > limit {
            self.exceed(DecodeError::NameTooLong { path: path.to_owned(), limit });
            return None;
        }
        Some(text)
    }

    /// The value when nothing was recorded; otherwise the exceeded limit or
    /// all the field errors.
    pub(super) fn finish<T>(self, value: Option<T>) -> Result<T, DecodeError> {
        if let Some(exceeded) = self.exceeded {
            return Err(exceeded);
        }
        match value {
            Some(value) if self.found.is_empty() => Ok(value),
            _ => Err(DecodeError::Invalid(self.found)),
        }
    }
}
