//! Fault injection against the real `sftd` binary: `kill -9` (and aborts at chosen points:
//! mid-checkpoint, between a checkpoint and its row, inside an event's transaction) at random
//! moments of many jobs, each resumed to `succeeded` with every step exactly once in the event
//! stream and in `metrics.csv` and the uninterrupted run's losses; the crash-loop cap; a second
//! process on the same data dir; a store that cannot record events; a full disk. Randomness is
//! seeded: the seed is printed, and `SFTD_FAULT_SEED=<seed>` replays a run.

mod common;

use common::jobs::{step_losses, step_numbers};
use common::{example, tiny_job, Env, Server};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const LONG: Duration = Duration::from_secs(120);
const STEPS: i64 = 6;

fn seed() -> u64 {
    let seed = std::env::var("SFTD_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("fault injection seed: {seed} (replay with SFTD_FAULT_SEED={seed})");
    seed
}

fn set_var(env: &mut Env, key: &str, value: Option<&str>) {
    env.vars.retain(|(k, _)| k != key);
    if let Some(v) = value {
        env.vars.push((key.into(), v.into()));
    }
}

/// `(step, train_loss)` of every training step in `metrics.csv`.
async fn csv_losses(s: &Server, job: &Value) -> Vec<(i64, f64)> {
    let csv = s
        .result_file(job, "metrics.csv")
        .await
        .unwrap_or_else(|| panic!("no metrics.csv in {job}"));
    String::from_utf8(csv)
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| {
            let cells: Vec<&str> = l.split(',').collect();
            (cells[0].parse().unwrap(), cells[1].parse().unwrap())
        })
        .collect()
}

/// A succeeded job whose events are gap-free with each step once, whose metrics.csv has each
/// step once, and whose losses are `reference`'s (when given). Returns its losses.
async fn check_succeeded(
    s: &Server,
    id: &str,
    reference: Option<&[(i64, f64)]>,
    ctx: &str,
) -> Vec<(i64, f64)> {
    let job = s.wait_finished(id, LONG).await;
    assert_eq!(job["status"], "succeeded", "{ctx}: {job}");
    let events = s.all_events(id).await;
    let seqs: Vec<i64> = events.iter().map(|e| e["seq"].as_i64().unwrap()).collect();
    assert_eq!(
        seqs,
        (1..=seqs.len() as i64).collect::<Vec<_>>(),
        "{ctx}: seq gap"
    );
    let steps = step_losses(&events);
    assert_eq!(
        steps.iter().map(|s| s.0).collect::<Vec<_>>(),
        (1..=STEPS).collect::<Vec<_>>(),
        "{ctx}: steps in the event stream"
    );
    let csv = csv_losses(s, &job).await;
    assert_eq!(csv, steps, "{ctx}: metrics.csv");
    if let Some(r) = reference {
        assert_eq!(steps, r, "{ctx}: losses differ from the uninterrupted run");
    }
    steps
}

/// How a round interrupts its job.
#[derive(Debug)]
enum Fault {
    /// kill -9 after `after_steps` steps are recorded plus a random delay.
    Kill { after_steps: usize, delay_ms: u64 },
    /// The server aborts itself at the n-th hit of a point.
    Abort(String),
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_points_always_resumes_each_step_exactly_once() {
    let seed = seed();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut env = Env::new();
    let mut s = env.start();
    let train = s.upload(&example("text.jsonl")).await;
    // save_steps 1: a checkpoint (and its row and event) at every step, so a random moment is
    // as likely to fall in a checkpoint write or an event commit as in a step.
    let body = tiny_job(&train, STEPS as u32, 1);
    let id = s.start_job(&body).await;
    let reference = check_succeeded(&s, &id, None, "uninterrupted").await;
    let points = ["checkpoint_files", "checkpoint_renamed", "event_insert"];
    for round in 1..=24 {
        let fault = if rng.random_bool(0.5) {
            Fault::Kill {
                after_steps: rng.random_range(0..STEPS as usize),
                delay_ms: rng.random_range(0..40),
            }
        } else {
            let point = points[rng.random_range(0..points.len())];
            // Steps 1..6 each hit every point at least once (event_insert more often).
            Fault::Abort(format!("{point}:{}", rng.random_range(1..=STEPS)))
        };
        let ctx = format!("seed {seed}, round {round}, {fault:?}");
        if let Fault::Abort(point) = &fault {
            s.kill9();
            set_var(&mut env, "SFTD_FAULT_POINT", Some(point));
            s = env.start();
            set_var(&mut env, "SFTD_FAULT_POINT", None);
        }
        let id = s.start_job(&body).await;
        match fault {
            Fault::Kill {
                after_steps,
                delay_ms,
            } => {
                s.wait_train_steps(&id, after_steps, LONG).await;
                tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                s.kill9();
            }
            Fault::Abort(_) => {
                let status = s.wait_exit(LONG);
                assert!(!status.success(), "{ctx}: {status:?}");
            }
        }
        s = env.start();
        check_succeeded(&s, &id, Some(reference.as_slice()), &ctx).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_keeps_crashing_the_server_fails_after_the_cap_and_the_queue_moves_on() {
    let env = Env::new().with("SFTD_MAX_ATTEMPTS", "2");
    let mut s = env.start();
    let train = s.upload(&example("text.jsonl")).await;
    // No checkpoint cadence: each crash sends it back to step 0, like a job that runs out of
    // memory at its first steps.
    let crasher = s.start_job(&tiny_job(&train, 400, 0)).await;
    let next = s.start_job(&tiny_job(&train, 2, 0)).await;
    for run in 1..=3 {
        // This run has claimed the job (its own `running` event) and is training.
        let deadline = Instant::now() + LONG;
        loop {
            let runs = s
                .all_events(&crasher)
                .await
                .iter()
                .filter(|e| e["data"]["status"] == "running")
                .count();
            if runs >= run {
                break;
            }
            assert!(Instant::now() < deadline, "run {run} never started");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        s.wait_train_steps(&crasher, 1, LONG).await;
        s.kill9();
        s = env.start();
    }
    let job = s.wait_finished(&crasher, LONG).await;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["error"]["code"], "job_interrupted", "{job}");
    let message = job["error"]["message"].as_str().unwrap();
    assert!(message.contains("interrupted 3 times"), "{message}");
    assert!(message.contains("the last step reached was"), "{message}");
    assert!(message.contains("SFTD_MAX_ATTEMPTS"), "{message}");
    let events = s.all_events(&crasher).await;
    let interrupted = events
        .iter()
        .filter(|e| e["data"]["interrupted"] == true)
        .count();
    assert_eq!(interrupted, 2, "two resumes, then the failure");
    let ok = s.wait_finished(&next, LONG).await;
    assert_eq!(ok["status"], "succeeded", "{ok}");
}

#[tokio::test]
async fn a_second_server_on_the_same_data_dir_exits_non_zero_with_a_clear_error() {
    let env = Env::new();
    let mut first = env.start();
    let mut cmd = Command::new(common::BIN);
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    for (k, v) in &env.vars {
        cmd.env(k, v);
    }
    let out = cmd.arg("serve").output().unwrap();
    assert!(!out.status.success(), "{:?}", out.status);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("another sftd process is using the data directory"),
        "{stderr}"
    );
    // The first one is unaffected; once it is gone (even by kill -9) the directory is free.
    let (st, _) = first.get("/readyz").await;
    assert_eq!(st, 200);
    first.kill9();
    let again = env.start();
    assert_eq!(again.get("/healthz").await.0, 200);
}

#[tokio::test]
async fn an_event_the_store_cannot_record_fails_the_job_instead_of_leaving_a_hole() {
    // From the 6th event a running job appends, every insert fails (each retried 3 times).
    let env = Env::new().with("SFTD_FAULT_FAIL", "event_insert:6");
    let s = env.start();
    let train = s.upload(&example("text.jsonl")).await;
    let id = s.start_job(&tiny_job(&train, 40, 0)).await;
    let job = s.wait_finished(&id, LONG).await;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["error"]["code"], "events_not_recorded", "{job}");
    let message = job["error"]["message"].as_str().unwrap();
    assert!(message.contains("could not record the event"), "{message}");
    let steps = step_numbers(&s.all_events(&id).await);
    assert!(steps.len() < 40);
    assert_eq!(steps, (1..=steps.len() as i64).collect::<Vec<_>>());
    assert_eq!(s.get("/readyz").await.0, 200);
}

/// A size-limited tmpfs mounted for the test's lifetime (CI runs as root).
struct Tmpfs<'a>(&'a Path);

impl<'a> Tmpfs<'a> {
    fn mount(dir: &'a Path, size: &str) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "this test mounts a tmpfs and needs root: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self(dir)
    }
}

impl Drop for Tmpfs<'_> {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.0).status();
    }
}

/// Writes zeros into `path` until the file system is full.
fn fill(path: &Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0u8; 64 << 10];
    loop {
        if let Err(e) = f.write_all(&chunk) {
            assert_eq!(e.raw_os_error(), Some(28), "{e}");
            break;
        }
    }
    let small = [0u8; 512];
    while f.write_all(&small).is_ok() {}
}

fn files_named(dir: &Path, pred: &dyn Fn(&str) -> bool, found: &mut Vec<String>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        if pred(&name) {
            found.push(e.path().display().to_string());
        }
        if e.file_type().unwrap().is_dir() {
            files_named(&e.path(), pred, found);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_the_job_cleanly_and_the_server_serves_on() {
    let env = Env::new();
    let jobs = env.data_dir().join("jobs");
    let _tmpfs = Tmpfs::mount(&jobs, "32m");
    let s = env.start();
    let train = s.upload(&example("text.jsonl")).await;
    let id = s.start_job(&tiny_job(&train, 400, 1)).await;
    s.wait_train_steps(&id, 2, LONG).await;
    let filler = jobs.join("filler");
    fill(&filler);
    let job = s.wait_finished(&id, LONG).await;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["error"]["code"], "disk_full", "{job}");
    let message = job["error"]["message"].as_str().unwrap();
    assert!(message.contains("No space left on device"), "{message}");
    assert!(
        !message.contains(&*env.data_dir().to_string_lossy()),
        "{message}"
    );
    assert_eq!(job["result_files"], json!([]));
    // Nothing half-written: no temporary left, every checkpoint on disk is complete.
    let mut partial = Vec::new();
    files_named(&jobs, &|n| n.ends_with(".partial"), &mut partial);
    assert!(partial.is_empty(), "{partial:?}");
    // (Each claim's checkpoints are under `checkpoints/epoch-<E>/`.)
    let ckpts = jobs.join(&id).join("checkpoints");
    let mut verified = 0;
    for e in std::fs::read_dir(&ckpts).unwrap() {
        let path = e.unwrap().path();
        let claims = path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("epoch-");
        let dirs: Vec<_> = if claims {
            std::fs::read_dir(&path)
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect()
        } else {
            vec![path]
        };
        for dir in dirs {
            sftd::train::checkpoint::verify(&dir).unwrap();
            verified += 1;
        }
    }
    assert!(verified >= 1, "{verified} checkpoints");
    assert!(!jobs.join(&id).join("adapter").exists());
    // The server serves on, and trains again once there is room.
    assert_eq!(s.get("/readyz").await.0, 200);
    std::fs::remove_file(&filler).unwrap();
    let next = s.start_job(&tiny_job(&train, 2, 1)).await;
    let ok = s.wait_finished(&next, LONG).await;
    assert_eq!(ok["status"], "succeeded", "{ok}");
}
