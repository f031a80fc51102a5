"""fullscale.data: loading every file type, format detection, prompt masking, truncation,
invalid rows, the eval split and collation. Tiny char-level tokenizer, no network."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1]))

from tiny import make_tokenizer  # noqa: E402

from fullscale.data import (  # noqa: E402
    FORMATS,
    DataStats,
    PreparedData,
    collate,
    detect_format,
    format_alpaca_prompt,
    load_rows,
    prepare_data,
)
from fullscale.errors import DataError  # noqa: E402

FILE_TYPES = ["jsonl", "json", "csv", "parquet", "arrow"]

ROWS = {
    "text": [{"text": "hello world"}, {"text": "second text"}],
    "prompt_completion": [{"prompt": "Q: 2+2?\nA:", "completion": " 4"}, {"prompt": "Say hi", "completion": "hi"}],
    "alpaca": [
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        {"instruction": "Name a color.", "input": "", "output": "blue"},
    ],
    "messages": [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"},
                      {"role": "assistant", "content": "ciao"}]},
        {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
    ],
    "sharegpt": [   # ShareGPT: conversations of {from, value}, roles human/gpt/system
        {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "hi"},
                           {"from": "gpt", "value": "hello"}]},
        {"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]},
    ],
}


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def write_rows(tmp_path: Path, rows: list[dict], kind: str, name: str = "data") -> Path:
    """Write `rows` as a dataset file (or save_to_disk directory) of the given kind."""
    if kind == "jsonl":
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "json":
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(rows))
    elif kind == "csv":
        path = tmp_path / f"{name}.csv"
        columns = list(dict.fromkeys(k for r in rows for k in r))
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            for r in rows:
                writer.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()})
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp_path / f"{name}.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif kind == "arrow":
        import datasets

        path = tmp_path / f"{name}_dataset"
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    else:
        raise ValueError(kind)
    return path


def write_jsonl_lines(tmp_path: Path, lines: list[str], name: str = "data") -> Path:
    path = tmp_path / f"{name}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def prepare(path, tokenizer, **overrides) -> PreparedData:
    kwargs = dict(train_file=path, eval_file=None, eval_split=0.0, dataset_format="auto", max_seq_length=512,
                  seed=0, tokenizer=tokenizer)
    kwargs.update(overrides)
    return prepare_data(**kwargs)


def labelled_text(tokenizer, example: dict) -> str:
    """The decoded tokens that carry loss, in order, keeping special tokens."""
    ids = [i for i, label in zip(example["input_ids"], example["labels"]) if label != -100]
    return tokenizer.decode(ids)


def expected_labelled(fmt: str, row: dict, tokenizer) -> str:
    eos = tokenizer.eos_token
    if fmt == "text":
        return tokenizer.bos_token + row["text"] + eos
    if fmt == "prompt_completion":
        return row["completion"] + eos
    if fmt == "alpaca":
        return row["output"] + eos
    if fmt == "sharegpt":
        return "".join(t["value"] + "<|end|>\n" for t in row["conversations"] if t["from"] == "gpt")
    return "".join(m["content"] + "<|end|>\n" for m in row["messages"] if m["role"] == "assistant")


# --------------------------------------------------------------------------------------
# Loading and masking


@pytest.mark.parametrize("kind", FILE_TYPES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_loads_from_each_file_type_with_only_the_answer_labelled(tmp_path, tokenizer, fmt, kind):
    path = write_rows(tmp_path, ROWS[fmt], kind)
    data = prepare(path, tokenizer)

    assert data.format == fmt
    assert [ex["row"] for ex in data.train] == [1, 2]
    for example, row in zip(data.train, ROWS[fmt]):
        assert len(example["input_ids"]) == len(example["labels"])
        assert labelled_text(tokenizer, example) == expected_labelled(fmt, row, tokenizer)
        # Labels, where present, are the input ids themselves (the model shifts them).
        assert all(lab in (-100, tok) for tok, lab in zip(example["input_ids"], example["labels"]))
    assert data.train_stats.num_rows == 2 and data.train_stats.num_examples == 2
    assert data.eval is None and data.eval_stats is None


def test_prompt_completion_ids_are_bos_prompt_completion_eos_with_the_prompt_masked(tmp_path, tokenizer):
    path = write_rows(tmp_path, [{"prompt": "ab", "completion": "cd"}], "jsonl")
    example = prepare(path, tokenizer).train[0]
    prompt = tokenizer("ab")["input_ids"]
    completion = tokenizer("cd", add_special_tokens=False)["input_ids"]
    assert prompt[0] == tokenizer.bos_token_id
    assert example["input_ids"] == prompt + completion + [tokenizer.eos_token_id]
    assert example["labels"] == [-100] * len(prompt) + completion + [tokenizer.eos_token_id]


def test_alpaca_renders_the_classic_prompt_with_and_without_input(tmp_path, tokenizer):
    path = write_rows(tmp_path, ROWS["alpaca"], "jsonl")
    data = prepare(path, tokenizer)
    with_input, without_input = (tokenizer.decode(ex["input_ids"]) for ex in data.train)
    assert with_input == (
        "<s>Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nAdd the numbers.\n\n"
        "### Input:\n2 and 3\n\n### Response:\n5</s>"
    )
    assert without_input == (
        "<s>Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nName a color.\n\n### Response:\nblue</s>"
    )
    assert format_alpaca_prompt(instruction="x").endswith("### Instruction:\nx\n\n### Response:\n")


def test_messages_mask_system_and_user_turns_and_label_each_assistant_reply_with_its_end_marker(tmp_path, tokenizer):
    path = write_rows(tmp_path, ROWS["messages"][:1], "jsonl")
    example = prepare(path, tokenizer).train[0]
    rendered = tokenizer.apply_chat_template(ROWS["messages"][0]["messages"], tokenize=False)
    assert tokenizer.decode(example["input_ids"]) == rendered
    assert example["input_ids"].count(tokenizer.bos_token_id) == 1  # the template's BOS, not a second one
    labelled_spans, current = [], []
    for tok, lab in zip(example["input_ids"], example["labels"]):
        if lab != -100:
            current.append(tok)
        elif current:
            labelled_spans.append(tokenizer.decode(current))
            current = []
    if current:
        labelled_spans.append(tokenizer.decode(current))
    assert labelled_spans == ["hello<|end|>\n", "ciao<|end|>\n"]


def test_messages_without_a_chat_template_raise_a_data_error_with_a_fix(tmp_path):
    path = write_rows(tmp_path, ROWS["messages"], "jsonl")
    with pytest.raises(DataError, match="chat template") as info:
        prepare(path, make_tokenizer(chat_template=False))
    assert "prompt_completion" in str(info.value)


def test_a_template_that_rewrites_earlier_turns_is_rejected_as_not_prefix_stable(tmp_path):
    tok = make_tokenizer()
    # Past assistant turns are rendered without content: a prefix renders differently.
    tok.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>"
        "{% if m['role'] == 'assistant' and not loop.last %}...{% else %}{{ m['content'] }}{% endif %}<|end|>"
        "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    path = write_rows(tmp_path, ROWS["messages"][:1], "jsonl")
    with pytest.raises(DataError, match="not prefix-stable") as info:
        prepare(path, tok)
    assert "line 1" in str(info.value)


def test_text_format_trains_on_every_token_and_ends_with_eos(tmp_path, tokenizer):
    path = write_rows(tmp_path, [{"text": "abc"}], "jsonl")
    example = prepare(path, tokenizer).train[0]
    assert example["labels"] == example["input_ids"]
    assert example["input_ids"][0] == tokenizer.bos_token_id
    assert example["input_ids"][-1] == tokenizer.eos_token_id


def test_load_rows_reports_line_numbers_for_jsonl_and_row_indices_for_csv(tmp_path):
    jsonl = write_jsonl_lines(tmp_path, ['{"text": "a"}', "", '{"text": "b"', "[1, 2]", '{"text": "c"}'])
    rows = load_rows(jsonl)
    assert [n for n, _, _ in rows] == [1, 3, 4, 5]  # the blank line 2 is not a row
    assert rows[0] == (1, {"text": "a"}, None)
    assert rows[1][1] is None and rows[1][2].startswith("invalid JSON")
    assert rows[2][1] is None and "expected a JSON object" in rows[2][2]

    csv_path = tmp_path / "d.csv"
    csv_path.write_text("prompt,completion\nq1,a1\nq2,\n")
    assert load_rows(csv_path) == [(1, {"prompt": "q1", "completion": "a1"}, None),
                                   (2, {"prompt": "q2", "completion": None}, None)]


def test_json_accepts_a_data_wrapped_list_and_json_lines_content(tmp_path):
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"data": [{"text": "a"}, {"text": "b"}]}))
    assert [r for _, r, _ in load_rows(wrapped)] == [{"text": "a"}, {"text": "b"}]
    lines = tmp_path / "lines.json"
    lines.write_text('{"text": "a"}\n{"text": "b"}\n')
    assert [r for _, r, _ in load_rows(lines)] == [{"text": "a"}, {"text": "b"}]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.jsonl", None, "not found"),
        ("data.txt", "hello", "unsupported data file type '.txt'"),
        ("scalar.json", "42", "expected a JSON list of objects"),
        ("broken.json", '[{"text": "a"},', "invalid JSON at line 1"),
        ("broken.parquet", "not parquet", "cannot read parquet file"),
    ],
)
def test_unreadable_files_raise_a_data_error_naming_the_path(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=message) as info:
        load_rows(path)
    assert name in str(info.value)


def test_a_directory_that_is_not_a_saved_dataset_raises_a_data_error(tmp_path):
    with pytest.raises(DataError, match="save_to_disk"):
        load_rows(tmp_path)


def test_a_saved_dataset_dict_uses_its_train_split_or_lists_the_splits(tmp_path, tokenizer):
    import datasets

    good = tmp_path / "good"
    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"text": "a"}]),
                          "test": datasets.Dataset.from_list([{"text": "b"}])}).save_to_disk(str(good))
    assert [r for _, r, _ in load_rows(good)] == [{"text": "a"}]
    bad = tmp_path / "bad"
    datasets.DatasetDict({"validation": datasets.Dataset.from_list([{"text": "a"}])}).save_to_disk(str(bad))
    with pytest.raises(DataError, match="splits: validation"):
        load_rows(bad)


# --------------------------------------------------------------------------------------
# Format detection


@pytest.mark.parametrize(
    ("columns", "expected"),
    [
        ({"messages", "text"}, "messages"),
        ({"instruction", "input", "output", "text"}, "alpaca"),
        ({"instruction", "output"}, "alpaca"),
        ({"prompt", "completion", "text"}, "prompt_completion"),
        ({"text", "id"}, "text"),
    ],
)
def test_detect_format_prefers_messages_then_alpaca_then_prompt_completion_then_text(columns, expected):
    assert detect_format(columns, path="d.jsonl") == expected


@pytest.mark.parametrize("fmt", FORMATS)
def test_auto_detection_picks_each_format_and_reports_it(tmp_path, tokenizer, fmt):
    data = prepare(write_rows(tmp_path, ROWS[fmt], "jsonl"), tokenizer)
    assert data.format == fmt
    assert any(m.startswith(f"dataset_format auto: detected '{fmt}' (columns: ") for m in data.messages)


def test_an_unknown_column_set_raises_a_data_error_listing_the_columns(tmp_path, tokenizer):
    path = write_rows(tmp_path, [{"question": "q", "answer": "a"}], "jsonl")
    with pytest.raises(DataError) as info:
        prepare(path, tokenizer)
    text = str(info.value)
    assert "answer, question" in text and "prompt, completion" in text and "data.jsonl" in text


def test_an_explicit_format_whose_columns_are_absent_raises_and_suggests_the_fitting_one(tmp_path, tokenizer):
    path = write_rows(tmp_path, ROWS["prompt_completion"], "jsonl")
    with pytest.raises(DataError, match="needs the column.*text.*prompt_completion"):
        prepare(path, tokenizer, dataset_format="text")


def test_an_explicit_format_adds_no_detection_message(tmp_path, tokenizer):
    data = prepare(write_rows(tmp_path, ROWS["text"], "jsonl"), tokenizer, dataset_format="text")
    assert data.format == "text"
    assert not any("detected" in m for m in data.messages)


# --------------------------------------------------------------------------------------
# Truncation


def test_over_long_rows_are_truncated_on_the_right_and_counted_with_their_rows(tmp_path, tokenizer):
    rows = [{"text": "short"}, {"text": "x" * 50}, {"text": "tiny"}, {"text": "y" * 40}]
    data = prepare(write_rows(tmp_path, rows, "jsonl", name="train"), tokenizer, max_seq_length=16)
    stats = data.train_stats
    assert stats.num_truncated == 2 and stats.truncated_rows == [2, 4]
    assert all(len(ex["input_ids"]) <= 16 for ex in data.train)
    assert data.train[1]["input_ids"] == (tokenizer("x" * 50)["input_ids"])[:16]  # right side cut
    assert stats.num_tokens == sum(len(ex["input_ids"]) for ex in data.train)
    assert "2 truncated to max_seq_length=16 (lines 2, 4)" in "\n".join(data.messages)


def test_a_row_whose_prompt_fills_max_seq_length_is_skipped_with_a_reason(tmp_path, tokenizer):
    rows = [{"prompt": "p" * 30, "completion": "c"}, {"prompt": "q", "completion": "a" * 30}]
    data = prepare(write_rows(tmp_path, rows, "jsonl"), tokenizer, max_seq_length=10)
    assert [ex["row"] for ex in data.train] == [2]
    # BOS + 30 prompt tokens; one more position for the first completion token that carries loss.
    assert data.train_stats.skipped == [(1, "prompt of 31 tokens, longer than max_seq_length=10: nothing to learn "
                                            "(needs max_seq_length >= 32)")]
    assert data.train_stats.needed_length == 32
    assert data.train_stats.truncated_rows == [2]
    assert any(label != -100 for label in data.train[0]["labels"])


# --------------------------------------------------------------------------------------
# Invalid rows


def test_malformed_rows_are_skipped_and_reported_with_their_line_numbers(tmp_path, tokenizer):
    lines = [
        '{"prompt": "q1", "completion": "a1"}',
        "{not json",
        '{"prompt": "q3", "completion": null}',
        '{"prompt": "q4", "completion": ""}',
        '{"prompt": "q5"}',
        '{"prompt": 5, "completion": "a6"}',
        '{"prompt": "q7", "completion": "a7"}',
    ]
    data = prepare(write_jsonl_lines(tmp_path, lines, name="train"), tokenizer)
    stats = data.train_stats
    assert [ex["row"] for ex in data.train] == [1, 7]
    assert stats.num_rows == 7 and stats.num_examples == 2 and stats.num_skipped == 5
    reasons = dict(stats.skipped)
    assert sorted(reasons) == [2, 3, 4, 5, 6]
    assert reasons[2].startswith("invalid JSON")
    assert reasons[3] == "null 'completion'"
    assert reasons[4] == "empty 'completion'"
    assert reasons[5] == "missing 'completion'"
    assert reasons[6] == "'prompt' must be a string, got a number"
    summary = "\n".join(data.messages)
    assert "train.jsonl: 7 rows -> 2 examples" in summary
    assert "5 skipped (line 2: invalid JSON" in summary and "line 4: empty 'completion'" in summary


def test_malformed_messages_rows_are_skipped_with_the_reason(tmp_path, tokenizer):
    good = {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}
    rows = [
        good,
        {"messages": {"role": "user", "content": "u"}},
        {"messages": [{"role": "user", "content": "u"}, {"role": "bot", "content": "a"}]},
        {"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": "only a question"}]},
        {"messages": []},
    ]
    data = prepare(write_rows(tmp_path, rows, "json"), tokenizer)
    reasons = dict(data.train_stats.skipped)
    assert [ex["row"] for ex in data.train] == [1]
    assert "must be a list" in reasons[2]
    assert "unknown role 'bot'" in reasons[3] and "message 2 of 2" in reasons[3]
    assert "message 1 of 2 (user) has no 'content'" == reasons[4]
    assert "no assistant message" in reasons[5]
    assert reasons[6] == "empty 'messages'"
    assert "row 2:" in "\n".join(data.messages)  # .json rows are rows, not lines


def test_null_cells_in_csv_and_parquet_are_skipped_with_their_row_numbers(tmp_path, tokenizer):
    rows = [{"text": "a"}, {"text": None}, {"text": "c"}]
    for kind in ("csv", "parquet"):
        data = prepare(write_rows(tmp_path, rows, kind), tokenizer)
        assert data.train_stats.skipped == [(2, "null 'text'")], kind


def test_invalid_rows_error_raises_at_the_first_bad_row_naming_file_row_and_the_alternative(tmp_path, tokenizer):
    lines = ['{"text": "ok"}', '{"text": "ok"}', '{"text": ""}', "{bad"]
    path = write_jsonl_lines(tmp_path, lines, name="train")
    with pytest.raises(DataError) as info:
        prepare(path, tokenizer, invalid_rows="error")
    text = str(info.value)
    assert "train.jsonl line 3: empty 'text'" in text
    assert "invalid_rows: skip" in text


def test_a_file_with_no_valid_row_always_raises(tmp_path, tokenizer):
    path = write_jsonl_lines(tmp_path, ['{"text": null}', '{"text": ""}'])
    with pytest.raises(DataError, match="none of its 2 rows"):
        prepare(path, tokenizer)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        prepare(empty, tokenizer)
    broken = write_jsonl_lines(tmp_path, ["{bad", "[1]"], name="broken")
    with pytest.raises(DataError, match="line 1: invalid JSON.*line 2: expected a JSON object"):
        prepare(broken, tokenizer)


def test_all_prompts_too_long_raises_with_the_max_seq_length_fix(tmp_path, tokenizer):
    path = write_rows(tmp_path, [{"prompt": "p" * 30, "completion": "c"}], "jsonl")
    with pytest.raises(DataError, match="Increase max_seq_length"):
        prepare(path, tokenizer, max_seq_length=8)


# --------------------------------------------------------------------------------------
# Eval data


def numbered_text_rows(n: int) -> list[dict]:
    return [{"text": f"row {i}"} for i in range(n)]


def test_the_eval_split_is_deterministic_in_the_seed_and_disjoint_from_train(tmp_path, tokenizer):
    path = write_rows(tmp_path, numbered_text_rows(40), "jsonl")
    first = prepare(path, tokenizer, eval_split=0.1, seed=3)
    again = prepare(path, tokenizer, eval_split=0.1, seed=3)
    other = prepare(path, tokenizer, eval_split=0.1, seed=4)

    eval_rows = [ex["row"] for ex in first.eval]
    train_rows = [ex["row"] for ex in first.train]
    assert len(eval_rows) == 4  # ceil(40 * 0.1)
    assert set(eval_rows).isdisjoint(train_rows) and sorted(eval_rows + train_rows) == list(range(1, 41))
    assert eval_rows == [ex["row"] for ex in again.eval]
    assert first.eval == again.eval and first.train == again.train
    assert eval_rows != [ex["row"] for ex in other.eval]
    assert first.eval_stats.num_rows == 4 and first.train_stats.num_rows == 36
    assert any("held out" in m and "seed=3" in m for m in first.messages)


def test_a_small_eval_split_holds_out_at_least_one_row_and_keeps_one_for_training(tmp_path, tokenizer):
    data = prepare(write_rows(tmp_path, numbered_text_rows(2), "jsonl"), tokenizer, eval_split=0.01)
    assert len(data.eval) == 1 and len(data.train) == 1
    single = prepare(write_rows(tmp_path, numbered_text_rows(1), "jsonl", name="one"), tokenizer, eval_split=0.5)
    assert single.eval is None and len(single.train) == 1


def test_an_eval_file_is_prepared_in_the_train_format_with_its_own_stats(tmp_path, tokenizer):
    train = write_rows(tmp_path, ROWS["prompt_completion"], "jsonl", name="train")
    eval_path = write_rows(tmp_path, [{"prompt": "e", "completion": "f"}, {"prompt": "g", "completion": None}],
                           "csv", name="eval")
    data = prepare(train, tokenizer, eval_file=eval_path, eval_split=0.5)
    assert len(data.train) == 2  # eval_split is ignored when an eval_file is given
    assert [ex["row"] for ex in data.eval] == [1]
    assert labelled_text(tokenizer, data.eval[0]) == "f</s>"
    assert data.eval_stats.skipped == [(2, "null 'completion'")]
    assert any(m.startswith(f"{eval_path}: 2 rows -> 1 example") for m in data.messages)


def test_an_eval_file_without_the_train_format_columns_raises(tmp_path, tokenizer):
    train = write_rows(tmp_path, ROWS["prompt_completion"], "jsonl", name="train")
    eval_path = write_rows(tmp_path, ROWS["text"], "jsonl", name="eval")
    with pytest.raises(DataError, match="eval.jsonl.*prompt_completion"):
        prepare(train, tokenizer, eval_file=eval_path)


# --------------------------------------------------------------------------------------
# Collation


def test_collate_pads_to_the_longest_in_the_batch_with_ignored_labels_and_masked_attention():
    examples = [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "row": 1},
        {"input_ids": [8], "labels": [8], "row": 2},
    ]
    batch = collate(examples, pad_token_id=0)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(t.dtype == torch.int64 and t.shape == (2, 3) for t in batch.values())  # not max_seq_length
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_collate_of_prepared_examples_keeps_every_label(tmp_path, tokenizer):
    data = prepare(write_rows(tmp_path, ROWS["messages"], "jsonl"), tokenizer, max_seq_length=1024)
    batch = collate(data.train, pad_token_id=tokenizer.pad_token_id)
    longest = max(len(ex["input_ids"]) for ex in data.train)
    assert batch["input_ids"].shape == (2, longest) and longest < 1024
    assert int((batch["labels"] != -100).sum()) == data.train_stats.num_label_tokens


def test_data_stats_count_rows_examples_and_skips_consistently(tmp_path, tokenizer):
    data = prepare(write_jsonl_lines(tmp_path, ['{"text": "a"}', '{"text": null}']), tokenizer)
    stats = data.train_stats
    assert isinstance(stats, DataStats)
    assert stats.num_rows == stats.num_examples + stats.num_skipped == 2
    assert stats.num_label_tokens == sum(sum(lab != -100 for lab in ex["labels"]) for ex in data.train)


def test_a_conversation_the_template_cannot_render_is_that_row_alone(tmp_path):
    """Conversations are rendered a batch at a time; one the template raises on is reported (or
    skipped) by its own row number and the rest of its batch still trains."""
    tok = make_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{% if 'forbidden' in m['content'] %}{{ raise_exception('no forbidden words') }}"
        "{% endif %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(6)]
    rows[3]["messages"][1]["content"] = "a forbidden reply"
    path = write_rows(tmp_path, rows, "jsonl")
    data = prepare(path, tok)
    assert [n for n, _ in data.train_stats.skipped] == [4]
    assert "cannot render this conversation" in data.train_stats.skipped[0][1]
    assert "no forbidden words" in data.train_stats.skipped[0][1]
    assert len(data.train) == 5
    with pytest.raises(DataError, match="line 4: the chat template cannot render"):
        prepare(path, tok, invalid_rows="error")


def test_the_direct_encoder_gives_the_tokenizers_own_ids_or_is_not_used():
    from fullscale.data import tokenize as data_module

    tok = make_tokenizer()
    texts = ["hello world", "<|user|>hi<|end|>", "a" * 300, ""]
    for special in (True, False):
        expected = [list(x) for x in tok(texts, add_special_tokens=special)["input_ids"]]
        assert data_module._tokenize(tok, texts, add_special_tokens=special) == expected
    assert data_module._direct_encoder(tok, texts, add_special_tokens=True) is not None
    tok.backend_tokenizer.enable_truncation(max_length=4)  # a backend setting the call would override
    assert data_module._direct_encoder(tok, texts, add_special_tokens=True) is None


def test_the_alpaca_template_is_configurable_and_a_too_long_prompt_says_the_length_needed(tmp_path, tokenizer):
    from fullscale.data import alpaca_templates

    rows = [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
            {"instruction": "Name a color.", "input": "", "output": "blue"}]
    path = write_rows(tmp_path, rows, "jsonl")
    # The classic preamble does not fit 64 tokens: every row is skipped, and the error says what fits.
    with pytest.raises(DataError) as info:
        prepare(path, tokenizer, max_seq_length=64)
    assert "Increase max_seq_length (now 64) to at least" in str(info.value) and "alpaca_template" in str(info.value)
    short = alpaca_templates("Q: {instruction}\nA: ", "Q: {instruction} ({input})\nA: ")
    data = prepare(path, tokenizer, max_seq_length=64, alpaca=short)
    assert [tokenizer.decode(ex["input_ids"], skip_special_tokens=True) for ex in data.train] == [
        "Q: Add the numbers. (2 and 3)\nA: 5", "Q: Name a color.\nA: blue"]
    # A template with no {input} field skips rows that have one, with the fix.
    data = prepare(path, tokenizer, max_seq_length=64, alpaca=alpaca_templates("Q: {instruction}\nA: "))
    assert data.train_stats.skipped == [(1, "has an 'input' but alpaca_template has no {input} field: set "
                                            "alpaca_template_with_input (or add {input} to alpaca_template)")]


@pytest.mark.parametrize("template", [
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor",      # a syntax error
    "{% for m in messages %}{{ m['content'] | no_such_filter }}{% endfor %}",     # an unknown filter
    "{% for m in messages %}{{ m.content.nothing.here }}{% endfor %}",            # undefined
])
def test_a_broken_chat_template_is_named_as_the_template_not_bad_rows(tmp_path, template):
    tok = make_tokenizer()
    tok.chat_template = template
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(4)]
    path = write_rows(tmp_path, rows, "jsonl")
    with pytest.raises(DataError, match="chat template itself is broken"):
        prepare(path, tok)
