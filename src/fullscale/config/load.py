"""Loading a config: YAML first (duplicate keys and line numbers kept for the messages), then
``key=value`` overrides, each value coerced to its key's type. Validation is strict and collects
every problem before raising, so a user fixes a config in one pass and before any model is loaded."""

from __future__ import annotations

import difflib
import errno
import math
import os
import typing
from pathlib import Path
from typing import Any

import yaml

from fullscale.config.schema import FIELDS, REPORT_TO, Config, is_hub_name, train_sources
from fullscale.errors import ConfigError

_PATH_KEYS = ("model_name_or_path", "train_file", "eval_file", "output_dir")
_HINTS = typing.get_type_hints(Config)

# ----------------------------------------------------------------------------- loading

def _yaml_lines(text: str) -> dict[str, int]:
    """Line number (1-based) of each top-level key, for error messages."""
    lines: dict[str, int] = {}
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return lines
    if isinstance(node, yaml.MappingNode):
        for key_node, _ in node.value:
            lines[str(key_node.value)] = key_node.start_mark.line + 1
    return lines


def read_yaml(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, int]]:
    """Read a flat YAML config file: (values, line number of each key)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} (give a YAML file, or no file to run the demo)")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[:exc.start].count(b"\n") + 1
        raise ConfigError(f"{path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at line {line}); save it "
                          "as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"cannot read the config file {path}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path} is not valid YAML{where}: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must be a mapping of key: value lines, got a {type(data).__name__}")
    duplicates = _duplicate_keys(text)
    if duplicates:
        raise ConfigError([f"{key} is set twice ({path}:{first} and {path}:{second}); keep one of them"
                           for key, first, second in duplicates])
    return data, _yaml_lines(text)


def _duplicate_keys(text: str) -> list[tuple[str, int, int]]:
    """(key, first line, repeated line) for each top-level key given more than once (YAML loaders
    silently keep the last one)."""
    node = yaml.compose(text)
    seen: dict[str, int] = {}
    out = []
    if isinstance(node, yaml.MappingNode):
        for key_node, _ in node.value:
            key, line = str(key_node.value), key_node.start_mark.line + 1
            if key in seen:
                out.append((key, seen[key], line))
            else:
                seen[key] = line
    return out


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Parse ``key=value`` command-line overrides; values are read as YAML scalars/lists."""
    out: dict[str, Any] = {}
    problems = []
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            problems.append(f"override {item!r} is not key=value (e.g. learning_rate=1e-4)")
            continue
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            out[key.strip()] = raw
    if problems:
        raise ConfigError(problems)
    return out


def _from_file_dir(config_dir: Path, key: str, value: Any) -> Any:
    """A relative path in a config file, resolved against the file's directory (as users of
    YAML-driven tools expect): output_dir and eval_file always (unless the path exists only from
    the working directory, as in configs written before this rule); model_name_or_path and
    train_file entries when the path exists there or starts with ./ or ../ (otherwise they may be
    hub ids, or paths from the working directory)."""
    if key == "train_file" and isinstance(value, list):
        return [{**e, "path": _from_file_dir(config_dir, key, e["path"])} if isinstance(e, dict) and "path" in e
                else _from_file_dir(config_dir, key, e) for e in value]
    if key not in _PATH_KEYS or not isinstance(value, str) or not value or config_dir == Path("."):
        return value
    value = os.path.expanduser(value)
    if os.path.isabs(value):
        return value
    there = os.path.normpath(config_dir / value)
    if key in ("output_dir", "eval_file"):
        return value if (Path(value).exists() and not Path(there).exists()) else there
    if Path(there).exists() or value.startswith(("./", "../")):
        return there
    return value


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | dict | None = None,
                *, base: dict[str, Any] | None = None) -> Config:
    """Build a validated Config from an optional YAML file, then overrides.

    `base` holds values applied before the file (the demo's settings). Raises ConfigError
    listing every problem at once.
    """
    values: dict[str, Any] = dict(base or {})
    where: dict[str, str] = {k: "demo config" for k in values}
    explicit: set[str] = set()
    if path is not None:
        data, lines = read_yaml(path)
        for k, v in data.items():
            values[str(k)] = _from_file_dir(Path(path).parent, str(k), v)
            explicit.add(str(k))
            where[str(k)] = f"{path}:{lines[str(k)]}" if str(k) in lines else str(path)
    if overrides:
        ov = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides)
        for k, v in ov.items():
            values[k] = v
            explicit.add(k)
            where[k] = "command line"
    config = build_config(values, where=where, explicit=explicit)
    if config.output_dir is None:
        first = train_sources(config)[0]["path"] if config.train_file else None
        name = Path(path).stem if path else Path(first).stem if first else "demo"
        config.output_dir = str(Path("runs") / name)
    return absolute_paths(config)


def path_problem(value: str) -> str | None:
    """Why a data path cannot be read as a file or directory, in the user's words; None when it can."""
    path = Path(value)
    try:
        path.stat()
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return f"{value} is a symbolic link that loops (a link to itself, or a cycle of links)"
        if path.is_symlink():
            return f"{value} is a symbolic link to {os.readlink(value)}, which does not exist"
        if exc.errno == errno.ENOENT or exc.errno == errno.ENOTDIR:
            return f"no such file or directory: {value}"
        return f"cannot read {value}: {exc.strerror}"
    if not (path.is_file() or path.is_dir()):
        return (f"{value} is not a regular file or directory (a FIFO, socket or device): the data is read more "
                "than once (fingerprinted, then tokenized), so write it to a file first")
    return None


def absolute_paths(config: Config) -> Config:
    """Local paths made absolute, so that what the run records (config.yaml, best_model/, exports,
    the model card) works from any directory: a requeued job started elsewhere resumes, an export
    finds its base. The model and data when they exist here (otherwise they may be hub ids, which
    stay ids); output_dir stays as given (`fullscale resume RUN` names the run itself)."""
    def local(value):
        if isinstance(value, str) and value and not os.path.isabs(value) and Path(value).exists():
            return os.path.abspath(value)
        return value

    config.model_name_or_path = local(config.model_name_or_path)
    config.eval_file = local(config.eval_file)
    if isinstance(config.train_file, list):
        config.train_file = [{**e, "path": local(e["path"])} if isinstance(e, dict) and "path" in e else local(e)
                             for e in config.train_file]
    else:
        config.train_file = local(config.train_file)
    return config


def build_config(values: dict[str, Any], *, where: dict[str, str] | None = None,
                 explicit: set[str] | None = None) -> Config:
    """Type-check `values` against Config, then check combinations; all problems at once."""
    where = where or {}
    problems: list[str] = []
    clean: dict[str, Any] = {}
    for key, value in values.items():
        at = f" ({where[key]})" if key in where else ""
        if key not in FIELDS:
            close = difflib.get_close_matches(key, FIELDS.keys(), n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else "; run `fullscale train --help-keys` for the list"
            problems.append(f"unknown key '{key}'{at}{hint}")
            continue
        ok, converted, why = _coerce(key, value)
        if ok:
            clean[key] = converted
        else:
            problems.append(f"{key}{at}: {why}")
    config = Config(**clean)
    # A key counts as deliberately set when it was given with a value other than its default
    # (a saved config.yaml lists every key; its defaults are not choices).
    defaults = Config()
    config.explicit = {k for k in (explicit if explicit is not None else values)
                       if k in FIELDS and getattr(config, k) != getattr(defaults, k)}
    if config.lora_target_modules != "attention":
        config.explicit.add("lora_target_modules")   # a list is always the user's, even q/k/v/o
    problems += _check_combinations(config, where)
    if problems:
        raise ConfigError(problems)
    return config


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any) -> tuple[bool, Any, str]:
    """Check one value against the key's type and choices; returns (ok, value, reason)."""
    f = FIELDS[key]
    choices = f.metadata.get("choices")
    tp = _HINTS[key]
    args = set(typing.get_args(tp)) or {tp}
    nullable = type(None) in args
    if value is None:
        if nullable:
            return True, None, ""
        return False, None, f"must not be empty (default: {f.default!r})"
    if choices is not None:
        if isinstance(value, str) and value.lower() in ("true", "false") and True in choices:
            value = value.lower() == "true"
        if value in choices and not (isinstance(value, bool) and not any(isinstance(c, bool) for c in choices)):
            return True, value, ""
        return False, None, f"got {value!r}; choose one of {', '.join(repr(c) for c in choices)}"
    # Lists (with a single string accepted where the key allows it).
    if any(typing.get_origin(a) is list for a in args):
        if isinstance(value, str):
            if key == "report_to":
                value = [] if value == "none" else [value]
            elif key == "lora_target_modules":
                return True, value if value in ("all-linear", "attention") else [value], ""
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            return False, None, f"got {value!r}; expected a list of names"
        if key == "report_to":
            bad = [v for v in value if v not in REPORT_TO]
            if bad:
                return False, None, f"unsupported {bad}; choose from {list(REPORT_TO)}"
            value = [v for v in value if v != "none"]
            import importlib.util

            missing = [v for v in value if v in ("wandb", "mlflow") and importlib.util.find_spec(v) is None]
            if missing:
                return False, None, f"{missing[0]} is not installed: pip install {missing[0]} (or leave it out)"
        return True, value, ""
    if key == "train_file" and isinstance(value, list):
        return _coerce_sources(value)
    if key == "dataset_columns":
        if isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            return True, dict(value), ""
        return False, None, f"got {value!r}; expected a mapping of column names, e.g. {{prompt: question}}"
    if key == "dataloader_num_workers":
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
            return True, value, ""
        return False, None, f"got {value!r}; expected 'auto' or a whole number >= 0"
    if bool in args:
        if isinstance(value, bool):
            return True, value, ""
        return False, None, f"got {value!r}; expected true or false"
    if int in args:
        if isinstance(value, int) and not isinstance(value, bool):
            return True, value, ""
        if isinstance(value, float) and value.is_integer():
            return True, int(value), ""
        return False, None, f"got {value!r} ({type(value).__name__}); expected a whole number"
    if float in args:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None and math.isfinite(number):
            return True, number, ""
        if number is not None:
            return False, None, f"got {value!r}; expected a finite number"
        return False, None, f"got {value!r} ({type(value).__name__}); expected a number"
    if str in args:
        if isinstance(value, str):
            if key in _PATH_KEYS and value.startswith("~"):
                value = os.path.expanduser(value)   # as a shell would (YAML and quoted overrides do not)
            return True, value, ""
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key.endswith(("_dir", "_path")):
            return True, str(value), ""
        return False, None, f"got {value!r} ({type(value).__name__}); expected text"
    return False, None, f"unsupported value {value!r}; expected {_type_name(tp)}"


SOURCE_KEYS = ("path", "weight", "dataset_config", "dataset_split", "dataset_format", "dataset_columns")


def _coerce_sources(value: list) -> tuple[bool, Any, str]:
    """train_file as a list of sources: each a path (or hub id) or a mapping with `path` and
    optional `weight` (> 0: that many times the source's examples per epoch) and the source's own
    dataset_config / dataset_split / dataset_format / dataset_columns. Normalised to mappings."""
    if not value:
        return False, None, "an empty list; give a file (or a list of sources, each with a path)"
    out, problems = [], []
    for n, entry in enumerate(value, start=1):
        if isinstance(entry, str):
            entry = {"path": entry}
        if not isinstance(entry, dict):
            problems.append(f"source {n}: got {entry!r}; expected a path or a mapping with 'path' (and 'weight')")
            continue
        unknown = [k for k in entry if k not in SOURCE_KEYS]
        if unknown:
            close = difflib.get_close_matches(str(unknown[0]), SOURCE_KEYS, n=1, cutoff=0.6)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(SOURCE_KEYS)})"
            problems.append(f"source {n}: unknown key '{unknown[0]}'{hint}")
            continue
        clean = {}
        for key, item in entry.items():
            if key == "weight":
                ok = isinstance(item, (int, float)) and not isinstance(item, bool) and math.isfinite(item) and item > 0
                why = f"{item!r} must be a number > 0 (1: every example once an epoch, 0.5: half, 2: twice)"
            elif key == "path":
                ok, item, why = _coerce("eval_file", item)   # a path, '~' expanded
                ok = ok and bool(item)
                why = why or "path must not be empty"
            else:
                ok, item, why = _coerce(key, item)
            if not ok:
                problems.append(f"source {n}: {key}: {why}")
            clean[key] = float(item) if key == "weight" and ok else item
        if "path" not in entry:
            problems.append(f"source {n}: has no 'path' (a data file, a directory or a hub dataset id)")
        out.append(clean)
    if problems:
        return False, None, "; ".join(problems)
    return True, out, ""


def _check_combinations(c: Config, where: dict[str, str]) -> list[str]:
    """Ranges and impossible combinations, each with the fix."""
    p: list[str] = []

    def at(key: str) -> str:
        return f" ({where[key]})" if key in where else ""

    def need(cond: bool, key: str, text: str) -> None:
        if not cond:
            p.append(f"{key}{at(key)}: {text}")

    need(c.learning_rate > 0, "learning_rate", f"got {c.learning_rate}; must be > 0 (the default is 2e-4)")
    for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                "logging_steps", "lora_rank", "lora_alpha", "save_steps"):
        need(getattr(c, key) >= 1, key, f"got {getattr(c, key)}; must be >= 1")
    need(c.eval_steps >= 0, "eval_steps", f"got {c.eval_steps}; must be >= 0 (0: evaluate only at start and end)")
    need(c.save_total_limit >= 1, "save_total_limit", f"got {c.save_total_limit}; must be >= 1 (at least one checkpoint is kept)")
    need(c.max_seq_length >= 8, "max_seq_length", f"got {c.max_seq_length}; must be >= 8 tokens")
    need(0 <= c.warmup_ratio < 1, "warmup_ratio", f"got {c.warmup_ratio}; must be in [0, 1)")
    need(0 <= c.eval_split < 1, "eval_split", f"got {c.eval_split}; must be in [0, 1) (0: no held-out split)")
    need(0 <= c.lora_dropout < 1, "lora_dropout", f"got {c.lora_dropout}; must be in [0, 1)")
    need(c.weight_decay >= 0, "weight_decay", f"got {c.weight_decay}; must be >= 0")
    need(0 <= c.max_invalid_share <= 1, "max_invalid_share", f"got {c.max_invalid_share}; must be in [0, 1] (1: never stop)")
    need(0 <= c.seed < 2**32, "seed", f"got {c.seed}; must be a whole number in [0, 2^32) (the default is 42)")
    need(c.max_grad_norm >= 0, "max_grad_norm", f"got {c.max_grad_norm}; must be >= 0 (0 disables clipping)")
    need(c.early_stopping_patience >= 0, "early_stopping_patience", f"got {c.early_stopping_patience}; must be >= 0 (0 disables)")
    need(c.health_window >= 10, "health_window", f"got {c.health_window}; must be >= 10 steps")
    need(c.health_max_nonfinite >= 1, "health_max_nonfinite", f"got {c.health_max_nonfinite}; must be >= 1")
    need(0 < c.health_rollback_lr_factor <= 1, "health_rollback_lr_factor", f"got {c.health_rollback_lr_factor}; must be in (0, 1]")
    need(c.health_max_rollbacks >= 0, "health_max_rollbacks", f"got {c.health_max_rollbacks}; must be >= 0")
    need(c.health_memory_growth > 0, "health_memory_growth", f"got {c.health_memory_growth}; must be > 0")
    need(c.eval_samples >= 0, "eval_samples", f"got {c.eval_samples}; must be >= 0 (0: no sample generations)")
    need(c.eval_sample_tokens >= 1, "eval_sample_tokens", f"got {c.eval_sample_tokens}; must be >= 1")
    need(0 < c.eval_time_budget <= 1, "eval_time_budget", f"got {c.eval_time_budget}; must be in (0, 1]")
    need(c.early_stopping_min_delta >= 0, "early_stopping_min_delta", f"got {c.early_stopping_min_delta}; must be >= 0")
    if c.max_steps <= 0:
        need(c.num_train_epochs > 0, "num_train_epochs", f"got {c.num_train_epochs}; must be > 0 unless max_steps > 0")
    need(c.max_steps == -1 or c.max_steps > 0, "max_steps", f"got {c.max_steps}; use a positive number of steps, or -1 to use num_train_epochs")
    for n, source in enumerate(train_sources(c) if c.train_file else [], start=1):
        value = source["path"]
        which = f" (source {n})" if isinstance(c.train_file, list) else ""
        problem = path_problem(value)
        if problem and not (problem.startswith("no such") and is_hub_name(value)):
            p.append(f"train_file{at('train_file')}{which}: {problem}")
    if c.eval_file and path_problem(c.eval_file):
        p.append(f"eval_file{at('eval_file')}: {path_problem(c.eval_file)}")
    if c.model_name_or_path and _looks_like_path(c.model_name_or_path) and not Path(c.model_name_or_path).exists():
        p.append(f"model_name_or_path{at('model_name_or_path')}: no such directory: {c.model_name_or_path} "
                 "(give a local model directory or a hub id such as org/name)")
    if c.eval_file and "eval_split" in c.explicit and c.eval_split > 0:
        p.append(f"eval_split{at('eval_split')}: set together with eval_file; the eval data comes from eval_file, "
                 "so remove eval_split (or set it to 0)")
    # Evaluation needs eval data; early stopping needs evaluation.
    if not c.has_eval_data:
        if "eval_steps" in c.explicit and c.eval_steps > 0:
            p.append(f"eval_steps{at('eval_steps')}: set to {c.eval_steps} but there is no eval data "
                     "(no eval_file and eval_split is 0); give eval_file or eval_split > 0, or remove eval_steps")
        if "early_stopping_patience" in c.explicit and c.early_stopping_patience > 0:
            p.append(f"early_stopping_patience{at('early_stopping_patience')}: early stopping needs evaluation, but there is "
                     "no eval data; give eval_file or eval_split > 0, or set early_stopping_patience: 0")
    elif c.eval_steps == 0 and "early_stopping_patience" in c.explicit and c.early_stopping_patience > 0:
        p.append(f"early_stopping_patience{at('early_stopping_patience')}: early stopping needs periodic evaluation, "
                 "but eval_steps is 0; set eval_steps > 0 or early_stopping_patience: 0")
    if c.alpaca_template is not None:
        need("{instruction}" in c.alpaca_template, "alpaca_template",
             "must contain {instruction}, where the row's instruction goes (e.g. '### Q:\\n{instruction}\\n### A:\\n')")
    if c.alpaca_template_with_input is not None:
        need("{instruction}" in c.alpaca_template_with_input and "{input}" in c.alpaca_template_with_input,
             "alpaca_template_with_input", "must contain {instruction} and {input}")
    if c.memory_budget_gb is not None:
        need(c.memory_budget_gb > 0, "memory_budget_gb", f"got {c.memory_budget_gb}; must be > 0 (GB), or remove it to use the device's memory")
    need(0 <= c.memory_margin < 1, "memory_margin", f"got {c.memory_margin}; must be in [0, 1) (the default 0.1 keeps 10% free)")
    return p


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.sep + os.sep in name or name.count("/") > 1


