"""Training throughput and model FLOPs utilisation (MFU) on one CUDA GPU: fullscale (packing off
and on) against the transformers Trainer + peft and a bare PyTorch loop, on an 8B-shaped Llama
with random weights in bf16.

    python benchmarks/bench_gpu.py                  # Llama-3-8B shape (~6 min on an H100)
    python benchmarks/bench_gpu.py --size 1b        # Llama-3.2-1B shape (~2 min)
    python benchmarks/bench_gpu.py --peak-tflops 989 --json out.json

Without a CUDA device it prints why and exits 0 (`--allow-cpu --size tiny` runs the same code
paths on the CPU, to check the script itself).

Same settings for every contender (the textbook's): lr 2e-4, batch 8, accumulation 4, LoRA r32
alpha 32 dropout 0.05 on q/k/v/o, warmup 5%, weight decay 0.01, cosine, clip 1.0, bf16 weights,
gradient checkpointing on (non-reentrant), sdpa attention (flash_attention_2 is not used:
with a batch of several packed rows it does not see the example boundaries), data loading in the
main process. The Trainer reads the same examples in fullscale's order, so its micro-batches are
fullscale's.

The model is built from a LlamaConfig directly on the GPU (no 16 GB checkpoint written or read):
fullscale is pointed at a directory holding only config.json and the tokenizer, and its
`load_base_model` is replaced by one that builds the random model; everything else is the real
fullscale.train.train().

MFU = model FLOPs / (seconds x peak dense bf16 FLOP/s of the card), where model FLOPs of LoRA
training count, per real (non-padding) token, 2N for the forward and 2N for the backward through
the frozen weights (no weight gradients), N = the parameters of every matmul (the lm_head
included, the embedding lookup not), plus causal attention 6 x layers x hidden x n^2 per example
of n tokens (forward + backward, half of the n^2 scores). The recomputation of gradient
checkpointing and the padding are not counted: MFU measures useful work.

Timing: the GPU is synchronised at the end of the last warm-up step and at the end of the last
measured step only (no extra syncs inside the window); tokens come from the known batches.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import itertools
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_throughput import bare_update, word_tokenizer, write_data  # noqa: E402

IGNORE_INDEX = -100

SIZES = {  # Llama shapes: (hidden, layers, heads, kv heads, intermediate, vocab)
    "8b": (4096, 32, 32, 8, 14336, 128256),      # Llama-3-8B
    "3b": (3072, 28, 24, 8, 8192, 128256),       # Llama-3.2-3B
    "1b": (2048, 16, 32, 8, 8192, 128256),       # Llama-3.2-1B
    "tiny": (256, 2, 4, 2, 512, 4096),           # for --allow-cpu checks of this script
}

# Peak dense bf16 tensor FLOP/s (no sparsity), by device name; --peak-tflops overrides.
PEAK_TFLOPS = [("H200", 989.4), ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.4), ("GH200", 989.4),
               ("A100", 312.0), ("L40S", 362.1), ("A10G", 70.0), ("L4", 121.0)]

_RUN_IDS = itertools.count(1)


def peak_flops(name: str, override: float | None) -> float | None:
    if override:
        return override * 1e12
    for key, tflops in PEAK_TFLOPS:
        if key in name:
            return tflops * 1e12
    return None


def llama_config(size: str, tokenizer, max_seq_length: int):
    from transformers import LlamaConfig

    hidden, layers, heads, kv, ff, vocab = SIZES[size]
    assert len(tokenizer) == vocab
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=kv, intermediate_size=ff, max_position_embeddings=max(8192, max_seq_length),
                       rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)


def matmul_params(config) -> int:
    """Parameters of every matmul a token goes through: attention, MLP, lm_head."""
    d, kv_dim = config.hidden_size, config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)
    per_layer = 2 * d * d + 2 * d * kv_dim + 3 * d * config.intermediate_size
    return config.num_hidden_layers * per_layer + d * config.vocab_size


def build_random_model(config, *, dtype, device, attn: str = "sdpa"):
    """A LlamaForCausalLM with random weights, built directly on `device` in `dtype`."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=dtype, attn_implementation=attn)
    model.config.use_cache = False
    return model


# ----------------------------------------------------------------------------- batches and FLOPs

def step_lengths(items: list[dict], *, steps: int, packed: bool) -> list[list[int]]:
    """The example lengths each optimizer step trains on, in fullscale's order (batch 8 x 4)."""
    from fullscale import sampler

    out: list[list[int]] = []
    epoch = 0
    while len(out) < steps:
        batches = sampler.global_micro_batches(len(items), seed=0, epoch=epoch, global_batch_size=8, num_processes=1)
        for w in range(0, len(batches), 4):
            lengths = []
            for b in batches[w:w + 4]:
                for i in b:
                    lengths += items[i]["lengths"] if packed else [len(items[i]["input_ids"])]
            out.append(lengths)
        epoch += 1
    return out[:steps]


def model_flops(lengths: list[int], *, n_matmul: int, layers: int, hidden: int) -> float:
    tokens = sum(lengths)
    return 4 * n_matmul * tokens + 6 * layers * hidden * sum(n * n for n in lengths)


class Window:
    """Wall time from the end of step `first` to the end of step `last`, the device synchronised
    at those two points only."""

    def __init__(self, first: int, last: int, device: torch.device):
        self.first, self.last, self.device = first, last, device
        self.times: dict[int, float] = {}

    def step_end(self, step: int) -> None:
        if step in (self.first, self.last):
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.times[step] = time.perf_counter()

    @property
    def seconds(self) -> float:
        return self.times[self.last] - self.times[self.first]


def fresh_start(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        left = torch.cuda.memory_allocated(device) / 1024**3
        if left > 0.5:   # a previous contender's model still alive would skew memory and may cause OOM
            print(f"  (note: {left:.1f} GB still allocated from earlier contenders)")


def peak_memory_gb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 1024**3 if device.type == "cuda" else float("nan")


# ----------------------------------------------------------------------------- contenders

def fullscale_values(args, name: str, **over) -> dict:
    values = dict(model_name_or_path=str(args.model_dir), train_file=str(args.train_file),
                  output_dir=str(args.workdir / f"{name}-{next(_RUN_IDS)}"), max_seq_length=args.max_seq_length,
                  eval_split=0.0, max_steps=args.warmup + args.steps, per_device_train_batch_size=8,
                  gradient_accumulation_steps=4, learning_rate=2e-4, warmup_ratio=0.05, weight_decay=0.01,
                  lr_scheduler_type="cosine", max_grad_norm=1.0, lora_rank=32, lora_alpha=32, lora_dropout=0.05,
                  gradient_checkpointing=True, bf16=args.bf16, attn_implementation="sdpa", report_to="none",
                  logging_steps=10, save_steps=1_000_000, seed=0, dataloader_num_workers=0)
    values.update(over)
    return values


@contextlib.contextmanager
def random_base_model(args):
    """fullscale.model.load_base_model builds the random model instead of reading weights."""
    from fullscale import model as model_module

    original = model_module.load_base_model

    def load(config, choices):
        return build_random_model(args.llama_config, dtype=choices.dtype, device=args.device,
                                  attn=choices.attn_implementation)

    model_module.load_base_model = load
    try:
        yield
    finally:
        model_module.load_base_model = original


def run_fullscale(args, name: str, **over) -> dict:
    from fullscale import faults
    from fullscale.config import load_config
    from fullscale.train import train

    fresh_start(args.device)
    config = load_config(None, fullscale_values(args, name, **over))
    window = Window(args.warmup, args.warmup + args.steps, args.device)
    original = faults.hit

    def hit(point, step=None):   # called once per step, right after the optimizer step
        if point == "step":
            window.step_end(faults.current_step)
        original(point, step)

    faults.hit = hit
    console = io.StringIO()
    try:
        with random_base_model(args):
            result = train(config, stream=console)
    finally:
        faults.hit = original
    result.clear()   # drop the model it holds
    notes = [line for line in console.getvalue().splitlines() if line.startswith("packing:")]
    return {"seconds": window.seconds, "peak_gb": peak_memory_gb(args.device), "notes": notes}


def run_bare(args, examples: list[dict], *, packed: bool) -> dict:
    from transformers import get_scheduler

    from fullscale import sampler
    from fullscale.config import load_config
    from fullscale.data import collate, collate_packed, pack_examples
    from fullscale.loss import LabelledHead
    from fullscale.model import build_model, choose

    fresh_start(args.device)
    config = load_config(None, fullscale_values(args, "bare"))
    with random_base_model(args):
        model = build_model(config, choose(config, args.device))
    model.to(args.device).train()
    head = LabelledHead(model)   # fullscale's model computation: logits only at labelled positions
    if packed:
        examples, _ = pack_examples(examples, max_seq_length=args.max_seq_length, seed=0)
    collate_fn = collate_packed if packed else collate
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.01)
    total = args.warmup + args.steps
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=math.ceil(0.05 * total), num_training_steps=total)
    window = Window(args.warmup, total, args.device)
    step, epoch = 0, 0
    while step < total:
        batches = sampler.global_micro_batches(len(examples), seed=0, epoch=epoch, global_batch_size=8, num_processes=1)
        for w in range(0, len(batches), 4):
            if step >= total:
                break
            micro = [collate_fn([examples[i] for i in b], pad_token_id=0) for b in batches[w:w + 4]]
            bare_update(model, head, micro, params, optimizer, scheduler, device=args.device)
            step += 1
            window.step_end(step)
        epoch += 1
    seconds = window.seconds
    del model, optimizer, params
    return {"seconds": seconds, "peak_gb": peak_memory_gb(args.device)}


def run_trainer(args, examples: list[dict]) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    from fullscale import sampler

    fresh_start(args.device)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = build_random_model(args.llama_config, dtype=torch.bfloat16 if args.bf16 else torch.float32,
                               device=args.device)
    model = get_peft_model(model, LoraConfig(r=32, lora_alpha=32, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    window = Window(args.warmup, args.warmup + args.steps, args.device)

    class Mark(TrainerCallback):
        def on_step_end(self, targs, state, control, **kwargs):
            window.step_end(state.global_step)

    order = sampler.epoch_order(len(examples), seed=0, epoch=0)   # fullscale's micro-batches, read in order
    needed = (args.warmup + args.steps) * 32
    assert needed <= len(order), "use more --rows: the Trainer reads one epoch of fullscale's order"
    features = [{"input_ids": examples[i]["input_ids"], "attention_mask": [1] * len(examples[i]["input_ids"]),
                 "labels": examples[i]["labels"]} for i in order[:needed]]
    targs = TrainingArguments(
        output_dir=str(args.workdir / f"trainer-{next(_RUN_IDS)}"), max_steps=args.warmup + args.steps,
        per_device_train_batch_size=8, gradient_accumulation_steps=4, learning_rate=2e-4, warmup_steps=0.05,
        weight_decay=0.01, lr_scheduler_type="cosine", max_grad_norm=1.0, logging_steps=10, save_strategy="no",
        eval_strategy="no", report_to="none", gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False}, dataloader_num_workers=0, seed=0, disable_tqdm=True,
        bf16=args.bf16, tf32=args.device.type == "cuda" or None, use_cpu=args.device.type == "cpu",
        train_sampling_strategy="sequential")
    trainer = Trainer(model=model, args=targs, train_dataset=features,
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX,
                                                           return_tensors="pt"),
                      callbacks=[Mark()])
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.train()
    seconds = window.seconds
    del trainer, model
    return {"seconds": seconds, "peak_gb": peak_memory_gb(args.device), "notes": [f"optimizer {targs.optim.value}"]}


# ----------------------------------------------------------------------------- main

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="8b")
    p.add_argument("--rows", type=int, default=4000)
    p.add_argument("--max-seq-length", type=int, default=1024)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--peak-tflops", type=float, help="the card's peak dense bf16 TFLOP/s (default: by device name)")
    p.add_argument("--only", nargs="*", help="contenders to run (default: all)")
    p.add_argument("--allow-cpu", action="store_true", help="run on the CPU when there is no GPU (checks the script)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)

    if torch.cuda.is_available():
        args.device = torch.device("cuda", torch.cuda.current_device())
    elif args.allow_cpu:
        args.device = torch.device("cpu")
    else:
        print("bench_gpu: no CUDA device here; skipped (run it on a GPU machine, or pass --allow-cpu --size tiny "
              "to check the script on the CPU)")
        return 0
    args.bf16 = args.device.type == "cuda" and torch.cuda.is_bf16_supported()
    if args.device.type == "cuda":   # the same for every contender (fullscale's tf32: auto turns it on anyway)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.workdir = Path(tempfile.mkdtemp(prefix="fullscale-bench-gpu-"))
    os.environ["FULLSCALE_CACHE"] = str(args.workdir / "cache")
    try:
        return _run(args)
    finally:
        shutil.rmtree(args.workdir, ignore_errors=True)


def _run(args) -> int:
    import transformers

    from fullscale.data import pack_examples, prepare_data

    started = time.perf_counter()
    name = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else "cpu"
    peak = peak_flops(name, args.peak_tflops)
    print(f"device: {name}; peak bf16 {peak / 1e12:.0f} TFLOP/s" if peak else f"device: {name}; peak FLOP/s unknown "
          f"(give --peak-tflops for MFU)")
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}; "
          f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    hidden, layers, *_, vocab = SIZES[args.size]
    tokenizer = word_tokenizer(vocab)
    args.model_dir = args.workdir / "model"        # config.json + tokenizer, no weights
    args.llama_config = llama_config(args.size, tokenizer, args.max_seq_length)
    args.llama_config.save_pretrained(args.model_dir)
    tokenizer.save_pretrained(args.model_dir)
    args.train_file = args.workdir / "train.jsonl"
    write_data(args.train_file, rows=args.rows, max_seq_length=args.max_seq_length, vocab_size=vocab)
    data = prepare_data(train_file=args.train_file, eval_file=None, eval_split=0.0, dataset_format="prompt_completion",
                        max_seq_length=args.max_seq_length, seed=0, tokenizer=tokenizer)
    examples = data.train
    packed, packing = pack_examples(examples, max_seq_length=args.max_seq_length, seed=0)
    n_matmul = matmul_params(args.llama_config)
    print(f"model: Llama {args.size} shape, {n_matmul / 1e6:,.0f}M matmul parameters, bf16 {args.bf16}, random "
          f"weights; {len(examples):,} rows of 20-{args.max_seq_length} tokens (log-uniform)\n{packing.describe()}\n"
          f"{args.warmup} warm-up + {args.steps} measured steps of 8 x 4 sequences each\n")

    window_steps = slice(args.warmup, args.warmup + args.steps)
    lengths = {"unpacked": step_lengths(examples, steps=args.warmup + args.steps, packed=False)[window_steps],
               "packed": step_lengths(packed, steps=args.warmup + args.steps, packed=True)[window_steps]}
    plan = {
        "trainer": ("unpacked", lambda: run_trainer(args, examples)),
        "bare": ("unpacked", lambda: run_bare(args, examples, packed=False)),
        "fullscale": ("unpacked", lambda: run_fullscale(args, "fullscale")),
        "fullscale+pack": ("packed", lambda: run_fullscale(args, "fullscale+pack", packing=True)),
    }
    results = {}
    for label, (batches, run) in plan.items():
        if args.only and label not in args.only:
            continue
        t0 = time.perf_counter()
        try:
            out = run()
        except torch.OutOfMemoryError as exc:
            print(f"{label:15s} out of memory: {str(exc).splitlines()[0]}")
            continue
        step_list = lengths[batches]
        tokens = sum(sum(x) for x in step_list)
        flops = sum(model_flops(x, n_matmul=n_matmul, layers=layers, hidden=hidden) for x in step_list)
        out.update(batches=batches, tokens_per_s=tokens / out["seconds"], step_time=out["seconds"] / args.steps,
                   mfu=flops / out["seconds"] / peak if peak else None)
        results[label] = out
        mfu = f"MFU {100 * out['mfu']:5.1f}%" if out["mfu"] is not None else "MFU n/a"
        print(f"{label:15s} {out['tokens_per_s']:9,.0f} real tokens/s  {out['step_time']:6.2f} s/step  {mfu}  "
              f"peak {out['peak_gb']:.1f} GB  [{time.perf_counter() - t0:.0f} s]"
              + (f"  {'; '.join(out.get('notes', []))}" if out.get("notes") else ""), flush=True)

    if "trainer" in results:
        base = results["trainer"]
        print("\n| contender | batches | real tokens/s | s/step | MFU | peak GB | vs Trainer |\n|---|---|---:|---:|---:|---:|---:|")
        for label, r in results.items():
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
            print(f"| {label} | {r['batches']} | {r['tokens_per_s']:,.0f} | {r['step_time']:.2f} | {mfu} | "
                  f"{r['peak_gb']:.1f} | {r['tokens_per_s'] / base['tokens_per_s']:.2f}x |")
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"device": name, "size": args.size, "peak_flops": peak,
                                         "packing": packing.describe(), "results": results}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
