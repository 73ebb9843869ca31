//! Helpers of the cluster tests: the processes of one cluster (API nodes, workers) on a real
//! PostgreSQL server, and what those tests read straight from its database.

use super::{Env, Server};
use sqlx::PgPool;
use std::time::{Duration, Instant};

pub const LEASE_MS: &str = "2000";
pub const HEARTBEAT_MS: &str = "400";
pub const LONG: Duration = Duration::from_secs(180);

/// The shared settings of every process of one cluster.
pub fn cluster_env(database_url: &str) -> Env {
    Env::new()
        .with("SFTD_DATABASE_URL", database_url)
        .with("SFTD_LEASE_MS", LEASE_MS)
        .with("SFTD_HEARTBEAT_MS", HEARTBEAT_MS)
}

pub fn api_node(env: &Env) -> Server {
    env.start_args(&["serve", "--no-worker"])
}

pub fn worker(env: &Env) -> Server {
    env.start_args(&["worker"])
}

/// The registry id of a worker process, from its start-up log.
pub fn worker_id(w: &mut Server) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(line) = w.logs().iter().find(|l| l.contains("worker registered")) {
            let i = line.find("wrk-").expect("the worker id");
            let id: String = line[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect();
            return id;
        }
        assert!(Instant::now() < deadline, "the worker did not register");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until the process has logged a line containing `needle`.
pub async fn wait_logged(p: &mut Server, needle: &str) {
    let deadline = Instant::now() + LONG;
    while !p.logged(needle) {
        assert!(Instant::now() < deadline, "never logged {needle:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A job's metrics steps in event order, from the database.
pub async fn metric_steps(db: &PgPool, job: &str) -> Vec<i64> {
    sqlx::query_scalar(
        "SELECT step FROM events WHERE job_id = $1 AND type = 'metrics' \
         AND data::jsonb ? 'train_loss' ORDER BY seq",
    )
    .bind(job)
    .fetch_all(db)
    .await
    .unwrap()
}

/// `(worker_id, epoch, attempts)` of a job.
pub async fn claim_of(db: &PgPool, job: &str) -> (Option<String>, i64, i64) {
    sqlx::query_as("SELECT worker_id, epoch, attempts FROM jobs WHERE id = $1")
        .bind(job)
        .fetch_one(db)
        .await
        .unwrap()
}

/// The committed checkpoint steps of a job.
pub async fn checkpoint_steps(db: &PgPool, job: &str) -> Vec<i64> {
    sqlx::query_scalar("SELECT step FROM checkpoints WHERE job_id = $1 ORDER BY step")
        .bind(job)
        .fetch_all(db)
        .await
        .unwrap()
}

/// Waits until `cond` holds for the job's claim and steps.
pub async fn wait_until(
    db: &PgPool,
    job: &str,
    what: &str,
    cond: impl Fn(&(Option<String>, i64, i64), &[i64]) -> bool,
) -> ((Option<String>, i64, i64), Vec<i64>) {
    let deadline = Instant::now() + LONG;
    loop {
        let (claim, steps) = (claim_of(db, job).await, metric_steps(db, job).await);
        if cond(&claim, &steps) {
            return (claim, steps);
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {claim:?} {steps:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
