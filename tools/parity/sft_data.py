"""Dataset handling shared by parity.py and ../bench/compare.py: sftd's data semantics in Python.

Rows (JSONL):
  {"messages": [...], "tools": [...]?}  rendered with the tokenizer's chat template
                                        (apply_chat_template(messages, tools=tools, tokenize=False)),
                                        tokenized without special-token additions.
  {"prompt": str, "completion": str}    the string prompt + completion + eos_token tokenized as one
                                        text (TRL appends the EOS string for non-conversational data);
                                        tokens starting at or after len(prompt) are labelled.
  {"text": str}                         text + eos_token tokenized; everything labelled.

Labels (loss_on "assistant", the default, for chat rows): 1 for tokens whose start offset lies inside
an assistant region, a region running from right after each "<|im_start|>assistant\\n" through the end
of the "<|im_end|>" closing that turn (the "\\n" after it excluded), from the offset mapping. (For chat
text no token straddles a region boundary, so "starts inside" and "lies inside" agree; see
tools/fixtures/make_chat_fixtures.py.) loss_on "all" labels every token of every format.

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


def span_mask(offsets, spans):
    """1 for tokens whose start offset lies in one of the [start, end) spans."""
    return [1 if any(s <= a < e for s, e in spans) else 0 for a, _ in offsets]


def read_jsonl(path):
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                rows.append((n, json.loads(line)))
    return rows


def encode_row(tok, row, loss_on="assistant"):
    """Returns (input_ids, mask) with mask 1 on labelled tokens."""
    eos = tok.eos_token
    if "messages" in row:
        text = tok.apply_chat_template(row["messages"], tools=row.get("tools"), tokenize=False)
        spans = assistant_regions(text)
    elif "prompt" in row and "completion" in row:
        text = row["prompt"] + row["completion"] + eos
        spans = [(len(row["prompt"]), len(text))]
    elif "text" in row:
        text = row["text"] + eos
        spans = [(0, len(text))]
    else:
        raise ValueError("row has none of messages / prompt+completion / text")
    if loss_on == "all":
        spans = [(0, len(text))]
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), span_mask(enc["offset_mapping"], spans)


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
