//! Persistence: the SQLite pool, migrations, and the one place events are published after commit.
//! Each submodule owns the SQL of one table; every state change is one transaction.

pub mod checkpoints;
pub mod events;
pub mod files;
pub mod jobs;
pub mod status;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::SqlitePool;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast;

pub use events::{EventRow, NewEvent};
pub use jobs::JobRow;
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
    pool: SqlitePool,
    data_dir: PathBuf,
    events_tx: broadcast::Sender<Arc<Published>>,
    broadcast_capacity: usize,
    write_lock: Arc<tokio::sync::Mutex<()>>,
    /// The open lock file: its exclusive `flock` keeps a second process off this data dir
    /// until this process exits (or dies: the kernel drops the lock).
    _dir_lock: Arc<std::fs::File>,
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
        std::fs::create_dir_all(data_dir)?;
        let dir_lock = lock_data_dir(data_dir)?;
        for sub in ["files", "jobs", "models", "tmp"] {
            std::fs::create_dir_all(data_dir.join(sub))?;
        }
        // FULL: a commit returns only after the WAL is fsync'd, so a committed state change or
        // event survives power loss, not only a crash of the process.
        let options = SqliteConnectOptions::from_str(database_url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options)
            .await?;
        sqlx::migrate!("./migrations").run(&pool).await?;
        let (events_tx, _) = broadcast::channel(broadcast_capacity);
        Ok(Self {
            pool,
            data_dir: data_dir.to_path_buf(),
            events_tx,
            broadcast_capacity,
            write_lock: Default::default(),
            _dir_lock: Arc::new(dir_lock),
        })
    }

    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Every event committed from now on, in commit order (per job; see `events` for gaps).
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
            // No receivers is fine: nobody is watching.
            let _ = self.events_tx.send(Arc::new(Published { row: e }));
        }
    }

    /// A write transaction. Writers queue on an in-process lock (SQLite has one writer anyway,
    /// and its busy handler sleeps in coarse steps), then take SQLite's write lock up front so
    /// a read lock never has to be upgraded. Hold the guard until the commit.
    async fn begin_write(
        &self,
    ) -> Result<(
        tokio::sync::OwnedMutexGuard<()>,
        sqlx::Transaction<'static, sqlx::Sqlite>,
    )> {
        let guard = self.write_lock.clone().lock_owned().await;
        Ok((guard, self.pool.begin_with("BEGIN IMMEDIATE").await?))
    }

    /// Liveness of the database for `/readyz`.
    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
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

/// Fixtures shared by the unit tests of the store and of the modules that use it.
#[cfg(test)]
pub(crate) mod testing {
    use super::jobs::NewJob;
    use super::Store;

    /// A store in a fresh temporary directory (kept alive by the returned guard).
    pub async fn temp_store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let s = Store::open(&url, dir.path()).await.unwrap();
        (dir, s)
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
}

#[cfg(test)]
mod tests {
    use super::jobs::{Created, JobError};
    use super::*;

    use super::testing::{new_job as job, temp_store as store};

    fn statuses(events: &[EventRow]) -> Vec<String> {
        events
            .iter()
            .filter_map(|e| e.status().map(|s| s.to_string()))
            .collect()
    }

    #[tokio::test]
    async fn transitions_are_guarded_and_events_numbered() {
        let (_d, s) = store().await;
        let mut live = s.subscribe();
        assert!(matches!(
            s.create_job(&job("ftjob-a", None)).await.unwrap(),
            Created::New(_)
        ));
        // Not queued yet: nothing to claim, and running-only events are refused.
        assert!(s.claim_next_job().await.unwrap().is_none());
        assert!(s
            .append_running_event("ftjob-a", &NewEvent::info("x"))
            .await
            .unwrap()
            .is_none());
        assert!(s.mark_queued("ftjob-a").await.unwrap());
        assert!(!s.mark_queued("ftjob-a").await.unwrap());
        let claimed = s.claim_next_job().await.unwrap().unwrap();
        assert_eq!((claimed.id.as_str(), claimed.attempts), ("ftjob-a", 1));
        assert!(s
            .append_running_event("ftjob-a", &NewEvent::info("log"))
            .await
            .unwrap()
            .is_some());
        assert!(s.cancel_job("ftjob-a").await.unwrap().is_some());
        // After the terminal event nothing else lands: no events, no success, no failure, no requeue.
        assert!(s
            .append_running_event("ftjob-a", &NewEvent::info("late"))
            .await
            .unwrap()
            .is_none());
        assert!(!s.succeed_job("ftjob-a", 1, "ft", &[]).await.unwrap());
        let err = JobError::new("x", "y", None);
        assert!(!s
            .fail_job("ftjob-a", &[JobStatus::Running], &err)
            .await
            .unwrap());
        assert!(!s.requeue("ftjob-a", "r").await.unwrap());
        assert!(!s
            .add_checkpoint("ftjob-a", 1, &serde_json::json!({}), "p")
            .await
            .unwrap());
        assert!(s.cancel_job("ftjob-a").await.unwrap().is_none());

        let events = s.list_events("ftjob-a", 0, 100).await.unwrap();
        assert_eq!(
            events.iter().map(|e| e.seq).collect::<Vec<_>>(),
            [1, 2, 3, 4, 5]
        );
        assert_eq!(
            statuses(&events),
            ["validating_files", "queued", "running", "cancelled"]
        );
        assert!(events.last().unwrap().is_terminal());
        // Every committed event was broadcast, in order.
        for e in &events {
            assert_eq!(live.try_recv().unwrap().row, *e);
        }
        assert!(live.try_recv().is_err());
    }

    #[tokio::test]
    async fn a_second_store_on_the_same_data_dir_is_refused_until_the_first_closes() {
        let (dir, s) = store().await;
        let url = format!("sqlite://{}", dir.path().join("t.db").display());
        let second = Store::open(&url, dir.path()).await;
        assert!(
            matches!(&second, Err(StoreError::Locked(p)) if p == dir.path()),
            "{:?}",
            second.err()
        );
        drop(s);
        Store::open(&url, dir.path()).await.unwrap();
    }

    #[tokio::test]
    async fn interruptions_are_counted_from_the_requeue_events() {
        let (_d, s) = store().await;
        s.create_job(&job("ftjob-i", None)).await.unwrap();
        s.mark_queued("ftjob-i").await.unwrap();
        for n in 1..=2 {
            s.claim_next_job().await.unwrap().unwrap();
            assert!(s.requeue_interrupted("ftjob-i", "crash").await.unwrap());
            assert_eq!(s.interruptions("ftjob-i").await.unwrap(), n);
        }
        // A requeue for a clean shutdown is not an interruption.
        s.claim_next_job().await.unwrap().unwrap();
        assert!(s.requeue("ftjob-i", "suspended").await.unwrap());
        assert_eq!(s.interruptions("ftjob-i").await.unwrap(), 2);
    }

    #[tokio::test]
    async fn fifo_requeue_and_idempotency_key() {
        let (_d, s) = store().await;
        for id in ["ftjob-1", "ftjob-2"] {
            s.create_job(&job(id, None)).await.unwrap();
        }
        s.mark_queued("ftjob-2").await.unwrap();
        s.mark_queued("ftjob-1").await.unwrap();
        assert_eq!(s.claim_next_job().await.unwrap().unwrap().id, "ftjob-1");
        assert!(s.requeue("ftjob-1", "suspended").await.unwrap());
        // The requeued job is older, so it goes first again.
        let again = s.claim_next_job().await.unwrap().unwrap();
        assert_eq!((again.id.as_str(), again.attempts), ("ftjob-1", 2));
        assert!(s
            .add_checkpoint("ftjob-1", 4, &serde_json::json!({"step": 4}), "p")
            .await
            .unwrap());
        assert!(!s
            .add_checkpoint("ftjob-1", 4, &serde_json::json!({"step": 4}), "p")
            .await
            .unwrap());
        assert_eq!(
            s.list_checkpoints("ftjob-1", None, 10).await.unwrap().len(),
            1
        );

        assert!(matches!(
            s.create_job(&job("ftjob-k", Some("key"))).await.unwrap(),
            Created::New(_)
        ));
        match s.create_job(&job("ftjob-k2", Some("key"))).await.unwrap() {
            Created::Existing(row) => assert_eq!(row.id, "ftjob-k"),
            Created::New(_) => panic!("a reused key must not create a job"),
        }
        assert!(s.get_job("ftjob-k2").await.unwrap().is_none());
    }
}
