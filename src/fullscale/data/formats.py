"""The row formats: detecting one from the columns, validating a row, and converting it to text
(the prompt and completion, or a chat rendered with the tokenizer's template and the assistant
spans located). No tokens yet."""

from __future__ import annotations

import json
import math
from collections import Counter
from typing import Any

from fullscale.config import FORMATS  # noqa: F401 (re-exported: one home, the config's choices)
from fullscale.data.readers import _json_type
from fullscale.data.records import _Source
from fullscale.errors import DataError

CHAT_FORMATS = ("messages", "sharegpt")  # rendered with the tokenizer's chat template

# The columns each format needs. Detection tries the most specific format first, so a file
# with both 'messages' and 'text' columns is read as chat data.
REQUIRED_COLUMNS = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
}
DETECT_ORDER = ("messages", "sharegpt", "alpaca", "prompt_completion", "text")

KNOWN_ROLES = ("system", "developer", "user", "assistant", "tool", "function", "ipython")

# The classic Alpaca prompt (tatsu-lab/stanford_alpaca), with and without the input section.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)

# Format detection


def _match_format(columns: set[str]) -> str | None:
    for fmt in DETECT_ORDER:
        if all(c in columns for c in REQUIRED_COLUMNS[fmt]):
            return fmt
    return None


def _expected_columns() -> str:
    return "; ".join(
        f"{fmt}: {', '.join(REQUIRED_COLUMNS[fmt])}" + (" (+ optional input)" if fmt == "alpaca" else "")
        for fmt in DETECT_ORDER
    )


def detect_format(columns: set[str], *, path) -> str:
    """The dataset format that `columns` fit, trying messages > alpaca > prompt_completion > text.

    Raises DataError listing the columns found and the ones each format expects when none fits.
    """
    fmt = _match_format(set(columns))
    if fmt is not None:
        return fmt
    found = ", ".join(sorted(columns)) or "(none)"
    hint = ""
    if "conversations" in columns:
        hint = (" A 'conversations' column looks like ShareGPT data: convert it to a 'messages' column of "
                "{'role', 'content'} objects.")
    raise DataError(
        f"{path}: cannot detect the dataset format from its columns ({found}). Expected columns: "
        f"{_expected_columns()}.{hint} Rename the columns, or set dataset_format to one of {', '.join(FORMATS)}."
    )


def _choose_format(records: list[tuple[int, dict]], *, path, dataset_format: str) -> tuple[str, str | None]:
    """The format for these rows and, under auto, the console message saying which was chosen.

    Detection looks at every row, not just the first: each distinct column set votes with its
    number of rows (JSON Lines rows need not share their keys).
    """
    return _choose_format_from(Counter(frozenset(row) for _, row in records), path=path, dataset_format=dataset_format)


def _choose_format_from(column_sets: Counter, *, path, dataset_format: str) -> tuple[str, str | None]:
    """_choose_format from the column sets of the valid rows and their counts."""
    records = bool(column_sets)
    all_columns = set().union(*column_sets) if column_sets else set()
    if dataset_format != "auto":
        required = REQUIRED_COLUMNS[dataset_format]
        if records and not any(all(c in cols for c in required) for cols in column_sets):
            detected = _match_format(all_columns)
            hint = f" The columns fit '{detected}': set dataset_format: {detected} (or auto)." if detected else ""
            raise DataError(
                f"{path}: dataset_format '{dataset_format}' needs the column(s) {', '.join(required)}, but no row "
                f"has them (columns found: {', '.join(sorted(all_columns)) or '(none)'}).{hint}"
            )
        return dataset_format, None
    votes: Counter[str] = Counter()
    for cols, count in column_sets.items():
        fmt = _match_format(set(cols))
        if fmt is not None:
            votes[fmt] += count
    if not votes:
        detect_format(all_columns, path=path)  # raises with the columns found and expected
    best = max(votes.values())
    fmt = next(f for f in DETECT_ORDER if votes.get(f) == best)
    message = f"dataset_format auto: detected '{fmt}' (columns: {', '.join(sorted(all_columns))})"
    others = sum(votes.values()) - votes[fmt]
    if others:
        message += f"; {others:,} rows look like another format and will be skipped"
    return fmt, message


# --------------------------------------------------------------------------------------
# Row conversion: validate a row and turn it into text (no tokens yet)


class _Invalid(Exception):
    """A row that cannot be used; the message is the reason shown with its row number."""


class _TemplateUnstable(Exception):
    """The chat template renders a prefix of a conversation differently from the full one."""

    def __init__(self, detail: str, index: int = -1):
        super().__init__(detail)
        self.index = index  # which item, when raised while tokenizing a batch


def _is_null(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))  # pandas/csv NaN


def _null_word(value: Any) -> str:
    """How the reason names a missing value: "null", or "NaN (an empty cell)" for a float NaN."""
    return "NaN (an empty cell, or a float NaN)" if isinstance(value, float) else "null"


def _required_str(row: dict, key: str) -> str:
    if key not in row:
        raise _Invalid(f"missing '{key}'")
    value = row[key]
    if _is_null(value):
        raise _Invalid(f"{_null_word(value)} '{key}'")
    if not isinstance(value, str):
        hint = " (conversational prompt/completion is not supported: use a 'messages' column)" if isinstance(
            value, list) else ""
        raise _Invalid(f"'{key}' must be a string, got {_json_type(value)}{hint}")
    if not value.strip():
        raise _Invalid(f"empty '{key}'")
    return value


def alpaca_templates(template: str | None = None, with_input: str | None = None) -> tuple[str, str | None]:
    """The (template, template for rows with an input) in use: the classic Alpaca pair by default;
    a template of one's own serves rows with an input too when it has an {input} field."""
    if template is None and with_input is None:
        return ALPACA_PROMPT, ALPACA_PROMPT_WITH_INPUT
    template = template if template is not None else ALPACA_PROMPT
    return template, with_input if with_input is not None else (template if "{input}" in template else None)


def format_alpaca_prompt(*, instruction: str, input: str | None = None,
                         templates: tuple[str, str | None] | None = None) -> str:
    """The Alpaca prompt for an instruction (and optional input): the classic one ending in
    '### Response:\\n', or `templates` (from alpaca_templates)."""
    plain, with_input = templates or (ALPACA_PROMPT, ALPACA_PROMPT_WITH_INPUT)
    if input:
        if with_input is None:
            raise _Invalid("has an 'input' but alpaca_template has no {input} field: set alpaca_template_with_input "
                           "(or add {input} to alpaca_template)")
        return with_input.replace("{instruction}", instruction).replace("{input}", input)
    return plain.replace("{instruction}", instruction).replace("{input}", "")


def _convert_prompt_completion(row: dict) -> tuple[str, str]:
    return _required_str(row, "prompt"), _required_str(row, "completion")


def _convert_alpaca(row: dict, templates: tuple[str, str | None] | None = None) -> tuple[str, str]:
    instruction = _required_str(row, "instruction")
    output = _required_str(row, "output")
    extra = row.get("input")
    if _is_null(extra):
        extra = None
    elif not isinstance(extra, str):
        raise _Invalid(f"'input' must be a string, got {_json_type(extra)}")
    return format_alpaca_prompt(instruction=instruction, input=extra if extra and extra.strip() else None,
                                templates=templates), output


# ShareGPT rows: {"conversations": [{"from": "human", "value": ...}, {"from": "gpt", ...}]}.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
                  "system": "system", "tool": "tool", "observation": "tool", "function_call": "assistant"}


def _sharegpt_messages(row: dict) -> list[dict]:
    """A ShareGPT row's turns as {role, content} messages (validated as messages afterwards)."""
    turns = row.get("conversations")
    if isinstance(turns, str):
        try:
            turns = json.loads(turns)
        except json.JSONDecodeError:
            raise _Invalid("'conversations' must be a list of {from, value} objects, got a string") from None
    if not isinstance(turns, list) or not turns:
        raise _Invalid(f"'conversations' must be a non-empty list of {{from, value}} objects, got {_json_type(turns)}")
    messages = []
    for i, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict) or "from" not in turn:
            raise _Invalid(f"turn {i} of {len(turns)} must be an object with 'from' and 'value'")
        role = SHAREGPT_ROLES.get(str(turn["from"]).lower())
        if role is None:
            raise _Invalid(f"turn {i} of {len(turns)} is from {turn['from']!r} (expected one of: "
                           f"{', '.join(SHAREGPT_ROLES)})")
        messages.append({"role": role, "content": turn.get("value")})
    return messages


def _validate_messages(row: dict) -> list[dict]:
    if "messages" not in row:
        raise _Invalid("missing 'messages'")
    messages = row["messages"]
    if _is_null(messages):
        raise _Invalid(f"{_null_word(messages)} 'messages'")
    if isinstance(messages, str):  # a CSV cell holding the list as JSON
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError:
            raise _Invalid("'messages' must be a list of {role, content} objects, got a string") from None
    if not isinstance(messages, list):
        raise _Invalid(f"'messages' must be a list of {{role, content}} objects, got {_json_type(messages)}")
    if not messages:
        raise _Invalid("empty 'messages'")
    for i, message in enumerate(messages, start=1):
        where = f"message {i} of {len(messages)}"
        if not isinstance(message, dict):
            raise _Invalid(f"{where} must be an object with 'role' and 'content', got {_json_type(message)}")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise _Invalid(f"{where} has no 'role'")
        if role not in KNOWN_ROLES:
            raise _Invalid(f"{where} has unknown role {role!r} (expected one of: {', '.join(KNOWN_ROLES)})")
        content = message.get("content")
        if role == "assistant" and message.get("tool_calls") and (_is_null(content) or content == ""):
            continue  # a tool call carries no text content
        if "content" not in message or _is_null(content):
            raise _Invalid(f"{where} ({role}) has no 'content'")
        if not isinstance(content, str):
            raise _Invalid(f"{where} ({role}): 'content' must be a string, got {_json_type(content)}")
        if not content.strip() and role != "system":  # an empty system prompt is common and harmless
            raise _Invalid(f"{where} ({role}) has empty 'content'")
    if not any(m["role"] == "assistant" for m in messages):
        raise _Invalid("no assistant message: nothing to learn")
    return messages


def _render(tokenizer, conversations: list[list[dict]], *, add_generation_prompt: bool) -> list[str | _Invalid]:
    """Each conversation rendered by the chat template, or the _Invalid its rendering raised. One
    call for the batch (a fifth less template work than one call each); a batch that fails is
    rendered one conversation at a time to find the one that raised."""
    if not conversations:
        return []
    try:
        return list(tokenizer.apply_chat_template(conversations, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt))
    except Exception:
        pass
    out: list[str | _Invalid] = []
    for messages in conversations:
        try:
            out.append(tokenizer.apply_chat_template(messages, tokenize=False,
                                                     add_generation_prompt=add_generation_prompt))
        except Exception as exc:  # jinja errors raised by the template itself ("roles must alternate", ...)
            if _template_bug(exc):
                raise DataError(
                    f"the tokenizer's chat template itself is broken ({type(exc).__name__}: {exc}): it fails "
                    "whatever the conversation, so no messages row can be rendered. This is the template, not your "
                    "data: fix chat_template in the tokenizer's tokenizer_config.json (or chat_template.jinja), or "
                    "use a tokenizer with a working template") from None
            out.append(_Invalid(f"the chat template cannot render this conversation: {exc}"))
    return out


def _template_bug(exc: Exception) -> bool:
    """A template that cannot work at all (a syntax error, an undefined name), as opposed to one that
    refuses a conversation on purpose (raise_exception: "roles must alternate", ...)."""
    try:
        from jinja2 import TemplateSyntaxError, UndefinedError
    except ImportError:
        return False
    return isinstance(exc, (TemplateSyntaxError, UndefinedError))


def _convert_conversations(conversations: list[list[dict]], tokenizer) -> list:
    """Per validated conversation, its rendering and, per assistant message, the rendered text before
    and after it: (full, spans), or the _Invalid / _TemplateUnstable that stops the row.

    The assistant tokens are those between render(messages[:i], add_generation_prompt=True)
    and render(messages[:i+1]): the reply and the template's end marker, so the model learns
    to stop. This holds only if each rendering is a prefix of the next (checked here).
    """
    fulls = _render(tokenizer, conversations, add_generation_prompt=False)
    # Every prefix rendering needed, in two batches (with and without the generation prompt).
    wanted: dict[bool, list] = {True: [], False: []}
    for c, messages in enumerate(conversations):
        if isinstance(fulls[c], _Invalid):
            continue
        for i, message in enumerate(messages):
            if message["role"] == "assistant":
                if i:
                    wanted[True].append((c, i))
                if i != len(messages) - 1:
                    wanted[False].append((c, i + 1))
    rendered = {}
    for gen, keys in wanted.items():
        for key, text in zip(keys, _render(tokenizer, [conversations[c][:i] for c, i in keys],
                                           add_generation_prompt=gen)):
            rendered[gen, *key] = text
    out = []
    for c, messages in enumerate(conversations):
        full = fulls[c]
        if isinstance(full, _Invalid):
            out.append(full)
            continue
        spans, problem = [], None
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            last = i == len(messages) - 1
            before = rendered[True, c, i] if i else ""
            after = full if last else rendered[False, c, i + 1]
            problem = next((t for t in (before, after) if isinstance(t, _Invalid)), None)
            if problem is None and not (after.startswith(before) and full.startswith(after)):
                problem = _TemplateUnstable(f"at message {i + 1}")
            if problem is not None:
                break
            spans.append((before, None if last else after))  # None: up to the end of the conversation
        out.append(problem if problem is not None else (full, spans))
    return out



def _convert_rows(rows, *, fmt: str, tokenizer, source: _Source, invalid_rows: str,
                  alpaca: tuple[str, str | None] | None = None):
    """Validate and render every row. Returns (items, row numbers, skipped (row, reason))."""
    converters = {"text": lambda r: _required_str(r, "text"), "prompt_completion": _convert_prompt_completion,
                  "alpaca": lambda r: _convert_alpaca(r, alpaca), "messages": _validate_messages,
                  "sharegpt": lambda r: _validate_messages({"messages": _sharegpt_messages(r)})}
    convert = converters[fmt]
    results = []   # per row: (number, converted item or the exception that stops it)
    for number, row, error in rows:
        try:
            if error is not None:
                raise _Invalid(error)
            results.append((number, convert(row)))
        except _Invalid as exc:
            results.append((number, exc))
    if fmt in CHAT_FORMATS:   # validated messages -> renderings, the chunk's conversations at once
        valid = [k for k, (_, item) in enumerate(results) if not isinstance(item, Exception)]
        for k, item in zip(valid, _convert_conversations([results[k][1] for k in valid], tokenizer)):
            results[k] = (results[k][0], item)
    items, numbers, skipped = [], [], []
    for number, item in results:   # in row order: the first bad row is the one reported
        if isinstance(item, _TemplateUnstable):
            raise _template_unstable_error(source, number, str(item)) from None
        if isinstance(item, _Invalid):
            if invalid_rows == "error":
                raise DataError(
                    f"{source.path} {source.unit} {number}: {item}. Fix the {source.unit}, or set "
                    f"`invalid_rows: skip` to skip invalid rows and report them."
                ) from None
            skipped.append((number, str(item)))
            continue
        items.append(item)
        numbers.append(number)
    return items, numbers, skipped


def _template_unstable_error(source: _Source, number: int, detail: str) -> DataError:
    return DataError(
        f"{source.path} {source.unit} {number}: the tokenizer's chat template is not prefix-stable "
        f"({detail}): rendering the conversation up to an assistant message does not give the start of the "
        f"full conversation, so the assistant tokens cannot be located for loss masking. This happens with "
        f"templates that rewrite earlier turns (for example, dropping reasoning from past assistant turns). "
        f"Fix: set a chat template that renders each turn independently, split the conversations into one "
        f"example per assistant turn, or convert the data to dataset_format prompt_completion."
    )
