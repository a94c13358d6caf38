//! The API suite: every rule and error case of STATE-API.md over real HTTP,
//! each against a fresh server on port 0 with its own database, on the
//! backend `HIGHWATER_TEST_BACKEND` names (see `tests/support`).

mod concurrency;
mod errors;
mod harness;
mod leases;
mod reading;
mod revisions;
mod routes;
mod streams;
#[path = "../support/mod.rs"]
mod support;
mod type_rules;
mod writing;
