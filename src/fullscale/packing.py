"""Padding-free packing: several tokenized examples per row, without cross-example attention.

`pack_examples` puts examples into rows of at most max_seq_length tokens by best-fit decreasing
bin packing (each example, longest first, goes into the fullest row that still has room), which
wastes almost nothing on varied lengths. `collate_packed` pads a batch of packed rows to its
longest row.

Why the examples do not see each other: each example's position ids restart at 0, and a packed
batch carries no attention mask. With no attention mask and no cache (`use_cache=False`),
transformers (sdpa and eager attention) reads the sequence boundaries from the position ids
and builds a block-diagonal causal mask. This is checked with logits in
tests/unit/test_packing.py (an example's logits inside a packed row equal its logits alone).
flash_attention_2 reads the boundaries from the position ids only when the batch holds one
row: use `collate_packed(..., flatten=True)` for it.

Why the loss is unchanged: the first token of each example gets label -100, so the last token
of one example is never asked to predict the first token of the next one (labels are shifted
by one in the loss). In an unpacked example that label is never used either.
"""

from __future__ import annotations

import bisect
import contextlib
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fullscale.loss import IGNORE_INDEX


@dataclass
class PackingStats:
    """What packing did; `efficiency` = real tokens / (rows x max_seq_length)."""

    num_examples: int
    num_rows: int
    num_tokens: int
    max_seq_length: int

    @property
    def efficiency(self) -> float:
        return self.num_tokens / max(1, self.num_rows * self.max_seq_length)

    @property
    def examples_per_row(self) -> float:
        return self.num_examples / max(1, self.num_rows)

    def describe(self) -> str:
        return (f"packing: {self.num_examples:,} examples -> {self.num_rows:,} rows of <={self.max_seq_length:,} "
                f"tokens ({self.examples_per_row:.1f} examples per row), efficiency {100 * self.efficiency:.1f}%")


def pack_examples(examples: list[dict], *, max_seq_length: int, seed: int,
                  lazy: bool = False) -> tuple[list[dict], PackingStats]:
    """Pack tokenized examples ({"input_ids", "labels", "row"}) into rows of <= max_seq_length tokens.

    Best-fit decreasing: examples are taken longest first (equal lengths in an order drawn from
    `seed`) and each goes into the row with the least room left that still fits it, or opens a
    new row. The result depends only on the examples, max_seq_length and seed.

    Each packed row is {"input_ids", "labels", "position_ids", "rows", "lengths"}: the examples'
    tokens one after another; their labels with the first label of each example set to -100;
    position ids restarting at 0 for each example; the source row numbers and lengths, in order.
    Raises ValueError for an example longer than max_seq_length (prepare_data truncates them).
    `lazy`: return PackedRows (bins of indices, rows put together when read) instead of a list.
    """
    from fullscale.data.store import example_lengths

    lengths = example_lengths(examples)   # from the token store's offsets when the examples are views
    for i, n in enumerate(lengths):
        if n > max_seq_length:
            raise ValueError(f"example of row {examples[i].get('row')} has {n} tokens, more than "
                             f"max_seq_length={max_seq_length}: truncate before packing")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    order.sort(key=lambda i: -lengths[i])  # stable: ties keep the seeded order

    bins: list[list[int]] = []                # example indices per row
    room: dict[int, list[int]] = {}           # space left -> rows with that much space (a stack)
    sizes: list[int] = []                     # the distinct non-zero space-left values, sorted
    for i in order:
        n = lengths[i]
        k = bisect.bisect_left(sizes, n)      # the smallest space left that fits (best fit)
        if k < len(sizes):
            space = sizes[k]
            b = room[space].pop()
            if not room[space]:
                del room[space]
                sizes.pop(k)
        else:
            space, b = max_seq_length, len(bins)
            bins.append([])
        bins[b].append(i)
        left = space - n
        if left > 0:
            if left not in room:
                room[left] = []
                bisect.insort(sizes, left)
            room[left].append(b)

    packed = PackedRows(examples, bins)
    if not lazy:
        packed = [packed[i] for i in range(len(packed))]
    stats = PackingStats(num_examples=len(examples), num_rows=len(packed),
                         num_tokens=sum(lengths), max_seq_length=max_seq_length)
    return packed, stats


class PackedRows(Sequence):
    """Packed rows as bins of example indices into the examples (a token store's views): a row's
    tokens are put together when it is read, a batch at a time, so packing holds no second copy of
    the data."""

    def __init__(self, examples, bins: list[list[int]]):
        self.examples, self.bins = examples, bins

    def __len__(self) -> int:
        return len(self.bins)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return _pack_row([self.examples[j] for j in self.bins[i]])

    def __eq__(self, other) -> bool:
        if not isinstance(other, Sequence) or len(other) != len(self):
            return False
        return all(self[i] == other[i] for i in range(len(self)))

    __hash__ = None


def _pack_row(members: list[dict]) -> dict:
    input_ids: list[int] = []
    labels: list[int] = []
    position_ids: list[int] = []
    for ex in members:
        n = len(ex["input_ids"])
        input_ids += ex["input_ids"]
        labels += [IGNORE_INDEX] + list(ex["labels"][1:])  # the boundary token predicts nothing
        position_ids += range(n)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
            "rows": [ex.get("row") for ex in members], "lengths": [len(ex["input_ids"]) for ex in members]}


def collate_packed(rows: list[dict], *, pad_token_id: int, flatten: bool = False) -> dict[str, torch.Tensor]:
    """A batch of packed rows as int64 tensors: input_ids, position_ids, labels, real_mask.

    Rows are padded on the right to the longest one. The padding is a block of its own: its
    position ids restart at 0 (so no real token attends to it, nor it to them), its labels are
    -100 and its real_mask is 0. `real_mask` is for counting tokens, never a model input; there
    is no attention_mask, which is what makes transformers build the block-diagonal mask.

    flatten=True puts the whole batch into one row (1, total tokens) with no padding at all:
    the layout flash_attention_2 needs to see the example boundaries (it reads them from the
    position ids only when the batch has one row). The loss is the same, since every row
    starts with an example whose first label is -100.
    """
    if flatten:
        ids = torch.tensor([t for r in rows for t in r["input_ids"]], dtype=torch.long)[None]
        return {"input_ids": ids,
                "position_ids": torch.tensor([p for r in rows for p in r["position_ids"]], dtype=torch.long)[None],
                "labels": torch.tensor([t for r in rows for t in r["labels"]], dtype=torch.long)[None],
                "real_mask": torch.ones_like(ids)}
    longest = max(len(r["input_ids"]) for r in rows)
    shape = (len(rows), longest)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    real_mask = torch.zeros(shape, dtype=torch.long)
    ramp = torch.arange(longest, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        input_ids[i, :n] = torch.tensor(r["input_ids"], dtype=torch.long)
        labels[i, :n] = torch.tensor(r["labels"], dtype=torch.long)
        position_ids[i, :n] = torch.tensor(r["position_ids"], dtype=torch.long)
        position_ids[i, n:] = ramp[: longest - n]   # the pad block counts from 0 again
        real_mask[i, :n] = 1
    return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels, "real_mask": real_mask}


# Packed examples must not see each other: proven on the real model before a packed run trains.
# The proof always runs in fp32 (see float32_forward), so its tolerance is fp32's whatever the
# training dtype: a leak smaller than bf16's rounding is still a leak.
ISOLATION_TOLERANCE = 1e-5


@contextlib.contextmanager
def float32_forward(model):
    """Run `model` in fp32 for the duration, on its own (loaded) weights, and give them back bitwise.

    The repeated blocks (decoder layers) are cast to fp32 one at a time, around their forward, so
    the extra memory is one layer in fp32 plus the parameters outside the layers (embeddings,
    final norm, head). bf16/fp16 -> fp32 -> bf16/fp16 is exact, so nothing the run trains changes.
    Only parameters are cast: buffers (rotary frequencies) keep their dtype."""
    params = [p for p in model.parameters() if p.is_floating_point() and p.dtype != torch.float32]
    if not params:
        yield
        return
    units, inside = [], set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and not any(name.startswith(u + ".") for u in inside):
            for i, block in enumerate(module):
                if any(True for _ in block.parameters()):
                    units.append(block)
                    inside.add(f"{name}.{i}" if name else str(i))
    in_units = {id(p) for u in units for p in u.parameters()}
    original: dict[int, torch.dtype] = {}

    def cast(tensors, to=None):
        for p in tensors:
            if not p.is_floating_point():
                continue
            if to is None:
                original.setdefault(id(p), p.dtype)
                p.data = p.data.float()
            else:
                p.data = p.data.to(original[id(p)])

    rest = [p for p in model.parameters() if id(p) not in in_units]
    hooks = []
    for unit in units:
        hooks.append(unit.register_forward_pre_hook(lambda m, args: cast(m.parameters())))
        hooks.append(unit.register_forward_hook(lambda m, args, out: cast(m.parameters(), to=True)))
    cast(rest)
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
        for unit in units:
            cast([p for p in unit.parameters() if p.dtype != original.get(id(p), p.dtype)], to=True)
        cast(rest, to=True)


def isolation_error(model, *, pad_token_id: int, vocab_size: int) -> tuple[float, str | None]:
    """Packs two short random examples into one row (beside a second row, as in a batch), runs the
    model in fp32, and compares the second example's logits with the same example run alone.

    Returns (max |logit difference|, why the model cannot isolate packed examples or None). A model
    whose forward takes no position_ids (ALiBi models such as bloom) cannot be told where an
    example starts, and one whose layers carry a state across positions (state-space mixers, short
    convolutions, linear attention, recurrences) runs it from one example into the next, whatever
    the difference on this pair."""
    import inspect

    from fullscale.targets import stateful_layers

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    stateful = stateful_layers(base)
    if stateful:
        kinds = "; ".join(f"{k} ({v})" for k, v in stateful.items())
        return math.inf, (f"its layers carry a state from one position to the next ({kinds}): the state of one "
                          "packed example runs into the next, since transformers does not give these layers the "
                          "example boundaries")
    if "position_ids" not in inspect.signature(base.forward).parameters:
        return math.inf, f"{type(base).__name__} takes no position_ids, from which packed rows are told apart"
    return _logit_difference(model, pad_token_id=pad_token_id, vocab_size=vocab_size), None


def _logit_difference(model, *, pad_token_id: int, vocab_size: int) -> float:
    g = torch.Generator().manual_seed(0)
    low = min(8, vocab_size - 1)
    a, b, c = (torch.randint(low, vocab_size, (n,), generator=g).tolist() for n in (7, 5, 9))

    def row(*examples):
        ids = [t for ex in examples for t in ex]
        return {"input_ids": ids, "labels": ids, "position_ids": [p for ex in examples for p in range(len(ex))]}

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), float32_forward(model):
            packed = collate_packed([row(a, b), row(c)], pad_token_id=pad_token_id)
            alone = collate_packed([row(b)], pad_token_id=pad_token_id)
            got = model(input_ids=packed["input_ids"].to(device), position_ids=packed["position_ids"].to(device),
                        use_cache=False).logits[0, len(a):len(a) + len(b)].float()
            want = model(input_ids=alone["input_ids"].to(device), position_ids=alone["position_ids"].to(device),
                         use_cache=False).logits[0, :len(b)].float()
    finally:
        model.train(was_training)
    return float((got - want).abs().max())
