//! The API suite: every rule and error case of STATE-API.md over real HTTP,
//! each against a fresh server on port 0 with its own database.

mod errors;
mod harness;
mod reading;
mod routes;
mod type_rules;
mod writing;
