//! Job helpers over the API for the tests that run real jobs: creating one, waiting for it to
//! finish or to train some steps, for the process to exit, its training steps, its result files,
//! and the checks every event log must pass (no seq gap, each step once).

use super::Server;
use serde_json::Value;
use std::time::{Duration, Instant};

impl Server {
    /// Creates a job (asserting 200) and returns its id.
    pub async fn start_job(&self, body: &Value) -> String {
        self.create_job(body).await["id"]
            .as_str()
            .expect("a created job has an id")
            .to_string()
    }

    /// Polls until the job is in a final state (`finished_at` set), whichever it is.
    pub async fn wait_finished(&self, id: &str, timeout: Duration) -> Value {
        self.wait_for(id, timeout, |j| j["finished_at"].is_number())
            .await
    }

    /// The job's training-step metrics events (those with a `train_loss`), in order.
    pub async fn train_steps(&self, id: &str) -> Vec<Value> {
        train_events(&self.all_events(id).await)
    }

    /// Polls until at least `at_least` training steps of the job are recorded.
    pub async fn wait_train_steps(&self, id: &str, at_least: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let done = self.train_steps(id).await.len();
            if done >= at_least {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{id}: {done} of {at_least} steps before the deadline"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A file's content through `/v1/files/{id}/content` (asserting 200).
    pub async fn download(&self, file_id: &str) -> Vec<u8> {
        let r = self
            .client
            .get(self.url(&format!("/v1/files/{file_id}/content")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "download {file_id}");
        r.bytes().await.unwrap().to_vec()
    }

    /// The content of the job's result file called `name` (`metrics.csv`, …), if it has one.
    pub async fn result_file(&self, job: &Value, name: &str) -> Option<Vec<u8>> {
        for f in job["result_files"].as_array()? {
            let id = f.as_str().unwrap();
            let (st, meta) = self.get(&format!("/v1/files/{id}")).await;
            assert_eq!(st, 200, "{meta}");
            if meta["filename"] == name {
                return Some(self.download(id).await);
            }
        }
        None
    }

    /// Waits for the process to exit by itself (an armed fault point, a SIGTERM) and returns
    /// its exit status.
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(Instant::now() < deadline, "the server did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// The training-step metrics events (those with a `train_loss`) among `events`.
pub fn train_events(events: &[Value]) -> Vec<Value> {
    events
        .iter()
        .filter(|e| e["type"] == "metrics" && e["data"]["train_loss"].is_number())
        .cloned()
        .collect()
}

/// The step numbers of training-step metrics events, in order.
pub fn step_numbers(events: &[Value]) -> Vec<i64> {
    train_events(events)
        .iter()
        .map(|e| e["data"]["step"].as_i64().unwrap())
        .collect()
}

/// `(step, train_loss)` of each training-step metrics event, in order.
pub fn step_losses(events: &[Value]) -> Vec<(i64, f64)> {
    train_events(events)
        .iter()
        .map(|e| {
            (
                e["data"]["step"].as_i64().unwrap(),
                e["data"]["train_loss"].as_f64().unwrap(),
            )
        })
        .collect()
}

/// Seqs are exactly 1..=n and training steps run 1, 2, … each once.
pub fn assert_gap_free(events: &[Value]) {
    let seqs: Vec<i64> = events.iter().map(|e| e["seq"].as_i64().unwrap()).collect();
    assert_eq!(
        seqs,
        (1..=seqs.len() as i64).collect::<Vec<_>>(),
        "seq gap or duplicate"
    );
    let steps = step_numbers(events);
    assert_eq!(
        steps,
        (1..=steps.len() as i64).collect::<Vec<_>>(),
        "step gap or duplicate"
    );
}

/// The statuses the job's status events went through, in order.
pub fn statuses(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| e["data"]["status"].as_str().map(String::from))
        .collect()
}

/// Puts a job on the demo model straight into `store` and marks it queued, for store-level
/// tests that claim it themselves.
pub async fn queued_store_job(store: &sftd::store::Store, id: &str) {
    store
        .create_job(&sftd::store::jobs::NewJob {
            id: id.into(),
            model: "sftd-demo".into(),
            training_file: "file-x".into(),
            validation_file: None,
            spec: "{}".into(),
            config: "{}".into(),
            seed: 1,
            suffix: None,
            metadata: None,
            idempotency_key: None,
        })
        .await
        .unwrap();
    assert!(store.mark_queued(id).await.unwrap());
}
