//! Every setting, parsed once at start-up. Each can be given as a flag or as
//! the environment variable beside it; a flag beats the environment, which
//! beats the default.
//!
//! | flag | environment | default |
//! |---|---|---|
//! | `--listen` | `HIGHWATER_LISTEN` | `127.0.0.1:8000` |
//! | `--database-url` | `HIGHWATER_DATABASE_URL` | `sqlite://highwater.db` |
//! | `--database-pool-size` | `HIGHWATER_DATABASE_POOL_SIZE` | 16 |
//! | `--database-timeout-ms` | `HIGHWATER_DATABASE_TIMEOUT_MS` | 3000 |
//! | `--database-operation-timeout-ms` | `HIGHWATER_DATABASE_OPERATION_TIMEOUT_MS` | 30000 |
//! | `--state-cache-mb` | `HIGHWATER_STATE_CACHE_MB` | 32 |
//! | `--database-sole-node` | `HIGHWATER_DATABASE_SOLE_NODE` | `true` |
//! | `--migrate` | `HIGHWATER_MIGRATE` | `true` |
//! | `--max-body-bytes` | `HIGHWATER_MAX_BODY_BYTES` | 134217728 (128 MiB) |
//! | `--max-json-depth` | `HIGHWATER_MAX_JSON_DEPTH` | 128 |
//! | `--history-keep-revisions` | `HIGHWATER_HISTORY_KEEP_REVISIONS` | 10000 (0: no limit) |
//! | `--history-keep-days` | `HIGHWATER_HISTORY_KEEP_DAYS` | 30 (0: no limit) |
//! | `--history-prune-interval-secs` | `HIGHWATER_HISTORY_PRUNE_INTERVAL_SECS` | 300 |
//! | `--max-streams-per-request` | `HIGHWATER_MAX_STREAMS_PER_REQUEST` | 100000 |
//! | `--max-blob-bytes` | `HIGHWATER_MAX_BLOB_BYTES` | 134217728 (128 MiB) |
//! | `--max-name-chars` | `HIGHWATER_MAX_NAME_CHARS` | 1024 |
//! | `--request-timeout-secs` | `HIGHWATER_REQUEST_TIMEOUT_SECS` | 60 |
//! | `--max-concurrent-requests` | `HIGHWATER_MAX_CONCURRENT_REQUESTS` | 1024 |
//! | `--shutdown-timeout-secs` | `HIGHWATER_SHUTDOWN_TIMEOUT_SECS` | 30 |
//! | `--auth-file` | `HIGHWATER_AUTH_FILE` | none (authentication off) |
//! | `--auth-credentials` | `HIGHWATER_AUTH_CREDENTIALS` | none |
//! | `--behind-auth-proxy` | `HIGHWATER_BEHIND_AUTH_PROXY` | `false` |
//! | `--log-level` | `HIGHWATER_LOG_LEVEL` | `info` |
//! | `--log-format` | `HIGHWATER_LOG_FORMAT` | `text` |

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::api::Limits;
use crate::state::history::Retention;
use crate::state::wire::DecodeLimits;
use crate::store::{DatabaseUrl, OpenOptions};

/// How error messages name the body-size setting.
pub const MAX_BODY_SETTING: &str = "--max-body-bytes / HIGHWATER_MAX_BODY_BYTES";
/// How error messages name the nesting-depth setting.
pub const MAX_DEPTH_SETTING: &str = "--max-json-depth / HIGHWATER_MAX_JSON_DEPTH";
/// How error messages name the blob-size setting.
pub const MAX_BLOB_SETTING: &str = "--max-blob-bytes / HIGHWATER_MAX_BLOB_BYTES";
/// How error messages name the name-length setting.
pub const MAX_NAME_SETTING: &str = "--max-name-chars / HIGHWATER_MAX_NAME_CHARS";
/// How error messages name the concurrency setting.
pub const MAX_CONCURRENT_SETTING: &str = "--max-concurrent-requests / HIGHWATER_MAX_CONCURRENT_REQUESTS";
/// How error messages name the request-timeout setting.
pub const REQUEST_TIMEOUT_SETTING: &str = "--request-timeout-secs / HIGHWATER_REQUEST_TIMEOUT_SECS";
/// How error messages name the streams-per-request setting.
pub const MAX_STREAMS_SETTING: &str = "--max-streams-per-request / HIGHWATER_MAX_STREAMS_PER_REQUEST";

/// Highwater keeps the connection state of data-integration pipelines
/// (cursors, CDC offsets, per-stream bookmarks) behind the state endpoints
/// of the Airbyte Configuration API.
#[derive(Debug, Parser)]
#[command(name = "highwater", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    #[command(flatten)]
    pub log: LogArgs,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the state API over HTTP.
    Serve(ServeArgs),
    /// Create or upgrade the database schema, then exit. A SQLite file
    /// must not be in use by a running server.
    Migrate(DatabaseArgs),
    /// Write every connection (state and history) as NDJSON, for backups
    /// and for moving between SQLite and PostgreSQL. Runs beside a server.
    Export(ExportArgs),
    /// Load connections from an export; each is stored atomically. A SQLite
    /// file must not be in use by a running server.
    Import(ImportArgs),
    /// Hash a password (read from standard input) or make a new API token,
    /// for the credentials file.
    HashSecret(HashSecretArgs),
}

/// Settings of `highwater hash-secret`.
#[derive(Debug, Args)]
pub struct HashSecretArgs {
    /// Make a new random API token (for Bearer authentication) instead of
    /// hashing a password.
    #[arg(long)]
    pub new_token: bool,
}

/// Settings of `highwater export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,

    /// File to write; standard output when absent.
    #[arg(long, short)]
    pub output: Option<std::path::PathBuf>,
}

/// Settings of `highwater import`.
#[derive(Debug, Args)]
pub struct ImportArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,

    /// Export file to read; standard input when absent.
    #[arg(long, short)]
    pub input: Option<std::path::PathBuf>,

    /// Replace connections that already exist (their state and history)
    /// instead of leaving them alone and failing.
    #[arg(long)]
    pub overwrite: bool,
}

/// Where the state is kept.
#[derive(Debug, Args)]
pub struct DatabaseArgs {
    /// Database to keep state in: sqlite://PATH (created on first start;
    /// sqlite:///abs/path for an absolute path) or
    /// postgres://USER:PASSWORD@HOST:PORT/DATABASE (never logged with its
    /// password).
    #[arg(long, env = "HIGHWATER_DATABASE_URL", default_value = "sqlite://highwater.db")]
    pub database_url: DatabaseUrl,

    /// PostgreSQL: most connections this node keeps open.
    #[arg(long, env = "HIGHWATER_DATABASE_POOL_SIZE", default_value_t = 16,
          value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub database_pool_size: u64,

    /// PostgreSQL: how long to wait for a connection before answering 503,
    /// in milliseconds.
    #[arg(long, env = "HIGHWATER_DATABASE_TIMEOUT_MS", default_value_t = 3000,
          value_parser = clap::value_parser!(u64).range(10..=600_000))]
    pub database_timeout_ms: u64,

    /// PostgreSQL: the longest one database operation may take before the
    /// request fails with 503, in milliseconds (a silent server must not
    /// hang requests).
    #[arg(long, env = "HIGHWATER_DATABASE_OPERATION_TIMEOUT_MS", default_value_t = 30_000,
          value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
    pub database_operation_timeout_ms: u64,

    /// Memory for cached current states, in MiB: large states are then
    /// not read back row by row on every read and after every write.
    #[arg(long, env = "HIGHWATER_STATE_CACHE_MB", default_value_t = 32,
          value_parser = clap::value_parser!(u64).range(0..=65_536))]
    pub state_cache_mb: u64,

    /// PostgreSQL: when this node is the only one on the database, take a
    /// lease there (others' writes wait for it; it is given up as soon as
    /// another node starts or anything else writes the tables) and answer
    /// reads from memory instead of asking the database first. Set false
    /// on every node when they reach PostgreSQL through a pooler in
    /// transaction mode.
    #[arg(long, env = "HIGHWATER_DATABASE_SOLE_NODE", default_value_t = true, action = clap::ArgAction::Set)]
    pub database_sole_node: bool,
}

impl DatabaseArgs {
    /// How to open the store.
    pub fn open_options(&self, migrate: bool) -> OpenOptions {
        OpenOptions {
            migrate,
            pool_size: self.database_pool_size as usize,
            connect_timeout: Duration::from_millis(self.database_timeout_ms),
            operation_timeout: Duration::from_millis(self.database_operation_timeout_ms),
            state_cache_bytes: (self.state_cache_mb as usize).saturating_mul(1024 * 1024),
            exclusive: true,
            sole_node: self.database_sole_node,
        }
    }
}

/// Settings of `highwater serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address and port to listen on.
    #[arg(long, env = "HIGHWATER_LISTEN", default_value = "127.0.0.1:8000")]
    pub listen: SocketAddr,

    #[command(flatten)]
    pub database: DatabaseArgs,

    /// Apply pending schema migrations at start-up. With false, a node
    /// refuses a schema that `highwater migrate` has not brought up to date.
    #[arg(long, env = "HIGHWATER_MIGRATE", default_value_t = true, action = clap::ArgAction::Set)]
    pub migrate: bool,

    /// Largest request body accepted, in bytes; larger bodies get 413.
    #[arg(long, env = "HIGHWATER_MAX_BODY_BYTES", default_value_t = 128 * 1024 * 1024,
          value_parser = clap::value_parser!(u64).range(1024..=4 * 1024 * 1024 * 1024))]
    pub max_body_bytes: u64,

    /// Deepest nesting of JSON arrays and objects in a request, blobs
    /// included; deeper requests get 422.
    #[arg(long, env = "HIGHWATER_MAX_JSON_DEPTH", default_value_t = 128,
          value_parser = clap::value_parser!(u64).range(8..=1024))]
    pub max_json_depth: u64,

    /// History kept per connection: at most this many revisions (0: no
    /// limit). The current revision is always kept.
    #[arg(long, env = "HIGHWATER_HISTORY_KEEP_REVISIONS", default_value_t = 10_000)]
    pub history_keep_revisions: u64,

    /// History kept per connection: revisions younger than this many days
    /// (0: no limit). The current revision is always kept.
    #[arg(long, env = "HIGHWATER_HISTORY_KEEP_DAYS", default_value_t = 30)]
    pub history_keep_days: u64,

    /// How often old history is pruned, in seconds.
    #[arg(long, env = "HIGHWATER_HISTORY_PRUNE_INTERVAL_SECS", default_value_t = 300,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub history_prune_interval_secs: u64,

    /// Most stream states one request may carry; more get 422.
    #[arg(long, env = "HIGHWATER_MAX_STREAMS_PER_REQUEST", default_value_t = 100_000,
          value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub max_streams_per_request: u64,

    /// Largest single blob (a legacy state, a shared blob or one stream's
    /// state) in bytes; larger ones get 422.
    #[arg(long, env = "HIGHWATER_MAX_BLOB_BYTES", default_value_t = 128 * 1024 * 1024,
          value_parser = clap::value_parser!(u64).range(1..=4 * 1024 * 1024 * 1024))]
    pub max_blob_bytes: u64,

    /// Longest stream name or namespace, in characters; longer get 422.
    #[arg(long, env = "HIGHWATER_MAX_NAME_CHARS", default_value_t = 1024,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_name_chars: u64,

    /// Longest a request may take before it is answered 503, in seconds.
    #[arg(long, env = "HIGHWATER_REQUEST_TIMEOUT_SECS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub request_timeout_secs: u64,

    /// Most requests served at once; more are answered 503 straight away.
    #[arg(long, env = "HIGHWATER_MAX_CONCURRENT_REQUESTS", default_value_t = 1024,
          value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_concurrent_requests: u64,

    /// Longest a client may take to send a request's headers, in seconds;
    /// also how long an idle kept-alive connection is kept open. Slower
    /// clients are disconnected, so that connections that send nothing do
    /// not hold file descriptors for ever.
    #[arg(long, env = "HIGHWATER_HEADER_READ_TIMEOUT_SECS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub header_read_timeout_secs: u64,

    /// Memory for the requests being served at once, in MiB, each counted
    /// as twice its body (about what handling a large write takes) from
    /// when its body is read, once its route and credentials are checked,
    /// until it is answered. A request that does not fit waits for others
    /// to finish (503 after --request-timeout-secs); one with a body of
    /// --max-body-bytes always fits. A body sent without a length is
    /// counted as it arrives.
    #[arg(long, env = "HIGHWATER_REQUEST_MEMORY_MB", default_value_t = 512,
          value_parser = clap::value_parser!(u64).range(1..=1_048_576))]
    pub request_memory_mb: u64,

    /// How long a shutdown (SIGTERM, Ctrl-C) waits for requests in flight
    /// before exiting anyway, in seconds.
    #[arg(long, env = "HIGHWATER_SHUTDOWN_TIMEOUT_SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(0..=3600))]
    pub shutdown_timeout_secs: u64,

    /// JSON file of credentials; with it (or HIGHWATER_AUTH_CREDENTIALS)
    /// every route but health and openapi needs Basic or Bearer
    /// authentication. See the README for its form and `highwater
    /// hash-secret`.
    #[arg(long, env = "HIGHWATER_AUTH_FILE")]
    pub auth_file: Option<std::path::PathBuf>,

    /// The credentials JSON itself, instead of a file.
    #[arg(long, env = "HIGHWATER_AUTH_CREDENTIALS", hide_env_values = true, conflicts_with = "auth_file")]
    pub auth_credentials: Option<String>,

    /// Serve without authentication on a non-loopback address, because an
    /// authenticating proxy stands in front. Without it, Highwater refuses
    /// to listen beyond loopback with authentication off.
    #[arg(long, env = "HIGHWATER_BEHIND_AUTH_PROXY", default_value_t = false, action = clap::ArgAction::Set,
          num_args = 0..=1, default_missing_value = "true")]
    pub behind_auth_proxy: bool,
}

impl ServeArgs {
    /// The history retention these settings describe.
    pub fn retention(&self) -> Retention {
        Retention {
            keep_revisions: (self.history_keep_revisions > 0).then_some(self.history_keep_revisions),
            keep_for: (self.history_keep_days > 0).then(|| Duration::from_secs(self.history_keep_days * 86_400)),
        }
    }

    /// The request limits these settings describe.
    pub fn limits(&self) -> Limits {
        Limits {
            max_body_bytes: usize::try_from(self.max_body_bytes).unwrap_or(usize::MAX),
            decode: DecodeLimits {
                max_depth: self.max_json_depth as usize,
                max_streams: self.max_streams_per_request as usize,
                max_blob_bytes: usize::try_from(self.max_blob_bytes).unwrap_or(usize::MAX),
                max_name_chars: self.max_name_chars as usize,
            },
            request_timeout: Duration::from_secs(self.request_timeout_secs),
            max_concurrent_requests: self.max_concurrent_requests as usize,
            header_read_timeout: Duration::from_secs(self.header_read_timeout_secs),
            request_memory_bytes: usize::try_from(self.request_memory_mb.saturating_mul(1024 * 1024))
                .unwrap_or(usize::MAX),
        }
    }
}

/// Logging settings, accepted before or after the subcommand.
#[derive(Debug, Args)]
pub struct LogArgs {
    /// Log filter: a level (error, warn, info, debug, trace) or tracing
    /// directives such as "info,highwater=debug".
    #[arg(long, env = "HIGHWATER_LOG_LEVEL", default_value = "info", global = true)]
    pub log_level: String,

    /// Log line format: human-readable text or one JSON object per line.
    #[arg(long, env = "HIGHWATER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
}

/// The log line formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn serve_needs_no_settings() {
        let cli = Cli::try_parse_from(["highwater", "serve"]).unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("expected serve");
        };
        assert_eq!(args.listen.to_string(), "127.0.0.1:8000");
        assert_eq!(args.database.database_url, DatabaseUrl::Sqlite("highwater.db".into()));
        assert_eq!(args.limits().decode.max_depth, 128);
    }

    #[test]
    fn a_bad_database_url_names_the_setting() {
        let err = Cli::try_parse_from(["highwater", "serve", "--database-url", "mysql://x"]).unwrap_err();
        assert!(err.to_string().contains("--database-url"), "{err}");
    }
}
