"""Measure how fast a LoRA adapter learns the bundled demo task on the bundled demo base (CPU).

Loads src/fullscale/demo/base, applies a peft LoRA adapter, trains with a plain PyTorch loop
(AdamW, cosine schedule with warmup, loss only on assistant tokens), holds out a seeded random
eval split, and prints eval loss at step 0 and every --eval-every steps with wall time, then a
few greedy generations vs the expected answers.

Usage:
    .venv/bin/python scripts/measure_demo_task.py
    .venv/bin/python scripts/measure_demo_task.py --lr 2e-3 --steps 200 --rank 16
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO_DIR = ROOT / "src" / "fullscale" / "demo"


def build_example(tok, messages, max_len):
    """input_ids + labels: -100 on everything up to and including the last '<|assistant|>'."""
    prompt = tok.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(messages, tokenize=False)
    assert full.startswith(prompt)
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    f_ids = tok(full, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert f_ids[: len(p_ids)] == p_ids
    labels = [-100] * len(p_ids) + f_ids[len(p_ids) :]
    return f_ids[:max_len], labels[:max_len]


def collate(examples, pad_id):
    import torch

    L = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), L), pad_id, dtype=torch.long)
    lab = torch.full((len(examples), L), -100, dtype=torch.long)
    att = torch.zeros((len(examples), L), dtype=torch.long)
    for i, (x, y) in enumerate(examples):
        ids[i, : len(x)] = torch.tensor(x)
        lab[i, : len(y)] = torch.tensor(y)
        att[i, : len(x)] = 1
    return ids, att, lab


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default=str(DEMO_DIR / "base"))
    ap.add_argument("--data", default=str(DEMO_DIR / "data" / "train.jsonl"))
    ap.add_argument("--lr", type=float, default=4e-3)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--eval-batch", type=int, default=32)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--alpha", type=int, default=32)
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    ap.add_argument("--warmup-ratio", type=float, default=0.05)
    ap.add_argument("--eval-split", type=float, default=0.05)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--max-seq-length", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--probe",
        nargs="*",
        default=["Encode: hello world", "Cipher: python code"],
        help="extra prompts to generate for (words outside the dataset's vocabulary)",
    )
    ap.add_argument("--max-seconds", type=float, default=0, help="stop training after this many seconds")
    args = ap.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tok = AutoTokenizer.from_pretrained(args.base)
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32)
    model = get_peft_model(
        model,
        LoraConfig(
            r=args.rank,
            lora_alpha=args.alpha,
            lora_dropout=args.dropout,
            target_modules=args.targets.split(","),
            task_type="CAUSAL_LM",
        ),
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"LoRA r={args.rank} alpha={args.alpha} on {args.targets}: {trainable} trainable / {total} params")

    rows = [json.loads(line) for line in Path(args.data).read_text(encoding="utf-8").splitlines() if line.strip()]
    rng = random.Random(args.seed)
    idx = list(range(len(rows)))
    rng.shuffle(idx)
    n_eval = max(1, int(round(len(rows) * args.eval_split)))
    eval_rows = [rows[i] for i in idx[:n_eval]]
    train_rows = [rows[i] for i in idx[n_eval:]]
    train_ex = [build_example(tok, r["messages"], args.max_seq_length) for r in train_rows]
    eval_ex = [build_example(tok, r["messages"], args.max_seq_length) for r in eval_rows]
    print(f"data: {len(train_ex)} train rows, {len(eval_ex)} eval rows")

    def evaluate():
        model.eval()
        tot, n = 0.0, 0
        with torch.no_grad():
            for i in range(0, len(eval_ex), args.eval_batch):
                ids, att, lab = collate(eval_ex[i : i + args.eval_batch], tok.pad_token_id)
                logits = model(input_ids=ids, attention_mask=att).logits[:, :-1]
                tgt = lab[:, 1:]
                loss = torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100, reduction="sum"
                )
                tot += loss.item()
                n += (tgt != -100).sum().item()
        model.train()
        return tot / n

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    warm = max(1, int(math.ceil(args.warmup_ratio * args.steps)))

    def lr_at(step):
        if step < warm:
            return args.lr * (step + 1) / warm
        prog = (step - warm) / max(1, args.steps - warm)
        return args.lr * 0.5 * (1 + math.cos(math.pi * prog))

    t_start = time.time()
    e0 = evaluate()
    print(f"step {0:4d}  eval_loss {e0:.4f}  (1.00x)  train_time {0.0:6.1f}s", flush=True)
    model.train()
    order: list[int] = []
    train_time = 0.0
    last = e0
    step = 0
    for step in range(1, args.steps + 1):
        t = time.time()
        if len(order) < args.batch:
            extra = list(range(len(train_ex)))
            rng.shuffle(extra)
            order += extra
        batch = [train_ex[i] for i in order[: args.batch]]
        del order[: args.batch]
        ids, att, lab = collate(batch, tok.pad_token_id)
        for g in opt.param_groups:
            g["lr"] = lr_at(step - 1)
        loss = model(input_ids=ids, attention_mask=att, labels=lab).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        train_time += time.time() - t
        stop = bool(args.max_seconds and train_time > args.max_seconds)
        if step % args.eval_every == 0 or step == args.steps or stop:
            last = evaluate()
            print(
                f"step {step:4d}  train_loss {loss.item():.4f}  eval_loss {last:.4f}  ({last / e0:.2f}x)  "
                f"train_time {train_time:6.1f}s",
                flush=True,
            )
        if stop:
            print("time budget reached")
            break

    print(
        f"\nfinal: eval_loss {e0:.4f} -> {last:.4f} ({last / e0:.3f}x) after {step} steps, "
        f"train_time {train_time:.1f}s, total wall {time.time() - t_start:.1f}s"
    )

    model.eval()
    end_id = tok.convert_tokens_to_ids("<|end|>")
    correct = 0
    n_gen = min(len(eval_rows), 20)
    shown = 0
    for r in eval_rows[:n_gen]:
        msgs = r["messages"]
        prompt = tok.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
        ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=48,
                do_sample=False,
                eos_token_id=[tok.eos_token_id, end_id],
                pad_token_id=tok.pad_token_id,
            )
        got = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
        want = msgs[-1]["content"]
        correct += got == want
        if shown < 3 or got != want and shown < 6:
            shown += 1
            print(f"  {msgs[-2]['content']!r:40} -> {got!r:28} expected {want!r} {'OK' if got == want else 'WRONG'}")
    print(f"greedy exact match on {n_gen} held-out rows: {correct}/{n_gen}")
    for q in args.probe:
        msgs = [{"role": "user", "content": q}]
        prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=48,
                                 do_sample=False, eos_token_id=[tok.eos_token_id, end_id], pad_token_id=tok.pad_token_id)
        print(f"  probe {q!r:34} -> {tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()!r}")


if __name__ == "__main__":
    main()
