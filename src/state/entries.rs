//! A state's entries, in order, held in shared chunks.
//!
//! The state after a write is made from the state before it, and a write
//! of one stream of a 10,000-stream state leaves all but one entry alone.
//! In one vector, each of those entries was cloned into the new state and
//! later dropped from the old one: two atomic reference counts per entry
//! each way, on memory spread over the heap (perf, bench/profile update10k:
//! `advance` and `Arc::drop_slow` were a quarter of the request's time).
//! In chunks, the new state shares every chunk the write leaves alone with
//! the old one and copies only those it changes.

use std::fmt;
use std::ops::Index;
use std::sync::Arc;

use super::{Blob, EntryKey};

/// Entries per chunk (the last may hold fewer). Small in unit tests, so
/// that they cross chunks.
const CHUNK: usize = if cfg!(test) { 4 } else { 64 };

/// One entry: its key and blob.
pub type Entry = (EntryKey, Blob);

/// A state's entries in first-insertion order.
#[derive(Clone, Default)]
pub struct Entries {
    /// Every chunk but the last holds exactly [`CHUNK`] entries.
    chunks: Vec<Arc<Chunk>>,
}

#[derive(Clone, Default)]
struct Chunk {
    entries: Vec<Entry>,
    /// Roughly the memory its entries take, as [`Entries::weight`] counts.
    weight: usize,
}

impl Chunk {
    fn weigh(&mut self) {
        self.weight = self.entries.iter().map(weight).sum();
    }
}

/// Roughly the memory an entry takes: its blob, its key's text, and what
/// holds them.
fn weight((key, blob): &Entry) -> usize {
    let key = match key {
        EntryKey::Stream(d) => d.name.len() + d.namespace.as_ref().map_or(0, String::len),
        _ => 0,
    };
    blob.len() + key + 96
}

impl Entries {
    pub fn len(&self) -> usize {
        self.chunks.last().map_or(0, |last| (self.chunks.len() - 1) * CHUNK + last.entries.len())
    }

    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    pub fn get(&self, at: usize) -> Option<&Entry> {
        self.chunks.get(at / CHUNK)?.entries.get(at % CHUNK)
    }

    pub fn iter(&self) -> Iter<'_> {
        self.into_iter()
    }

    /// Roughly the memory the entries take, without a pass over them.
    pub fn weight(&self) -> usize {
        self.chunks.iter().map(|chunk| chunk.weight).sum()
    }

    /// Whether both hold the same keys in the same order; the chunks they
    /// share are not looked into.
    pub fn same_keys(&self, other: &Entries) -> bool {
        self.len() == other.len()
            && self.chunks.iter().zip(&other.chunks).all(|(mine, theirs)| {
                Arc::ptr_eq(mine, theirs)
                    || mine.entries.iter().zip(&theirs.entries).all(|((mine, _), (theirs, _))| mine == theirs)
            })
    }

    /// Whether entry `at` here is the very entry `at` of `other`: both hold
    /// the chunk it is in. A cheap test, which may say no for equal entries.
    pub fn shares(&self, other: &Entries, at: usize) -> bool {
        match (self.chunks.get(at / CHUNK), other.chunks.get(at / CHUNK)) {
            (Some(mine), Some(theirs)) => Arc::ptr_eq(mine, theirs),
            _ => false,
        }
    }

    /// These entries with the blobs of some replaced, and `appended` added
    /// after them: `replaced` gives indices, in ascending order. Chunks
    /// neither touches are shared, not copied.
    pub fn with(&self, replaced: &[(usize, &Blob)], appended: impl IntoIterator<Item = Entry>) -> Entries {
        let mut chunks = self.chunks.clone();
        let mut replaced = replaced.iter().peekable();
        while let Some(&&(at, _)) = replaced.peek() {
            let Some(chunk) = chunks.get_mut(at / CHUNK) else { break };
            let first = at / CHUNK * CHUNK;
            let chunk = Arc::make_mut(chunk);
            while let Some((at, blob)) = replaced.next_if(|(at, _)| *at < first + CHUNK) {
                if let Some(entry) = chunk.entries.get_mut(at - first) {
                    entry.1 = (*blob).clone();
                }
            }
            chunk.weigh();
        }
        let mut entries = Entries { chunks };
        entries.extend(appended);
        entries
    }

    fn push(&mut self, entry: Entry) {
        let entry_weight = weight(&entry);
        match self.chunks.last_mut() {
            Some(last) if last.entries.len() < CHUNK => {
                let last = Arc::make_mut(last);
                last.entries.push(entry);
                last.weight += entry_weight;
            }
            _ => {
                let mut entries = Vec::with_capacity(CHUNK);
                entries.push(entry);
                self.chunks.push(Arc::new(Chunk { entries, weight: entry_weight }));
            }
        }
    }
}

impl FromIterator<Entry> for Entries {
    fn from_iter<I: IntoIterator<Item = Entry>>(entries: I) -> Self {
        let mut all = Entries::default();
        all.extend(entries);
        all
    }
}

impl Extend<Entry> for Entries {
    fn extend<I: IntoIterator<Item = Entry>>(&mut self, entries: I) {
        for entry in entries {
            self.push(entry);
        }
    }
}

impl From<Vec<Entry>> for Entries {
    fn from(entries: Vec<Entry>) -> Self {
        entries.into_iter().collect()
    }
}

impl Index<usize> for Entries {
    type Output = Entry;

    fn index(&self, at: usize) -> &Entry {
        &self.chunks[at / CHUNK].entries[at % CHUNK]
    }
}

impl<'a> IntoIterator for &'a Entries {
    type Item = &'a Entry;
    type IntoIter = Iter<'a>;

    fn into_iter(self) -> Iter<'a> {
        Iter(self.chunks.iter().flat_map(|chunk| &chunk.entries))
    }
}

/// How [`Iter`] walks the chunks.
type Chunks<'a> = std::iter::FlatMap<std::slice::Iter<'a, Arc<Chunk>>, &'a Vec<Entry>, fn(&Arc<Chunk>) -> &Vec<Entry>>;

/// The entries in order.
#[derive(Clone)]
pub struct Iter<'a>(Chunks<'a>);

impl<'a> Iterator for Iter<'a> {
    type Item = &'a Entry;

    fn next(&mut self) -> Option<&'a Entry> {
        self.0.next()
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.0.size_hint()
    }
}

impl DoubleEndedIterator for Iter<'_> {
    fn next_back(&mut self) -> Option<Self::Item> {
        self.0.next_back()
    }
}

impl PartialEq for Entries {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
    }
}

impl fmt::Debug for Entries {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::StreamDescriptor;

    fn entry(i: usize) -> Entry {
        let key = EntryKey::stream(StreamDescriptor { name: format!("s{i}"), namespace: None });
        (key, Blob::from_json(&i.to_string()))
    }

    #[test]
    fn entries_keep_their_order_across_chunks() {
        let entries: Entries = (0..11).map(entry).collect();
        assert_eq!(entries.len(), 11);
        assert_eq!(entries.iter().cloned().collect::<Vec<_>>(), (0..11).map(entry).collect::<Vec<_>>());
        assert_eq!(entries[9], entry(9));
        assert_eq!(entries.get(10), Some(&entry(10)));
        assert_eq!(entries.get(11), None);
        assert_eq!(entries.iter().next_back(), Some(&entry(10)));
    }

    #[test]
    fn a_changed_entry_copies_its_chunk_alone() {
        let before: Entries = (0..10).map(entry).collect();
        let blob = Blob::from_json("\"new\"");
        let after = before.with(&[(5, &blob)], [entry(10), entry(11), entry(12)]);
        assert_eq!(after.len(), 13);
        assert_eq!(after[5].1, blob);
        assert_eq!(before[5], entry(5), "the state before is as it was");
        assert!(after.shares(&before, 0) && after.shares(&before, 3), "an untouched chunk is shared");
        assert!(!after.shares(&before, 4) && !after.shares(&before, 5));
        assert!(!after.shares(&before, 8), "the last chunk took the appended entries");
        assert!(after.same_keys(&after.with(&[(9, &blob)], [])));
        assert!(!after.same_keys(&before));
        let expected: Vec<Entry> =
            (0..13).map(|i| if i == 5 { (entry(5).0, blob.clone()) } else { entry(i) }).collect();
        assert_eq!(after, Entries::from(expected.clone()));
        assert_eq!(after.weight(), expected.iter().map(weight).sum::<usize>());
    }
}
