//! Any bytes as a request body: the decoders must answer `Ok` or `Err`,
//! never panic, and a decoded write must plan and diff cleanly against
//! every stored type.
#![no_main]

use std::collections::HashMap;

use highwater::state::wire::{decode_connection_id_request, decode_create_or_update, DecodeError, DecodeLimits};
use highwater::state::{changes, plan_write, StateType};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The server's defaults (`--max-json-depth` and the rest).
    let limits = DecodeLimits::default();
    let _ = decode_connection_id_request(data, limits);
    match decode_create_or_update(data, limits) {
        Ok((_, write)) => {
            // Every key of a write is unique (a repeated stream is a 422).
            let mut keys: Vec<String> = write.ops.iter().map(|op| op.key.encode()).collect();
            let count = keys.len();
            keys.sort_unstable();
            keys.dedup();
            assert_eq!(keys.len(), count, "a decoded write names a key twice: {write:?}");
            for stored in [None, Some(StateType::Legacy), Some(StateType::Global), Some(StateType::Stream)] {
                if let Ok(ops) = plan_write(stored, &write) {
                    let found = changes(&ops, &HashMap::new(), &HashMap::new());
                    // Against nothing stored, exactly the upserts change something.
                    assert_eq!(found.len(), ops.iter().filter(|op| op.blob.is_some()).count());
                }
            }
        }
        // A refused body must say why, so the 422 names a field.
        Err(DecodeError::Invalid(errors)) => assert!(!errors.is_empty(), "a 422 with no validation errors"),
        Err(_) => {}
    }
});
