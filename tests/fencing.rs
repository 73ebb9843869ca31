//! Checkpoint objects fenced per claim (`sftd::worker::checkpoints`), on a real SQLite store and
//! real storage shared by several hosts (each its own data dir): a `file://` directory and the
//! real S3-compatible server `s3s-fs`. A worker that lost its claim, then publishes a
//! checkpoint of a step the new holder already committed, writes only objects no row names:
//! the committed row's objects keep the new holder's bytes, a resume on any host fetches
//! exactly those, and the holder's pruning deletes the stale objects while a stale pruner
//! deletes nothing of the newer claim. A row written before per-claim keys still resumes.
//! What such a worker uploaded and then died without deleting is swept at the next start
//! (`sftd::worker::sweep`), on the same three kinds of storage and on the default, in place.

mod common;

use common::jobs::queued_store_job;
use common::s3::{as_strs, S3Server, BUCKET};
use common::train::{run_steps, tiny_model, train_job};
use serde_json::json;
use sftd::storage::Storage;
use sftd::store::{Claimant, Lease, Store};
use sftd::train::checkpoint;
use sftd::train::events::{Control, Outcome};
use sftd::worker::checkpoints;
use sftd::worker::sweep::sweep_fenced_objects;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Every file of a checkpoint directory, by name.
fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .map(|e| {
            (
                e.file_name().into_string().unwrap(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

/// Checkpoints of steps 2 and 4 from two runs that differ only in their seed (so the same step
/// has different bytes in each): `(run, step) → directory`.
fn two_runs(dir: &Path) -> BTreeMap<(u64, u64), PathBuf> {
    std::fs::create_dir_all(dir).unwrap();
    let model = tiny_model(dir, 7);
    let mut out = BTreeMap::new();
    for seed in [1, 2] {
        let hp = json!({"n_epochs": 1, "max_steps": 4, "batch_size": 2, "max_seq_len": 64,
            "loss_on": "all", "save_steps": 2, "lora": {"r": 2}});
        let mut job = train_job(dir, &model, &format!("run-{seed}"), 8, 3, hp);
        job.config.seed = seed;
        let (outcome, _) = run_steps(&job, &Control::new(), None).unwrap();
        assert!(matches!(outcome, Outcome::Completed { .. }), "{outcome:?}");
        for step in [2, 4] {
            out.insert(
                (seed, step),
                checkpoint::checkpoint_dir(&job.output_dir, step),
            );
        }
    }
    assert_ne!(files(&out[&(1, 4)]), files(&out[&(2, 4)]));
    out
}

/// Copies a checkpoint into a host's data dir where the trainer stages it.
fn stage(storage: &Storage, job: &str, step: u64, from: &Path) -> PathBuf {
    let dir = checkpoint::checkpoint_dir(&storage.local_path(&format!("jobs/{job}")), step);
    std::fs::create_dir_all(&dir).unwrap();
    for (name, bytes) in files(from) {
        std::fs::write(dir.join(name), bytes).unwrap();
    }
    dir
}

async fn claim(store: &Store, lease: Duration) -> Lease {
    let who = Claimant {
        lease,
        ..Claimant::any("wrk-test")
    };
    store.claim_next_job(&who).await.unwrap().unwrap().lease()
}

async fn keys_under(storage: &Storage, prefix: &str) -> Vec<String> {
    storage
        .list(prefix)
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect()
}

/// Hosts A, B and C on storage `url` (`options`: S3 settings; `None`: the default storage, the
/// data dir itself, which the three then share), one SQLite store, and [`two_runs`]'s checkpoints.
struct Scene {
    a: Storage,
    b: Storage,
    c: Storage,
    store: Store,
    ckpt: BTreeMap<(u64, u64), PathBuf>,
    _tmp: tempfile::TempDir,
}

async fn scene(url: Option<&str>, options: &[(&str, &str)]) -> Scene {
    let tmp = tempfile::tempdir().unwrap();
    let host = |name: &str| {
        let dir = tmp.path().join(if url.is_some() { name } else { "data" });
        std::fs::create_dir_all(&dir).unwrap();
        Storage::open_with(url, &dir.canonicalize().unwrap(), options).unwrap()
    };
    let (a, b, c) = (host("a"), host("b"), host("c"));
    let ckpt = two_runs(&tmp.path().join("runs"));
    let db_dir = tmp.path().join("db");
    let store = Store::open(&format!("sqlite://{}/sftd.db", db_dir.display()), &db_dir)
        .await
        .unwrap();
    Scene {
        a,
        b,
        c,
        store,
        ckpt,
        _tmp: tmp,
    }
}

/// Host A's claim (epoch 1) of the queued `job` commits step 2 of run 1, then A freezes past its
/// lease and B takes the job over (epoch 2). Returns A's lease, step 2's key and B's lease.
async fn takeover(s: &Scene, job: &str) -> (Lease, String, Lease) {
    let lease_a = claim(&s.store, Duration::from_millis(300)).await;
    let staged = stage(&s.a, job, 2, &s.ckpt[&(1, 2)]);
    let key_a2 = checkpoints::publish(&s.a, &lease_a, 2, &staged)
        .await
        .unwrap();
    assert_eq!(key_a2, format!("jobs/{job}/checkpoints/epoch-1/step-2"));
    assert!(!staged.exists(), "the staging directory moved to its key");
    assert!(s
        .store
        .add_checkpoint(&lease_a, 2, &json!({}), &key_a2)
        .await
        .unwrap());
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(s
        .store
        .requeue_interrupted(&lease_a, "lease expired")
        .await
        .unwrap());
    let lease_b = claim(&s.store, Duration::from_secs(3600)).await;
    assert_eq!((lease_b.job_id.as_str(), lease_b.epoch), (job, 2));
    (lease_a, key_a2, lease_b)
}

/// The scenario on storage `url` (`options`: S3 settings), hosts A, B and C.
async fn stale_publish_after_a_takeover(url: &str, options: &[(&str, &str)]) {
    let scene = scene(Some(url), options).await;
    let Scene {
        a,
        b,
        c,
        store,
        ckpt,
        ..
    } = &scene;
    assert!(!a.is_in_place());
    let job = "ftjob-fence";
    queued_store_job(store, job).await;
    // A's claim commits step 2 and stages step 4, then freezes past its lease; B takes over.
    let (lease_a, key_a2, lease_b) = takeover(&scene, job).await;
    let stale_staged = stage(a, job, 4, &ckpt[&(1, 4)]);

    // B resumes from the committed step 2, fetched from the storage into its empty data dir.
    let resumed = checkpoints::fetch_committed(store, b, job).await.unwrap();
    assert!(resumed.passed_over.is_empty(), "{:?}", resumed.passed_over);
    assert_eq!(resumed.dir, Some(b.local_path(&key_a2)));
    assert_eq!(files(&b.local_path(&key_a2)), files(&ckpt[&(1, 2)]));
    // B commits its own step 4 (run 2's bytes), keeping one checkpoint.
    let staged = stage(b, job, 4, &ckpt[&(2, 4)]);
    let key_b4 = checkpoints::publish(b, &lease_b, 4, &staged).await.unwrap();
    assert_eq!(key_b4, format!("jobs/{job}/checkpoints/epoch-2/step-4"));
    assert!(store
        .add_checkpoint_keeping(&lease_b, 4, &json!({}), &key_b4, 1)
        .await
        .unwrap());

    // A wakes and finishes its upload of step 4: it lands under epoch 1, and its row is refused.
    let stale_key = checkpoints::publish(a, &lease_a, 4, &stale_staged)
        .await
        .unwrap();
    assert_eq!(stale_key, format!("jobs/{job}/checkpoints/epoch-1/step-4"));
    assert!(!store
        .add_checkpoint(&lease_a, 4, &json!({}), &stale_key)
        .await
        .unwrap());
    let rows = store.list_checkpoints(job, None, 10).await.unwrap();
    let rows: Vec<(i64, &str)> = rows.iter().map(|r| (r.step, r.path.as_str())).collect();
    assert_eq!(rows, [(4, key_b4.as_str())]);

    // Host C resumes from exactly the committed objects: run 2's step 4, whole.
    let resumed = checkpoints::fetch_committed(store, c, job).await.unwrap();
    assert!(resumed.passed_over.is_empty(), "{:?}", resumed.passed_over);
    let dir = resumed.dir.unwrap();
    assert_eq!(dir, c.local_path(&key_b4));
    assert_eq!(checkpoint::verify(&dir).unwrap().step, 4);
    assert_eq!(files(&dir), files(&ckpt[&(2, 4)]));

    // B, the holder, prunes: step 2 (its row went with save_total_limit 1) and A's stale
    // step 4 are deleted, in the storage and in B's data dir; the committed step 4 stays.
    let prefix = checkpoints::prefix(job);
    let mut deleted = checkpoints::prune(store, b, &lease_b).await.unwrap();
    deleted.sort();
    assert_eq!(deleted, [key_a2.clone(), stale_key.clone()]);
    let committed: Vec<String> = keys_under(a, &prefix).await;
    assert!(!committed.is_empty());
    assert!(
        committed
            .iter()
            .all(|k| k.starts_with(&format!("{key_b4}/"))),
        "{committed:?}"
    );
    assert!(!b.local_path(&key_a2).exists());

    // B's next checkpoint is in flight (stored, row not yet committed) when stale A prunes:
    // A deletes nothing of epoch 2, committed or not.
    let staged = stage(b, job, 6, &ckpt[&(2, 4)]);
    let in_flight = checkpoints::publish(b, &lease_b, 6, &staged).await.unwrap();
    let before = keys_under(a, &prefix).await;
    // (Only A's own local copies of epoch 1 go.)
    let dropped = checkpoints::prune(store, a, &lease_a).await.unwrap();
    assert!(
        dropped.iter().all(|k| k.contains("/epoch-1/")),
        "{dropped:?}"
    );
    assert_eq!(keys_under(a, &prefix).await, before);
    assert!(before
        .iter()
        .any(|k| k.starts_with(&format!("{in_flight}/"))));

    // A row written before per-claim keys (`jobs/<id>/checkpoints/step-N`) still resumes,
    // and its holder's pruning keeps what it names.
    let old = "ftjob-old-layout";
    queued_store_job(store, old).await;
    let lease = claim(store, Duration::from_secs(3600)).await;
    let old_key = format!("jobs/{old}/checkpoints/step-2");
    let staged = stage(a, old, 2, &ckpt[&(1, 2)]);
    a.publish_dir(&old_key, &staged, checkpoint::MANIFEST)
        .await
        .unwrap();
    assert!(store
        .add_checkpoint(&lease, 2, &json!({}), &old_key)
        .await
        .unwrap());
    assert!(checkpoints::prune(store, a, &lease)
        .await
        .unwrap()
        .is_empty());
    let resumed = checkpoints::fetch_committed(store, c, old).await.unwrap();
    assert_eq!(resumed.dir, Some(c.local_path(&old_key)));
    assert_eq!(files(&c.local_path(&old_key)), files(&ckpt[&(1, 2)]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_directory_keeps_the_committed_checkpoint_of_a_stale_publish() {
    let tmp = tempfile::tempdir().unwrap();
    let shared = tmp.path().join("shared");
    std::fs::create_dir_all(&shared).unwrap();
    let url = format!("file://{}", shared.canonicalize().unwrap().display());
    stale_publish_after_a_takeover(&url, &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_keeps_the_committed_checkpoint_of_a_stale_publish() {
    let s3 = S3Server::start();
    let options = s3.options();
    let options = as_strs(&options);
    stale_publish_after_a_takeover(&format!("s3://{BUCKET}/fence"), &options).await;
}

/// Workers that lost their claims upload and die before the store refuses them (none deletes
/// what it stored); a later start sweeps exactly what no row names of claims that are fenced,
/// and nothing of the running holder's uploads in flight. `url`: `None` is the default storage,
/// the data dir itself, shared by the three hosts.
async fn dead_stale_uploads_are_swept(url: Option<&str>, options: &[(&str, &str)]) {
    let scene = scene(url, options).await;
    let Scene {
        a,
        b,
        c,
        store,
        ckpt,
        ..
    } = &scene;
    let (job, cancelled) = ("ftjob-swept", "ftjob-swept-cancelled");
    queued_store_job(store, job).await;
    let results =
        |epoch: i64| format!("jobs/{job}/results/epoch-{epoch}/adapter_model.safetensors");

    // A's claim (epoch 1) commits step 2, then loses the job to B (epoch 2).
    let (lease_a, key_a2, lease_b) = takeover(&scene, job).await;
    // A's late uploads land (its step 4 and its adapter), and A dies before any refusal.
    let staged = stage(a, job, 4, &ckpt[&(1, 4)]);
    let stale_a4 = checkpoints::publish(a, &lease_a, 4, &staged).await.unwrap();
    a.put_bytes(&results(1), b"stale".to_vec()).await.unwrap();
    // B's step 4 and adapter are in flight: stored, no row yet.
    let staged = stage(b, job, 4, &ckpt[&(2, 4)]);
    let key_b4 = checkpoints::publish(b, &lease_b, 4, &staged).await.unwrap();
    b.put_bytes(&results(2), b"holder".to_vec()).await.unwrap();
    // A job cancelled while its claim was uploading a checkpoint, whose worker then died.
    queued_store_job(store, cancelled).await;
    let lease_x = claim(store, Duration::from_secs(3600)).await;
    assert_eq!(lease_x.job_id, cancelled);
    let staged = stage(a, cancelled, 2, &ckpt[&(1, 2)]);
    let stale_x2 = checkpoints::publish(a, &lease_x, 2, &staged).await.unwrap();
    assert!(store.cancel_job(cancelled).await.unwrap().is_some());
    // A trainer's staging directory (epoch 0) is never swept: in a shared data dir it may be live.
    let staging = format!("jobs/{job}/checkpoints/step-6/{}", checkpoint::MANIFEST);
    c.put_bytes(&staging, b"{}".to_vec()).await.unwrap();

    let mut deleted = sweep_fenced_objects(store, c).await.unwrap();
    deleted.sort();
    let mut expected = vec![stale_x2.clone(), stale_a4.clone(), results(1)];
    expected.sort();
    assert_eq!(deleted, expected);
    let left = keys_under(c, "jobs").await;
    for gone in [&stale_x2, &stale_a4] {
        assert!(
            !left.iter().any(|k| k.starts_with(&format!("{gone}/"))),
            "{left:?}"
        );
    }
    assert!(!left.contains(&results(1)), "{left:?}");
    for kept in [&key_a2, &key_b4] {
        assert!(
            left.iter().any(|k| k.starts_with(&format!("{kept}/"))),
            "{kept}: {left:?}"
        );
    }
    assert!(
        left.contains(&results(2)) && left.contains(&staging),
        "{left:?}"
    );
    // A second sweep finds nothing more.
    assert!(sweep_fenced_objects(store, c).await.unwrap().is_empty());

    // B commits step 4, keeping one checkpoint (step 2's row goes), and then its run stops
    // before its success (the storage failed; the job is queued again): its adapter is fenced
    // now, and so are the step-2 objects, which no row names.
    assert!(store
        .add_checkpoint_keeping(&lease_b, 4, &json!({}), &key_b4, 1)
        .await
        .unwrap());
    assert!(store
        .requeue_held_interrupted(&lease_b, "storage unavailable")
        .await
        .unwrap());
    let mut deleted = sweep_fenced_objects(store, c).await.unwrap();
    deleted.sort();
    assert_eq!(deleted, [key_a2.clone(), results(2)]);
    // The committed checkpoint resumes whole, with B's bytes.
    let resumed = checkpoints::fetch_committed(store, c, job).await.unwrap();
    assert!(resumed.passed_over.is_empty(), "{:?}", resumed.passed_over);
    assert_eq!(files(&resumed.dir.unwrap()), files(&ckpt[&(2, 4)]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_place_storage_sweeps_what_dead_stale_workers_uploaded() {
    dead_stale_uploads_are_swept(None, &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_directory_sweeps_what_dead_stale_workers_uploaded() {
    let tmp = tempfile::tempdir().unwrap();
    let shared = tmp.path().join("shared");
    std::fs::create_dir_all(&shared).unwrap();
    let url = format!("file://{}", shared.canonicalize().unwrap().display());
    dead_stale_uploads_are_swept(Some(&url), &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_sweeps_what_dead_stale_workers_uploaded() {
    let s3 = S3Server::start();
    let options = s3.options();
    let options = as_strs(&options);
    dead_stale_uploads_are_swept(Some(&format!("s3://{BUCKET}/sweep")), &options).await;
}
