//! Test databases on either backend. `HIGHWATER_TEST_BACKEND` picks it:
//! `sqlite` (the default: a file in a temp dir) or `postgres` (a database
//! created on the server at `HIGHWATER_TEST_POSTGRES_URL`, default
//! `postgres://postgres@127.0.0.1:5432/postgres`, and dropped afterwards).
//! A Postgres run that cannot reach the server fails; it never skips.
//! [`server`] runs the `highwater serve` binary.

#![allow(dead_code)]

pub mod server;

use std::sync::Arc;

use highwater::state::ConnectionId;
use highwater::store::{self, DatabaseUrl, Store};

const DEFAULT_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// The backend the suite runs on.
pub fn backend() -> &'static str {
    match std::env::var("HIGHWATER_TEST_BACKEND").as_deref() {
        Ok("postgres") => "postgres",
        Ok("sqlite") | Err(_) => "sqlite",
        Ok(other) => panic!("HIGHWATER_TEST_BACKEND={other}: expected sqlite or postgres"),
    }
}

/// A database of its own for one test, removed when dropped.
pub struct TestDatabase {
    pub url: DatabaseUrl,
    _dir: Option<tempfile::TempDir>,
    postgres: Option<(String, String)>,
}

impl TestDatabase {
    pub async fn new() -> Self {
        match backend() {
            "postgres" => Self::postgres().await,
            _ => {
                let dir = tempfile::tempdir().expect("temp dir");
                let url = DatabaseUrl::Sqlite(dir.path().join("highwater.db"));
                Self { url, _dir: Some(dir), postgres: None }
            }
        }
    }

    /// A database on the PostgreSQL server whatever `HIGHWATER_TEST_BACKEND`
    /// says, for the tests that need PostgreSQL itself.
    pub async fn postgres_always() -> Self {
        Self::postgres().await
    }

    async fn postgres() -> Self {
        let admin = admin_url();
        let name = format!("highwater_test_{}", ConnectionId::random().to_string().replace('-', ""));
        let client = connect(&admin).await;
        client.batch_execute(&format!("CREATE DATABASE {name}")).await.expect("CREATE DATABASE");
        let url = database_url(&admin, &name);
        Self { url: url.parse().expect("test database URL"), _dir: None, postgres: Some((admin, name)) }
    }

    /// Opens the store on this database.
    pub async fn open(&self) -> Arc<dyn Store> {
        store::open(&self.url, &Default::default()).await.expect("open the store")
    }

    /// The URL as text, for a server process.
    pub fn url_text(&self) -> String {
        match &self.url {
            DatabaseUrl::Sqlite(path) => format!("sqlite://{}", path.display()),
            DatabaseUrl::Postgres(url) => url.clone(),
        }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let Some((admin, name)) = self.postgres.take() else {
            return;
        };
        // Drop runs outside any runtime guarantee; use a thread of its own.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            runtime.block_on(async {
                let client = connect(&admin).await;
                client.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("warning: could not drop a test database: {dropped:?}");
        }
    }
}

/// The administrative URL for creating test databases.
pub fn admin_url() -> String {
    std::env::var("HIGHWATER_TEST_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_ADMIN_URL.to_owned())
}

/// `admin` with its database name replaced by `name`.
pub fn database_url(admin: &str, name: &str) -> String {
    let (base, query) = admin.split_once('?').map_or((admin, None), |(b, q)| (b, Some(q)));
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let host_end = base[scheme_end..].find('/').map_or(base.len(), |i| scheme_end + i);
    let mut url = format!("{}/{name}", &base[..host_end]);
    if let Some(query) = query {
        url.push('?');
        url.push_str(query);
    }
    url
}

pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL tests need a server at {url}: {e}"));
    tokio::spawn(connection);
    client
}

/// The revisions of connection `id` in a PostgreSQL database's `revisions`
/// table, in order.
pub async fn postgres_revisions(db: &tokio_postgres::Client, id: &str) -> Vec<i64> {
    db.query("SELECT revision FROM revisions WHERE connection_id = $1 ORDER BY revision", &[&id])
        .await
        .expect("query revisions")
        .iter()
        .map(|row| row.get(0))
        .collect()
}
