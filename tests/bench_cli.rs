//! `sftd bench` as a user runs it: the binary, on the built-in demo model, from a directory that
//! is not this repository (as in the container image), where `--data`'s default file is absent
//! and the copy built into sftd stands in for it, measuring the same rows as the file.

mod common;

use serde_json::Value;
use std::path::Path;
use std::process::{Command, Output};

/// Runs `sftd bench ARGS` in `cwd` with its own data dir.
fn bench(cwd: &Path, args: &[&str]) -> Output {
    Command::new(common::BIN)
        .arg("bench")
        .args(args)
        .current_dir(cwd)
        .env("SFTD_DATA_DIR", cwd.join("data"))
        .env("RAYON_NUM_THREADS", "2")
        .output()
        .expect("sftd runs")
}

fn report(out: &Output) -> Value {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {stderr}"))
}

#[test]
fn bench_runs_outside_the_repository_on_the_built_in_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let quick = ["--steps", "1", "--seq-len", "64", "--json"];
    let out = bench(tmp.path(), &quick);
    let here = report(&out);
    assert!(String::from_utf8_lossy(&out.stderr).contains("using the copy built into sftd"));
    assert_eq!(here["batch_size"], 1);
    assert_eq!(here["seq_len"], 64);
    assert!(here["tokens_per_second"].as_f64().unwrap() > 0.0, "{here}");
    let tokens = here["mean_tokens_per_step"].as_f64().unwrap();
    assert!(tokens > 0.0 && tokens <= 64.0, "{here}");

    // The file itself, named: the same rows, so the same tokens and labels per step.
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/tool_calls.jsonl");
    let mut named = quick.to_vec();
    named.extend(["--data", file.to_str().unwrap()]);
    let from_file = report(&bench(tmp.path(), &named));
    for field in [
        "mean_tokens_per_step",
        "labelled_fraction",
        "model_flops_per_token",
    ] {
        assert_eq!(here[field], from_file[field], "{field}");
    }

    // Generation takes its prompt from the same rows.
    let out = bench(
        tmp.path(),
        &["--generate", "--new-tokens", "4", "--steps", "1", "--json"],
    );
    let generated = report(&out);
    assert_eq!(generated["new_tokens"], 4);
    assert!(
        generated["prompt_tokens"].as_u64().unwrap() > 0,
        "{generated}"
    );
    assert!(generated["decode_tokens_per_second_best"].as_f64().unwrap() > 0.0);
}

#[test]
fn bench_says_what_is_wrong_with_its_data() {
    let tmp = tempfile::tempdir().unwrap();
    let out = bench(tmp.path(), &["--steps", "1", "--data", "rows.jsonl"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("reading rows.jsonl") && stderr.contains("No such file"),
        "{stderr}"
    );
    // Rows are skipped when truncation leaves them nothing to learn from, as in training; when
    // every row is, the error says so and what to change.
    let out = bench(tmp.path(), &["--steps", "1", "--seq-len", "8"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("400 of 400 rows have no labelled token within --seq-len 8")
            && stderr.contains("has a labelled token within --seq-len 8")
            && stderr.contains("--loss-on all"),
        "{stderr}"
    );
}

/// `--lora-dropout` trains with dropout masks (the recipe's setting; reported back), and a
/// probability outside [0, 1) is refused with a message naming the flag.
#[test]
fn bench_runs_with_lora_dropout_and_refuses_an_impossible_one() {
    let tmp = tempfile::tempdir().unwrap();
    let quick = ["--steps", "1", "--seq-len", "64", "--json"];
    let with = report(&bench(
        tmp.path(),
        &[&quick[..], &["--lora-dropout", "0.05"]].concat(),
    ));
    assert_eq!(with["lora_dropout"], 0.05, "{with}");
    assert!(with["tokens_per_second"].as_f64().unwrap() > 0.0, "{with}");
    let out = bench(tmp.path(), &[&quick[..], &["--lora-dropout", "1"]].concat());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("--lora-dropout must be in [0, 1), got 1"),
        "{stderr}"
    );
}

/// `--json-mask` times the forced-call mask over the model's vocabulary at each state it
/// reports, the index against reading every token (the command fails if they disagree), and
/// the states allow what a JSON object allows there.
#[test]
fn bench_json_mask_reports_each_state_of_a_call() {
    let tmp = tempfile::tempdir().unwrap();
    let mask = report(&bench(
        tmp.path(),
        &["--json-mask", "--steps", "2", "--json"],
    ));
    assert!(mask["vocabulary"].as_u64().unwrap() > 1000, "{mask}");
    assert_eq!(mask["runs"], 2);
    let cases = mask["cases"].as_array().unwrap();
    let allowed = |state: &str, schema: bool| {
        let case = cases
            .iter()
            .find(|c| c["state"] == state && c["schema"] == schema)
            .unwrap_or_else(|| panic!("{state} {schema}: {mask}"));
        assert!(case["indexed_ms_best"].as_f64().unwrap() >= 0.0);
        assert!(case["one_by_one_ms_median"].as_f64().unwrap() > 0.0);
        case["allowed_tokens"].as_u64().unwrap()
    };
    let vocabulary = mask["vocabulary"].as_u64().unwrap();
    // Inside a free string nearly every token fits; before the object only those of `{`; a
    // listed key narrows the first key to the schema's names.
    assert!(allowed("in a string value", false) > vocabulary * 9 / 10);
    assert!(allowed("before the object", false) < 10);
    assert!(allowed("first key", true) < allowed("first key", false));
    assert!(allowed("in a listed value", true) < 10);
    // Six characters left: long texts no longer fit.
    let bounded = allowed("in a string of at most 8 characters", true);
    assert!(bounded < allowed("in a string value", true), "{mask}");
    assert!(bounded > 100, "{mask}");
    // After `1` of 1..=30: `}`, `,`, blanks and the digits that keep it within 30.
    let days = allowed("in an integer from 1 to 30", true);
    assert!(days < allowed("in a number", false), "{mask}");
}
