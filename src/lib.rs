//! Highwater: the connection-state endpoints of the Airbyte Configuration API
//! as a standalone, durable service.
//!
//! Layout, with dependencies pointing `api` → `state` ← `store`:
//!
//! - [`state`]: the domain. Identifiers, entries, blobs, the type and merge
//!   rules, and the JSON wire format. Pure; no HTTP, no SQL.
//! - [`store`]: the [`store::Store`] trait and its backends (SQLite today),
//!   each with its own migrations under `migrations/`.
//! - [`api`]: the HTTP router, one file per endpoint family, and the wire
//!   errors (`api::error`).
//! - [`auth`]: credentials (hashed secrets) and roles; `api::auth` applies
//!   them to requests.
//! - [`config`]: every setting, flag > `HIGHWATER_*` environment > default.
//! - [`startup`]: builds the store and serves the router on a listener until
//!   a shutdown signal, so tests can bind port 0.
//! - [`telemetry`]: log set-up (text or JSON lines).
//! - [`cli`]: one file per subcommand; `main.rs` only dispatches.
#![forbid(unsafe_code)]

pub mod api;
pub mod auth;
pub mod cli;
pub mod config;
pub mod startup;
pub mod state;
pub mod store;
pub mod telemetry;
