#!/usr/bin/env python3
"""Greedy generation reference: transformers + PEFT `generate` on a tiny Qwen3 with a LoRA adapter.

Writes the fixture sftd's `tests/generate_parity.rs` checks (token-identical greedy output):

    /work/venv-ref/bin/python tools/parity/generate_parity.py --out tests/fixtures/generate

1. A tiny model and adapter from make_tiny_model.py (fixture tokenizer, B != 0), with every weight
   scaled by --scale so that the logits are far apart (random-init models at the default
   std 0.02 have near-flat logits, where an argmax flips on rounding noise).
2. For each prompt (chat messages, some with tools): the prompt rendered with the model's chat
   template (add_generation_prompt=True), tokenized without special tokens, then greedy
   `generate` (KV cache) with and without the adapter; eos = <|im_end|> and <|endoftext|>.
3. The smallest gap between the best and second-best logit over all steps is reported and must
   exceed --min-margin, so the fixture is not on a knife edge.

Files: model/{config.json, model.safetensors}, adapter/{adapter_config.json,
adapter_model.safetensors}, expected.json. The tokenizer comes from tests/fixtures/tokenizer.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
TOK_DIR = os.path.join(ROOT, "tests", "fixtures", "tokenizer")

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]

CASES = [
    {"messages": [{"role": "user", "content": "What is the weather in Paris?"}], "tools": TOOLS},
    {"messages": [{"role": "system", "content": "You are terse."},
                  {"role": "user", "content": "Say hello."}]},
    {"messages": [{"role": "user", "content": "Book a table for two."}], "enable_thinking": False},
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(ROOT, "tests", "fixtures", "generate"))
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--scale", type=float, default=12.0, help="multiplies every base weight")
    ap.add_argument("--b-std", type=float, default=0.5, help="std of the random lora_B init")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--min-margin", type=float, default=1e-3)
    args = ap.parse_args()

    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    tmp = tempfile.mkdtemp()
    subprocess.run([sys.executable, os.path.join(HERE, "make_tiny_model.py"), "--out", tmp,
                    "--seed", str(args.seed), "--b-std", str(args.b_std)], check=True)
    model_dir, adapter_dir = os.path.join(tmp, "model"), os.path.join(tmp, "adapter")
    model = Qwen3ForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.mul_(args.scale)
    model.save_pretrained(model_dir, safe_serialization=True)

    tok = AutoTokenizer.from_pretrained(TOK_DIR)
    stop = [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")]
    base = Qwen3ForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    peft = PeftModel.from_pretrained(
        Qwen3ForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32), adapter_dir).eval()

    out_cases = []
    worst = float("inf")
    for case in CASES:
        kwargs = {}
        if "enable_thinking" in case:
            kwargs["enable_thinking"] = case["enable_thinking"]
        text = tok.apply_chat_template(case["messages"], tools=case.get("tools"), tokenize=False,
                                       add_generation_prompt=True, **kwargs)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        record = dict(case, prompt_ids=ids)
        for key, m in (("base", base), ("adapter", peft)):
            with torch.no_grad():
                g = m.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                               max_new_tokens=args.max_new_tokens, do_sample=False, use_cache=True,
                               eos_token_id=stop, pad_token_id=stop[1], output_scores=True,
                               return_dict_in_generate=True)
            new = g.sequences[0, len(ids):].tolist()
            margins = []
            peak = max(s.abs().max().item() for s in g.scores)
            for s in g.scores:
                top = torch.topk(s[0].float(), 2).values
                margins.append((top[0] - top[1]).item())
            worst = min(worst, min(margins))
            record[key] = {"ids": new, "min_margin": min(margins), "max_abs_logit": peak}
            print("%-7s %s -> %s (min margin %.4f, max |logit| %.1f)"
                  % (key, case["messages"][-1]["content"][:24], new, min(margins), peak))
        out_cases.append(record)
    if worst < args.min_margin:
        sys.exit("smallest top-1/top-2 logit gap %.2e is below --min-margin: try another --seed or --scale" % worst)

    os.makedirs(os.path.join(args.out, "model"), exist_ok=True)
    os.makedirs(os.path.join(args.out, "adapter"), exist_ok=True)
    for f in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(model_dir, f), os.path.join(args.out, "model", f))
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(os.path.join(adapter_dir, f), os.path.join(args.out, "adapter", f))
    import transformers, peft as peft_mod
    expected = {
        "generator": "tools/parity/generate_parity.py --seed %d --scale %g --b-std %g --max-new-tokens %d"
                     % (args.seed, args.scale, args.b_std, args.max_new_tokens),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft_mod.__version__},
        "max_new_tokens": args.max_new_tokens,
        "stop_ids": stop,
        "min_margin": worst,
        "cases": out_cases,
    }
    with open(os.path.join(args.out, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1)
    print("wrote %s (smallest logit gap %.4f)" % (args.out, worst))


if __name__ == "__main__":
    main()
