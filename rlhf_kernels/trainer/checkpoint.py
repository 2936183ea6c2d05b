"""Checkpoints: models via ``save_pretrained`` (safetensors), trainer state via
``torch.save`` of plain tensors/dicts, loaded with ``torch.load(weights_only=True)``
— loading never unpickles arbitrary objects.

Layout::

    <out>/ckpt/step_000040/{policy,critic,...}/model.safetensors + config.json
    <out>/ckpt/step_000040/trainer_state.pt   optimizer(s), scheduler(s), RNG, step, extra
    <out>/ckpt/latest                          text file naming the last complete checkpoint

Writes are atomic: a checkpoint is written to ``step_N.tmp`` and renamed when
complete, then ``latest`` is replaced atomically (``os.replace``). A kill at any
point leaves ``latest`` pointing at a complete checkpoint.
"""
from __future__ import annotations

import json
import os
import shutil

import torch


def rng_state() -> dict:
    s = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def _to_cpu(x):
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    if isinstance(x, dict):
        return {k: _to_cpu(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_to_cpu(v) for v in x)
    return x


def save_checkpoint(out_dir: str, step: int, models: dict, optimizers: dict, schedulers: dict,
                    extra: dict | None = None, tokenizer=None, keep: int = 2) -> str:
    root = os.path.join(out_dir, "ckpt")
    os.makedirs(root, exist_ok=True)
    name = f"step_{step:06d}"
    final, tmp = os.path.join(root, name), os.path.join(root, name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for k, m in models.items():
        m.save_pretrained(os.path.join(tmp, k))
        if tokenizer is not None:
            tokenizer.save_pretrained(os.path.join(tmp, k))
    state = {"step": step, "rng": rng_state(),
             "optimizers": {k: _to_cpu(o.state_dict()) for k, o in optimizers.items()},
             "schedulers": {k: s.state_dict() for k, s in schedulers.items()},
             "extra_json": json.dumps(extra or {})}
    torch.save(state, os.path.join(tmp, "trainer_state.pt"))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    latest_tmp = os.path.join(root, "latest.tmp")
    with open(latest_tmp, "w") as f:
        f.write(name)
        f.flush()
        os.fsync(f.fileno())
    os.replace(latest_tmp, os.path.join(root, "latest"))
    old = sorted(d for d in os.listdir(root) if d.startswith("step_") and not d.endswith(".tmp"))
    for d in old[:-keep] if keep > 0 else []:
        shutil.rmtree(os.path.join(root, d), ignore_errors=True)
    return final


def latest_checkpoint(out_dir: str) -> str | None:
    p = os.path.join(out_dir, "ckpt", "latest")
    if not os.path.isfile(p):
        return None
    with open(p) as f:
        d = os.path.join(out_dir, "ckpt", f.read().strip())
    return d if os.path.isdir(d) else None


def _load_safetensors_dir(d: str) -> dict:
    """model.safetensors, or the shards listed in model.safetensors.index.json (large models)."""
    from safetensors.torch import load_file
    single = os.path.join(d, "model.safetensors")
    if os.path.isfile(single):
        return load_file(single)
    with open(os.path.join(d, "model.safetensors.index.json")) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    sd = {}
    for sh in shards:
        sd.update(load_file(os.path.join(d, sh)))
    return sd


def load_checkpoint(path: str, models: dict, optimizers: dict, schedulers: dict) -> tuple[int, dict]:
    """Restore weights, optimizer/scheduler/RNG state in place; returns (step, extra)."""
    from safetensors.torch import load_file
    for k, m in models.items():
        d = os.path.join(path, k)
        body = getattr(m, "body", m)  # ScalarHeadModel keeps the LM body in .body
        sd = _load_safetensors_dir(d)
        missing, unexpected = body.load_state_dict(sd, strict=False)
        # tied weights (lm_head = wte) are stored once by save_pretrained
        missing = [x for x in missing if not x.endswith("lm_head.weight")]
        if missing or unexpected:
            raise RuntimeError(f"checkpoint {d}: missing {missing[:5]}, unexpected {unexpected[:5]}")
        if hasattr(m, "head"):
            m.head.load_state_dict(load_file(os.path.join(d, "scalar_head.safetensors")))
    state = torch.load(os.path.join(path, "trainer_state.pt"), map_location="cpu", weights_only=True)
    for k, o in optimizers.items():
        o.load_state_dict(state["optimizers"][k])
    for k, s in schedulers.items():
        s.load_state_dict(state["schedulers"][k])
    set_rng_state(state["rng"])
    return state["step"], json.loads(state["extra_json"])
