#!/usr/bin/env python3
"""Give a model directory Qwen's real vocabulary, for `sftd bench --json-mask`.

Model weights and tokenizer.json files cannot be downloaded on the build machines, but PyPI's
`dashscope` package ships Qwen's byte-level BPE ranks (`dashscope/resources/qwen.tiktoken`,
151643 tokens, the regular vocabulary Qwen2 and Qwen3 share). This writes a tokenizer.json with
those tokens at their ids and Qwen3's 26 added tokens after them (151669 in all), into a
directory that already holds a model's config and chat template (`sftd demo-model DIR`).

The file decodes every token as Qwen3's does (byte-level), which is all the mask reads; it has
no merges, so it does not encode text as Qwen3 does: use it for the mask benchmark only.

    pip download dashscope==2.0.2 --no-deps -d /tmp/dl && unzip -o /tmp/dl/dashscope-*.whl \\
        'dashscope/resources/qwen.tiktoken' -d /tmp/dl
    sftd demo-model /tmp/qwen-vocab
    python3 tools/bench/qwen_vocab.py /tmp/dl/dashscope/resources/qwen.tiktoken /tmp/qwen-vocab
    sftd bench --json-mask --model /tmp/qwen-vocab --steps 9
"""

import base64
import json
import sys
from pathlib import Path

# Qwen3's added tokens, in id order from 151643.
ADDED = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>",
]


def byte_chars():
    """Byte-level BPE's printable stand-in for each byte (GPT-2's table)."""
    kept = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars = {b: chr(b) for b in kept}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: qwen_vocab.py QWEN_TIKTOKEN MODEL_DIR")
    ranks, model_dir = Path(sys.argv[1]), Path(sys.argv[2])
    chars = byte_chars()
    vocab = {}
    for line in ranks.read_bytes().splitlines():
        if not line.strip():
            continue
        token, rank = line.split()
        vocab["".join(chars[b] for b in base64.b64decode(token))] = int(rank)
    if sorted(vocab.values()) != list(range(len(vocab))):
        sys.exit(f"{ranks}: ranks are not 0..{len(vocab) - 1}")
    first_added = len(vocab)
    added = [
        {"id": first_added + i, "content": t, "single_word": False, "lstrip": False,
         "rstrip": False, "normalized": False, "special": not t.startswith(("<tool", "</tool", "<think", "</think"))}
        for i, t in enumerate(ADDED)
    ]
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                          "use_regex": True},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                    "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": False, "vocab": vocab, "merges": []},
    }
    (model_dir / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
    print(f"{model_dir}/tokenizer.json: {first_added} tokens + {len(ADDED)} added")


if __name__ == "__main__":
    main()
