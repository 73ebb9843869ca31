#!/usr/bin/env python3
"""Check that an adapter written by sftd loads in PEFT and gives sftd's logits.

Loads the base model (--model, float32) and the adapter (--adapter) with PeftModel.from_pretrained,
runs one forward pass over the token ids stored in --logits (a safetensors file written by
`sftd logits --model DIR --adapter DIR --text-file F --out F`, holding `input_ids` (T,) i64/u32/i32
and `logits` (T, V) f32), and prints the max absolute difference of the logits. Exit 1 above --tol
(default 1e-4), 2 on bad input.

With --text-file the text is also tokenized here (no special tokens added) and the ids must equal
the file's `input_ids`.

--write OUT writes a logits file in the same format from the PEFT forward instead of comparing (to
test this script, or to give sftd a reference to compare against).

    python logits_check.py --model M --adapter out/adapter --text-file t.txt --logits sftd_logits.safetensors
"""

import argparse
import os
import sys


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--logits", help="sftd's logits safetensors (input_ids, logits)")
    ap.add_argument("--text-file", help="the text sftd tokenized (checked against input_ids)")
    ap.add_argument("--write", help="write PEFT's logits for --text-file here instead of comparing")
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--attn", default="eager")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    import torch
    from peft import PeftModel
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(args.model)
    base = Qwen3ForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation=args.attn)
    model = PeftModel.from_pretrained(base, args.adapter)
    model.eval()
    n_lora = sum(1 for n, _ in model.named_parameters() if "lora_" in n)
    print("loaded %s + adapter %s (%d LoRA tensors)" % (args.model, args.adapter, n_lora))
    if n_lora == 0:
        print("error: no LoRA tensors were loaded")
        return 2
    # PEFT only warns about adapter tensors it did not find: insist that the file and the model agree.
    from peft import get_peft_model_state_dict

    expected = set(get_peft_model_state_dict(model))
    on_disk = set(load_file(os.path.join(args.adapter, "adapter_model.safetensors")))
    if expected != on_disk:
        print("error: adapter keys differ from what PEFT expects: missing %s, unexpected %s" % (
            sorted(expected - on_disk)[:4], sorted(on_disk - expected)[:4]))
        return 1

    text_ids = None
    if args.text_file:
        with open(args.text_file, encoding="utf-8") as f:
            text = f.read()
        text_ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"], dtype=torch.long)

    if args.write:
        if text_ids is None:
            print("error: --write needs --text-file")
            return 2
        with torch.no_grad():
            logits = model(input_ids=text_ids[None]).logits[0].float().contiguous()
        save_file({"input_ids": text_ids.contiguous(), "logits": logits}, args.write)
        print("wrote %s: input_ids %s, logits %s" % (args.write, tuple(text_ids.shape), tuple(logits.shape)))
        return 0

    if not args.logits:
        print("error: --logits (or --write) is required")
        return 2
    t = load_file(args.logits)
    if "input_ids" not in t or "logits" not in t:
        print("error: %s needs tensors input_ids and logits, has %s" % (args.logits, sorted(t)))
        return 2
    ids = t["input_ids"].to(torch.long).reshape(-1)
    theirs = t["logits"].float()
    if text_ids is not None and not torch.equal(text_ids, ids):
        n = min(len(text_ids), len(ids))
        first = next((i for i in range(n) if text_ids[i] != ids[i]), n)
        print("error: tokenization differs (transformers %d ids, sftd %d ids, first difference at %d)" % (
            len(text_ids), len(ids), first))
        return 1
    with torch.no_grad():
        mine = model(input_ids=ids[None]).logits[0].float()
    if mine.shape != theirs.shape:
        print("error: logits shape %s (PEFT) vs %s (sftd)" % (tuple(mine.shape), tuple(theirs.shape)))
        return 1
    diff = (mine - theirs).abs()
    max_diff = diff.max().item()
    pos = int(diff.max(dim=-1).values.argmax())
    same_argmax = (mine.argmax(-1) == theirs.argmax(-1)).float().mean().item()
    print("tokens %d, vocab %d: max |logits PEFT - sftd| = %.3e (at position %d), mean %.3e, "
          "argmax agreement %.4f, max |logit| %.3f" % (
              mine.shape[0], mine.shape[1], max_diff, pos, diff.mean().item(), same_argmax, mine.abs().max().item()))
    if not max_diff <= args.tol:
        print("LOGITS MISMATCH: %.3e > %.0e" % (max_diff, args.tol))
        return 1
    print("LOGITS OK (tol %.0e)" % args.tol)
    return 0


if __name__ == "__main__":
    sys.exit(main())
