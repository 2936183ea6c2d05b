"""torch.distributed for the trainers, in one place: the process group, DDP / FSDP2 wrapping,
reductions by *global* counts, and full (rank-0) state dicts for checkpoints.

Under ``torchrun`` (``WORLD_SIZE > 1``) every rank holds a slice of the step's batch. The trainers
normalise each loss by the global count (tokens, sequences, ...) and multiply by ``world`` because
DDP and FSDP2 both *average* gradients over ranks; so K ranks take the same update as one process
on the same global batch::

    loss_rank = Σ_rank term / n_rank                       (what rk.ppo_loss returns locally)
    grad      = 1/K · Σ_ranks ∇(loss_rank · n_rank · K / n_global) = ∇(Σ_all term / n_global)

``parallel``: ``ddp`` (a full replica per rank; gradients all-reduced) or ``fsdp`` (FSDP2,
``fully_shard``: parameters, gradients and optimizer state sharded over the ranks, each transformer
block gathered only around its own forward / backward; for models that do not fit one GPU).
Without ``torchrun`` both mean a plain single-process model.
"""
from __future__ import annotations

import os

import torch

PARALLEL = ("ddp", "fsdp")


# ----------------------------------------------------------------------------- process group
def dist_setup(pref: str = "auto"):
    """``(rank, world_size, device)``. Under ``torchrun`` (WORLD_SIZE > 1) joins the process group:
    NCCL on CUDA (one GPU per LOCAL_RANK), gloo on CPU. Otherwise ``(0, 1, device)``."""
    from .models import device_of
    dev = device_of(pref)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, dev
    import torch.distributed as dist
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), dev


def dist_teardown() -> None:
    """Leave the process group together: collect what still holds it (DDP reducers, FSDP
    state), wait for every rank, then destroy it. A rank that tears gloo down while a peer is
    still talking, or whose leftover objects touch it later, can abort with "terminate called
    without an active exception". No-op outside torchrun."""
    import gc

    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def dist_world() -> int:
    import torch.distributed as dist
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def dist_rank() -> int:
    import torch.distributed as dist
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def barrier() -> None:
    if dist_world() > 1:
        torch.distributed.barrier()


# ----------------------------------------------------------------------------- reductions
def all_reduce(x: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """All-reduce a copy of ``x`` (sum | max) across ranks; ``x`` itself when not distributed."""
    if dist_world() == 1:
        return x
    import torch.distributed as dist
    y = x.detach().clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return y


def all_reduce_mean_dict(d: dict, device) -> dict:
    """Average a dict of floats across ranks (logging)."""
    if dist_world() == 1 or not d:
        return d
    keys = sorted(d)
    v = all_reduce(torch.tensor([float(d[k]) for k in keys], dtype=torch.float64, device=device)) / dist_world()
    return {**d, **dict(zip(keys, v.tolist()))}


def global_loss_scale(loss_agg: str, mask: torch.Tensor) -> torch.Tensor | float:
    """Factor that turns this rank's loss aggregated by ``loss_agg`` over local counts (``rk.ppo_loss``,
    ``rk.value_loss``) into its share of the loss aggregated over global counts; the gradient average
    of DDP / FSDP2 over ``world`` ranks then gives the single-process gradient. 1 when not distributed."""
    world = dist_world()
    if world == 1:
        return 1.0
    if loss_agg == "token-mean":
        n = mask.sum()
    elif loss_agg == "seq-mean-token-mean":        # non-empty sequences
        n = (mask.sum(-1) > 0).sum().to(mask.dtype)
    elif loss_agg == "seq-mean-token-sum":         # all sequences
        n = mask.new_tensor(float(mask.shape[0]))
    elif loss_agg == "seq-mean-token-sum-norm":    # Σ / (num seqs × width): width = the widest rank's
        B, T = mask.shape
        n_glob = all_reduce(mask.new_tensor(float(B))) * all_reduce(mask.new_tensor(float(T)), "max")
        return B * T * world / n_glob
    else:
        raise ValueError(f"loss_agg {loss_agg!r} has no global normalisation here")
    n = n.to(torch.float64)
    n_glob = all_reduce(n)
    return torch.where(n_glob > 0, n * world / n_glob.clamp(min=1), torch.zeros_like(n)).float()


# ----------------------------------------------------------------------------- wrapping
def _fully_shard(device: torch.device):
    """``fully_shard`` for models on ``device``: ``torch.distributed.fsdp`` from torch 2.6,
    ``torch.distributed._composable.fsdp`` before; ``ValueError`` naming ``parallel`` where it cannot run."""
    if device.type == "cpu" and not hasattr(torch.cpu.Stream, "record_event"):
        # torch 2.6's FSDP2 records events on its all-gather stream, which its CPU stream stub cannot do
        raise ValueError(f"parallel 'fsdp' on the CPU needs a newer torch than {torch.__version__} (its FSDP2 "
                         "runs on CUDA only: torch.cpu.Stream has no record_event): use --parallel ddp")
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        try:
            from torch.distributed._composable.fsdp import fully_shard
        except ImportError:
            raise ValueError(f"parallel 'fsdp' needs FSDP2 (fully_shard); torch {torch.__version__} has none: "
                             f"use --parallel ddp") from None
    return fully_shard


def is_fsdp(model) -> bool:
    """True for a module sharded by ``fully_shard`` (its parameters are DTensors)."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return False  # fully_shard needs a process group; a single process also skips importing FSDP (0.5 s)
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        try:
            from torch.distributed._composable.fsdp import FSDPModule
        except ImportError:
            return False
    return isinstance(model, FSDPModule)


def check_parallel(parallel: str) -> None:
    if parallel not in PARALLEL:
        raise ValueError(f"parallel must be one of {list(PARALLEL)}, got {parallel!r}")


def wrap_model(model: torch.nn.Module, parallel: str, device: torch.device) -> torch.nn.Module:
    """Prepare ``model`` (already on ``device``) for this process group; returns what to call forward on.

    * one process: ``model`` itself;
    * ``ddp``: a ``DistributedDataParallel`` wrapper for a trainable model, ``model`` itself for a frozen
      one (reference, reward model: every rank keeps a full copy and nothing is reduced);
    * ``fsdp``: ``model`` sharded in place, trainable or frozen alike: each block named in the Hugging Face
      model's ``_no_split_modules`` (GPT2Block, LlamaDecoderLayer, ...) is its own FSDP unit, the rest
      (embeddings, tied LM head, scalar head) the root unit. Build optimizers *after* this call:
      ``fully_shard`` replaces the parameters by sharded DTensors.
    """
    check_parallel(parallel)
    world = dist_world()
    if world == 1:
        return model
    if parallel == "ddp":
        if not any(p.requires_grad for p in model.parameters()):
            return model
        ids = [device.index] if device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    fully_shard = _fully_shard(device)
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh(device.type, (world,))
    blocks = set()
    for m in model.modules():
        blocks.update(getattr(m, "_no_split_modules", None) or ())
    for m in [m for m in model.modules() if type(m).__name__ in blocks]:   # inner units first, then the root
        fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def clip_grad_norm(params, max_norm: float) -> float:
    """``clip_grad_norm_`` that also returns a plain float under FSDP2 (where the norm is a DTensor
    reduced over the shards)."""
    gn = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if hasattr(gn, "full_tensor"):
        gn = gn.full_tensor()
    return float(gn)


# ----------------------------------------------------------------------------- state dicts
# Saved names are the inner model's own: a wrapper module that is sharded as the FSDP2 root
# (``FusedHeadLM``, --fused-head) declares the prefix its parameters carry (``CHECKPOINT_PREFIX``), stripped
# from what is saved and added to what is loaded, so checkpoints do not depend on the mode that wrote them.
def _full_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, **kw)


def _prefix(model) -> str:
    return getattr(model, "CHECKPOINT_PREFIX", "")


def _strip(names, prefix: str):
    return [n[len(prefix):] if prefix and isinstance(n, str) and n.startswith(prefix) else n for n in names]


def model_state_dict(model) -> dict | None:
    """Full CPU state dict of an FSDP2 model on rank 0 ({} on the others; a collective: call on every
    rank); ``None`` for any other model (its own ``state_dict()`` / ``save_pretrained`` serve)."""
    if not is_fsdp(model):
        return None
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    sd = get_model_state_dict(model, options=_full_options(cpu_offload=True))
    # a tied parameter (lm_head = wte) comes back once per name, as separate copies: keep its first name,
    # as save_pretrained does for an unsharded model
    names: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(n)
    for tied in names.values():
        for n in tied[1:]:
            sd.pop(n, None)
    return dict(zip(_strip(sd, _prefix(model)), sd.values()))


def load_model_state_dict(model, sd: dict):
    """Load a full state dict (every rank holds it) into an FSDP2 model: each rank keeps its shard.
    Returns ``(missing, unexpected)`` keys."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict
    p = _prefix(model)
    r = set_model_state_dict(model, {p + k: v for k, v in sd.items()}, options=_full_options(strict=False))
    return _strip(r.missing_keys, p), _strip(r.unexpected_keys, p)


def _rename_optimizer_state(sd: dict, rename) -> dict:
    """An FSDP2 (name-keyed) optimizer state dict with every parameter name passed through ``rename``."""
    return {**sd, "state": {rename(k): v for k, v in sd.get("state", {}).items()},
            "param_groups": [{**g, "params": [rename(n) for n in g["params"]]} for g in sd.get("param_groups", [])]}


def optimizer_state_dict(model, opt) -> dict:
    """Optimizer state to save: ``opt.state_dict()``, or for an FSDP2 model the full state keyed by
    parameter name (gathered to rank 0, on the CPU; a collective)."""
    if model is None or not is_fsdp(model):
        return opt.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    sd = get_optimizer_state_dict(model, opt, options=_full_options(cpu_offload=True))
    p = _prefix(model)
    return _rename_optimizer_state(sd, lambda n: _strip([n], p)[0]) if p else sd


def load_optimizer_state_dict(model, opt, sd: dict) -> None:
    by_name = any(isinstance(k, str) for k in sd.get("state", {})) or \
        any(isinstance(p, str) for g in sd.get("param_groups", []) for p in g.get("params", []))
    fsdp = model is not None and is_fsdp(model)
    if by_name != fsdp:
        raise ValueError(f"checkpoint optimizer state was written with parallel "
                         f"{'fsdp' if by_name else 'ddp (or one process)'}; resume with the same --parallel")
    if not fsdp:
        opt.load_state_dict(sd)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
    p = _prefix(model)
    if p:
        sd = _rename_optimizer_state(sd, lambda n: p + n)
    set_optimizer_state_dict(model, opt, sd, options=_full_options())
