"""Packing: best-fit rows, collation, and the two things that break silently: examples attending
to each other inside a packed row, and a loss that differs from the unpacked one. Both are
checked with a real (tiny) Llama's logits, not by reading transformers' code."""

from __future__ import annotations

import math
import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1]))

from tiny import make_model, make_tokenizer  # noqa: E402

from fullscale.data import IGNORE_INDEX, collate, collate_packed, pack_examples  # noqa: E402
from fullscale.loss import token_loss_sum  # noqa: E402


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FULLSCALE_CACHE", str(tmp_path / "cache"))  # never the real ~/.cache


def make_examples(lengths, *, vocab=(8, 100), seed=0, prompt_share=0.5):
    """Random token examples; the first `prompt_share` of each is prompt (label -100)."""
    rng = random.Random(seed)
    out = []
    for row, n in enumerate(lengths, start=1):
        ids = [rng.randrange(*vocab) for _ in range(n)]
        p = int(n * prompt_share)
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * p + ids[p:], "row": row})
    return out


def log_uniform_lengths(n, *, low=20, high=512, seed=0):
    """Lengths like instruction data: from `low` to `high` tokens, log-uniform (the benchmark's shape)."""
    rng = random.Random(seed)
    return [int(round(math.exp(rng.uniform(math.log(low), math.log(high))))) for _ in range(n)]


# ----------------------------------------------------------------------------- packing itself

def test_every_example_lands_in_exactly_one_row_of_at_most_max_seq_length():
    examples = make_examples(log_uniform_lengths(500, high=128), seed=1)
    packed, stats = pack_examples(examples, max_seq_length=128, seed=0)
    assert sorted(r for row in packed for r in row["rows"]) == list(range(1, 501))
    by_row = {ex["row"]: ex for ex in examples}
    for row in packed:
        assert len(row["input_ids"]) == len(row["labels"]) == len(row["position_ids"]) == sum(row["lengths"]) <= 128
        start = 0
        for r, n in zip(row["rows"], row["lengths"]):
            ex = by_row[r]
            assert row["input_ids"][start:start + n] == ex["input_ids"]
            assert row["position_ids"][start:start + n] == list(range(n))
            # The first label of each example is dropped: it would be predicted from the previous example.
            assert row["labels"][start:start + n] == [IGNORE_INDEX] + ex["labels"][1:]
            start += n
    assert stats.num_rows == len(packed) and stats.num_examples == 500
    assert stats.num_tokens == sum(len(ex["input_ids"]) for ex in examples)


def test_packing_is_deterministic_in_the_seed():
    examples = make_examples([10] * 40 + [30] * 20 + [64] * 5, seed=2)
    a, _ = pack_examples(examples, max_seq_length=64, seed=7)
    b, _ = pack_examples(examples, max_seq_length=64, seed=7)
    c, _ = pack_examples(examples, max_seq_length=64, seed=8)
    assert a == b
    assert [row["rows"] for row in a] != [row["rows"] for row in c]  # equal lengths are grouped by the seed


def test_best_fit_fills_rows_almost_completely_on_benchmark_like_data():
    # A few thousand rows, 20..max_seq_length tokens, log-uniform: the benchmark's data.
    lengths = log_uniform_lengths(3000, low=20, high=512, seed=3)
    packed, stats = pack_examples(make_examples(lengths), max_seq_length=512, seed=0)
    assert stats.efficiency >= 0.95, stats.describe()
    # Best fit cannot do better than ceil(tokens / row size) rows; it should be within 5% of that.
    assert len(packed) <= math.ceil(1.05 * sum(lengths) / 512)
    text = stats.describe()
    assert text.startswith("packing: 3,000 examples -> ") and "rows of <=512 tokens" in text and "efficiency" in text


def test_an_example_longer_than_max_seq_length_is_refused():
    with pytest.raises(ValueError, match="row 1 has 20 tokens"):
        pack_examples(make_examples([20]), max_seq_length=16, seed=0)


# ----------------------------------------------------------------------------- collation

def test_collate_packed_pads_with_a_block_of_its_own_and_has_no_attention_mask():
    packed, _ = pack_examples(make_examples([6, 5, 9, 3]), max_seq_length=12, seed=0)
    packed.sort(key=lambda r: -len(r["input_ids"]))
    batch = collate_packed(packed, pad_token_id=0)
    assert set(batch) == {"input_ids", "position_ids", "labels", "real_mask"}
    longest = len(packed[0]["input_ids"])
    for i, row in enumerate(packed):
        n = len(row["input_ids"])
        assert batch["input_ids"][i, :n].tolist() == row["input_ids"]
        assert batch["input_ids"][i, n:].eq(0).all()
        assert batch["labels"][i, n:].eq(IGNORE_INDEX).all()
        assert batch["position_ids"][i, :n].tolist() == row["position_ids"]
        assert batch["position_ids"][i, n:].tolist() == list(range(longest - n))  # pads: positions from 0
        assert batch["real_mask"][i].tolist() == [1] * n + [0] * (longest - n)
    assert int(batch["real_mask"].sum()) == sum(len(r["input_ids"]) for r in packed)


def test_collate_packed_flatten_puts_the_batch_in_one_row_without_padding():
    packed, _ = pack_examples(make_examples([6, 5, 9, 3]), max_seq_length=12, seed=0)
    batch = collate_packed(packed, pad_token_id=0, flatten=True)
    total = sum(len(r["input_ids"]) for r in packed)
    assert batch["input_ids"].shape == (1, total) and batch["real_mask"].all()
    assert batch["position_ids"][0].tolist() == [p for r in packed for p in r["position_ids"]]


# ----------------------------------------------------------------------------- no cross-example attention

@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def _model(tokenizer, attn):
    model = make_model(tokenizer, hidden_size=64, num_layers=2)
    model.config._attn_implementation = attn  # what from_pretrained(attn_implementation=...) sets
    model.config.use_cache = True  # the loop passes use_cache=False itself; check that this is enough
    return model.eval()


def _forward(model, batch):
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    return model(**inputs, use_cache=False).logits  # exactly what fit() passes


def _packed_batch(tokenizer, lengths, *, max_seq_length, seed=0):
    examples = make_examples(lengths, vocab=(8, len(tokenizer)), seed=seed)
    packed, _ = pack_examples(examples, max_seq_length=max_seq_length, seed=seed)
    assert len(packed) < len(examples)  # several examples share rows
    return examples, packed


def _assert_each_example_has_its_logits_alone(model, examples, packed, logits) -> None:
    """logits: (rows, longest, V) of the packed batch; each example's span equals it run alone."""
    by_row = {ex["row"]: ex for ex in examples}
    for i, row in enumerate(packed):
        start = 0
        for r, n in zip(row["rows"], row["lengths"]):
            alone = model(input_ids=torch.tensor([by_row[r]["input_ids"]]), use_cache=False).logits[0]
            torch.testing.assert_close(logits[i, start:start + n], alone, rtol=0, atol=1e-5)
            start += n


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_each_example_in_a_packed_row_has_the_logits_it_has_alone(tokenizer, attn):
    model = _model(tokenizer, attn)
    examples, packed = _packed_batch(tokenizer, [7, 12, 5, 20, 9, 3, 16, 11], max_seq_length=32)
    batch = collate_packed(packed, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        _assert_each_example_has_its_logits_alone(model, examples, packed, _forward(model, batch))


def test_without_position_ids_packed_examples_do_see_each_other(tokenizer):
    # The control: the logits check above would notice cross-example attention.
    model = _model(tokenizer, "sdpa")
    examples = make_examples([10, 10], vocab=(8, len(tokenizer)))
    row = examples[0]["input_ids"] + examples[1]["input_ids"]
    with torch.no_grad():
        mixed = model(input_ids=torch.tensor([row]), use_cache=False).logits[0, 10:]
        alone = model(input_ids=torch.tensor([examples[1]["input_ids"]]), use_cache=False).logits[0]
    assert (mixed - alone).abs().max() > 1e-2


def test_lora_model_with_gradient_checkpointing_in_train_mode_keeps_examples_apart(tokenizer):
    # What the loop runs: peft LoRA, gradient checkpointing (non-reentrant), train mode.
    from peft import LoraConfig, get_peft_model

    from fullscale.model import enable_gradient_checkpointing

    base = _model(tokenizer, "sdpa")
    enable_gradient_checkpointing(base)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, init_lora_weights=False,
                                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    model.train()
    examples, packed = _packed_batch(tokenizer, [9, 14, 6, 18, 4], max_seq_length=24, seed=1)
    batch = collate_packed(packed, pad_token_id=tokenizer.pad_token_id)
    _assert_each_example_has_its_logits_alone(model, examples, packed, _forward(model, batch))


# ----------------------------------------------------------------------------- same loss, same gradients

def _lora_model(tokenizer):
    from peft import LoraConfig, get_peft_model

    base = _model(tokenizer, "sdpa")
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                                            target_modules=["q_proj", "v_proj"]))
    return model.train()


def test_packed_loss_and_gradients_equal_the_unpacked_ones(tokenizer):
    lengths = log_uniform_lengths(24, low=4, high=40, seed=4)
    examples = make_examples(lengths, vocab=(8, len(tokenizer)), seed=4, prompt_share=0.3)
    packed, _ = pack_examples(examples, max_seq_length=48, seed=0)
    model = _lora_model(tokenizer)
    params = [p for p in model.parameters() if p.requires_grad]

    def loss_and_grads(batches):
        model.zero_grad()
        total, count = torch.zeros(()), torch.zeros((), dtype=torch.long)
        for batch in batches:
            s, c = token_loss_sum(_forward(model, batch), batch["labels"])
            total, count = total + s, count + c
        (total / count).backward()
        return total / count, count, [p.grad.clone() for p in params]

    pad = tokenizer.pad_token_id
    # Unpacked: the examples in padded batches of 5, as the loop collates them without packing.
    unpacked = [collate(examples[i:i + 5], pad_token_id=pad) for i in range(0, len(examples), 5)]
    packed_batches = [collate_packed(packed[i:i + 3], pad_token_id=pad) for i in range(0, len(packed), 3)]
    flat = [collate_packed(packed, pad_token_id=pad, flatten=True)]
    loss_u, count_u, grads_u = loss_and_grads(unpacked)
    loss_p, count_p, grads_p = loss_and_grads(packed_batches)
    loss_f, count_f, grads_f = loss_and_grads(flat)
    assert int(count_u) == int(count_p) == int(count_f)   # the same label tokens take loss
    torch.testing.assert_close(loss_p, loss_u, rtol=0, atol=1e-5)
    torch.testing.assert_close(loss_f, loss_u, rtol=0, atol=1e-5)
    for gu, gp, gf in zip(grads_u, grads_p, grads_f):
        torch.testing.assert_close(gp, gu, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(gf, gu, rtol=1e-4, atol=1e-6)


def test_each_examples_loss_inside_a_packed_row_equals_its_loss_alone(tokenizer):
    examples = make_examples([12, 7, 15, 5, 9], vocab=(8, len(tokenizer)), seed=5)
    packed, _ = pack_examples(examples, max_seq_length=24, seed=0)
    model = _model(tokenizer, "sdpa")
    by_row = {ex["row"]: ex for ex in examples}
    with torch.no_grad():
        batch = collate_packed(packed, pad_token_id=tokenizer.pad_token_id)
        logits = _forward(model, batch)
        for i, row in enumerate(packed):
            start = 0
            for r, n in zip(row["rows"], row["lengths"]):
                seg_logits = logits[i:i + 1, start:start + n]
                seg_labels = batch["labels"][i:i + 1, start:start + n]
                ex = by_row[r]
                alone = model(input_ids=torch.tensor([ex["input_ids"]]), use_cache=False).logits
                s_packed, c_packed = token_loss_sum(seg_logits, seg_labels)
                s_alone, c_alone = token_loss_sum(alone, torch.tensor([ex["labels"]]))
                assert int(c_packed) == int(c_alone)
                torch.testing.assert_close(s_packed / c_packed, s_alone / c_alone, rtol=0, atol=1e-5)
                start += n
