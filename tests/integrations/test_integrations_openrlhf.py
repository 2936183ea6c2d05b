"""OpenRLHF drop-ins (``rlhf_kernels.integrations.openrlhf``) against the float64 formulas, and patched into
OpenRLHF 0.11.2's own ``Actor.forward`` where the package is installed (``make test`` installs it without its
dependencies; DeepSpeed, flash-attn, peft and pylatexenc are stubbed for the import, as OpenRLHF's own CPU test
does)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from unittest.mock import MagicMock

import pytest
import torch

import rlhf_kernels.integrations.openrlhf as rk_orl
from tests.tolerance import assert_matches_oracle

V = 37


def _logits(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, V, generator=g) * 3).to(dtype)


def _logp(logits, labels, temperature=1.0):
    """``log softmax(logits / T)[label]`` in ``logits``' dtype (float64 input: the oracle)."""
    return torch.log_softmax(logits / temperature, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def _entropy(logits):
    """``lse(z) - Σ softmax(z)·z`` in ``logits``' dtype, 0·(-inf) counted as 0 (float64 input: the oracle)."""
    p = torch.softmax(logits, -1)
    pz = torch.where(p > 0, p * logits, torch.zeros_like(p))
    return torch.logsumexp(logits, -1) - pz.sum(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_log_probs_from_logits_matches_the_formula(dtype):
    logits = _logits((3, 9), dtype).requires_grad_(True)
    labels = torch.randint(0, V, (3, 9), generator=torch.Generator().manual_seed(1))
    got = rk_orl.log_probs_from_logits(logits, labels)
    assert got.dtype == torch.float32 and got.shape == (3, 9)
    weights = torch.randn(3, 9, generator=torch.Generator().manual_seed(2))
    (got * weights).sum().backward()
    leaf = logits.detach().double().requires_grad_(True)
    want = _logp(leaf, labels)
    (want * weights.double()).sum().backward()
    assert_matches_oracle(got, _logp(logits.detach(), labels), want, dtype, "logp")
    assert logits.grad.dtype == dtype
    torch.testing.assert_close(logits.grad.double(), leaf.grad, rtol=2e-2 if dtype == torch.bfloat16 else 1e-5,
                               atol=1e-2 if dtype == torch.bfloat16 else 1e-6)


def test_temperature_divides_the_logits_in_place_like_openrlhf():
    """OpenRLHF divides the logits by the temperature in place, and callers may read them after; so does the
    drop-in. The log-probs are those of softmax(logits / T)."""
    logits = _logits((2, 5), torch.float32)
    original = logits.clone()
    labels = torch.randint(0, V, (2, 5))
    got = rk_orl.log_probs_from_logits(logits, labels, temperature=0.7)
    torch.testing.assert_close(logits, original / 0.7)
    torch.testing.assert_close(got.double(), _logp(original.double(), labels, 0.7), rtol=1e-5, atol=1e-6)
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="temperature"):
            rk_orl.log_probs_from_logits(logits, labels, temperature=bad)


def test_ignored_label_gives_zero_and_bad_label_raises_by_position():
    logits = _logits((4,), torch.float32)
    labels = torch.tensor([1, -100, 3, 0])
    got = rk_orl.log_probs_from_logits(logits, labels)
    assert got[1] == 0 and torch.isfinite(got).all()
    with pytest.raises(ValueError, match="target"):
        rk_orl.log_probs_from_logits(logits, torch.tensor([1, V, 3, 0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compute_entropy_matches_the_formula(dtype):
    logits = _logits((2, 6), dtype)
    logits[0, 1, :5] = float("-inf")  # masked vocabulary entries add 0, not NaN
    logits.requires_grad_(True)
    got = rk_orl.compute_entropy(logits)
    assert got.dtype == torch.float32 and got.shape == (2, 6) and torch.isfinite(got).all()
    got.sum().backward()
    leaf = logits.detach().double().requires_grad_(True)
    expected = _entropy(torch.where(torch.isfinite(leaf), leaf, -1e30))  # -inf as a finite floor: no NaN gradient
    expected.sum().backward()
    assert_matches_oracle(got, _entropy(logits.detach()), expected, dtype, "entropy")
    torch.testing.assert_close(logits.grad.double(), leaf.grad, rtol=2e-2 if dtype == torch.bfloat16 else 1e-5,
                               atol=1e-2 if dtype == torch.bfloat16 else 1e-6)
    with pytest.raises(ValueError, match="logits"):
        rk_orl.compute_entropy(torch.tensor(1.0))
    row = logits.detach()[1, 2]   # one row [V]: a 0-d entropy
    torch.testing.assert_close(rk_orl.compute_entropy(row), got.detach()[1, 2])


# ----------------------------------------------------------------------------- OpenRLHF itself

_STUBS = ("deepspeed", "flash_attn", "flash_attn.bert_padding", "flash_attn.utils", "flash_attn.utils.distributed",
          "peft", "peft.tuners", "peft.tuners.lora", "pylatexenc")


def _unload(prefixes):
    for name in [n for n in sys.modules if any(n == p or n.startswith(p + ".") for p in prefixes)]:
        del sys.modules[name]


@pytest.fixture(scope="module")
def openrlhf():
    """``(openrlhf.models.utils, openrlhf.models.actor)``, imported with stubs for the dependencies that are not
    installed; everything imported here is unloaded afterwards, so no other test sees a stub."""
    if importlib.util.find_spec("openrlhf") is None:
        pytest.skip("openrlhf is not installed (make test installs 0.11.2 without its dependencies)")
    missing = {top for top in {n.split(".")[0] for n in _STUBS} if importlib.util.find_spec(top) is None}
    stubbed = [n for n in _STUBS if n.split(".")[0] in missing and n not in sys.modules]
    for name in stubbed:
        stub = MagicMock()
        stub.__spec__ = importlib.machinery.ModuleSpec(name, None)
        sys.modules[name] = stub
    compile_ = torch.compile
    torch.compile = lambda fn=None, **_: fn if fn is not None else (lambda f: f)  # compute_entropy, eagerly
    try:
        utils = importlib.import_module("openrlhf.models.utils")
        actor = importlib.import_module("openrlhf.models.actor")
    except Exception as e:  # noqa: BLE001 (another OpenRLHF release, or a dependency stubs cannot stand in for)
        _unload(["openrlhf"] + stubbed)
        pytest.skip(f"openrlhf does not import here: {e!r}")
    finally:
        torch.compile = compile_
    yield utils, actor
    rk_orl.unpatch_openrlhf()
    _unload(["openrlhf"])
    for name in stubbed:
        sys.modules.pop(name, None)


def test_import_does_not_patch(openrlhf):
    utils, actor = openrlhf
    assert utils.log_probs_from_logits is not rk_orl.log_probs_from_logits
    assert actor.compute_entropy is utils.compute_entropy


def test_patch_openrlhf_replaces_every_binding_nests_and_restores(openrlhf):
    utils, actor = openrlhf
    originals = (utils.log_probs_from_logits, utils.compute_entropy)
    with rk_orl.patch_openrlhf() as handle:
        assert actor.log_probs_from_logits is rk_orl.log_probs_from_logits
        assert actor.compute_entropy is rk_orl.compute_entropy is utils.compute_entropy
        assert {"openrlhf.models.actor.compute_entropy", "openrlhf.models.utils.log_probs_from_logits"} <= set(
            handle.patched)
        with rk_orl.patch_openrlhf():  # nested: a no-op that must not restore early
            pass
        assert actor.compute_entropy is rk_orl.compute_entropy
    assert (utils.log_probs_from_logits, utils.compute_entropy) == originals
    assert actor.log_probs_from_logits is originals[0] and actor.compute_entropy is originals[1]
    rk_orl.patch_openrlhf()
    assert utils.compute_entropy is rk_orl.compute_entropy
    rk_orl.unpatch_openrlhf()
    assert utils.compute_entropy is originals[1]


class _TableLM(torch.nn.Module):
    """A causal LM whose logits are a learned table row per input token (a real Actor's model stand-in)."""

    def __init__(self):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(V, V, generator=torch.Generator().manual_seed(0)) * 2)

    def forward(self, input_ids, attention_mask=None, position_ids=None, **_):
        from transformers.modeling_outputs import CausalLMOutputWithPast

        return CausalLMOutputWithPast(logits=self.table[input_ids])


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_actor_forward_agrees_with_the_patch(openrlhf, temperature):
    """OpenRLHF's ``Actor.forward`` (action log-probs and entropy, then their gradient to the model) gives the
    same numbers with and without the patch."""
    _, actor_module = openrlhf
    sequences = torch.randint(0, V, (3, 8), generator=torch.Generator().manual_seed(3))
    attention_mask = torch.ones_like(sequences)
    action_mask = torch.ones(3, 5, dtype=torch.long)
    action_mask[1, 3:] = 0

    def run():
        model = _TableLM()
        actor = actor_module.Actor(model, temperature=temperature)
        actor.packing_samples = False
        logp, output = actor(sequences, action_mask, attention_mask=attention_mask, return_output=True,
                             return_entropy=True)
        (logp.sum() - 0.1 * output.entropy.sum()).backward()
        return logp.detach(), output.entropy.detach(), model.table.grad

    want = run()
    with rk_orl.patch_openrlhf():
        got = run()
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_a_bad_labels_tensor_is_reported_as_labels_before_the_in_place_division():
    logits = _logits((2, 5), torch.float32)
    original = logits.clone()
    with pytest.raises(TypeError, match="^labels must have dtype"):
        rk_orl.log_probs_from_logits(logits, torch.rand(2, 5), temperature=0.5)
    with pytest.raises(ValueError, match="^labels must have shape"):
        rk_orl.log_probs_from_logits(logits, torch.randint(0, V, (2, 4)), temperature=0.5)
    assert torch.equal(logits, original)  # refused before OpenRLHF's in-place temperature
