//! Persistence: the pool (SQLite or PostgreSQL, chosen by the database URL), migrations, and the
//! one place events are published after commit. Each submodule owns the SQL of one table (`sql`
//! holds the few fragments the two engines spell differently); every state change is one
//! transaction. Nothing outside this module knows which engine is behind it.

/// A row struct and its `FromRow<AnyRow>`: each field is read from the column of its name, or of
/// the name after `as`. Written here rather than `#[derive(sqlx::FromRow)]`, whose proc-macro
/// crate would compile a second, host-side copy of sqlx and SQLite into every build (docs/ci.md).
macro_rules! row_struct {
    (
        $(#[$attr:meta])*
        pub struct $row:ident {
            $($(#[$field_attr:meta])* pub $field:ident: $ty:ty $(as $column:literal)?),+ $(,)?
        }
    ) => {
        $(#[$attr])*
        pub struct $row {
            $($(#[$field_attr])* pub $field: $ty),+
        }

        impl<'r> sqlx::FromRow<'r, sqlx::any::AnyRow> for $row {
            fn from_row(row: &'r sqlx::any::AnyRow) -> sqlx::Result<Self> {
                use sqlx::Row;
                Ok(Self { $($field: row.try_get(row_struct!(@column $field $($column)?))?),+ })
            }
        }
    };
    (@column $field:ident) => { stringify!($field) };
    (@column $field:ident $column:literal) => { $column };
}

pub mod checkpoints;
pub mod events;
mod feed;
pub mod files;
mod guard;
pub mod jobs;
pub mod lease;
mod migrations;
mod placement;
mod sql;
pub mod status;
pub mod workers;

use sql::Backend;
use sqlx::any::AnyPoolOptions;
use sqlx::AnyConnection;
use sqlx::{AnyPool, Executor};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast;

pub use events::{EventRow, NewEvent};
pub use jobs::JobRow;
pub use lease::{Claimant, Lease};
pub use status::JobStatus;

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
    #[error(
        "another sftd process is using the data directory {0} (it holds the lock on {0}/sftd.lock); \
         stop it, or give this one its own SFTD_DATA_DIR"
    )]
    Locked(PathBuf),
    #[error("SFTD_DATABASE_URL must start with sqlite:// or postgres:// (got {0:?})")]
    UnsupportedUrl(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// A committed event as broadcast after its commit (to the API's stream fan-out, which renders
/// it once for every subscriber).
#[derive(Debug)]
pub struct Published {
    pub row: EventRow,
}

/// Capacity of the event broadcast shared by every stream subscriber. A subscriber that falls
/// further behind than this gets `Lagged` and catches up from the database.
const BROADCAST_CAPACITY: usize = 4096;

/// Cheap to clone: a pool handle, the data dir and the event broadcast.
#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
    database_url: Arc<str>,
    data_dir: PathBuf,
    events_tx: broadcast::Sender<Arc<Published>>,
    broadcast_capacity: usize,
    write_lock: Arc<tokio::sync::Mutex<()>>,
    /// SQLite only: the open lock file, whose exclusive `flock` keeps a second process off this
    /// data dir until this process exits (or dies: the kernel drops the lock). Its presence is
    /// what makes this process the only writer ([`Store::is_exclusive`]).
    _dir_lock: Option<Arc<std::fs::File>>,
    /// PostgreSQL only: wakes this process's event feed at once after its own commits.
    feed: feed::Seen,
}

impl Store {
    /// Opens (creating if needed) the database, applies migrations and prepares the data dir.
    pub async fn open(database_url: &str, data_dir: &Path) -> Result<Self> {
        Self::open_with_capacity(database_url, data_dir, BROADCAST_CAPACITY).await
    }

    /// [`Store::open`] with a given event broadcast capacity (tests use a tiny one to force lag).
    pub async fn open_with_capacity(
        database_url: &str,
        data_dir: &Path,
        broadcast_capacity: usize,
    ) -> Result<Self> {
        let backend = Backend::of_url(database_url)
            .ok_or_else(|| StoreError::UnsupportedUrl(redact_url(database_url)))?;
        sqlx::any::install_default_drivers();
        std::fs::create_dir_all(data_dir)?;
        // SQLite lives in one process; a PostgreSQL data dir may be shared by many (a cluster).
        let dir_lock = match backend {
            Backend::Sqlite => Some(Arc::new(lock_data_dir(data_dir)?)),
            Backend::Postgres => None,
        };
        for sub in ["files", "jobs", "models", "tmp"] {
            std::fs::create_dir_all(data_dir.join(sub))?;
        }
        let pool = match backend {
            Backend::Sqlite => open_sqlite(database_url).await?,
            Backend::Postgres => {
                AnyPoolOptions::new()
                    .max_connections(8)
                    .acquire_timeout(Duration::from_secs(30))
                    .after_connect(|conn, _| {
                        Box::pin(async move {
                            sqlx::query(IDLE_IN_TRANSACTION_TIMEOUT)
                                .execute(conn)
                                .await?;
                            Ok(())
                        })
                    })
                    .connect(database_url)
                    .await?
            }
        };
        migrations::migrator(backend).await?.run(&pool).await?;
        let (events_tx, _) = broadcast::channel(broadcast_capacity);
        Ok(Self {
            pool,
            backend,
            database_url: database_url.into(),
            data_dir: data_dir.to_path_buf(),
            events_tx,
            broadcast_capacity,
            write_lock: Default::default(),
            _dir_lock: dir_lock,
            feed: Default::default(),
        })
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Whether this process is the database's only writer (SQLite: it holds the data dir's
    /// lock). Then a job found `running` at start-up was left by a dead process, whatever its
    /// lease says; with a shared database only an expired lease says so.
    pub fn is_exclusive(&self) -> bool {
        self._dir_lock.is_some()
    }

    /// Every event committed from now on, in commit order (per job; see `events` for gaps).
    /// With a shared database, call [`Store::follow_other_writers`] once so that events committed
    /// by other processes arrive here too.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Published>> {
        self.events_tx.subscribe()
    }

    /// How many events the broadcast holds for a subscriber that has not read them yet.
    pub fn broadcast_capacity(&self) -> usize {
        self.broadcast_capacity
    }

    /// Broadcasts events that are already committed. Called only after `COMMIT`.
    fn publish(&self, events: impl IntoIterator<Item = EventRow>) {
        for e in events {
            self.feed.saw(&e);
            // No receivers is fine: nobody is watching.
            let _ = self.events_tx.send(Arc::new(Published { row: e }));
        }
    }

    /// A write transaction. SQLite: writers queue on an in-process lock (SQLite has one writer
    /// anyway, and its busy handler sleeps in coarse steps), then take SQLite's write lock up
    /// front so a read lock never has to be upgraded. PostgreSQL: a plain transaction (the
    /// queries lock the rows they change). Hold the guard until the commit.
    async fn begin_write(
        &self,
    ) -> Result<(
        Option<tokio::sync::OwnedMutexGuard<()>>,
        sqlx::Transaction<'static, sqlx::Any>,
    )> {
        match self.backend {
            Backend::Sqlite => {
                let guard = self.write_lock.clone().lock_owned().await;
                Ok((Some(guard), self.pool.begin_with("BEGIN IMMEDIATE").await?))
            }
            Backend::Postgres => Ok((None, self.pool.begin().await?)),
        }
    }

    /// Liveness of the database for `/readyz`.
    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }
}

/// Set on every PostgreSQL session: the server ends a session that sits idle inside a
/// transaction for 5 s. sftd runs a transaction's statements back to back, so only a client that
/// stopped mid-transaction (a frozen worker: SIGSTOP, a paused VM, a swap storm) sits there, and
/// it holds its row locks meanwhile. Every event write locks its job's row, so a worker frozen in
/// one would otherwise block the take-over of that job, and the thread of every worker trying
/// it, until it woke. Once the session is ended its locks are released; the frozen worker's
/// commit fails when it wakes, and fencing refuses its retries.
const IDLE_IN_TRANSACTION_TIMEOUT: &str = "SET idle_in_transaction_session_timeout = '5s'";

/// The SQLite pool: WAL, `FULL` sync (a commit returns only after the WAL is fsync'd, so a
/// committed state change or event survives power loss, not only a crash of the process),
/// a busy timeout and foreign keys, set on every connection.
async fn open_sqlite(database_url: &str) -> Result<AnyPool> {
    let url = if database_url.contains("mode=") {
        database_url.to_string()
    } else if database_url.contains('?') {
        format!("{database_url}&mode=rwc")
    } else {
        format!("{database_url}?mode=rwc")
    };
    Ok(AnyPoolOptions::new()
        .max_connections(8)
        .acquire_timeout(Duration::from_secs(30))
        .after_connect(|conn: &mut AnyConnection, _| {
            Box::pin(async move {
                conn.execute(
                    "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; \
                     PRAGMA busy_timeout = 10000; PRAGMA foreign_keys = ON;",
                )
                .await?;
                Ok(())
            })
        })
        .connect(&url)
        .await?)
}

/// A database URL without its password, for error messages.
fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => format!("{}://…{}", &url[..scheme], &url[at..]),
        _ => url.to_string(),
    }
}

/// Takes the exclusive lock on `data_dir/sftd.lock`, or fails at once if another process has it.
fn lock_data_dir(data_dir: &Path) -> Result<std::fs::File> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(data_dir.join("sftd.lock"))?;
    use std::os::fd::AsRawFd;
    // SAFETY: flock(2) on a descriptor this function owns; it touches no memory.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(file);
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Err(StoreError::Locked(data_dir.to_path_buf()))
    } else {
        Err(err.into())
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

/// The throwaway PostgreSQL server of the integration tests, shared with the unit tests.
#[cfg(test)]
#[path = "../../tests/common/postgres.rs"]
pub(crate) mod test_postgres;

/// Fixtures shared by the unit tests of the store and of the modules that use it.
#[cfg(test)]
pub(crate) mod testing {
    use super::jobs::NewJob;
    use super::Store;

    pub(crate) use super::test_postgres as postgres;

    /// A store in a fresh temporary directory (kept alive by the returned guard).
    pub async fn temp_store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let s = Store::open(&url, dir.path()).await.unwrap();
        (dir, s)
    }

    /// A store on a fresh PostgreSQL server, or `None` (the test is skipped, with a message)
    /// when PostgreSQL is not installed.
    pub async fn pg_store() -> Option<(postgres::PgServer, tempfile::TempDir, Store)> {
        let server = postgres::PgServer::start()?;
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&server.database().await, dir.path())
            .await
            .unwrap();
        Some((server, dir, s))
    }

    /// A job on the demo model, optionally with an idempotency key.
    pub fn new_job(id: &str, key: Option<&str>) -> NewJob {
        NewJob {
            id: id.into(),
            model: "sftd-demo".into(),
            training_file: "file-x".into(),
            validation_file: None,
            spec: "{}".into(),
            config: "{}".into(),
            seed: 1,
            suffix: None,
            metadata: None,
            idempotency_key: key.map(String::from),
        }
    }

    /// Runs the async fn `$body(Store)` as two tests, `$name::sqlite` and `$name::postgres`.
    macro_rules! on_both_backends {
        ($name:ident, $body:ident) => {
            mod $name {
                #[tokio::test]
                async fn sqlite() {
                    let (_dir, store) = $crate::store::testing::temp_store().await;
                    super::$body(store).await;
                }

                #[tokio::test]
                async fn postgres() {
                    let Some((_server, _dir, store)) = $crate::store::testing::pg_store().await
                    else {
                        return;
                    };
                    super::$body(store).await;
                }
            }
        };
    }
    pub(crate) use on_both_backends;
}

#[cfg(test)]
mod tests;
