"""Training throughput on this machine's CPU: fullscale against the transformers Trainer + peft
and against a bare PyTorch loop, with the same model, data, batches and settings; and the cost
of checkpoints.

    python benchmarks/bench_throughput.py              # the recorded run (~8 min on 2 cores)
    python benchmarks/bench_throughput.py --quick      # a smoke run (~2 min)

Contenders:

  bare           a bare PyTorch loop on fullscale's batches: forward, backward, clip, AdamW,
                 scheduler, nothing else (the floor for loop overhead)
  trainer        transformers Trainer + peft, dynamic padding (DataCollatorForSeq2Seq), fed the
                 same examples in the same order (sequential sampler over fullscale's epoch order),
                 so its micro-batches are exactly fullscale's
  fullscale      fullscale.train.train(config), packing off
  fullscale+ckpt fullscale, packing off, saving a checkpoint every 10 steps
  fullscale+pack fullscale.train.train(config), packing on
  bare+pack      the bare loop on fullscale's packed batches (the floor for fullscale+pack)
  what-if ...    (--what-if) fullscale with its loss computed as transformers computes it
                 (labels shifted instead of logits sliced; see label_shift_loss)

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
