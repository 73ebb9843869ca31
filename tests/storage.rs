//! The artifact storage interface against each backend: the data dir itself (the default),
//! another directory (`file://`, as a shared mount), and a real S3-compatible server (s3s-fs).
//! Each runs the same put / get / stream / list / delete / publish / fetch checks.

mod common;

use common::s3::{as_strs, S3Server, BUCKET};
use futures::StreamExt;
use sftd::storage::{Storage, StorageError, PART_BYTES};
use std::path::Path;

/// Bytes that differ at every offset (a misplaced part shows).
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 + i / 4096) as u8).collect()
}

async fn read_all(storage: &Storage, key: &str) -> Vec<u8> {
    let (size, mut stream) = storage.get(key).await.unwrap();
    let mut out = Vec::new();
    let mut chunks = 0;
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk.unwrap());
        chunks += 1;
    }
    assert_eq!(size as usize, out.len(), "{key}: the declared size");
    assert!(chunks >= 1);
    out
}

/// The checks every backend passes. `second` is another host's view of the same objects (its
/// own data dir).
async fn exercise(storage: &Storage, second: &Storage) {
    // Small objects, in one request.
    storage
        .put_bytes("files/a.jsonl", b"{\"a\":1}\n".to_vec())
        .await
        .unwrap();
    assert_eq!(
        storage.get_bytes("files/a.jsonl").await.unwrap(),
        b"{\"a\":1}\n"
    );
    assert_eq!(storage.size("files/a.jsonl").await.unwrap(), Some(8));
    assert_eq!(storage.size("files/none.jsonl").await.unwrap(), None);
    assert!(matches!(
        storage.get("files/none.jsonl").await.err().unwrap(),
        StorageError::NotFound(_)
    ));

    // A file larger than two parts goes up in parts and streams back intact.
    let big = pattern(2 * PART_BYTES + 12_345);
    let src = storage.local_path("tmp/big.bin");
    std::fs::create_dir_all(src.parent().unwrap()).unwrap();
    std::fs::write(&src, &big).unwrap();
    assert_eq!(
        storage.put_file("files/big.bin", &src).await.unwrap(),
        big.len() as u64
    );
    assert!(read_all(storage, "files/big.bin").await == big);
    assert!(read_all(second, "files/big.bin").await == big);

    // Another host's local copy: fetched once, byte for byte.
    let copy = second.fetch("files/big.bin").await.unwrap();
    assert_eq!(copy, second.local_path("files/big.bin"));
    assert!(std::fs::read(&copy).unwrap() == big);

    // move_in takes the file away from its temporary path.
    let tmp = storage.local_path("tmp/upload");
    std::fs::write(&tmp, b"line\n").unwrap();
    assert_eq!(storage.move_in("files/b.jsonl", &tmp).await.unwrap(), 5);
    assert!(!tmp.exists());
    assert_eq!(second.get_bytes("files/b.jsonl").await.unwrap(), b"line\n");

    // Listing: the keys under a directory, sorted, with sizes; nothing from a sibling prefix.
    storage.put_bytes("filesx/c", b"c".to_vec()).await.unwrap();
    let listed: Vec<(String, u64)> = storage
        .list("files")
        .await
        .unwrap()
        .into_iter()
        .map(|o| (o.key, o.bytes))
        .collect();
    assert_eq!(
        listed,
        vec![
            ("files/a.jsonl".to_string(), 8),
            ("files/b.jsonl".to_string(), 5),
            ("files/big.bin".to_string(), big.len() as u64),
        ]
    );

    // Delete: the object is gone for every host; deleting it again is fine.
    storage.delete("files/a.jsonl").await.unwrap();
    storage.delete("files/a.jsonl").await.unwrap();
    assert_eq!(second.size("files/a.jsonl").await.unwrap(), None);

    // A directory published by one host and fetched by another.
    let dir = storage.local_path("jobs/j/checkpoints/step-2");
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    std::fs::write(dir.join("adapter.bin"), pattern(1000)).unwrap();
    std::fs::write(dir.join("sub/state.json"), b"{}").unwrap();
    std::fs::write(dir.join("manifest.json"), b"[manifest]").unwrap();
    storage
        .publish_dir("jobs/j/checkpoints/step-2", &dir, "manifest.json")
        .await
        .unwrap();
    let keys: Vec<String> = second
        .list("jobs/j")
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    assert_eq!(
        keys,
        [
            "jobs/j/checkpoints/step-2/adapter.bin",
            "jobs/j/checkpoints/step-2/manifest.json",
            "jobs/j/checkpoints/step-2/sub/state.json"
        ]
    );
    let fetched = second
        .fetch_dir("jobs/j/checkpoints/step-2", true)
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(fetched.join("adapter.bin")).unwrap(),
        pattern(1000)
    );
    assert_eq!(
        std::fs::read(fetched.join("sub/state.json")).unwrap(),
        b"{}"
    );
    assert_eq!(
        std::fs::read(fetched.join("manifest.json")).unwrap(),
        b"[manifest]"
    );

    // delete_prefix removes the whole directory.
    storage
        .delete_prefix("jobs/j/checkpoints/step-2")
        .await
        .unwrap();
    assert!(second.list("jobs/j").await.unwrap().is_empty());
}

/// A publish that fails part-way never stores the file named last: whoever finds that file
/// (a checkpoint's manifest) finds every other one.
async fn a_torn_publish_leaves_no_manifest(storage: &Storage) {
    let dir = storage.local_path("jobs/t/checkpoints/step-4");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("a.bin"), b"a").unwrap();
    std::fs::write(dir.join("manifest.json"), b"m").unwrap();
    // Reading this one fails (its target does not exist), after `a.bin`, before the manifest.
    std::os::unix::fs::symlink(dir.join("missing"), dir.join("z.bin")).unwrap();
    let prefix = "jobs/t/checkpoints/step-4";
    let published = storage.publish_dir(prefix, &dir, "manifest.json").await;
    assert!(published.is_err());
    assert_eq!(
        storage.size(&format!("{prefix}/a.bin")).await.unwrap(),
        Some(1)
    );
    assert_eq!(
        storage
            .size(&format!("{prefix}/manifest.json"))
            .await
            .unwrap(),
        None
    );
}

fn data_dir(root: &Path, name: &str) -> std::path::PathBuf {
    let d = root.join(name);
    std::fs::create_dir_all(&d).unwrap();
    d.canonicalize().unwrap()
}

#[tokio::test]
async fn the_data_dir_itself() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = data_dir(tmp.path(), "data");
    let storage = Storage::open(None, &dir).unwrap();
    assert!(storage.is_in_place());
    exercise(&storage, &storage).await;
    // In place, a key's local path is the object itself.
    storage.put_bytes("files/x", b"x".to_vec()).await.unwrap();
    assert_eq!(std::fs::read(dir.join("files/x")).unwrap(), b"x");
}

#[tokio::test]
async fn a_shared_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let shared = data_dir(tmp.path(), "shared");
    let url = format!("file://{}", shared.display());
    let one = Storage::open(Some(&url), &data_dir(tmp.path(), "host1")).unwrap();
    let two = Storage::open(Some(&url), &data_dir(tmp.path(), "host2")).unwrap();
    assert!(!one.is_in_place());
    exercise(&one, &two).await;
    a_torn_publish_leaves_no_manifest(&one).await;
    // The objects are files of the shared directory.
    one.put_bytes("files/y", b"y".to_vec()).await.unwrap();
    assert_eq!(std::fs::read(shared.join("files/y")).unwrap(), b"y");
}

#[tokio::test]
async fn s3_compatible_storage() {
    let s3 = S3Server::start();
    let tmp = tempfile::tempdir().unwrap();
    let options = s3.options();
    let options = as_strs(&options);
    let url = format!("s3://{BUCKET}/some/prefix");
    let one = Storage::open_with(Some(&url), &data_dir(tmp.path(), "host1"), &options).unwrap();
    let two = Storage::open_with(Some(&url), &data_dir(tmp.path(), "host2"), &options).unwrap();
    exercise(&one, &two).await;
    a_torn_publish_leaves_no_manifest(&one).await;
    // The objects are on the S3 server, under the prefix.
    one.put_bytes("files/z", b"z".to_vec()).await.unwrap();
    assert_eq!(
        std::fs::read(s3.object_path("some/prefix/files/z")).unwrap(),
        b"z"
    );
}

#[tokio::test]
async fn a_storage_that_is_down_is_an_error_not_a_hang() {
    let mut s3 = S3Server::start();
    let tmp = tempfile::tempdir().unwrap();
    let options = s3.options();
    let options = as_strs(&options);
    let storage = Storage::open_with(
        Some(&format!("s3://{BUCKET}")),
        &data_dir(tmp.path(), "host"),
        &options,
    )
    .unwrap();
    storage.put_bytes("k", b"v".to_vec()).await.unwrap();
    s3.stop();
    let err = storage.get_bytes("k").await.unwrap_err();
    assert!(matches!(err, StorageError::Backend(_)), "{err:?}");
}
