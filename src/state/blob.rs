//! State blobs: JSON values kept as the exact text the client sent.
//!
//! Blobs are never parsed into a tree, so key order, duplicate keys, number
//! spelling and string escapes survive a round trip (STATE-API.md §3). The
//! only change allowed, and made, is removing whitespace outside strings.

use std::sync::Arc;

/// One entry's JSON value, as compact text. Cloning shares the text.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Blob(Arc<String>);

impl AsRef<str> for Blob {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl Blob {
    /// Takes JSON text that has already been checked to be one valid value
    /// and removes the whitespace outside its strings.
    pub fn from_json(text: &str) -> Self {
        // The common case, compact text, is copied once.
        if !text.bytes().any(is_json_whitespace) {
            return Self(Arc::new(text.to_owned()));
        }
        Self(Arc::new(minify(text)))
    }

    /// Wraps text read back from storage, where only [`Blob::from_json`]'s
    /// output is ever written.
    pub fn from_stored(text: String) -> Self {
        // Moved, not copied: stored states can be large.
        Self(Arc::new(text))
    }

    /// The compact JSON text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Consumes the blob, returning its text.
    pub fn into_string(self) -> String {
        self.0.to_string()
    }

    /// Size of the text in bytes.
    /// Whether the two are one shared text, not merely equal ones.
    pub fn same(&self, other: &Blob) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True only for an empty text, which a valid blob never is.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for Blob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const SHOWN: usize = 64;
        match self.0.char_indices().nth(SHOWN) {
            Some((cut, _)) => write!(f, "Blob({}… {} bytes)", &self.0[..cut], self.0.len()),
            None => write!(f, "Blob({})", self.0),
        }
    }
}

fn is_json_whitespace(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

/// Tells, byte by byte, whether JSON text is inside a string (quotes
/// included), so scans can skip string contents.
#[derive(Default)]
pub(crate) struct StringTracker {
    in_string: bool,
    escaped: bool,
}

impl StringTracker {
    /// Feeds the next byte; true when it belongs to a string.
    pub(crate) fn inside(&mut self, b: u8) -> bool {
        if self.in_string {
            if self.escaped {
                self.escaped = false;
            } else if b == b'\\' {
                self.escaped = true;
            } else if b == b'"' {
                self.in_string = false;
            }
            true
        } else {
            self.in_string = b == b'"';
            self.in_string
        }
    }
}

/// Removes JSON whitespace outside strings from valid JSON text.
fn minify(text: &str) -> String {
    let mut strings = StringTracker::default();
    let out: Vec<u8> = text.bytes().filter(|&b| strings.inside(b) || !is_json_whitespace(b)).collect();
    // Only ASCII whitespace bytes were dropped, never part of a multi-byte
    // character, so the text is still UTF-8; the fallback is unreachable.
    String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whitespace_outside_strings_is_removed() {
        let blob = Blob::from_json("{ \"a\" :\n [ 1 ,\t2 ] }");
        assert_eq!(blob.as_str(), r#"{"a":[1,2]}"#);
    }

    #[test]
    fn whitespace_and_escapes_inside_strings_are_kept() {
        let text = r#"{"a b":"x \" y\\","c":"\u00e9 \n"}"#;
        assert_eq!(Blob::from_json(text).as_str(), text);
    }

    #[test]
    fn key_order_duplicates_and_number_spelling_are_kept() {
        let text = r#"{"z":1e3,"a":1.50,"z":123456789012345678901234567890}"#;
        assert_eq!(Blob::from_json(text).as_str(), text);
    }

    #[test]
    fn non_ascii_text_survives_minifying() {
        let blob = Blob::from_json("{ \"ключ\" : \"値 🙂\" }");
        assert_eq!(blob.as_str(), "{\"ключ\":\"値 🙂\"}");
    }

    #[test]
    fn debug_output_is_bounded() {
        let long = format!("\"{}\"", "x".repeat(1000));
        assert!(format!("{:?}", Blob::from_json(&long)).len() < 100);
    }
}
