#!/usr/bin/env python3
"""Write a tiny random Qwen3 model dir and a random PEFT LoRA adapter for exercising parity.py.

Model (transformers Qwen3ForCausalLM, float32, seeded): hidden 64, 2 layers, 4 query / 2 KV heads,
head_dim 16, intermediate 128, vocab = the fixture tokenizer's size, tied embeddings; saved with
save_pretrained (config.json + model.safetensors) next to tests/fixtures/tokenizer's files.

Adapter (PEFT, r 4, alpha 8, all-linear, dropout 0): A kaiming-uniform as PEFT does, B random
normal instead of zeros, so that both A and B receive gradients at step 1.

    python make_tiny_model.py --out /tmp/tiny            # writes /tmp/tiny/model and /tmp/tiny/adapter
"""

import argparse
import os
import shutil

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOK_DIR = os.path.join(ROOT, "tests", "fixtures", "tokenizer")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokenizer", default=TOK_DIR)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=16)
    ap.add_argument("--intermediate", type=int, default=128)
    ap.add_argument("--r", type=int, default=4)
    ap.add_argument("--alpha", type=float, default=8)
    ap.add_argument("--b-std", type=float, default=0.05, help="std of the random lora_B init")
    args = ap.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    torch.manual_seed(args.seed)
    cfg = Qwen3Config(
        vocab_size=len(tok),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim,
        max_position_embeddings=4096,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        hidden_act="silu",
        attention_bias=False,
        attention_dropout=0.0,
        bos_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        use_cache=False,
    )
    model = Qwen3ForCausalLM(cfg).to(torch.float32)
    model.eval()
    model_dir = os.path.join(args.out, "model")
    os.makedirs(model_dir, exist_ok=True)
    model.save_pretrained(model_dir, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(args.tokenizer, f), os.path.join(model_dir, f))

    lcfg = LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=0.0, target_modules="all-linear",
                      bias="none", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lcfg)
    g = torch.Generator().manual_seed(args.seed + 1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * args.b_std)
    adapter_dir = os.path.join(args.out, "adapter")
    peft_model.save_pretrained(adapter_dir)
    n = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    print("model: %s (%d params, vocab %d)" % (model_dir, sum(p.numel() for p in model.parameters()), len(tok)))
    print("adapter: %s (%d trainable params)" % (adapter_dir, n))


if __name__ == "__main__":
    main()
