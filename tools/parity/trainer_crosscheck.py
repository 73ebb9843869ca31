#!/usr/bin/env python3
"""Cross-check parity.py against transformers' own Trainer.

Runs transformers.Trainer (the engine under TRL's SFTTrainer) on the same model, adapter, data and
hyperparameters as parity.py: rows encoded by sft_data.py (the same labels TRL gets from an
assistant mask), sequential sampler (no shuffle), right-padding collator, AdamW (adamw_torch),
cosine schedule with warmup_steps = ceil(ratio * steps), max_grad_norm, logging every step. Then it
compares Trainer's logged loss / grad_norm / learning_rate with a metrics file written by
`parity.py --write-metrics`.

This is what shows that parity.py's hand-written loop (loss = sum CE over the window / number of
shifted label positions in the window) is the Trainer's behaviour for this transformers version
(whose Trainer counts num_items_in_batch over labels[..., 1:]).

    python trainer_crosscheck.py --model M --data D --init-adapter A --batch-size 4 --grad-accum 4 \\
        --steps 20 --lr 2e-3 --warmup-ratio 0.1 --max-seq-len 512 --parity-metrics ref.jsonl
"""

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import sft_data  # noqa: E402
from parity import force_no_dropout, load_model_and_adapter, rel_err  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--init-adapter", required=True)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--grad-accum", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--warmup-ratio", type=float, default=0.1)
    ap.add_argument("--max-seq-len", type=int, default=2048)
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--loss-on", choices=["assistant", "all"], default="assistant")
    ap.add_argument("--attn", default="eager")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--parity-metrics", required=True, help="parity.py --write-metrics output")
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--out-dir", default="/tmp/sftd_trainer_crosscheck")
    args = ap.parse_args()

    import torch
    from torch.utils.data import Dataset, SequentialSampler
    from transformers import Trainer, TrainerCallback, TrainingArguments

    torch.set_num_threads(args.threads)
    tok, model = load_model_and_adapter(args.model, args.init_adapter, args.attn)
    force_no_dropout(model)
    pad_id = tok.pad_token_id
    examples = sft_data.load_examples(tok, args.data, args.max_seq_len, args.loss_on)

    class Rows(Dataset):
        def __len__(self):
            return len(examples)

        def __getitem__(self, i):
            return examples[i]

    def collate(batch):
        ids, labels, attn = sft_data.collate(batch, pad_id)
        return {"input_ids": ids, "labels": labels, "attention_mask": attn}

    class SequentialTrainer(Trainer):
        def _get_train_sampler(self, *a, **k):
            return SequentialSampler(self.train_dataset)

    logs = []

    class Collect(TrainerCallback):
        def on_log(self, _args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                logs = dict(logs)
                logs["step"] = state.global_step
                collected.append(logs)

    collected = logs
    targs = TrainingArguments(
        output_dir=args.out_dir,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        max_steps=args.steps,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=math.ceil(args.warmup_ratio * args.steps),
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        optim="adamw_torch",
        max_grad_norm=args.max_grad_norm,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_drop_last=False,
        remove_unused_columns=False,
        seed=42,
        disable_tqdm=True,
    )
    trainer = SequentialTrainer(model=model, args=targs, train_dataset=Rows(), data_collator=collate,
                                callbacks=[Collect()])
    trainer.train()

    ref = {}
    with open(args.parity_metrics) as f:
        for line in f:
            r = json.loads(line)
            ref[r["step"]] = r
    print("| step | loss Trainer | loss parity.py | rel | grad_norm Trainer | parity.py | rel | lr Trainer | parity.py |")
    print("|" + "---|" * 9)
    worst = [0.0, 0.0, 0.0]
    for lg in logs:
        r = ref.get(lg["step"])
        if r is None:
            continue
        e = [rel_err(lg["loss"], r["train_loss"]), rel_err(lg["grad_norm"], r["grad_norm"]),
             rel_err(lg["learning_rate"], r["learning_rate"])]
        worst = [max(a, b) for a, b in zip(worst, e)]
        print("| %d | %.6f | %.6f | %.1e | %.6f | %.6f | %.1e | %.6e | %.6e |" % (
            lg["step"], lg["loss"], r["train_loss"], e[0], lg["grad_norm"], r["grad_norm"], e[1],
            lg["learning_rate"], r["learning_rate"], ))
    print("max rel err vs Trainer: loss %.2e, grad_norm %.2e, lr %.2e over %d steps" % (worst[0], worst[1], worst[2], len(logs)))
    ok = len(logs) == args.steps and worst[0] <= args.tol and worst[1] <= args.tol and worst[2] <= 1e-12
    print("TRAINER CROSSCHECK %s" % ("OK" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
