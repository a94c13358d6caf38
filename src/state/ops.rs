//! Every write Highwater accepts, the guards a write can carry
//! (compare-and-swap on the revision, sync leases) and the rules that turn
//! an operation into entry ops. Pure: a store loads what
//! [`Operation::needs`] asks for, calls [`plan`], and applies the result.

use std::collections::HashMap;

use super::{plan_write, Blob, EntryKey, EntryOp, StateType, StateWrite, StreamDescriptor, TypeConflict};

/// A write.
#[derive(Debug, Clone, PartialEq)]
pub enum Operation {
    /// `create_or_update` (and `_safe`): the per-key merge of STATE-API.md §4.
    Merge(StateWrite),
    /// Make the state equal to what it was at a revision, as a new revision.
    Restore { revision: u64 },
    /// Delete every entry (`streams: None`), or the listed streams and,
    /// when asked, the shared blob.
    Reset { streams: Option<Vec<StreamDescriptor>>, include_shared: bool },
    /// Set one stream's blob.
    StreamSet { stream: StreamDescriptor, blob: Blob },
    /// Delete one stream's entry.
    StreamDelete { stream: StreamDescriptor },
}

/// What a store must load before it can [`plan`] an operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Needs {
    /// The stored type is enough.
    Nothing,
    /// The keys of the current entries.
    CurrentKeys,
    /// The current keys and the state as it was at this revision.
    Revision(u64),
}

impl Operation {
    /// What the store must load for [`plan`].
    pub fn needs(&self) -> Needs {
        match self {
            Self::Reset { .. } => Needs::CurrentKeys,
            Self::Restore { revision } => Needs::Revision(*revision),
            Self::Merge(_) | Self::StreamSet { .. } | Self::StreamDelete { .. } => Needs::Nothing,
        }
    }

    /// Whether a live sync lease refuses this operation when it comes
    /// without the lease's token. Only the plain `create_or_update` keeps
    /// Airbyte's behaviour of writing regardless.
    pub fn respects_leases(&self, safe: bool) -> bool {
        !matches!(self, Self::Merge(_)) || safe
    }
}

/// How a write is guarded.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Guard {
    /// Refuse unless the connection is at exactly this revision.
    pub expected_revision: Option<u64>,
    /// The sync lease this write is made under.
    pub lease_token: Option<String>,
    /// A live lease refuses the write unless it carries the lease's token.
    pub respect_lease: bool,
}

/// Who made a write and why, kept in the history.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Meta {
    pub actor: Option<String>,
    pub reason: Option<String>,
}

/// A write with its guard and history metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct WriteRequest {
    pub operation: Operation,
    pub guard: Guard,
    pub meta: Meta,
    /// Whether the caller wants the whole state back (the Airbyte routes
    /// do; per-stream writes do not).
    pub return_state: bool,
}

/// A sync lease on a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub holder: String,
    pub token: String,
    pub expires_at_ms: i64,
}

impl Lease {
    /// Whether the lease still holds at `now_ms`.
    pub fn is_live(&self, now_ms: i64) -> bool {
        self.expires_at_ms > now_ms
    }
}

/// A request about leases.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseOp {
    Acquire { holder: String, ttl_ms: i64 },
    Renew { token: String, ttl_ms: i64 },
    Release { token: String },
}

/// The message Airbyte answers a safe write with while a sync runs.
pub const SYNC_RUNNING: &str = "State cannot be updated while a sync is running for this connection.";

/// Why a request was refused by the rules (as opposed to failing).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(transparent)]
    TypeConflict(#[from] TypeConflict),
    #[error("the connection is at revision {current}, not the expected {expected}; nothing was written")]
    RevisionMismatch { expected: u64, current: u64 },
    #[error("{SYNC_RUNNING}")]
    Locked { holder: String, expires_at_ms: i64 },
    #[error("the lease token is expired, released or superseded; nothing was written")]
    StaleLease,
    #[error("a sync lease on this connection is already held by {holder:?}")]
    LeaseHeld { holder: String, expires_at_ms: i64 },
    #[error("revision {revision} does not exist; the connection is at revision {current}")]
    RevisionNotFound { revision: u64, current: u64 },
    #[error("revision {revision} is no longer kept; the oldest kept revision is {oldest}")]
    RevisionPruned { revision: u64, oldest: u64 },
}

/// Checks a write's guard against the connection's revision and its live
/// lease (if any). Lease problems come first: they say who to wait for.
pub fn check_guard(guard: &Guard, revision: u64, live_lease: Option<&Lease>) -> Result<(), Refusal> {
    match (&guard.lease_token, live_lease) {
        (Some(token), Some(lease)) if *token == lease.token => {}
        (Some(_), _) => return Err(Refusal::StaleLease),
        (None, Some(lease)) if guard.respect_lease => {
            return Err(Refusal::Locked { holder: lease.holder.clone(), expires_at_ms: lease.expires_at_ms })
        }
        (None, _) => {}
    }
    match guard.expected_revision {
        Some(expected) if expected != revision => Err(Refusal::RevisionMismatch { expected, current: revision }),
        _ => Ok(()),
    }
}

/// Applies a lease request to the current lease row (live or not) at
/// `now_ms`. Returns the row to store (`None`: delete it) and the lease to
/// answer with.
pub fn lease_transition(
    op: &LeaseOp,
    current: Option<&Lease>,
    now_ms: i64,
    new_token: impl FnOnce() -> String,
) -> Result<Option<Lease>, Refusal> {
    let live = current.filter(|lease| lease.is_live(now_ms));
    match op {
        LeaseOp::Acquire { holder, ttl_ms } => match live {
            Some(lease) => Err(Refusal::LeaseHeld { holder: lease.holder.clone(), expires_at_ms: lease.expires_at_ms }),
            None => Ok(Some(Lease { holder: holder.clone(), token: new_token(), expires_at_ms: now_ms + ttl_ms })),
        },
        LeaseOp::Renew { token, ttl_ms } => match live {
            Some(lease) if lease.token == *token => Ok(Some(Lease { expires_at_ms: now_ms + ttl_ms, ..lease.clone() })),
            _ => Err(Refusal::StaleLease),
        },
        // Releasing one's own lease works even after it expired, as long
        // as nobody took the connection since.
        LeaseOp::Release { token } => match current {
            Some(lease) if lease.token == *token => Ok(None),
            _ => Err(Refusal::StaleLease),
        },
    }
}

/// A state as it was at some revision: its type and its entries with their
/// positions.
pub type PastState = (Option<StateType>, Vec<(EntryKey, i64, Blob)>);

/// What the store loaded for an operation's [`Needs`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Context {
    /// Keys of the current entries (for `Needs::CurrentKeys` and `Revision`).
    pub current_keys: Vec<EntryKey>,
    /// The state at the requested revision: its type and its entries with
    /// their positions (for `Needs::Revision`).
    pub target: Option<PastState>,
}

/// The entry ops an operation comes to.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub ops: Vec<EntryOp>,
    /// Positions an op must give its entry (restore puts entries back where
    /// they were), by encoded key.
    pub pinned_seqs: HashMap<String, i64>,
    /// The state's type afterwards, if any entry remains.
    pub state_type: Option<StateType>,
}

/// Turns an operation into entry ops, given the stored type and what
/// [`Operation::needs`] asked for.
pub fn plan(operation: &Operation, stored: Option<StateType>, context: &Context) -> Result<Plan, Refusal> {
    let simple = |ops, state_type| Plan { ops, pinned_seqs: HashMap::new(), state_type };
    match operation {
        Operation::Merge(write) => Ok(simple(plan_write(stored, write)?, Some(write.state_type))),
        Operation::StreamSet { stream, blob } => {
            if stored == Some(StateType::Legacy) {
                return Err(TypeConflict { stored: "legacy", incoming: "stream" }.into());
            }
            let op = EntryOp { key: EntryKey::stream(stream.clone()), blob: Some(blob.clone()) };
            Ok(simple(vec![op], Some(stored.unwrap_or(StateType::Stream))))
        }
        Operation::StreamDelete { stream } => {
            Ok(simple(vec![EntryOp { key: EntryKey::stream(stream.clone()), blob: None }], stored))
        }
        Operation::Reset { streams, include_shared } => {
            let doomed: Vec<EntryKey> = match streams {
                None => context.current_keys.clone(),
                Some(streams) => {
                    let shared = include_shared.then_some(EntryKey::Shared);
                    streams.iter().cloned().map(EntryKey::stream).chain(shared).collect()
                }
            };
            Ok(simple(doomed.into_iter().map(|key| EntryOp { key, blob: None }).collect(), stored))
        }
        Operation::Restore { .. } => {
            let (state_type, entries) = context.target.clone().unwrap_or_default();
            // Positions matter only when the order would differ: the same
            // keys in the same order need no moving (and a restore that
            // changes nothing visible takes no revision).
            let same_order = entries.len() == context.current_keys.len()
                && entries.iter().zip(&context.current_keys).all(|((key, _, _), current)| key == current);
            let mut pinned_seqs = HashMap::with_capacity(entries.len());
            let mut ops: Vec<EntryOp> = Vec::with_capacity(entries.len() + context.current_keys.len());
            for (key, seq, blob) in entries {
                if !same_order {
                    pinned_seqs.insert(key.encode(), seq);
                }
                ops.push(EntryOp { key, blob: Some(blob) });
            }
            let kept: std::collections::HashSet<&EntryKey> = ops.iter().map(|op| &op.key).collect();
            let gone: Vec<EntryKey> = context.current_keys.iter().filter(|key| !kept.contains(key)).cloned().collect();
            ops.extend(gone.into_iter().map(|key| EntryOp { key, blob: None }));
            Ok(Plan { ops, pinned_seqs, state_type })
        }
    }
}

#[cfg(test)]
mod tests;
