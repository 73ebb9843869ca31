"""Dataset handling shared by parity.py and ../bench/compare.py: sftd's data semantics in Python.

Rows (JSONL):
  {"messages": [...], "tools": [...]?}  rendered with the tokenizer's chat template
                                        (apply_chat_template(messages, tools=tools, tokenize=False)),
                                        tokenized without special-token additions.
  {"prompt": str, "completion": str}    tokens(prompt) + tokens(completion) + [eos]; completion (and
                                        eos) labelled.
  {"text": str}                         tokens(text) + [eos]; everything labelled.

Labels (loss_on "assistant", the default, for chat rows): 1 for tokens whose span lies inside an
assistant region, a region running from right after each "<|im_start|>assistant\\n" through the end of
the "<|im_end|>" closing that turn (the "\\n" after it excluded), from the offset mapping.
loss_on "all" labels every token of every format.

Truncation keeps the start (first max_seq_len tokens), after labelling, as TRL does.
"""

import json

ASSISTANT_OPEN = "<|im_start|>assistant\n"
IM_END = "<|im_end|>"
IGNORE = -100


def assistant_regions(text):
    regions = []
    pos = 0
    while True:
        i = text.find(ASSISTANT_OPEN, pos)
        if i < 0:
            return regions
        start = i + len(ASSISTANT_OPEN)
        j = text.find(IM_END, start)
        if j < 0:
            raise ValueError("assistant turn without <|im_end|>")
        end = j + len(IM_END)
        regions.append((start, end))
        pos = end


def region_mask(offsets, regions):
    return [1 if (b > a and any(s <= a and b <= e for s, e in regions)) else 0 for a, b in offsets]


def read_jsonl(path):
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                rows.append((n, json.loads(line)))
    return rows


def encode_row(tok, row, loss_on="assistant"):
    """Returns (input_ids, mask) with mask 1 on labelled tokens."""
    if "messages" in row:
        text = tok.apply_chat_template(row["messages"], tools=row.get("tools"), tokenize=False)
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        if loss_on == "all":
            mask = [1] * len(ids)
        else:
            mask = region_mask(enc["offset_mapping"], assistant_regions(text))
    elif "prompt" in row and "completion" in row:
        p = tok(row["prompt"], add_special_tokens=False)["input_ids"]
        c = tok(row["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = list(p) + list(c)
        mask = [1] * len(ids) if loss_on == "all" else [0] * len(p) + [1] * len(c)
    elif "text" in row:
        ids = list(tok(row["text"], add_special_tokens=False)["input_ids"]) + [tok.eos_token_id]
        mask = [1] * len(ids)
    else:
        raise ValueError("row has none of messages / prompt+completion / text")
    return ids, mask


def load_examples(tok, path, max_seq_len, loss_on="assistant", verbose=True):
    """Encode and truncate every row; rows with no labelled position after the shift are skipped
    (TRL drops fully-masked rows) and reported."""
    out = []
    for line_no, row in read_jsonl(path):
        ids, mask = encode_row(tok, row, loss_on)
        ids, mask = ids[:max_seq_len], mask[:max_seq_len]
        if sum(mask[1:]) == 0:
            if verbose:
                print("warning: line %d has no labelled token after truncation to %d; skipped" % (line_no, max_seq_len))
            continue
        out.append({"line": line_no, "input_ids": ids, "labels": [t if m else IGNORE for t, m in zip(ids, mask)]})
    return out


def collate(examples, pad_id):
    """Right-pad a micro-batch to its longest row."""
    import torch

    T = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    attn = torch.zeros((len(examples), T), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        attn[i, :n] = 1
    return ids, labels, attn
