"""Models and tokenizers for the trainer.

* ``build_policy(cfg)`` — any Hugging Face ``AutoModelForCausalLM`` given as a local
  path or hub name (where a network exists), or the default: a tiny GPT-2 built
  from a config (nothing downloaded) with a byte-level tokenizer.
* ``ScalarHeadModel`` — the LM body plus a linear scalar head. The reward model
  reads it at the last non-pad token, the critic at every token.

Sequences may be left- or right-padded; position ids are always derived from the
attention mask so that both paddings see the same positions.
"""
from __future__ import annotations

import dataclasses
import json
import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn

# The device a trainer runs on (``auto``: CUDA when there is a GPU; CUDA without one is a ValueError naming it).
from ..ops._dispatch import resolve_device as device_of  # noqa: E402,F401


# ----------------------------------------------------------------------------- tokenizers
class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; then EOS=256, PAD=257. No download, no training."""

    kind = "byte"

    def __init__(self):
        self.eos_id, self.pad_id, self.vocab_size = 256, 257, 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def save_pretrained(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "rk_tokenizer.json"), "w") as f:
            json.dump({"kind": "byte"}, f)


class HFTokenizer:
    """Adapter around a ``transformers`` tokenizer to the small interface the trainer uses."""

    kind = "hf"

    def __init__(self, tok):
        self.tok = tok
        if tok.eos_token_id is None:
            raise ValueError("tokenizer has no eos_token; set one (the trainer needs EOS handling)")
        self.eos_id = tok.eos_token_id
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.vocab_size = len(tok)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        return self.tok.decode([i for i in ids if i not in (self.eos_id, self.pad_id)])

    def save_pretrained(self, path: str) -> None:
        self.tok.save_pretrained(path)


def load_tokenizer(path: str | None):
    if path is None or path == "byte":
        return ByteTokenizer()
    marker = os.path.join(path, "rk_tokenizer.json")
    if os.path.isfile(marker):
        return ByteTokenizer()
    from transformers import AutoTokenizer
    return HFTokenizer(pretrained(AutoTokenizer, path, "tokenizer"))


# ----------------------------------------------------------------------------- models
@dataclass
class ModelConfig:
    model: str = "tiny-gpt2"      # "tiny-gpt2" (built from a config) | local path | hub name
    tokenizer: str | None = None  # defaults to `model` for paths/hub names, byte-level for tiny-gpt2
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    n_positions: int = 64
    dtype: str = "float32"


def tiny_gpt2(tok, cfg: ModelConfig):
    from transformers import GPT2Config, GPT2LMHeadModel
    conf = GPT2Config(vocab_size=tok.vocab_size, n_positions=cfg.n_positions, n_embd=cfg.n_embd,
                      n_layer=cfg.n_layer, n_head=cfg.n_head, bos_token_id=tok.eos_id,
                      eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # no dropout: RL needs π_old == π at step 0
    return GPT2LMHeadModel(conf)


def build_policy(cfg: ModelConfig):
    """Returns (model, tokenizer)."""
    dtype = getattr(torch, cfg.dtype)
    if cfg.model == "tiny-gpt2":
        tok = load_tokenizer(cfg.tokenizer)
        return tiny_gpt2(tok, cfg).to(dtype), tok
    from transformers import AutoModelForCausalLM
    if not os.path.isdir(cfg.model) and os.path.sep in cfg.model and cfg.model.startswith(("/", ".")):
        raise FileNotFoundError(f"model path {cfg.model!r} does not exist")
    model = pretrained(AutoModelForCausalLM, cfg.model)  # `dtype=` vs `torch_dtype=` differs across versions
    tok = load_tokenizer(cfg.tokenizer or cfg.model)      # after the model: a bad --model is reported as such
    return model.to(dtype), tok


def pretrained(auto_class, path: str, what: str = "model"):
    """``auto_class.from_pretrained(path)``, a name that resolves to nothing being a ``ValueError`` that says
    what ``model`` (or ``tokenizer``) may be (the hub is often out of reach: models here are built from configs)."""
    try:
        return auto_class.from_pretrained(path)
    except OSError as exc:
        builtin = "'tiny-gpt2'" if what == "model" else "'byte'"
        raise ValueError(f"{what} {path!r} is neither {builtin}, a saved {what} directory, nor a hub name "
                         f"found in the local cache ({str(exc).splitlines()[0]})") from None


def position_limit(model) -> int | None:
    """The learned absolute positions of a causal LM or ``ScalarHeadModel`` (its ``body``): ``config.n_positions``
    (GPT-2 and its kin), past which a sequence would index beyond the position embedding (an IndexError on the CPU,
    a device-side assert that ends the process on the GPU). ``None`` for rotary / ALiBi models (no such table) and
    for no model at all."""
    config = getattr(model, "config", None) or getattr(getattr(model, "body", None), "config", None)
    limit = getattr(config, "n_positions", None)
    return limit if isinstance(limit, int) else None


def fit_max_len(cfg, *models):
    """``cfg``, with ``max_len`` cut (and a warning) to the fewest learned positions among ``models`` when it asks
    for more (a ``None`` model is skipped): sequences are then cut to what the model can read instead of crashing
    it. A stage that loads its model (``ppo --sft DIR``) is held to that model, not to the config's ``n_positions``,
    which describes only a model built from the config."""
    limits = [n for n in map(position_limit, models) if n is not None]
    if not limits or cfg.max_len <= min(limits):
        return cfg
    warnings.warn(f"max_len {cfg.max_len} is more than the model's {min(limits)} learned positions "
                  f"(config.n_positions): sequences are cut to {min(limits)} tokens", stacklevel=2)
    return dataclasses.replace(cfg, max_len=min(limits))


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def lm_logits(model, input_ids, attention_mask):
    """Logits [B, T, V] for a possibly left-padded batch."""
    return model(input_ids=input_ids, attention_mask=attention_mask,
                 position_ids=position_ids_from_mask(attention_mask), use_cache=False).logits


def logits_are_free_after_the_loss(model) -> bool:
    """Whether a loss may write its gradient over ``model``'s logits (``overwrite_logits=True``): nothing in the
    model's own graph keeps them for its backward. True for a plain LM head (a linear layer keeps its input, not its
    output); False for a soft-capped one (Gemma's ``tanh``, whose backward reads its output, the logits). Were it
    wrong, autograd would still refuse that backward (the logits' version counter moves), not compute garbage."""
    config = getattr(getattr(model, "module", model), "config", None)
    return getattr(config, "final_logit_softcapping", None) is None


def last_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last non-pad token of each row (works for left and right padding)."""
    ar = torch.arange(mask.shape[-1], device=mask.device)
    return (mask.long() * (ar + 1)).argmax(-1)


class ScalarHeadModel(nn.Module):
    """LM body + scalar head. ``forward`` gives per-token values [B, T];
    ``score`` gives one reward per sequence, read at the last non-pad token."""

    def __init__(self, body: nn.Module, hidden_size: int):
        super().__init__()
        self.body = body
        self.head = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.head.weight, std=1.0 / (hidden_size + 1) ** 0.5)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_causal_lm(cls, lm) -> "ScalarHeadModel":
        """Copy the body of a causal LM (the head starts fresh)."""
        import copy
        body = copy.deepcopy(lm.base_model)
        return cls(body, lm.config.hidden_size)

    def forward(self, input_ids, attention_mask):
        h = self.body(input_ids=input_ids, attention_mask=attention_mask,
                      position_ids=position_ids_from_mask(attention_mask), use_cache=False).last_hidden_state
        return self.head(h.to(self.head.weight.dtype)).squeeze(-1).float()

    def score(self, input_ids, attention_mask):
        v = self(input_ids, attention_mask)
        return v.gather(1, last_index(attention_mask).unsqueeze(1)).squeeze(1)

    def save_pretrained(self, path: str, state_dict: dict | None = None) -> None:
        """``state_dict``: a full one of this module (``body.*``, ``head.*``), e.g. gathered from FSDP2 shards."""
        from safetensors.torch import save_file
        if state_dict is None:
            self.body.save_pretrained(path)
            head = self.head.state_dict()
        else:
            self.body.save_pretrained(path, state_dict={k[5:]: v for k, v in state_dict.items() if k.startswith("body.")})
            head = {k[5:]: v for k, v in state_dict.items() if k.startswith("head.")}
        save_file({k: v.detach().contiguous() for k, v in head.items()}, os.path.join(path, "scalar_head.safetensors"))

    @classmethod
    def from_pretrained(cls, path: str) -> "ScalarHeadModel":
        from safetensors.torch import load_file
        from transformers import AutoModel
        body = pretrained(AutoModel, path)
        m = cls(body, body.config.hidden_size)
        m.head.load_state_dict(load_file(os.path.join(path, "scalar_head.safetensors")))
        return m


def load_policy(path: str):
    """Load a policy saved by the trainer (model + tokenizer from the same dir)."""
    from transformers import AutoModelForCausalLM
    return pretrained(AutoModelForCausalLM, path), load_tokenizer(path)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB -> MiB (process RSS)
    except Exception:
        return float("nan")
