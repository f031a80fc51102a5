"""Training throughput on this machine's CPU: fullscale against the transformers Trainer + peft
and against a bare PyTorch loop, with the same model, data, batches and settings; and the cost
of checkpoints.

    python benchmarks/bench_throughput.py              # the recorded run (~8 min on 2 cores)
    python benchmarks/bench_throughput.py --quick      # a smoke run (~2 min)

Contenders:

  bare           a bare PyTorch loop on fullscale's batches and with fullscale's model computation
                 (logits only at labelled positions, fullscale.loss.LabelledHead): forward,
                 backward, clip, AdamW, scheduler, nothing else (the floor for loop overhead)
  trainer        transformers Trainer + peft, dynamic padding (DataCollatorForSeq2Seq), fed the
                 same examples in the same order (sequential sampler over fullscale's epoch order),
                 so its micro-batches are exactly fullscale's
  fullscale      fullscale.train.train(config), packing off
  fullscale+ckpt fullscale, packing off, saving a checkpoint every 10 steps
  fullscale+pack fullscale.train.train(config), packing on
  bare+pack      the bare loop on fullscale's packed batches (the floor for fullscale+pack)
  fullscale+group  fullscale with group_by_length (batches of similar length), packing off

Settings shared by all (the textbook's): lr 2e-4, batch 8, accumulation 4, LoRA r32 alpha 32
dropout 0.05 on q/k/v/o, warmup 5%, weight decay 0.01, cosine, clip 1.0, fp32, sdpa attention,
gradient checkpointing off for all (on a CPU it only costs time). The model is a Llama built
from a LlamaConfig with random weights; the tokenizer maps one word to one token, so the
generated rows have exact token lengths: log-uniform from 20 to max_seq_length.

How, and why so: this machine's speed drifts by 10-20% over minutes (shared host), more than
the differences measured, so contenders run in *lockstep* groups inside this one process: one
optimizer step of each in turn (fullscale in the main thread; the others in threads that wait
while another runs, so only one ever computes), every contender of a group on the same steps at
nearly the same moment. Each group has a bare loop; ratios between groups go through it
(fullscale / Trainer = (fullscale / bare) / (Trainer / bare)). Per step: active wall time (from
the contender's resumption to the end of its step, so its logging and saving count, its waiting
does not), real (non-padding) and padded tokens, and the CPU other processes took meanwhile; a
step during which they took more than 5% of a core is "disturbed" and left out for every
contender of the group. Peak memory is the process's peak resident set (VmHWM) during a group
(all of the group's models are resident).
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
import threading
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

def _unobserved_collate():
    from fullscale import data

    return data.collate, data.collate_packed


UNOBSERVED_COLLATE = _unobserved_collate()
_RUN_IDS = itertools.count(1)  # a fresh output_dir per fullscale run (the same one would resume)
TOKENS = {"real": 0, "padded": 0}  # batches add their tokens here as they are made (one contender runs at a time)


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


@dataclass
class Step:
    seconds: float   # active wall time
    real: int        # real (non-padding) tokens
    padded: int      # tokens including padding
    cpu: float       # CPU seconds of this process (all threads) in the step
    foreign: float   # share of a core other processes used during the step


class Clock:
    """One contender's steps: active time from its resumption to the end of each step."""

    def __init__(self, name: str, first: int, last: int):
        self.name, self.first, self.last = name, first, last
        self.steps: dict[int, Step] = {}
        self._start: tuple[float, int, int, float, float] | None = None

    @staticmethod
    def _now() -> tuple[float, int, int, float, float]:
        return time.perf_counter(), TOKENS["real"], TOKENS["padded"], time.process_time(), machine_busy_seconds()

    def resume(self) -> None:
        self._start = self._now()

    def pause(self, step: int) -> None:
        (t0, r0, p0, c0, m0), (t1, r1, p1, c1, m1) = self._start, self._now()
        if self.first < step <= self.last:
            foreign = max(0.0, (m1 - m0) - (c1 - c0)) / max(t1 - t0, 1e-9)
            self.steps[step] = Step(seconds=t1 - t0, real=r1 - r0, padded=p1 - p0, cpu=c1 - c0, foreign=foreign)


class Stop(Exception):
    """Ends a follower whose leader failed."""


class Lockstep:
    """A leader (the main thread) and followers (threads) that take turns, one step each.

    Every contender calls `step_end(step)` at the end of each optimizer step. The leader's call
    runs one step of each follower; a follower's call hands control back and waits for its turn.
    """

    def __init__(self, first: int, last: int):
        self.first, self.last = first, last
        self.clocks: dict[int, Clock] = {}          # thread id -> its contender's clock
        self.followers: list[dict] = []
        self.leader_thread = threading.get_ident()
        self.aborted = False

    def clock(self) -> Clock:
        return self.clocks[threading.get_ident()]

    def add_follower(self, name: str, run) -> None:
        f = {"name": name, "go": threading.Semaphore(0), "done": threading.Semaphore(0), "alive": True,
             "result": None, "error": None}

        def body():
            f["go"].acquire()
            if self.aborted:
                f["alive"] = False
                f["done"].release()
                return
            self.clocks[threading.get_ident()] = Clock(name, self.first, self.last)
            self.clock().resume()
            try:
                f["result"] = run()
            except BaseException as exc:  # noqa: BLE001 - reported by the leader
                f["error"] = exc
            f["alive"] = False
            f["done"].release()

        f["thread"] = threading.Thread(target=body, name=name, daemon=True)
        self.followers.append(f)

    def lead(self, name: str, run):
        """Run the leader in this thread; returns {name: (result, clock)} for every contender."""
        self.clocks[self.leader_thread] = Clock(name, self.first, self.last)
        for f in self.followers:
            f["thread"].start()
        self.clock().resume()
        try:
            result = run()
        except BaseException:
            self.aborted = True
            raise
        finally:
            while any(f["alive"] for f in self.followers):   # let them finish (or stop them)
                self._turns()
            for f in self.followers:
                f["thread"].join()
        out = {name: (result, self.clocks[self.leader_thread])}
        for f in self.followers:
            if f["error"] is not None:
                raise RuntimeError(f"{f['name']} failed: {f['error']!r}") from f["error"]
            ident = f["thread"].ident
            out[f["name"]] = (f["result"], self.clocks[ident])
        return out

    def _turns(self) -> None:
        for f in self.followers:
            if f["alive"]:
                f["go"].release()
                f["done"].acquire()

    def step_end(self, step: int) -> None:
        clock = self.clock()
        clock.pause(step)
        if threading.get_ident() == self.leader_thread:
            self._turns()
        else:
            f = next(f for f in self.followers if f["thread"].ident == threading.get_ident())
            f["done"].release()
            f["go"].acquire()
            if self.aborted:
                raise Stop()
        clock.resume()


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


class FullscaleHooks:
    """Observe fullscale runs, change nothing: the loop looks these names up at call time.
    faults.hit("step") is called once per step right after the optimizer step (where the Trainer
    calls on_step_end); Monitor.event("checkpoint") carries the seconds a save took."""

    def __init__(self, lockstep: Lockstep):
        self.lockstep = lockstep
        self.saves: dict[int, list[tuple[int, float]]] = {}   # thread id -> (step, seconds)

    def __enter__(self):
        from fullscale import data as data_module
        from fullscale import faults, monitor

        train_module = importlib.import_module("fullscale.train")  # (fullscale.train is also the function)
        self.modules = data_module, faults, monitor, train_module
        self.originals = (faults.hit, monitor.Monitor.event, data_module.collate, data_module.collate_packed)
        hit, event, collate, collate_packed = self.originals

        def hit_hook(point, step=None):
            if point == "step":
                self.lockstep.step_end(faults.current_step)
            hit(point, step)

        def event_hook(monitor_self, kind, step, **values):
            event(monitor_self, kind, step, **values)
            if kind == "checkpoint":
                self.saves.setdefault(threading.get_ident(), []).append((step, values["seconds"]))

        faults.hit, monitor.Monitor.event = hit_hook, event_hook
        data_module.collate = lambda ex, **kw: count_batch(collate(ex, **kw))
        data_module.collate_packed = lambda ex, **kw: count_batch(collate_packed(ex, **kw))
        return self

    def __exit__(self, *exc):
        data_module, faults, monitor, train_module = self.modules
        faults.hit, monitor.Monitor.event, data_module.collate, data_module.collate_packed = self.originals


def run_fullscale(args, hooks: FullscaleHooks, name: str, **over):
    from fullscale.config import load_config
    from fullscale.train import train

    config = load_config(None, fullscale_values(args, name, **over))
    console = io.StringIO()
    train(config, stream=console).clear()   # the result holds the model
    # A step's checkpoint is written after its faults.hit("step"), so it lands in the next step.
    saves = [(s, sec) for s, sec in hooks.saves.get(threading.get_ident(), []) if args.warmup <= s < args.warmup + args.steps]
    return {"saves": saves, "notes": [line for line in console.getvalue().splitlines() if line.startswith("packing:")]}


def bare_update(model, head, micro: list[dict], params, optimizer, scheduler, device=None) -> None:
    """One optimizer step of the bare loop (also bench_gpu's): forward and backward over the
    window's micro-batches, normalised by its label tokens, then clip, AdamW and the scheduler."""
    from fullscale.loss import num_label_tokens, token_loss_sum

    n_tokens = sum(num_label_tokens(b["labels"]) for b in micro)   # on the host
    for batch in micro:
        if device is not None:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        with head.only_labelled(batch["labels"]):
            logits = model(**inputs, use_cache=False).logits
        loss_sum, _ = token_loss_sum(logits, batch["labels"])
        (loss_sum / n_tokens).backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def run_bare(args, lockstep: Lockstep, examples: list[dict], *, packed: bool):
    """The floor: fullscale's model set-up and batches, and only what a step must do."""
    from transformers import get_scheduler

    from fullscale import sampler
    from fullscale.config import load_config
    from fullscale.data import pack_examples
    from fullscale.loss import LabelledHead
    from fullscale.model import build_model, choose

    collate, collate_packed = UNOBSERVED_COLLATE   # not the counting ones FullscaleHooks may have put in place
    config = load_config(None, fullscale_values(args, "bare"))
    torch.manual_seed(config.seed)
    model = build_model(config, choose(config, torch.device("cpu")))
    model.train()
    head = LabelledHead(model)
    if packed:
        examples, _ = pack_examples(examples, max_seq_length=args.max_seq_length, seed=config.seed)
    collate_fn = collate_packed if packed else collate
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.01)
    total = args.warmup + args.steps
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=math.ceil(0.05 * total), num_training_steps=total)
    step, epoch = 0, 0
    while step < total:
        batches = sampler.global_micro_batches(len(examples), seed=config.seed, epoch=epoch, global_batch_size=8,
                                               num_processes=1)
        for w in range(0, len(batches), 4):
            if step >= total:
                break
            micro = [count_batch(collate_fn([examples[i] for i in b], pad_token_id=0)) for b in batches[w:w + 4]]
            bare_update(model, head, micro, params, optimizer, scheduler)
            step += 1
            lockstep.step_end(step)
        epoch += 1
    return {}


def run_trainer(args, lockstep: Lockstep, examples: list[dict]):
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainerCallback,
                              TrainingArguments)

    from fullscale import sampler

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=32, lora_alpha=32, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))

    class Mark(TrainerCallback):
        def on_step_end(self, targs, state, control, **kwargs):   # after the optimizer step, before logging
            lockstep.step_end(state.global_step)

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
    assert needed <= len(order), "more --rows needed: the Trainer reads one epoch of fullscale's order"
    features = [{"input_ids": examples[i]["input_ids"], "attention_mask": [1] * len(examples[i]["input_ids"]),
                 "labels": examples[i]["labels"]} for i in order[:needed]]
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
    return {"notes": [f"optimizer {targs.optim.value}"]}


# ----------------------------------------------------------------------------- results

@dataclass
class Result:
    name: str
    group: str
    steps: dict[int, Step]
    peak_rss_gb: float
    saves: list[tuple[int, float]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def over(self, keys) -> tuple[float, int, int]:
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


def run_group(args, label: str, leader: tuple[str, callable], followers: list[tuple[str, callable]]) -> dict[str, Result]:
    """Run a lockstep group; keep, for every contender, only the steps no one was disturbed in."""
    gc.collect()
    reset_peak_rss()
    t0 = time.perf_counter()
    lockstep = Lockstep(args.warmup, args.warmup + args.steps)
    for name, make in followers:
        lockstep.add_follower(name, make(lockstep))
    out = lockstep.lead(leader[0], leader[1](lockstep))
    peak = rss_gb("VmHWM")
    clean = set.intersection(*(set(s for s, x in clock.steps.items() if x.foreign <= FOREIGN_LIMIT)
                               for _, clock in out.values()))
    disturbed = args.steps - len(clean)
    results = {}
    for name, (result, clock) in out.items():
        result = result or {}
        results[name] = Result(name=name, group=label, steps={s: clock.steps[s] for s in sorted(clean)},
                               peak_rss_gb=peak, saves=result.get("saves", []), notes=result.get("notes", []))
        if args.verbose:
            for s, x in clock.steps.items():
                print(f"      {name:40s} step {s:3d}: {x.seconds:7.3f} s ({x.cpu:6.3f} CPU s)  {x.real:6d} real / "
                      f"{x.padded:6d} tokens  others {100 * x.foreign:5.1f}% of a core")
    names = ", ".join(out)
    print(f"group {label}: {names}: {len(clean)} of {args.steps} steps clean"
          f"{f' ({disturbed} disturbed by other processes, left out)' if disturbed else ''}; peak RSS {peak:.2f} GB "
          f"[{time.perf_counter() - t0:.0f} s]", flush=True)
    for r in results.values():
        print(f"    {r.name:40s} {r.tokens_per_s:8,.0f} real tokens/s  {r.step_time:6.3f} s/step  padding "
              f"{100 * r.padding_share:4.1f}%", flush=True)
    return results


def ratio(a: Result, b: Result) -> tuple[float, float]:
    """a against b of the same group (same batches, same steps): (tokens/s ratio, median step-time ratio)."""
    if a is b:
        return 1.0, 1.0
    keys = sorted(set(a.steps) & set(b.steps))
    ta, ra, _ = a.over(keys)
    tb, rb, _ = b.over(keys)
    return (ra / ta) / (rb / tb), statistics.median(a.steps[k].seconds / b.steps[k].seconds for k in keys)


def table(results: dict[str, Result], floors: dict[str, Result], vs_trainer: dict[str, float]) -> str:
    lines = ["| contender | lockstep group | real tokens/s | s/step | padding | vs Trainer (real tokens/s) | "
             "step time vs the group's bare loop (median) | peak RSS of the group (GB) |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results.values():
        floor = floors[r.group]
        step_vs = "-" if r.name.startswith("bare") else f"{ratio(r, floor)[1]:.3f}x"
        vt = f"{vs_trainer[r.name]:.2f}x" if r.name in vs_trainer else "-"
        lines.append(f"| {r.name} | {r.group} | {r.tokens_per_s:,.0f} | {r.step_time:.3f} | {100 * r.padding_share:.1f}% | "
                     f"{vt} | {step_vs} | {r.peak_rss_gb:.2f} |")
    return "\n".join(lines)


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


# ----------------------------------------------------------------------------- main

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=3000)
    p.add_argument("--max-seq-length", type=int, default=256)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--warmup", type=int, default=4, help="optimizer steps run before the measured ones")
    p.add_argument("--steps", type=int, default=20, help="measured optimizer steps")
    p.add_argument("--save-every", type=int, default=20, help="the checkpoint interval the cost is reported for")
    p.add_argument("--no-group", action="store_true", help="leave out fullscale+group (group_by_length)")
    p.add_argument("--quick", action="store_true", help="smoke run: 800 rows, 2 + 6 steps")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--verbose", action="store_true", help="print every measured step")
    args = p.parse_args(argv)
    if args.quick:
        args.rows, args.warmup, args.steps = 800, 2, 6
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
          f"fullscale+ckpt saves every {save_steps} steps\n")

    def bare(packed: bool):
        return lambda ls: (lambda: run_bare(args, ls, examples, packed=packed))

    def fullscale(hooks_box: list, name: str, **over):
        return lambda ls: (lambda: run_fullscale(args, hooks_box[0], name, **over))

    results: dict[str, Result] = {}
    floors: dict[str, Result] = {}          # per group: the bare loop on the leader's batches
    unpacked_bare: dict[str, Result] = {}   # per group: the bare loop on the unpacked batches

    def group(label, leader_name, leader_over, followers, *, packed=False):
        box: list = []

        def leader(ls):
            box.append(FullscaleHooks(ls))

            def run():
                with box[0]:
                    return run_fullscale(args, box[0], leader_name, **leader_over)
            return run

        follower_makers = []
        for name, kind, over in followers:
            if kind == "bare":
                follower_makers.append((name, bare(packed and name.startswith("bare+pack"))))
            elif kind == "trainer":
                follower_makers.append((name, lambda ls: (lambda: run_trainer(args, ls, examples))))
            else:
                follower_makers.append((name, fullscale(box, name, **over)))
        out = run_group(args, label, (leader_name, leader), follower_makers)
        floors[label] = out.get(f"bare+pack [{label}]") or out[f"bare [{label}]"]    # same batches as the leader
        unpacked_bare[label] = out[f"bare [{label}]"]                              # the link between groups
        results.update(out)

    # The Trainer never shares a group with fullscale: accelerate's GradientState is a process-wide
    # singleton, and the Trainer's settings in it would change what fullscale's Accelerator does.
    group("A", "fullscale", {}, [("bare [A]", "bare", {}), ("fullscale+ckpt", "fullscale", {"save_steps": save_steps})])
    group_trainer(args, results, floors, unpacked_bare, examples)
    group("C", "fullscale+pack", {"packing": True}, [("bare+pack [C]", "bare", {}), ("bare [C]", "bare", {})],
          packed=True)
    if not args.no_group:
        group("D", "fullscale+group", {"group_by_length": True}, [("bare [D]", "bare", {})])

    # Across groups through the bare loops on the unpacked batches (every group has one, and they
    # all run the same batches): X / Trainer = (X / bare [X's group]) / (Trainer / bare [B]),
    # each ratio taken on the same steps at the same time.
    trainer = results["trainer"]
    trainer_vs_bare = ratio(trainer, unpacked_bare["B"])[0]
    vs_trainer = {name: ratio(r, unpacked_bare[r.group])[0] / trainer_vs_bare
                  for name, r in results.items() if name != "trainer"}
    print()
    print(table(results, floors, vs_trainer))
    print()
    for what, ok, value in targets(results, floors, vs_trainer, packing.efficiency, args.save_every):
        print(f"  [{'met' if ok else 'MISSED'}] {what}: {value}")
    for r in results.values():
        if r.notes:
            print(f"  note {r.name}: {'; '.join(r.notes)}")
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({
            "machine": info, "args": {k: str(v) for k, v in vars(args).items()}, "packing": packing.describe(),
            "vs_trainer": vs_trainer,
            "results": {k: {"group": r.group, "tokens_per_s": r.tokens_per_s, "step_time": r.step_time,
                            "padding_share": r.padding_share, "peak_rss_gb": r.peak_rss_gb, "saves": r.saves,
                            "steps": {s: vars(x) for s, x in r.steps.items()}} for k, r in results.items()}},
            indent=2))
    return 0


def group_trainer(args, results, floors, unpacked_bare, examples) -> None:
    """Group B: the Trainer leads (main thread), a bare loop follows."""
    def leader(ls):
        return lambda: run_trainer(args, ls, examples)

    def follower(ls):
        return lambda: run_bare(args, ls, examples, packed=False)

    out = run_group(args, "B", ("trainer", leader), [("bare [B]", follower)])
    floors["B"] = unpacked_bare["B"] = out["bare [B]"]
    results.update(out)


def targets(results, floors, vs_trainer, packing_efficiency: float, save_every: int) -> list[tuple[str, bool, str]]:
    out = []
    fs, fp, fc = results.get("fullscale"), results.get("fullscale+pack"), results.get("fullscale+ckpt")
    if fp:
        out.append(("fullscale+pack >= 2.0x Trainer real tokens/s", vs_trainer["fullscale+pack"] >= 2.0,
                    f"{vs_trainer['fullscale+pack']:.2f}x"))
    if fs:
        out.append(("fullscale (no packing) >= 1.1x Trainer real tokens/s", vs_trainer["fullscale"] >= 1.1,
                    f"{vs_trainer['fullscale']:.2f}x (same batches; via the bare loops of groups A and B)"))
        _, step_ratio = ratio(fs, floors["A"])
        out.append(("fullscale step time <= 1.05x the bare loop's", step_ratio <= 1.05,
                    f"{step_ratio:.3f}x (median over {len(fs.steps)} steps)"))
    if fp:
        _, step_ratio = ratio(fp, floors["C"])
        out.append(("fullscale+pack step time <= 1.05x the bare loop's on the packed batches", step_ratio <= 1.05,
                    f"{step_ratio:.3f}x (median over {len(fp.steps)} steps)"))
    if fc and fs and fc.saves:
        per_save = statistics.mean(sec for _, sec in fc.saves)
        cost = per_save / (save_every * fs.step_time)
        save_steps = sorted({s + 1 for s, _ in fc.saves})   # a save lands in the next step's time
        extra = [fc.steps[s].seconds - fs.steps[s].seconds for s in save_steps if s in fc.steps and s in fs.steps]
        others = [fc.steps[s].seconds / fs.steps[s].seconds for s in fc.steps if s in fs.steps and s not in save_steps]
        measured = ""
        if extra:
            measured = (f"; measured in lockstep: the steps holding a save took {statistics.mean(extra):+.3f} s more "
                        f"than the same steps without, i.e. {100 * statistics.mean(extra) / (save_every * fs.step_time):.2f}% "
                        f"per {save_every} steps (other steps: median ratio {statistics.median(others):.3f})")
        out.append((f"a checkpoint every {save_every} steps costs <= 2% throughput", cost <= 0.02,
                    f"{100 * cost:.2f}% ({per_save:.3f} s per save, timed by the loop, over {save_every} steps of "
                    f"{fs.step_time:.3f} s){measured}"))
    out.append(("packing efficiency >= 95% on this data", packing_efficiency >= 0.95, f"{100 * packing_efficiency:.1f}%"))
    return out


if __name__ == "__main__":
    sys.exit(main())
