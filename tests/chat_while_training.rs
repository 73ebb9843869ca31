//! Chat completions while a job trains: requests run on the worker thread between the job's
//! micro-batches (with the job's own base weights), succeed while the job is still running, and
//! leave its losses exactly as a run without requests; the same checkpoint answers the same
//! after the job has finished (then from a loaded serving copy).

mod common;

use common::jobs::step_losses;
use common::{example, tiny_job, Env, Server};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const STEPS: u32 = 24;

fn ask(model: &str, stream: bool) -> Value {
    json!({
        "model": model,
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
        "temperature": 0,
        "max_completion_tokens": 12,
        "stream": stream,
    })
}

/// Greedy text of a plain completion.
async fn answer(s: &Server, model: &str) -> String {
    let (st, v) = s
        .post_json("/v1/chat/completions", &ask(model, false))
        .await;
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 12, "{v}");
    v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

async fn streamed(s: &Server, model: &str) -> Vec<Value> {
    s.chat_stream(&ask(model, true)).await
}

async fn status(s: &Server, id: &str) -> String {
    s.job(id).await["status"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn a_checkpoint_answers_while_its_job_trains_without_changing_the_losses() {
    let env = Env::new();
    let s = env.start();
    let file = s.upload(&example("tool_calls.jsonl")).await;
    let body = tiny_job(&file, STEPS, 2);

    // The reference: the same job with no requests.
    let reference = s.start_job(&body).await;
    s.wait_status(&reference, "succeeded", Duration::from_secs(600))
        .await;
    let want = step_losses(&s.all_events(&reference).await);
    assert_eq!(want.len(), STEPS as usize);

    let id = s.start_job(&body).await;
    let deadline = Instant::now() + Duration::from_secs(300);
    let name = loop {
        let (_, cks) = s
            .get(&format!("/v1/fine_tuning/jobs/{id}/checkpoints"))
            .await;
        if let Some(c) = cks["data"].as_array().and_then(|d| d.last()) {
            break c["fine_tuned_model_checkpoint"]
                .as_str()
                .unwrap()
                .to_string();
        }
        assert!(Instant::now() < deadline, "no checkpoint yet");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(name.ends_with(":ckpt-step-2"), "{name}");

    // While it trains: the checkpoint plain and streamed, and the base model.
    let during = answer(&s, &name).await;
    assert_eq!(
        status(&s, &id).await,
        "running",
        "served between micro-batches"
    );
    let chunks = streamed(&s, &name).await;
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, during, "streamed and plain greedy agree");
    let base_during = answer(&s, "sftd-demo").await;
    assert_eq!(
        status(&s, &id).await,
        "running",
        "served between micro-batches"
    );

    s.wait_status(&id, "succeeded", Duration::from_secs(600))
        .await;
    assert_eq!(
        step_losses(&s.all_events(&id).await),
        want,
        "requests served between micro-batches must not change the training"
    );
    // Idle now: the checkpoint and the base answer the same from a loaded serving copy.
    assert_eq!(answer(&s, &name).await, during);
    assert_eq!(answer(&s, "sftd-demo").await, base_during);
}
