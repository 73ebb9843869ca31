#!/usr/bin/env python3
"""Drives a running sftd with the official `openai` Python SDK (pip install openai).

    python3 tools/openai_sdk_check.py [--base-url http://127.0.0.1:8080] [--api-key KEY]

Uploads examples/text.jsonl, creates a tiny job on the demo model (sftd's extra knobs go through
the SDK's `method` dict and `extra_body`), follows it to the end with retrieve/list_events,
lists checkpoints and jobs, downloads the adapter, cancels a second job and checks that a bad
hyperparameter raises BadRequestError naming the field; then calls the fine-tuned model with
chat.completions.create (plain, streamed with usage, with tools, with a named tool_choice),
lists it with models.list/retrieve, and checks that n=2 raises BadRequestError. Exits non-zero on the first mismatch.
CI runs it through scripts/openai-sdk-check.sh (which installs the pinned SDK).
"""
import argparse
import json
import pathlib
import sys
import time

import openai

ROOT = pathlib.Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", default="http://127.0.0.1:8080")
    ap.add_argument("--api-key", default="unused")
    args = ap.parse_args()
    client = openai.OpenAI(base_url=args.base_url.rstrip("/") + "/v1", api_key=args.api_key)

    with open(ROOT / "examples" / "text.jsonl", "rb") as f:
        up = client.files.create(file=f, purpose="fine-tune")
    assert up.id.startswith("file-") and up.object == "file", up
    print("files.create:", up.id, up.bytes, "bytes")

    hyper = {"n_epochs": 1, "batch_size": 2, "learning_rate_multiplier": 10}
    job = client.fine_tuning.jobs.create(
        model="sftd-demo",
        training_file=up.id,
        seed=3,
        suffix="sdk",
        method={"type": "supervised", "supervised": {"hyperparameters": hyper}},
        # sftd-only knobs the SDK does not type: merged into the JSON body.
        extra_body={"method": {"type": "supervised", "supervised": {"hyperparameters": {
            **hyper, "max_steps": 4, "max_seq_len": 128, "save_steps": 2,
            "lora": {"r": 4, "alpha": 8}}}}},
    )
    print("jobs.create:", job.id, job.status)
    while job.status not in ("succeeded", "failed", "cancelled"):
        time.sleep(0.5)
        job = client.fine_tuning.jobs.retrieve(job.id)
    assert job.status == "succeeded", job
    print("jobs.retrieve:", job.status, "trained_tokens", job.trained_tokens, "result_files", job.result_files)

    events = list(client.fine_tuning.jobs.list_events(job.id, limit=5))  # auto-paginates
    seqs = [e.model_extra.get("seq") for e in events]
    assert seqs == list(range(1, len(seqs) + 1)), seqs
    steps = [e.data["step"] for e in events if e.type == "metrics"]
    assert steps == [1, 2, 3, 4], steps
    print("jobs.list_events:", len(events), "events, metrics steps", steps)

    ckpts = list(client.fine_tuning.jobs.checkpoints.list(job.id))
    assert [c.step_number for c in ckpts] == [4, 2], ckpts
    print("checkpoints.list:", [c.fine_tuned_model_checkpoint for c in ckpts])

    listed = client.fine_tuning.jobs.list(limit=10)
    assert any(j.id == job.id for j in listed.data)
    print("jobs.list:", [j.id for j in listed.data])

    for fid in job.result_files:
        meta = client.files.retrieve(fid)
        body = client.files.content(fid).read()
        assert len(body) == meta.bytes, (meta, len(body))
        print("files.content:", meta.filename, len(body), "bytes")

    slow = client.fine_tuning.jobs.create(
        model="sftd-demo", training_file=up.id,
        extra_body={"method": {"type": "supervised", "supervised": {"hyperparameters": {
            "max_steps": 100000, "max_seq_len": 128, "batch_size": 2}}}},
    )
    cancelled = client.fine_tuning.jobs.cancel(slow.id)
    assert cancelled.status == "cancelled", cancelled
    print("jobs.cancel:", cancelled.id, cancelled.status)

    try:
        client.fine_tuning.jobs.create(
            model="sftd-demo", training_file=up.id,
            method={"type": "supervised", "supervised": {"hyperparameters": {"batch_size": 0}}},
        )
    except openai.BadRequestError as e:
        assert e.body["param"] == "method.supervised.hyperparameters.batch_size", e.body
        print("BadRequestError:", e.body["param"], "-", e.body["message"])
    else:
        raise AssertionError("batch_size 0 was accepted")
    chat_checks(client, job.fine_tuned_model, ckpts[-1].fine_tuned_model_checkpoint)
    print("OK: the openai SDK works against sftd")
    return 0


def chat_checks(client, model, checkpoint):
    msgs = [{"role": "user", "content": "What is the weather in Paris?"}]
    c = client.chat.completions.create(model=model, messages=msgs, temperature=0, max_completion_tokens=8)
    assert c.object == "chat.completion" and c.model == model, c
    assert c.choices[0].message.role == "assistant", c
    assert c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens, c.usage
    print("chat.completions.create:", c.choices[0].finish_reason, repr(c.choices[0].message.content), c.usage)

    stream = client.chat.completions.create(model=model, messages=msgs, temperature=0, max_completion_tokens=8,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == (c.choices[0].message.content or ""), (text, c.choices[0].message.content)
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == c.usage.total_tokens, chunks[-1]
    print("chat.completions.create(stream=True):", len(chunks), "chunks, text equal to the plain call")

    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    t = client.chat.completions.create(model=checkpoint, messages=msgs, tools=tools, temperature=0,
                                       max_completion_tokens=48)
    choice = t.choices[0]
    for call in choice.message.tool_calls or []:
        assert call.type == "function" and call.id.startswith("call_"), call
        json.loads(call.function.arguments)
    assert (choice.finish_reason == "tool_calls") == bool(choice.message.tool_calls), choice
    print("chat.completions.create(tools=...):", choice.finish_reason,
          [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or []] or repr(choice.message.content))

    named = {"type": "function", "function": {"name": "get_weather"}}
    f = client.chat.completions.create(model=model, messages=msgs, tools=tools, tool_choice=named,
                                       temperature=0, max_completion_tokens=48)
    forced = f.choices[0]
    if forced.message.tool_calls:
        assert forced.finish_reason == "tool_calls", forced
        assert forced.message.tool_calls[0].function.name == "get_weather", forced
    else:  # arguments that are not JSON stay text, which must open the forced call
        assert forced.message.content.startswith('<tool_call>\n{"name": "get_weather", "arguments": '), forced
    print("chat.completions.create(tool_choice=get_weather):", forced.finish_reason,
          [(c.function.name, c.function.arguments) for c in forced.message.tool_calls or []]
          or repr(forced.message.content))

    j = client.chat.completions.create(model=model, messages=msgs, temperature=0, max_completion_tokens=64,
                                       response_format={"type": "json_object"})
    answer = j.choices[0]
    assert answer.message.content.startswith("{"), answer
    if answer.finish_reason == "stop":
        assert isinstance(json.loads(answer.message.content), dict), answer
    else:
        assert answer.finish_reason == "length", answer
    print("chat.completions.create(response_format=json_object):", answer.finish_reason,
          repr(answer.message.content[:80]))

    ids = [m.id for m in client.models.list()]
    assert model in ids and checkpoint in ids, ids
    assert client.models.retrieve(model).id == model
    print("models.list:", len(ids), "models; models.retrieve:", model)
    try:
        client.chat.completions.create(model=model, messages=msgs, n=2)
    except openai.BadRequestError as e:
        assert e.body["param"] == "n", e.body
        print("BadRequestError:", e.body["param"], "-", e.body["message"])
    else:
        raise AssertionError("n=2 was accepted")


if __name__ == "__main__":
    sys.exit(main())
