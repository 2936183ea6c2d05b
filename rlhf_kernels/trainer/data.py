"""Data: JSONL loading (HF ``datasets``) with clear errors, tokenisation and collation.

Formats (one JSON object per line):
  sft    {"prompt": str, "response": str}
  rm     {"prompt": str, "chosen": str, "rejected": str}
  ppo    {"prompt": str}

Every sequence is ``prompt ids + response ids + EOS``. Batches carry a
``loss_mask`` [B, T] that is 1 on response tokens (EOS included); the log-prob of
token t+1 is read from logits at t, so per-token targets are
``where(loss_mask[:, 1:], input_ids[:, 1:], -100)``.
"""
from __future__ import annotations

import os

import torch

COLUMNS = {"sft": ("prompt", "response"), "rm": ("prompt", "chosen", "rejected"), "ppo": ("prompt",)}
IGNORE = -100


class DataError(ValueError):
    pass


def validate_rows(rows, kind: str, source: str = "data") -> list[dict]:
    need = COLUMNS[kind]
    rows = list(rows)
    if not rows:
        raise DataError(f"{source}: no examples (empty file?); {kind} needs columns {list(need)}")
    missing = [c for c in need if c not in rows[0]]
    if missing:
        raise DataError(f"{source}: missing column(s) {missing} for {kind}; found {sorted(rows[0])}, "
                        f"need {list(need)}")
    for i, r in enumerate(rows):
        for c in need:
            if not isinstance(r.get(c), str):
                raise DataError(f"{source}: row {i} column {c!r} must be a string, got {type(r.get(c)).__name__}")
    return rows


def load_jsonl(path: str, kind: str) -> list[dict]:
    """Load a JSONL file with HF ``datasets`` and check it has the columns ``kind`` needs."""
    if kind not in COLUMNS:
        raise DataError(f"unknown data kind {kind!r}; one of {sorted(COLUMNS)}")
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found")
    with open(path, "rb") as f:
        if not f.read(4096).strip():
            raise DataError(f"{path}: file is empty; {kind} needs JSONL rows with columns {list(COLUMNS[kind])}")
    import datasets
    try:
        ds = datasets.load_dataset("json", data_files=path, split="train")
    except Exception as e:  # malformed JSON etc.
        raise DataError(f"{path}: could not parse as JSONL ({type(e).__name__}: {e})") from e
    missing = [c for c in COLUMNS[kind] if c not in ds.column_names]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing} for {kind}; found {ds.column_names}, "
                        f"need {list(COLUMNS[kind])}")
    return validate_rows(ds.select_columns(list(COLUMNS[kind])).to_list(), kind, path)


# ----------------------------------------------------------------------------- collation
def _encode(tok, prompt: str, response: str, max_len: int):
    p = tok.encode(prompt)
    r = tok.encode(response) + [tok.eos_id]
    ids = (p + r)[:max_len]
    mask = ([0] * len(p) + [1] * len(r))[:max_len]
    return ids, mask


def _right_pad(seqs, masks, pad_id):
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), T), dtype=torch.long)
    lm = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        ids[i, :len(s)] = torch.tensor(s)
        attn[i, :len(s)] = 1
        lm[i, :len(m)] = torch.tensor(m)
    return ids, attn, lm


def collate_sft(rows, tok, max_len: int = 512) -> dict:
    enc = [_encode(tok, r["prompt"], r["response"], max_len) for r in rows]
    ids, attn, lm = _right_pad([e[0] for e in enc], [e[1] for e in enc], tok.pad_id)
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": lm}


def collate_pairs(rows, tok, max_len: int = 512) -> dict:
    """Chosen rows first, then rejected rows, in one right-padded batch of 2B."""
    enc = [_encode(tok, r["prompt"], r["chosen"], max_len) for r in rows]
    enc += [_encode(tok, r["prompt"], r["rejected"], max_len) for r in rows]
    ids, attn, lm = _right_pad([e[0] for e in enc], [e[1] for e in enc], tok.pad_id)
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": lm}


def collate_prompts(rows, tok, max_len: int = 512) -> dict:
    """Left-padded prompts (generation appends on the right)."""
    seqs = [tok.encode(r["prompt"])[-max_len:] for r in rows]
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), tok.pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, T - len(s):] = torch.tensor(s)
            attn[i, T - len(s):] = 1
    return {"input_ids": ids, "attention_mask": attn, "prompts": [r["prompt"] for r in rows]}


def shifted_targets(input_ids: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Targets [B, T-1] for logits[:, :-1]: the next token where it is a response token, else -100."""
    return torch.where(loss_mask[:, 1:].bool(), input_ids[:, 1:], torch.full_like(input_ids[:, 1:], IGNORE))


def batches(n: int, batch_size: int, seed: int, step: int):
    """Index of the rows of global step ``step``: an epoch-wise permutation fixed by (seed, epoch),
    so resuming at any step needs only the step number."""
    per_epoch = max(n // batch_size, 1)
    epoch, k = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)
    return perm[k * batch_size:(k + 1) * batch_size].tolist()
