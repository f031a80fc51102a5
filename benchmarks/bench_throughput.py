"""Training throughput on this machine's CPU: fullscale against the transformers Trainer + peft
and against a bare PyTorch loop, with the same model, data, batches and settings; and the cost
of checkpoints.

    python benchmarks/bench_throughput.py              # the recorded run (~7 min on 2 quiet cores)
    python benchmarks/bench_throughput.py --quick      # a smoke run (~2 min)
    python benchmarks/bench_throughput.py --rounds 2   # twice as long, steadier on a busy machine

Contenders, one after the other in this one process, each for the same optimizer steps:

  bare           a bare PyTorch loop on fullscale's batches: forward, backward, clip, AdamW,
                 scheduler, nothing else (the floor for loop overhead)
  trainer        transformers Trainer + peft, dynamic padding (DataCollatorForSeq2Seq), fed the
                 same examples in the same order (sequential sampler over fullscale's epoch order),
                 so its micro-batches are exactly fullscale's
  fullscale      fullscale.train.train(config), packing off
  fullscale+pack fullscale.train.train(config), packing on
  bare+pack      the bare loop on fullscale's packed batches (the floor for fullscale+pack)
  fullscale+ckpt fullscale, packing off, saving a checkpoint every 10 steps (2 saves inside the
                 measured steps; the others save none there)

With --what-if, two more: fullscale (packing off and on) with its loss computed the way
transformers computes it (labels shifted instead of logits sliced; see label_shift_loss).

Settings shared by all (the textbook's): lr 2e-4, batch 8, accumulation 4, LoRA r32 alpha 32
dropout 0.05 on q/k/v/o, warmup 5%, weight decay 0.01, cosine, clip 1.0, fp32, sdpa attention,
gradient checkpointing off for all (on a CPU it only costs time). The model is a Llama built
from a LlamaConfig with random weights; the tokenizer maps one word to one token, so the
generated rows have exact token lengths: log-uniform from 20 to max_seq_length.

Measured, per optimizer step after the warm-up: wall time (from the end of the previous step to
the end of this one, so logging and saving count), real (non-padding) and padded tokens, and the
CPU time other processes of the machine took meanwhile. This machine may be shared: a step
during which other processes took more than 5% of a core is "disturbed" and left out (with
--rounds N, each step keeps its least disturbed measurement). Contenders on the same batches are
compared step by step on the steps clean for both. Peak memory is the process's peak resident
set (VmHWM) during the contender, reset at its start.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib
import io
import itertools
import json
import math
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

IGNORE_INDEX = -100
FOREIGN_LIMIT = 0.05   # a step is disturbed when other processes took more than this share of a core


# ----------------------------------------------------------------------------- model, tokenizer, data

def word_tokenizer(vocab_size: int):
    """A fast tokenizer whose every word is one token: <pad> <s> </s> <unk> + (vocab_size - 4) words."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for i in range(vocab_size - len(specials)):
        vocab[f"w{i}"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def save_model(path: Path, tokenizer, *, hidden: int, layers: int, max_seq_length: int) -> tuple[Path, int]:
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = max(1, hidden // 64)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 64 * 64,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=max(2048, max_seq_length), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, sum(p.numel() for p in model.parameters())


def write_data(path: Path, *, rows: int, max_seq_length: int, vocab_size: int, seed: int = 0) -> list[int]:
    """prompt/completion rows of log-uniform total length 20..max_seq_length tokens (BOS and EOS
    included), the prompt about a third of it. Returns the lengths."""
    rng = random.Random(seed)
    lengths = []
    with open(path, "w") as fh:
        for _ in range(rows):
            total = int(round(math.exp(rng.uniform(math.log(20), math.log(max_seq_length)))))
            words = total - 2                                  # + BOS + EOS
            prompt = max(1, words // 3)
            ids = [f"w{rng.randrange(vocab_size - 4)}" for _ in range(words)]
            fh.write(json.dumps({"prompt": " ".join(ids[:prompt]), "completion": " " + " ".join(ids[prompt:])}) + "\n")
            lengths.append(total)
    return lengths


# ----------------------------------------------------------------------------- measuring

_RUN_IDS = itertools.count(1)  # a fresh output_dir per fullscale run (the same one would resume)
TOKENS = {"real": 0, "padded": 0}  # the contender's batches add their tokens here as they are made


def count_batch(batch: dict) -> dict:
    mask = batch.get("real_mask", batch.get("attention_mask"))
    TOKENS["real"] += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
    TOKENS["padded"] += batch["input_ids"].numel()
    return batch


def rss_gb(field_name: str = "VmRSS") -> float:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) / 1024**2
    except OSError:
        pass
    return float("nan")


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux: write 5 to clear_refs), where allowed."""
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def machine_busy_seconds() -> float:
    """CPU seconds all processes of the machine have run (user, nice, system, irq, softirq, steal)."""
    try:
        with open("/proc/stat") as fh:
            fields = [int(x) for x in fh.readline().split()[1:]]
    except OSError:
        return float("nan")
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / _TICK


def wait_for_quiet(max_seconds: float = 90.0) -> float:
    """Wait (up to max_seconds) until other processes use less than FOREIGN_LIMIT of a core."""
    start = time.perf_counter()
    while time.perf_counter() - start < max_seconds:
        m0, c0, t0 = machine_busy_seconds(), time.process_time(), time.perf_counter()
        time.sleep(1.0)
        foreign = (machine_busy_seconds() - m0) - (time.process_time() - c0)
        if not foreign / (time.perf_counter() - t0) > FOREIGN_LIMIT:
            break
    return time.perf_counter() - start - 1.0


@dataclass
class Step:
    seconds: float
    real: int
    padded: int
    foreign: float  # share of a core other processes used during the step


@dataclass
class Result:
    """One contender, over one or more rounds: per measured step its least disturbed clean
    measurement (steps disturbed in every round are absent)."""

    name: str
    batches: str                    # "unpacked" or "packed": contenders on the same batches pair up
    steps: dict[int, Step] = field(default_factory=dict)
    num_measured: int = 0
    num_disturbed: int = 0
    peak_rss_gb: float = 0.0
    saves: list[tuple[int, float]] = field(default_factory=list)  # (step, seconds) of saves inside the window
    notes: list[str] = field(default_factory=list)

    def add_round(self, steps: dict[int, Step], *, peak_rss_gb: float, saves=(), notes=()) -> None:
        for s, x in steps.items():
            self.num_measured += 1
            if x.foreign > FOREIGN_LIMIT:
                self.num_disturbed += 1
            elif s not in self.steps or x.seconds < self.steps[s].seconds:
                self.steps[s] = x
        self.peak_rss_gb = max(self.peak_rss_gb, peak_rss_gb)
        self.saves += list(saves)
        self.notes += [n for n in notes if n not in self.notes]

    def over(self, keys) -> tuple[float, int, int]:
        keys = [k for k in keys if k in self.steps]
        return (sum(self.steps[k].seconds for k in keys), sum(self.steps[k].real for k in keys),
                sum(self.steps[k].padded for k in keys))

    @property
    def tokens_per_s(self) -> float:
        seconds, real, _ = self.over(self.steps)
        return real / seconds if seconds else float("nan")

    @property
    def step_time(self) -> float:
        return self.over(self.steps)[0] / max(1, len(self.steps))

    @property
    def padding_share(self) -> float:
        _, real, padded = self.over(self.steps)
        return 1 - real / max(1, padded)


def paired(a: Result, b: Result, *, skip=()) -> tuple[float, float, int]:
    """a against b on the steps clean in both: (a's tokens/s / b's, median of a's step time / b's,
    number of steps). Needs the same batches (then tokens/s compare on the same tokens)."""
    common = sorted(set(a.steps) & set(b.steps) - set(skip))
    if not common:
        return float("nan"), float("nan"), 0
    ta, ra, _ = a.over(common)
    tb, rb, _ = b.over(common)
    return (ra / ta) / (rb / tb), statistics.median(a.steps[s].seconds / b.steps[s].seconds for s in common), len(common)


class Window:
    """Marks at the end of each step from `first` (the warm-up's last) to `last`."""

    def __init__(self, first: int, last: int):
        self.first, self.last = first, last
        self.marks: dict[int, tuple[float, int, int, float, float]] = {}

    def step_end(self, step: int) -> None:
        if self.first <= step <= self.last:
            self.marks[step] = (time.perf_counter(), TOKENS["real"], TOKENS["padded"], time.process_time(),
                                machine_busy_seconds())

    def steps(self) -> dict[int, Step]:
        out = {}
        for s in range(self.first + 1, self.last + 1):
            (t0, r0, p0, c0, m0), (t1, r1, p1, c1, m1) = self.marks[s - 1], self.marks[s]
            foreign = max(0.0, (m1 - m0) - (c1 - c0)) / max(t1 - t0, 1e-9)
            out[s] = Step(seconds=t1 - t0, real=r1 - r0, padded=p1 - p0, foreign=foreign)
        return out


def fresh_start() -> None:
    gc.collect()
    reset_peak_rss()


# ----------------------------------------------------------------------------- contenders

def fullscale_values(args, name: str, **over) -> dict:
    values = dict(model_name_or_path=str(args.model_dir), train_file=str(args.train_file),
                  output_dir=str(args.workdir / f"{name}-{next(_RUN_IDS)}"), max_seq_length=args.max_seq_length,
                  eval_split=0.0, max_steps=args.warmup + args.steps, per_device_train_batch_size=8,
                  gradient_accumulation_steps=4, learning_rate=2e-4, warmup_ratio=0.05, weight_decay=0.01,
                  lr_scheduler_type="cosine", max_grad_norm=1.0, lora_rank=32, lora_alpha=32, lora_dropout=0.05,
                  gradient_checkpointing=False, bf16=False, attn_implementation="sdpa", report_to="none",
                  logging_steps=10, save_steps=1_000_000, seed=0, dataloader_num_workers=0)
    values.update(over)
    return values


def run_trainer(args, examples: list[dict]) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainerCallback,
                              TrainingArguments)

    from fullscale import sampler

    fresh_start()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=32, lora_alpha=32, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    window = Window(args.warmup, args.warmup + args.steps)

    class Mark(TrainerCallback):
        def on_step_end(self, targs, state, control, **kwargs):   # after the optimizer step, before logging
            window.step_end(state.global_step)

    # Tokens are counted as the model receives them: the Trainer's data loader (accelerate's)
    # collates one micro-batch ahead, which would shift the per-step counts.
    def count_input(module, args_, kwargs):
        mask = kwargs["attention_mask"]
        TOKENS["real"] += int(mask.sum())
        TOKENS["padded"] += mask.numel()

    model.register_forward_pre_hook(count_input, with_kwargs=True)
    # fullscale's epoch order, read sequentially: the Trainer's micro-batches are fullscale's.
    order = sampler.epoch_order(len(examples), seed=0, epoch=0)
    needed = (args.warmup + args.steps) * 32
    order = (order * math.ceil(needed / len(order)))[:needed]
    features = [{"input_ids": examples[i]["input_ids"], "attention_mask": [1] * len(examples[i]["input_ids"]),
                 "labels": examples[i]["labels"]} for i in order]
    targs = TrainingArguments(
        output_dir=str(args.workdir / f"trainer-{next(_RUN_IDS)}"), max_steps=args.warmup + args.steps,
        per_device_train_batch_size=8, gradient_accumulation_steps=4, learning_rate=2e-4, warmup_steps=0.05,
        weight_decay=0.01, lr_scheduler_type="cosine", max_grad_norm=1.0, logging_steps=10, save_strategy="no",
        eval_strategy="no", report_to="none", gradient_checkpointing=False, dataloader_num_workers=0, use_cpu=True,
        seed=0, disable_tqdm=True, bf16=False, fp16=False, train_sampling_strategy="sequential")
    trainer = Trainer(model=model, args=targs, train_dataset=features,
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX,
                                                           return_tensors="pt"),
                      callbacks=[Mark()])
    with contextlib.redirect_stdout(io.StringIO()):   # its log dicts
        trainer.train()
    return {"steps": window.steps(), "peak_rss_gb": rss_gb("VmHWM"), "notes": [f"optimizer {targs.optim.value}"]}


def run_bare(args, examples: list[dict], *, packed: bool) -> dict:
    """The floor: fullscale's model set-up and batches, and only what a step must do."""
    from transformers import get_scheduler

    from fullscale import sampler
    from fullscale.config import load_config
    from fullscale.data import collate, collate_packed, pack_examples
    from fullscale.loss import token_loss_sum
    from fullscale.model import build_model, choose

    fresh_start()
    config = load_config(None, fullscale_values(args, "bare"))
    torch.manual_seed(config.seed)
    model = build_model(config, choose(config, torch.device("cpu")))
    model.train()
    if packed:
        examples, _ = pack_examples(examples, max_seq_length=args.max_seq_length, seed=config.seed)
    collate_fn = collate_packed if packed else collate
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.01)
    total = args.warmup + args.steps
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=math.ceil(0.05 * total), num_training_steps=total)
    window = Window(args.warmup, total)
    step, epoch = 0, 0
    while step < total:
        batches = sampler.global_micro_batches(len(examples), seed=config.seed, epoch=epoch, global_batch_size=8,
                                               num_processes=1)
        for w in range(0, len(batches), 4):
            if step >= total:
                break
            micro = [count_batch(collate_fn([examples[i] for i in b], pad_token_id=0)) for b in batches[w:w + 4]]
            n_tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro)
            for batch in micro:
                inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
                loss_sum, _ = token_loss_sum(model(**inputs, use_cache=False).logits, batch["labels"])
                (loss_sum / n_tokens).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            window.step_end(step)
        epoch += 1
    return {"steps": window.steps(), "peak_rss_gb": rss_gb("VmHWM")}


def label_shift_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fullscale.loss.token_loss_sum computed the way transformers' ForCausalLMLoss does it: the
    labels are shifted (padded with -100) instead of the logits being sliced, so no (B, T-1, V)
    copy of the logits is made (nor its gradient's). The same value (what-if contenders only)."""
    import torch.nn.functional as F

    shift_labels = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]      # (B, T): position t predicts t+1
    total = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), shift_labels.reshape(-1),
                            ignore_index=IGNORE_INDEX, reduction="sum")
    return total, (shift_labels != IGNORE_INDEX).sum()


def run_fullscale(args, name: str, *, what_if_loss: bool = False, **over) -> dict:
    from fullscale import data as data_module
    from fullscale import faults, monitor
    train_module = importlib.import_module("fullscale.train")  # (fullscale.train is also the function)
    from fullscale.config import load_config
    from fullscale.train import train

    fresh_start()
    config = load_config(None, fullscale_values(args, name, **over))
    window = Window(args.warmup, args.warmup + args.steps)
    saves: list[tuple[int, float]] = []
    originals = (faults.hit, monitor.Monitor.event, data_module.collate, data_module.collate_packed,
                 train_module.token_loss_sum)

    # Observe, change nothing: the loop looks these up at call time. faults.hit("step") is
    # called once per step right after the optimizer step (where the Trainer calls on_step_end).
    def hit(point, step=None):
        if point == "step":
            window.step_end(faults.current_step)
        originals[0](point, step)

    def event(self, kind, step, **values):
        originals[1](self, kind, step, **values)
        if kind == "checkpoint":
            saves.append((step, values["seconds"]))

    faults.hit, monitor.Monitor.event = hit, event
    data_module.collate = lambda ex, **kw: count_batch(originals[2](ex, **kw))
    data_module.collate_packed = lambda ex, **kw: count_batch(originals[3](ex, **kw))
    if what_if_loss:
        train_module.token_loss_sum = label_shift_loss
    console = io.StringIO()
    try:
        train(config, stream=console)
    finally:
        (faults.hit, monitor.Monitor.event, data_module.collate, data_module.collate_packed,
         train_module.token_loss_sum) = originals
    # A step's checkpoint is written after its faults.hit("step"), so it lands in the next step's
    # time: saves of steps first..last-1 are inside the window.
    inside = [(s, sec) for s, sec in saves if window.first <= s < window.last]
    notes = [line for line in console.getvalue().splitlines() if line.startswith("packing:")]
    return {"steps": window.steps(), "peak_rss_gb": rss_gb("VmHWM"), "saves": inside, "notes": notes}


# ----------------------------------------------------------------------------- report

def machine() -> dict:
    import subprocess

    import accelerate
    import peft
    import transformers

    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    model_name = next((line.split(":", 1)[1].strip() for line in lscpu if line.startswith("Model name")), "?")
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "nproc": os.cpu_count(),
            "cpu": model_name, "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "accelerate": accelerate.__version__, "platform": platform.platform()}


def table(results: dict[str, Result]) -> str:
    trainer = results.get("trainer")
    lines = ["| contender | batches | real tokens/s | s/step | padding | peak RSS GB | vs Trainer (tokens/s) | "
             "step time vs bare loop (paired median) | steps used |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results.values():
        if trainer is None or r is trainer:
            vs_trainer = "-"
        elif r.batches == trainer.batches:
            vs_trainer = f"{paired(r, trainer)[0]:.2f}x (paired)"
        else:
            vs_trainer = f"{r.tokens_per_s / trainer.tokens_per_s:.2f}x"
        floor = results.get("bare+pack" if r.batches == "packed" else "bare")
        vs_floor = "-" if floor is None or floor is r else f"{paired(r, floor)[1]:.3f}x"
        lines.append(f"| {r.name} | {r.batches} | {r.tokens_per_s:,.0f} | {r.step_time:.3f} | "
                     f"{100 * r.padding_share:.1f}% | {r.peak_rss_gb:.2f} | {vs_trainer} | {vs_floor} | "
                     f"{len(r.steps)}/{r.num_measured} |")
    return "\n".join(lines)


def targets(results: dict[str, Result], packing_efficiency: float, save_every: int) -> list[tuple[str, bool, str]]:
    t, b, bp = results.get("trainer"), results.get("bare"), results.get("bare+pack")
    fs, fp, fc = results.get("fullscale"), results.get("fullscale+pack"), results.get("fullscale+ckpt")
    out = []
    if fp and t:
        ratio = fp.tokens_per_s / t.tokens_per_s
        out.append(("fullscale+pack >= 2.0x Trainer real tokens/s", ratio >= 2.0, f"{ratio:.2f}x"))
    if fs and t:
        ratio, step_ratio, n = paired(fs, t)
        out.append(("fullscale (no packing) >= 1.1x Trainer real tokens/s", ratio >= 1.1,
                    f"{ratio:.2f}x on the same {n} steps (median step time ratio {step_ratio:.3f})"))
    if fs and b:
        _, step_ratio, n = paired(fs, b)
        out.append(("fullscale step time <= 1.05x the bare loop's", step_ratio <= 1.05,
                    f"{step_ratio:.3f}x (median over {n} paired steps)"))
    if fp and bp:
        _, step_ratio, n = paired(fp, bp)
        out.append(("fullscale+pack step time <= 1.05x the bare loop's on the packed batches", step_ratio <= 1.05,
                    f"{step_ratio:.3f}x (median over {n} paired steps)"))
    if fc and fs and fc.saves:
        per_save = statistics.mean(sec for _, sec in fc.saves)
        cost = per_save / (save_every * fs.step_time)
        # The same steps with and without saving: the extra time of the steps that hold a save.
        save_steps = sorted({s + 1 for s, _ in fc.saves})
        extra = [fc.steps[s].seconds - fs.steps[s].seconds for s in save_steps if s in fc.steps and s in fs.steps]
        measured = (f"; the steps holding a save took {statistics.mean(extra):+.3f} s vs the same steps without "
                    f"(noise included)") if extra else ""
        out.append((f"a checkpoint every {save_every} steps costs <= 2% throughput", cost <= 0.02,
                    f"{100 * cost:.2f}% ({per_save:.3f} s per save, timed by the loop, over {save_every} steps of "
                    f"{fs.step_time:.3f} s){measured}"))
    out.append(("packing efficiency >= 95% on this data", packing_efficiency >= 0.95, f"{100 * packing_efficiency:.1f}%"))
    return out


# ----------------------------------------------------------------------------- main

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=3000)
    p.add_argument("--max-seq-length", type=int, default=256)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--warmup", type=int, default=5, help="optimizer steps run before the measured ones")
    p.add_argument("--steps", type=int, default=20, help="measured optimizer steps")
    p.add_argument("--rounds", type=int, default=1, help="runs of every contender, interleaved")
    p.add_argument("--save-every", type=int, default=20, help="the checkpoint interval the cost is reported for")
    p.add_argument("--only", nargs="*", help="contenders to run (default: all)")
    p.add_argument("--what-if", action="store_true",
                   help="also run fullscale with the loss computed by shifting the labels, not the logits")
    p.add_argument("--quick", action="store_true", help="smoke run: 800 rows, 3 + 6 steps")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--verbose", action="store_true", help="print every measured step")
    args = p.parse_args(argv)
    if args.quick:
        args.rows, args.warmup, args.steps = 800, 3, 6
    if args.warmup < 1 or args.steps < 2:
        p.error("--warmup must be >= 1 and --steps >= 2")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args.workdir = Path(tempfile.mkdtemp(prefix="fullscale-bench-"))
    os.environ["FULLSCALE_CACHE"] = str(args.workdir / "cache")      # not the user's ~/.cache
    try:
        return _run(args)
    finally:
        shutil.rmtree(args.workdir, ignore_errors=True)


def _run(args) -> int:
    from fullscale.data import pack_examples, prepare_data

    started = time.perf_counter()
    info = machine()
    print(f"machine: {info['cpu']}, {info['nproc']} cores ({info['torch_threads']} torch threads); python "
          f"{info['python']}, torch {info['torch']}, transformers {info['transformers']}, peft {info['peft']}; "
          f"{info['date']}")
    tokenizer = word_tokenizer(args.vocab)
    args.model_dir, num_params = save_model(args.workdir / "model", tokenizer, hidden=args.hidden, layers=args.layers,
                                            max_seq_length=args.max_seq_length)
    args.train_file = args.workdir / "train.jsonl"
    lengths = write_data(args.train_file, rows=args.rows, max_seq_length=args.max_seq_length, vocab_size=args.vocab)
    data = prepare_data(train_file=args.train_file, eval_file=None, eval_split=0.0, dataset_format="prompt_completion",
                        max_seq_length=args.max_seq_length, seed=0, tokenizer=tokenizer)
    examples = data.train
    assert [len(ex["input_ids"]) for ex in examples] == lengths, "the tokenizer must give one token per word"
    _, packing = pack_examples(examples, max_seq_length=args.max_seq_length, seed=0)
    save_steps = 10 if args.steps > 10 else max(1, args.steps // 2)
    print(f"model: Llama, {num_params / 1e6:.1f}M parameters (hidden {args.hidden}, {args.layers} layers, vocab "
          f"{args.vocab}); data: {len(examples):,} rows of {min(lengths)}-{max(lengths)} tokens (mean "
          f"{sum(lengths) / len(lengths):.0f}), log-uniform\n{packing.describe()}\n"
          f"each contender: {args.warmup} warm-up steps, then {args.steps} measured steps of 8 x 4 sequences; "
          f"{args.rounds} round(s); fullscale+ckpt saves every {save_steps} steps\n")

    plan = {
        "bare": ("unpacked", lambda: run_bare(args, examples, packed=False)),
        "trainer": ("unpacked", lambda: run_trainer(args, examples)),
        "fullscale": ("unpacked", lambda: run_fullscale(args, "fullscale")),
        "fullscale+pack": ("packed", lambda: run_fullscale(args, "fullscale+pack", packing=True)),
        "bare+pack": ("packed", lambda: run_bare(args, examples, packed=True)),
        "fullscale+ckpt": ("unpacked", lambda: run_fullscale(args, "fullscale+ckpt", save_steps=save_steps)),
    }
    if args.what_if:
        plan["what-if: fullscale, label-shift loss"] = (
            "unpacked", lambda: run_fullscale(args, "fullscale-wi", what_if_loss=True))
        plan["what-if: fullscale+pack, label-shift loss"] = (
            "packed", lambda: run_fullscale(args, "fullscale+pack-wi", what_if_loss=True, packing=True))
    results: dict[str, Result] = {}
    for round_index in range(args.rounds):
        for name, (batches, run) in plan.items():
            if args.only and name not in args.only:
                continue
            waited = wait_for_quiet()
            t0 = time.perf_counter()
            out = run()
            r = results.setdefault(name, Result(name, batches))
            r.add_round(out["steps"], peak_rss_gb=out["peak_rss_gb"], saves=out.get("saves", ()),
                        notes=out.get("notes", ()))
            disturbed = sum(x.foreign > FOREIGN_LIMIT for x in out["steps"].values())
            print(f"[{round_index + 1}] {name:15s} {r.tokens_per_s:8,.0f} real tokens/s  {r.step_time:6.3f} s/step  "
                  f"padding {100 * r.padding_share:4.1f}%  peak RSS {out['peak_rss_gb']:.2f} GB  "
                  f"[{time.perf_counter() - t0:.0f} s{f', waited {waited:.0f} s for a quiet machine' if waited > 1 else ''}"
                  f"{f', {disturbed} steps disturbed by other processes' if disturbed else ''}]", flush=True)
            if args.verbose:
                for s, x in out["steps"].items():
                    print(f"      step {s:3d}: {x.seconds:7.3f} s  {x.real:6d} real / {x.padded:6d} tokens  "
                          f"others {100 * x.foreign:5.1f}% of a core")
    print()
    print(table(results))
    print()
    for what, ok, value in targets(results, packing.efficiency, args.save_every):
        print(f"  [{'met' if ok else 'MISSED'}] {what}: {value}")
    for r in results.values():
        if r.notes:
            print(f"  note {r.name}: {'; '.join(r.notes)}")
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({
            "machine": info, "args": {k: str(v) for k, v in vars(args).items()}, "packing": packing.describe(),
            "results": {k: {"batches": r.batches, "tokens_per_s": r.tokens_per_s, "step_time": r.step_time,
                            "padding_share": r.padding_share, "peak_rss_gb": r.peak_rss_gb,
                            "num_measured": r.num_measured, "num_disturbed": r.num_disturbed, "saves": r.saves,
                            "steps": {s: vars(x) for s, x in r.steps.items()}} for k, r in results.items()}},
            indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
