#!/usr/bin/env python3
"""PyTorch reference for sftd's training semantics (transformers + PEFT, TRL's loss normalisation).

Trains a PEFT LoRA adapter on a Qwen3 model for --steps optimizer steps exactly the way sftd is meant
to, and compares the per-step numbers with the metrics.jsonl that `sftd train` wrote:

  * model: Qwen3ForCausalLM in float32 from --model (config.json, model.safetensors, tokenizer files);
  * adapter: --init-adapter loaded with PeftModel.from_pretrained(..., is_trainable=True); every
    dropout (LoRA and model) forced to 0;
  * data: --data rows in file order (no shuffle), chat rows rendered with
    apply_chat_template(messages, tools=tools, tokenize=False) and tokenized without special tokens;
    labels = assistant regions (see sft_data.py), or everything with --loss-on all; truncated to
    --max-seq-len keeping the start; micro-batches of --batch-size consecutive rows, right-padded;
    --grad-accum micro-batches per optimizer step (an epoch's last window may be shorter, and the
    last micro-batch of an epoch may be smaller, as in transformers' Trainer);
  * loss per optimizer step: sum over the window of the token cross-entropies at the shifted label
    positions / number of those positions in the window (TRL's num_items_in_batch, shifted labels);
  * torch AdamW (betas 0.9/0.999, eps 1e-8, weight_decay --weight-decay), clip_grad_norm_ at
    --max-grad-norm (the pre-clip norm is what is recorded), transformers'
    get_{cosine,linear}_schedule_with_warmup with warmup = ceil(ratio * total) (or get_constant_schedule,
    no warmup, for "constant", as lr_scheduler_type "constant" in transformers), the logged learning
    rate being the one applied at that step.

Exit status: 0 when every step's loss and grad_norm agree within --tol (relative) and the learning
rates are identical (within --lr-rtol, default 1e-12: f64 rounding only); 1 otherwise; 2 on bad input.

Examples:
  python parity.py --model M --data examples/tool_calls.jsonl --init-adapter A \\
      --batch-size 4 --grad-accum 4 --steps 20 --lr 2e-4 --warmup-ratio 0.1 --max-seq-len 512 \\
      --sftd-metrics out/metrics.jsonl
  python parity.py ... --write-metrics ref.jsonl          # the reference's own metrics, same format
"""

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import sft_data  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="HF Qwen3 model dir")
    ap.add_argument("--data", required=True, help="training JSONL")
    ap.add_argument("--init-adapter", required=True, help="PEFT adapter dir (adapter_model.safetensors + adapter_config.json)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--grad-accum", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps to run")
    ap.add_argument("--total-steps", type=int, default=None,
                    help="total steps the LR schedule is built for (default: --steps)")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--warmup-ratio", type=float, default=0.1)
    ap.add_argument("--scheduler", choices=["cosine", "linear", "constant"], default="cosine")
    ap.add_argument("--max-seq-len", type=int, default=2048)
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--loss-on", choices=["assistant", "all"], default="assistant")
    ap.add_argument("--gradient-checkpointing", action="store_true", help="same numbers, less memory")
    ap.add_argument("--attn", default="eager", help="attn_implementation (eager | sdpa)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--sftd-metrics", help="sftd's metrics.jsonl to compare against")
    ap.add_argument("--write-metrics", help="write the reference's per-step metrics here (sftd's format)")
    ap.add_argument("--save-adapter", help="save the trained adapter (PEFT format) here")
    ap.add_argument("--sftd-adapter", help="sftd's final adapter dir: report its distance to the reference's")
    ap.add_argument("--tol", type=float, default=1e-3, help="max relative error of loss and grad_norm")
    ap.add_argument("--lr-rtol", type=float, default=1e-12, help="max relative difference of learning rates")
    return ap.parse_args(argv)


def rel_err(a, b):
    if a == b:
        return 0.0
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def force_no_dropout(model):
    import torch.nn as nn

    n = 0
    for m in model.modules():
        if hasattr(m, "lora_dropout") and isinstance(m.lora_dropout, nn.ModuleDict):
            for k in list(m.lora_dropout.keys()):
                m.lora_dropout[k] = nn.Identity()
                n += 1
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    if hasattr(model.config, "attention_dropout"):
        model.config.attention_dropout = 0.0
    for m in model.modules():
        if hasattr(m, "attention_dropout") and isinstance(getattr(m, "attention_dropout"), float):
            m.attention_dropout = 0.0
    return n


def windows(examples, batch_size, grad_accum):
    """Yield optimizer-step windows (lists of micro-batches), epoch after epoch, in file order."""
    epoch = 0
    while True:
        mbs = [examples[i:i + batch_size] for i in range(0, len(examples), batch_size)]
        for w in range(0, len(mbs), grad_accum):
            yield epoch, mbs[w:w + grad_accum]
        epoch += 1


def read_sftd_metrics(path):
    recs = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            r = json.loads(line)
            if "eval_loss" in r or r.get("type") == "eval" or "train_loss" not in r:
                continue
            recs[int(r["step"])] = r
    return recs


def load_model_and_adapter(model_dir, adapter_dir, attn, trainable=True):
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    tok = AutoTokenizer.from_pretrained(model_dir)
    base = Qwen3ForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attn)
    model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=trainable)
    return tok, model


def main(argv=None):
    args = parse_args(argv)
    import torch
    import torch.nn.functional as F
    import transformers
    import peft
    from transformers import get_constant_schedule, get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    print("torch %s, transformers %s, peft %s, threads %d" % (
        torch.__version__, transformers.__version__, peft.__version__, torch.get_num_threads()))

    tok, model = load_model_and_adapter(args.model, args.init_adapter, args.attn)
    n_drop = force_no_dropout(model)
    model.train()
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    params = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if not params or any("lora_" not in n for n in names):
        print("error: expected only LoRA parameters to be trainable, got %d: %s" % (len(names), names[:5]))
        return 2
    print("trainable LoRA tensors: %d (%d params); LoRA dropouts disabled: %d" % (
        len(params), sum(p.numel() for p in params), n_drop))

    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    examples = sft_data.load_examples(tok, args.data, args.max_seq_len, args.loss_on)
    if not examples:
        print("error: no usable rows in %s" % args.data)
        return 2
    total = args.total_steps or args.steps
    warmup = math.ceil(args.warmup_ratio * total)
    mb_per_epoch = math.ceil(len(examples) / args.batch_size)
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=args.weight_decay, foreach=False)
    # transformers' lr_scheduler_type "constant" is get_constant_schedule: no warmup.
    if args.scheduler == "constant":
        warmup = 0
        sched = get_constant_schedule(opt)
    else:
        make_sched = {"cosine": get_cosine_schedule_with_warmup, "linear": get_linear_schedule_with_warmup}[args.scheduler]
        sched = make_sched(opt, num_warmup_steps=warmup, num_training_steps=total)

    print("rows %d, micro-batches/epoch %d, steps/epoch %d; schedule %s over %d steps, warmup %d" % (
        len(examples), mb_per_epoch, math.ceil(mb_per_epoch / args.grad_accum), args.scheduler, total, warmup))

    ref = []
    num_tokens = 0
    gen = windows(examples, args.batch_size, args.grad_accum)
    t0 = time.time()
    for step in range(1, args.steps + 1):
        epoch, window = next(gen)
        batches = [sft_data.collate(mb, pad_id) for mb in window]
        n_items = sum(int((lab[:, 1:] != sft_data.IGNORE).sum()) for _, lab, _ in batches)
        step_loss = 0.0
        accs = []
        for ids, lab, attn in batches:
            logits = model(input_ids=ids, attention_mask=attn).logits.float()
            shift_logits = logits[:, :-1, :].reshape(-1, logits.shape[-1])
            shift_labels = lab[:, 1:].reshape(-1)
            ce = F.cross_entropy(shift_logits, shift_labels, ignore_index=sft_data.IGNORE, reduction="sum")
            loss = ce / n_items
            loss.backward()
            step_loss += loss.item()
            with torch.no_grad():
                valid = shift_labels != sft_data.IGNORE
                correct = (shift_logits.argmax(-1) == shift_labels) & valid
                accs.append(correct.sum().item() / max(1, valid.sum().item()))
            num_tokens += int(attn.sum())
        if args.max_grad_norm and args.max_grad_norm > 0:
            gn = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        else:
            gn = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
        lr = sched.get_last_lr()[0]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        rec = {"step": step, "train_loss": step_loss, "grad_norm": float(gn), "learning_rate": lr,
               "num_tokens": num_tokens, "train_mean_token_accuracy": sum(accs) / len(accs),
               "epoch": epoch, "num_items": n_items, "rows": sum(len(mb) for mb in window)}
        ref.append(rec)
        print("  step %3d  loss %.6f  grad_norm %.6f  lr %.6e  items %d  (%.1fs)" % (
            step, step_loss, float(gn), lr, n_items, time.time() - t0), file=sys.stderr)

    if args.write_metrics:
        with open(args.write_metrics, "w", encoding="utf-8") as f:
            for r in ref:
                f.write(json.dumps(r) + "\n")
        print("wrote %s" % args.write_metrics)
    if args.save_adapter:
        model.save_pretrained(args.save_adapter)
        print("saved adapter to %s" % args.save_adapter)

    status = 0
    if args.sftd_adapter:
        status |= compare_adapters(model, args.sftd_adapter, args.tol)
    if args.sftd_metrics:
        status |= compare_metrics(ref, read_sftd_metrics(args.sftd_metrics), args.tol, args.lr_rtol)
    else:
        print_table(ref, {})
    return status


def print_table(ref, sftd):
    hdr = "| step | loss ref | loss sftd | rel err | grad_norm ref | grad_norm sftd | rel err | lr ref | lr sftd |"
    print(hdr)
    print("|" + "---|" * 9)
    for r in ref:
        s = sftd.get(r["step"])
        if s is None:
            print("| %d | %.6f | - | - | %.6f | - | - | %.10e | - |" % (r["step"], r["train_loss"], r["grad_norm"], r["learning_rate"]))
            continue
        print("| %d | %.6f | %.6f | %.2e | %.6f | %.6f | %.2e | %.10e | %.10e |" % (
            r["step"], r["train_loss"], s["train_loss"], rel_err(r["train_loss"], s["train_loss"]),
            r["grad_norm"], s["grad_norm"], rel_err(r["grad_norm"], s["grad_norm"]),
            r["learning_rate"], s["learning_rate"]))


def compare_metrics(ref, sftd, tol, lr_rtol):
    print_table(ref, sftd)
    bad = []
    worst_loss = worst_gn = worst_lr = 0.0
    for r in ref:
        s = sftd.get(r["step"])
        if s is None:
            bad.append("step %d missing from sftd metrics" % r["step"])
            continue
        el = rel_err(r["train_loss"], float(s["train_loss"]))
        eg = rel_err(r["grad_norm"], float(s["grad_norm"]))
        elr = rel_err(r["learning_rate"], float(s["learning_rate"]))
        worst_loss, worst_gn, worst_lr = max(worst_loss, el), max(worst_gn, eg), max(worst_lr, elr)
        if not el <= tol:
            bad.append("step %d: loss rel err %.3e > %.0e" % (r["step"], el, tol))
        if not eg <= tol:
            bad.append("step %d: grad_norm rel err %.3e > %.0e" % (r["step"], eg, tol))
        if not elr <= lr_rtol:
            bad.append("step %d: lr %r != %r" % (r["step"], r["learning_rate"], s["learning_rate"]))
        if "num_tokens" in s and s["num_tokens"] != r["num_tokens"]:
            print("note: step %d num_tokens sftd %s vs ref %s" % (r["step"], s["num_tokens"], r["num_tokens"]))
    print("max rel err: loss %.3e, grad_norm %.3e, lr %.3e (tol %.0e, lr %.0e)" % (
        worst_loss, worst_gn, worst_lr, tol, lr_rtol))
    if bad:
        print("PARITY FAILED:")
        for b in bad:
            print("  " + b)
        return 1
    print("PARITY OK: %d steps" % len(ref))
    return 0


def compare_adapters(model, sftd_dir, tol):
    """Report the distance between the reference's trained LoRA tensors and sftd's saved ones."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    mine = get_peft_model_state_dict(model)
    theirs = load_file(os.path.join(sftd_dir, "adapter_model.safetensors"))
    missing = sorted(set(mine) ^ set(theirs))
    if missing:
        print("adapter key mismatch (%d): %s" % (len(missing), missing[:6]))
        return 1
    worst = 0.0
    for k, v in mine.items():
        t = theirs[k].float()
        if t.shape != v.shape:
            print("adapter shape mismatch %s: %s vs %s" % (k, tuple(v.shape), tuple(t.shape)))
            return 1
        d = (v.detach().float() - t).abs().max().item() / max(v.abs().max().item(), 1e-12)
        worst = max(worst, d)
    print("adapter: %d tensors, max |ref - sftd| / max |ref| = %.3e" % (len(mine), worst))
    return 0 if worst <= tol else 1


if __name__ == "__main__":
    sys.exit(main())
