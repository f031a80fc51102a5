"""The one typed config: every key, its default, a one-line doc and its choices, declared once;
what the rest of fullscale derives from it (the train sources, the early-stopping patience in use)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "cosine_with_min_lr",
    "warmup_stable_decay",
)
FORMATS = ("text", "prompt_completion", "alpaca", "messages", "sharegpt")   # the row formats (fullscale.data)
DATASET_FORMATS = ("auto", *FORMATS)
ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2")
AUTO_BOOL = ("auto", True, False)
REPORT_TO = ("tensorboard", "wandb", "mlflow", "none")
INVALID_ROWS = ("skip", "error")
RESUME = ("auto", "never", "restart")
HEALTH_ACTIONS = ("warn", "skip", "rollback", "abort")


def _key(default: Any, doc: str, choices: tuple | None = None) -> Any:
    meta = {"doc": doc, "choices": choices}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Config:
    """Every fullscale setting. Defaults are the values settled in the small-scale stage."""

    # --- model ---
    model_name_or_path: str | None = _key(None, "base model: a local directory or a hub id (none: the embedded demo model)")
    trust_remote_code: bool = _key(False, "allow custom modelling code from the model repository (off unless you trust it)")
    bf16: str | bool = _key("auto", "bf16 weights/compute: auto = where the device supports it, fp32 otherwise", AUTO_BOOL)
    tf32: str | bool = _key("auto", "TF32 matmuls: auto = on for CUDA devices that have it; never used on CPU", AUTO_BOOL)
    attn_implementation: str = _key("auto", "attention kernel: auto = flash_attention_2 when installed and on CUDA, else sdpa", ATTN_IMPLEMENTATIONS)
    gradient_checkpointing: bool = _key(True, "recompute activations in backward (non-reentrant; use_cache off)")
    # --- LoRA ---
    lora_rank: int = _key(32, "LoRA rank r")
    lora_alpha: int = _key(32, "LoRA alpha (scaling = alpha / r)")
    lora_dropout: float = _key(0.05, "dropout on the LoRA input")
    lora_target_modules: list[str] | str = _key("attention", "layers that get adapters: attention (the attention projections under the model's own names; a state-space model's mixer projections), all-linear (every linear layer but the output layer and routers, fused experts included), or a list of layer names (always taken as written)")
    # --- data ---
    train_file: str | list | None = _key(None, ".jsonl .json .csv .parquet, a datasets save_to_disk dir, a hub dataset id, or a list of such sources mixed by weight, each {path, weight, dataset_config, dataset_split, dataset_format, dataset_columns} (none: the demo data)")
    eval_file: str | None = _key(None, "evaluation data; when absent, eval_split of the train rows is held out")
    eval_split: float = _key(0.05, "share of train rows held out for evaluation when there is no eval_file")
    dataset_format: str = _key("auto", "row format; auto detects it from the columns", DATASET_FORMATS)
    max_seq_length: int = _key(1024, "longer rows are truncated to this many tokens and counted")
    dataset_config: str | None = _key(None, "with a hub dataset id (or a directory of data files) as train_file: its configuration (datasets.load_dataset's name)")
    dataset_split: str = _key("train", "with a hub dataset id (or a directory of data files) as train_file: the split to train on")
    alpaca_template: str | None = _key(None, "alpaca rows: the prompt, with {instruction} (and {input} for rows that have one); none: the classic Alpaca prompt (~200 characters of preamble)")
    alpaca_template_with_input: str | None = _key(None, "alpaca rows with an input: the prompt, with {instruction} and {input} (default: alpaca_template when it has {input})")
    dataset_columns: dict[str, str] | None = _key(None, "the file's name for a format's column, e.g. {prompt: question, completion: answer} or {conversations: dialog}")
    invalid_rows: str = _key("skip", "empty, null or malformed rows: skip and count them, or stop with an error", INVALID_ROWS)
    max_invalid_share: float = _key(0.05, "with invalid_rows: skip, stop (exit 2) when more than this share of a file's rows is skipped: that much bad data is a wrong file or format, not a few bad rows")
    packing: bool = _key(False, "pack several examples into each row of max_seq_length tokens (best-fit); examples never attend to each other; evaluation stays unpacked")
    group_by_length: bool = _key(False, "batch examples of similar length together (less padding, lighter than packing): each epoch's shuffled order is cut into spans of 64 micro-batches, sorted by length inside a span, and the span's micro-batches shuffled")
    # --- optimisation ---
    seed: int = _key(42, "seed for data order, split, LoRA init and dropout")
    num_train_epochs: float = _key(3.0, "passes over the train data (ignored when max_steps > 0)")
    max_steps: int = _key(-1, "optimizer steps to run; overrides num_train_epochs when > 0")
    learning_rate: float = _key(2e-4, "peak learning rate (AdamW)")
    per_device_train_batch_size: int = _key(8, "examples per micro-step per process")
    per_device_eval_batch_size: int = _key(8, "examples per evaluation batch per process")
    gradient_accumulation_steps: int = _key(4, "micro-steps per optimizer step; effective batch = per_device x processes x this")
    warmup_ratio: float = _key(0.05, "share of the steps spent warming the learning rate up")
    weight_decay: float = _key(0.01, "AdamW weight decay")
    lr_scheduler_type: str = _key("cosine", "learning-rate schedule (transformers get_scheduler)", SCHEDULERS)
    max_grad_norm: float = _key(1.0, "clip the gradient norm to this (0 disables clipping)")
    # --- evaluation, checkpoints, early stopping ---
    eval_steps: int = _key(500, "evaluate every this many steps (0: only before the first step and at the end)")
    save_steps: int = _key(500, "write a checkpoint every this many steps (and at the end)")
    save_total_limit: int = _key(3, "checkpoints kept; the best one is never rotated away")
    early_stopping_patience: int = _key(3, "stop after this many evaluations without improvement (0 disables)")
    early_stopping_min_delta: float = _key(0.001, "an eval loss must beat the best by more than this to count")
    eval_samples: int = _key(2, "at each evaluation, greedy generations for this many fixed eval rows (their prompts as trained), printed, logged and in the report (0: none)")
    eval_sample_tokens: int = _key(48, "at most this many new tokens per sample generation (and at most 16 past the expected reply's length)")
    eval_time_budget: float = _key(0.2, "warn when evaluation takes more than this share of the wall time")
    resume: str = _key("auto", "auto: continue from the newest valid checkpoint in output_dir; never: refuse to reuse a run directory; restart: move a previous run into output_dir/previous-<time>/ and start from step 0 (give it once, on the command line)", RESUME)
    force_resume: bool = _key(False, "resume even though the model, data or settings changed (the run is then no longer exact)")
    # --- health checks (see health.py for each rule) ---
    health_window: int = _key(50, "steps of history for the robust (median/MAD) spike and gradient rules")
    health_nonfinite_action: str = _key("skip", "NaN/Inf loss or grad norm: skip the update, or abort", ("skip", "abort"))
    health_max_nonfinite: int = _key(3, "non-finite steps in a row that end the run (abort) instead of skipping")
    health_spike_action: str = _key("rollback", "loss spike: warn, skip the update, rollback to the last checkpoint with a lower lr, or abort", HEALTH_ACTIONS)
    health_spike_threshold: float = _key(6.0, "spike when loss > recent median + this x the robust std of step-to-step changes; 0 disables")
    health_rollback_lr_factor: float = _key(0.5, "learning-rate factor applied at each rollback")
    health_max_rollbacks: int = _key(3, "rollbacks allowed before a spike aborts the run")
    health_grad_action: str = _key("warn", "exploding gradient norm: warn, skip, rollback or abort", HEALTH_ACTIONS)
    health_grad_threshold: float = _key(10.0, "exploding when the grad norm > this x its median over the window; 0 disables")
    health_overfit_action: str = _key("warn", "eval loss rising while train loss falls: warn or abort", ("warn", "abort"))
    health_overfit_evals: int = _key(3, "consecutive rising evaluations that count as overfitting; 0 disables")
    health_lr_action: str = _key("warn", "learning rate collapsing to ~0 long before the end (a scheduler error): warn or abort", ("warn", "abort"))
    health_memory_action: str = _key("warn", "memory growing through the run (a leak): warn or abort", ("warn", "abort"))
    health_memory_growth: float = _key(0.2, "memory growth (share of the early level) that counts as a leak")
    health_memory_window: int = _key(5, "logs averaged (median) at the start and at the end for the memory rule")
    # --- memory planning (see fullscale.plan and `fullscale plan`) ---
    memory_budget_gb: float | None = _key(None, "memory one process may use, in GB (2^30 bytes); none: the GPU's total memory, or on CPU the available RAM")
    memory_margin: float = _key(0.1, "share of that memory the plan keeps free (allocator fragmentation, estimate error)")
    plan_check: bool = _key(True, "before loading the model, refuse settings whose estimated peak memory does not fit (with settings that do)")
    # --- output and monitoring ---
    output_dir: str | None = _key(None, "the run directory (default runs/<config name>, runs/demo for the demo)")
    logging_steps: int = _key(10, "log train metrics every this many steps")
    report_to: list[str] | str = _key(["tensorboard"], "where metrics go besides metrics.jsonl: tensorboard, wandb, mlflow (a list for several), or none")
    dataloader_num_workers: str | int = _key("auto", "data loader worker processes; auto sizes to the cores, never more")

    # Keys the user set explicitly (YAML or override); used to tell a deliberate
    # combination from a default one. Not a config key.
    explicit: set[str] = field(default_factory=set, repr=False, compare=False, metadata={"internal": True})

    # ------------------------------------------------------------------
    @classmethod
    def keys(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if not f.metadata.get("internal")]

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.keys()}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def fingerprint(self, keys: typing.Iterable[str]) -> str:
        blob = json.dumps({k: getattr(self, k) for k in sorted(keys)}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def has_eval_data(self) -> bool:
        return bool(self.eval_file) or self.eval_split > 0

    @property
    def uses_tensorboard(self) -> bool:
        return "tensorboard" in self.report_to



FIELDS = {f.name: f for f in dataclasses.fields(Config) if not f.metadata.get("internal")}


def train_data(c: Config) -> str | list:
    """train_file, or the embedded demo data when there is none (the one home of that rule)."""
    from fullscale.demo import DEMO_TRAIN

    return c.train_file or str(DEMO_TRAIN)


def train_sources(c: Config) -> list[dict[str, Any]]:
    """The train data as a list of sources, each with every key set (a single train_file is one
    source of weight 1 with the run's dataset_* keys; a list's entries fall back to those keys; no
    train_file: the demo data)."""
    data = train_data(c)
    entries = data if isinstance(data, list) else [{"path": data}]
    shared = {"weight": 1.0, "dataset_config": c.dataset_config, "dataset_split": c.dataset_split,
              "dataset_format": c.dataset_format, "dataset_columns": c.dataset_columns}
    return [{**shared, **entry} for entry in entries]


def is_hub_name(name: str) -> bool:
    """A Hugging Face dataset id ("org/name" or "name"), not a path."""
    return bool(name) and not name.startswith((".", "/", "~")) and name.count("/") <= 1 and "\\" not in name \
        and Path(name).suffix.lower() not in (".jsonl", ".json", ".csv", ".parquet", ".ndjson")


def effective_early_stopping(c: Config) -> int:
    """Patience actually used: 0 when there is no periodic evaluation to stop on."""
    if not c.has_eval_data or c.eval_steps == 0:
        return 0
    return c.early_stopping_patience


def describe_keys() -> str:
    """A table of every key, default and doc (for --help-keys and the README)."""
    rows = []
    for name, f in FIELDS.items():
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        rows.append(f"  {name:30s} {str(default):34s} {f.metadata['doc']}")
    return "\n".join(rows)
