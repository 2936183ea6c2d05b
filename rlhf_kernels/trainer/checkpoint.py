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

Under ``torchrun`` call both functions on every rank: FSDP2 models and optimizers are first
gathered into full state dicts on rank 0 (a collective), rank 0 writes, and the others wait for
it; on resume every rank reads the checkpoint (``out_dir`` must be visible to all of them) and
keeps its own shard. An FSDP2 run's optimizer state is keyed by parameter name, so it resumes
under ``--parallel fsdp`` (any number of ranks) only.
"""
from __future__ import annotations

import json
import os
import shutil

import torch

from .distributed import (
    barrier,
    dist_rank,
    is_fsdp,
    load_model_state_dict,
    load_optimizer_state_dict,
    model_state_dict,
    optimizer_state_dict,
)


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


def save_model(model, path: str, tokenizer=None) -> None:
    """``model.save_pretrained(path)`` (+ the tokenizer) from rank 0; an FSDP2 model is gathered first."""
    sd = model_state_dict(model)  # collective under FSDP2, None otherwise
    if dist_rank() == 0:
        if sd is None:
            model.save_pretrained(path)
        else:
            model.save_pretrained(path, state_dict=sd)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)


def save_checkpoint(out_dir: str, step: int, models: dict, optimizers: dict, schedulers: dict,
                    extra: dict | None = None, tokenizer=None, keep: int = 2) -> str:
    """``optimizers[k]`` steps the parameters of ``models[k]`` (needed to name FSDP2 optimizer state)."""
    root = os.path.join(out_dir, "ckpt")
    name = f"step_{step:06d}"
    final, tmp = os.path.join(root, name), os.path.join(root, name + ".tmp")
    rank = dist_rank()
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    for k, m in models.items():
        save_model(m, os.path.join(tmp, k), tokenizer)
    optim = {k: _to_cpu(optimizer_state_dict(models.get(k), o)) for k, o in optimizers.items()}
    if rank == 0:
        state = {"step": step, "rng": rng_state(), "optimizers": optim,
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
    barrier()  # no rank reads `latest` before it names this checkpoint
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
        sd = _load_safetensors_dir(d)
        if is_fsdp(m):  # one state dict for the whole module: each rank keeps its shard
            if hasattr(m, "head"):
                sd = {**{"body." + n: v for n, v in sd.items()},
                      **{"head." + n: v for n, v in load_file(os.path.join(d, "scalar_head.safetensors")).items()}}
            missing, unexpected = load_model_state_dict(m, sd)
        else:
            # ScalarHeadModel keeps the LM body in .body, FusedHeadLM (--fused-head) the causal LM in .lm
            body = m.body if hasattr(m, "body") else getattr(m, "lm", m)
            missing, unexpected = body.load_state_dict(sd, strict=False)
            if hasattr(m, "head"):
                m.head.load_state_dict(load_file(os.path.join(d, "scalar_head.safetensors")))
        # tied weights (lm_head = wte) are stored once by save_pretrained
        missing = [x for x in missing if not x.endswith("lm_head.weight")]
        if missing or unexpected:
            raise RuntimeError(f"checkpoint {d}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    state = torch.load(os.path.join(path, "trainer_state.pt"), map_location="cpu", weights_only=True)
    for k, o in optimizers.items():
        load_optimizer_state_dict(models.get(k), o, state["optimizers"][k])
    for k, s in schedulers.items():
        s.load_state_dict(state["schedulers"][k])
    set_rng_state(state["rng"])
    return state["step"], json.loads(state["extra_json"])
