"""Config plumbing shared by the stages: a base dataclass, file + flag overrides, LR schedule."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
from dataclasses import dataclass

import torch


@dataclass
class BaseConfig:
    out_dir: str = "runs/default"
    seed: int = 0
    device: str = "auto"           # auto | cpu | cuda
    backend: str | None = None     # rk op backend override (None = auto; "torch" = reference/eager)
    # model (used when the stage builds a fresh model)
    model: str = "tiny-gpt2"       # tiny-gpt2 | local path | hub name
    tokenizer: str | None = None
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    n_positions: int = 64
    max_len: int = 64
    # loop
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 10
    grad_clip: float = 1.0
    log_every: int = 10
    ckpt_every: int = 0            # 0 = only at the end
    resume: bool = False           # continue from <out_dir>/ckpt/latest
    stop_after: int = 0            # stop (with a checkpoint) after this many steps of this invocation
    progress: bool = True
    threads: int = 0               # CPU intra-op threads; 0 = torch's default
    parallel: str = "ddp"          # under torchrun: ddp (replicas) | fsdp (FSDP2 sharding); see distributed.py
    fused_head: bool = False       # policy log-probs / losses from hidden states + LM head, no [B, T, V] logits
                                   # (fused_head.py; sft, ppo, grpo, dpo; rm has no vocabulary head)

    def __post_init__(self):
        from .distributed import check_parallel
        check_parallel(self.parallel)
        self._check_common()

    def _check_common(self) -> None:
        """Refuse, by key, values every stage would trip over later: an op backend that cannot run on the chosen
        device, negative counts, a response budget that leaves no room for the prompt. (``max_len`` against the
        model's positions is fitted once the model exists: ``models.fit_max_len``.)"""
        from rlhf_kernels.ops._dispatch import BACKENDS, device_kind, unavailable_reason
        if self.device != "auto" and device_kind(self.device) is None:
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.backend is not None:
            if self.backend not in BACKENDS:
                raise ValueError(f"backend must be one of {BACKENDS} or None, got {self.backend!r}")
            from .models import device_of
            device = device_of(self.device)
            reason = unavailable_reason(self.backend, device)
            if reason is not None:  # else every op call of the first step raises it, from deep in the loop
                raise ValueError(f"backend {self.backend!r} cannot run on device {device.type}: {reason}")
        for key in ("n_layer", "n_head", "n_embd", "n_positions"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        for key in ("warmup_steps", "log_every", "ckpt_every", "stop_after", "threads", "weight_decay", "grad_clip"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")
        if self.max_len < 2:
            raise ValueError(f"max_len must be >= 2 (a prompt token and a response token), got {self.max_len}")
        new_tokens = getattr(self, "max_new_tokens", None)  # the sampling stages: prompt + response <= max_len
        if new_tokens is not None and not 1 <= new_tokens < self.max_len:
            raise ValueError(f"max_new_tokens must be in [1, max_len = {self.max_len}) so that a prompt token "
                             f"fits beside the response, got {new_tokens}")

    def model_config(self):
        from .models import ModelConfig
        return ModelConfig(model=self.model, tokenizer=self.tokenizer, n_layer=self.n_layer,
                           n_head=self.n_head, n_embd=self.n_embd, n_positions=self.n_positions)


def _coerce(tp, value, key):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(args[0], value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"config key {key!r}: expected a boolean, got {value!r}")
    try:
        return tp(value)
    except (TypeError, ValueError):
        raise ValueError(f"config key {key!r}: expected {tp.__name__}, got {value!r}") from None


def make_config(cls, file: str | None = None, overrides: dict | None = None):
    """Build ``cls`` from an optional YAML/JSON file and then ``overrides`` (e.g. parsed flags).
    Unknown keys and badly-typed values raise ``ValueError`` naming the key."""
    values: dict = {}
    if file:
        if not os.path.isfile(file):
            raise ValueError(f"config file {file!r} not found")
        with open(file) as f:
            text = f.read()
        if file.endswith((".yaml", ".yml")):
            import yaml
            loaded = yaml.safe_load(text) or {}
        else:
            loaded = json.loads(text) if text.strip() else {}
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {file!r} must hold a mapping, got {type(loaded).__name__}")
        values.update(loaded)
    values.update(overrides or {})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown config key(s) for {cls.__name__}: {unknown}; valid keys: {sorted(names)}")
    cfg = cls(**{k: _coerce(hints[k], v, k) for k, v in values.items()})
    check = getattr(cfg, "validate", None)
    if check:
        check()
    return cfg


def parse_flags(argv: list[str]) -> tuple[str | None, dict]:
    """``--config FILE --key value --flag --no_flag`` -> (file, {key: value}).
    A bare ``--flag`` means true, a bare ``--no_flag`` false."""
    file, out, i = None, {}, 0
    while i < len(argv):
        a = argv[i]
        if not a.startswith("--"):
            raise ValueError(f"unexpected argument {a!r}; use --key value")
        key, eq, val = a[2:].partition("=")  # --key=value: only the key's dashes become underscores
        key = key.replace("-", "_")
        if eq:
            i += 1
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            val = argv[i + 1]
            i += 2
        elif key.startswith("no_"):  # bare --no_flag means false
            key, val = key[3:], "false"
            i += 1
        else:
            val = "true"
            i += 1
        if key == "config":
            file = val
        else:
            out[key] = val
    return file, out


def lr_lambda(warmup: int, total: int, min_ratio: float = 0.1):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    return f


def seed_all(seed: int, threads: int = 0) -> None:
    if threads > 0:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
