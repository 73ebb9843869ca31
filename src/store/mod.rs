//! Persistence: the SQLite pool, migrations, and the one place events are published after commit.
//! Each submodule owns the SQL of one table; every state change is one transaction.

pub mod checkpoints;
pub mod events;
pub mod files;
pub mod jobs;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::SqlitePool;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast;

pub use events::{EventRow, NewEvent};
pub use jobs::{JobRow, JobStatus};

/// Store failures. Constraint and guard failures are reported by the functions' return values,
/// so what reaches this type is an infrastructure error (disk, corruption, a bug).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("migration error: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error("corrupt row: {0}")]
    Corrupt(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Capacity of the event broadcast shared by every stream subscriber. A subscriber that falls
/// further behind than this gets `Lagged` and catches up from the database.
const BROADCAST_CAPACITY: usize = 4096;

/// Cheap to clone: a pool handle, the data dir and the event broadcast.
#[derive(Clone)]
pub struct Store {
    pool: SqlitePool,
    data_dir: PathBuf,
    events_tx: broadcast::Sender<Arc<EventRow>>,
}

impl Store {
    /// Opens (creating if needed) the database, applies migrations and prepares the data dir.
    pub async fn open(database_url: &str, data_dir: &Path) -> Result<Self> {
        for sub in ["files", "jobs", "models", "tmp"] {
            std::fs::create_dir_all(data_dir.join(sub))?;
        }
        let options = SqliteConnectOptions::from_str(database_url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options)
            .await?;
        sqlx::migrate!("./migrations").run(&pool).await?;
        let (events_tx, _) = broadcast::channel(BROADCAST_CAPACITY);
        Ok(Self {
            pool,
            data_dir: data_dir.to_path_buf(),
            events_tx,
        })
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Every event committed from now on, in commit order (per job; see `events` for gaps).
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<EventRow>> {
        self.events_tx.subscribe()
    }

    /// Broadcasts events that are already committed. Called only after `COMMIT`.
    fn publish(&self, events: impl IntoIterator<Item = EventRow>) {
        for e in events {
            // No receivers is fine: nobody is watching.
            let _ = self.events_tx.send(Arc::new(e));
        }
    }

    /// A write transaction that takes the write lock up front, so concurrent writers wait on
    /// `busy_timeout` instead of failing to upgrade a read lock.
    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>> {
        Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?)
    }

    /// Liveness of the database for `/readyz`.
    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }
}

/// Unix seconds now.
pub fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// A fresh object id such as `file-3f2a…` (24 hex digits, like OpenAI's length).
pub fn new_id(prefix: &str) -> String {
    let u = uuid::Uuid::new_v4().simple().to_string();
    format!("{prefix}-{}", &u[..24])
}
