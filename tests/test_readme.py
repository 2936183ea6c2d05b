"""README's Python examples run as written: each ```python block is executed against a tiny GPT-2 built from a config
and tensors of the shapes its prose names, so a renamed function, argument or return value in the README fails here.

Blocks that drive another library's trainer get a stand-in ``trainer`` whose ``train`` / ``fit`` call the patched
library function (OpenRLHF imported as its integration test does, with stubs for its missing dependencies); verl's
``register_policy_loss`` is a stand-in where verl is not installed (this CI installs no verl).
"""

from __future__ import annotations

import importlib.util
import re
import sys
import types
from pathlib import Path

import pytest
import torch

from tests.integrations.test_integrations_openrlhf import openrlhf  # noqa: F401 (the fixture: OpenRLHF with stubs)

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[tuple[int, str]]:
    """``(line, code)`` of every fenced ```python block of the README."""
    text = README.read_text()
    return [(text[:m.start()].count("\n") + 1, m.group(1)) for m in re.finditer(r"```python\n(.*?)```", text, re.S)]


BLOCKS = _python_blocks()


def _namespace() -> dict:
    """The names the examples take as given: a model, its inputs, and the PPO / GRPO batch tensors."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=96, n_positions=32, n_embd=32, n_layer=1, n_head=2)
    model = transformers.GPT2LMHeadModel(config)
    B, L = 2, 9
    input_ids = torch.randint(0, config.vocab_size, (B, L))
    attention_mask = torch.ones(B, L, dtype=torch.long)
    attention_mask[1, -2:] = 0
    response_mask = torch.zeros(B, L - 1)
    response_mask[:, 3:] = 1.0
    response_mask[1, -2:] = 0.0
    old_logp = -torch.rand(B, L - 1) * 4
    logits = torch.randn(B, L - 1, config.vocab_size, requires_grad=True)
    return dict(
        model=model, input_ids=input_ids, attention_mask=attention_mask, response_mask=response_mask,
        old_logp=old_logp, ref_logp=old_logp - 0.1, advantages=torch.randn(B, L - 1), rewards=torch.randn(B, L - 1),
        values=torch.randn(B, L - 1),
        # the verl example's names
        logits=logits, responses=input_ids[:, 1:], old_log_prob=old_logp,
    )


class _Trainer:
    """Stands in for a TRL / OpenRLHF trainer: ``train`` / ``fit`` run ``fn`` (the patched library call)."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def train(self, *args, **kwargs):
        self.calls += 1
        return self.fn()

    fit = train


def _fake_verl(monkeypatch, registered: dict) -> None:
    """``verl.trainer.ppo.core_algos.register_policy_loss`` (a decorator factory, as verl 0.9's), recording what is
    registered, where verl is not installed."""
    names = ("verl", "verl.trainer", "verl.trainer.ppo", "verl.trainer.ppo.core_algos")
    modules = {name: types.ModuleType(name) for name in names}
    modules["verl.trainer.ppo.core_algos"].register_policy_loss = (
        lambda name: lambda fn: registered.setdefault(name, fn))
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)


def test_the_readme_has_its_examples():
    assert len(BLOCKS) >= 5, [line for line, _ in BLOCKS]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("line,code", BLOCKS, ids=[f"line{line}" for line, _ in BLOCKS])
def test_readme_python_block_runs(line, code, monkeypatch, request):
    ns = _namespace()
    if "patch_trl" in code:
        pytest.importorskip("trl")
        import trl.trainer.utils as trl_utils

        logits, ids = ns["logits"].detach(), ns["responses"]
        ns["trainer"] = _Trainer(lambda: trl_utils.selective_log_softmax(logits, ids))
    if "patch_openrlhf" in code:
        openrlhf_utils, _ = request.getfixturevalue("openrlhf")  # (imported with stubs for peft, deepspeed, ...)
        logits, ids = ns["logits"].detach(), ns["responses"]
        ns["trainer"] = _Trainer(lambda: openrlhf_utils.log_probs_from_logits(logits, ids))
    registered: dict = {}
    if "from verl" in code and importlib.util.find_spec("verl") is None:
        _fake_verl(monkeypatch, registered)
    exec(compile(code, f"README.md:{line}", "exec"), ns)  # noqa: S102 - the README's own example
    if "patch_trl" in code or "patch_openrlhf" in code:
        assert ns["trainer"].calls == 1
    if "rk.ppo_loss" in code:
        assert torch.isfinite(ns["out"].loss)
    if "register_policy_loss" in code and registered:
        assert "rk_vanilla" in registered
