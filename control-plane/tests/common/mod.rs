//! The store-test harness every `*_store.rs` suite shares: a migrated store
//! on each backend (a temporary SQLite file; a fresh PostgreSQL database
//! from `keycap_tests::pg`, the server at `DATABASE_URL` or a throwaway
//! cluster), direct SQL for the tests that tamper with the ledger, and
//! `store_suite!`, which runs each case once per backend as
//! `sqlite::<case>` and `postgres::<case>`. Each test file is its own crate
//! and uses part of this, hence the `dead_code` allowance.
#![allow(dead_code)]

use std::any::Any;
use std::sync::Arc;

use keycap_control::store::{PgStore, SqliteStore, Store};

pub struct Backend {
    pub store: Arc<dyn Store>,
    /// The database as its owner sees it, for tests that tamper with it.
    pub raw: Raw,
    // Dropped after the store: the temp dir or the test database.
    _guard: Box<dyn Any + Send>,
}

pub async fn sqlite() -> Backend {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("keycap.db");
    let store = SqliteStore::connect(path.to_str().expect("utf-8 path"))
        .await
        .expect("open sqlite");
    store.migrate().await.expect("migrate sqlite");
    store.migrate().await.expect("migrate is idempotent");
    Backend {
        raw: Raw::Sqlite(store.pool().clone()),
        store: Arc::new(store),
        _guard: Box::new(dir),
    }
}

/// `None` only where no database test may run (never under `CI=true`).
pub async fn postgres() -> Option<Backend> {
    let db = keycap_tests::pg::fresh_database_or_skip()
        .await
        .expect("a PostgreSQL database for the store tests")?;
    let store = PgStore::connect(&db.url).await.expect("connect postgres");
    store.migrate().await.expect("migrate postgres");
    store.migrate().await.expect("migrate is idempotent");
    Some(Backend {
        raw: Raw::Postgres(store.pool().clone()),
        store: Arc::new(store),
        _guard: Box::new(db),
    })
}

/// Direct SQL on a backend's database.
#[derive(Clone)]
pub enum Raw {
    Sqlite(sqlx::SqlitePool),
    Postgres(sqlx::PgPool),
}

impl Raw {
    /// Runs `sql` (one statement); the database's error as text.
    pub async fn exec(&self, sql: &str) -> Result<u64, String> {
        match self {
            Raw::Sqlite(p) => sqlx::query(sql).execute(p).await.map(|r| r.rows_affected()),
            Raw::Postgres(p) => sqlx::query(sql).execute(p).await.map(|r| r.rows_affected()),
        }
        .map_err(|e| e.to_string())
    }

    /// Lets the owner change the ledger and its checkpoints as an attacker
    /// with the database would: the append-only triggers out of the way.
    pub async fn disable_ledger_triggers(&self) {
        let statements: &[&str] = match self {
            Raw::Sqlite(_) => &[
                "DROP TRIGGER audit_no_update",
                "DROP TRIGGER audit_no_delete",
                "DROP TRIGGER ledger_checkpoints_no_update",
                "DROP TRIGGER ledger_checkpoints_no_delete",
            ],
            Raw::Postgres(_) => &[
                "ALTER TABLE audit DISABLE TRIGGER USER",
                "ALTER TABLE ledger_checkpoints DISABLE TRIGGER USER",
            ],
        };
        for sql in statements {
            self.exec(sql).await.unwrap();
        }
    }
}

/// Runs each case, an `async fn(Arc<dyn Store>)` at the test crate's root,
/// on both backends.
macro_rules! store_suite {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let backend = crate::common::sqlite().await;
                    crate::$case(backend.store.clone()).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let Some(backend) = crate::common::postgres().await else { return };
                    crate::$case(backend.store.clone()).await;
                }
            )*
        }
    };
}
