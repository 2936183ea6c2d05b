"""TRL drop-ins vs TRL's own functions (values, dtypes, gradients) and a patched ORPO run."""

import os
import sys
import tempfile

import pytest
import torch

trl = pytest.importorskip("trl")
trl_utils = pytest.importorskip("trl.trainer.utils")

import rlhf_kernels.integrations.trl as rk_trl  # noqa: E402
from tests.tolerance import assert_matches_oracle  # noqa: E402

# TRL's originals, captured before any test patches anything.
TRL_SLS = trl_utils.selective_log_softmax
TRL_ENT = trl_utils.entropy_from_logits
TRL_SLSE = trl_utils.selective_log_softmax_and_entropy

SHAPES = [(1, 1, 7), (2, 5, 11), (3, 13, 1), (2, 3, 50257), (1, 2, 151936)]
DTYPES = [torch.float32, torch.bfloat16]


def _logits(shape, dtype, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype)


def _index(shape, vocab, seed):
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randint(0, vocab, shape, generator=g)


def _close(ours, theirs, truth, dtype):
    """Same dtype as TRL. fp32: equal to TRL to 1e-5. bf16: ours is the float64 truth rounded to bf16
    (within one ulp), and differs from TRL by at most TRL's own error plus one ulp (TRL reduces in bf16)."""
    assert ours.dtype == theirs.dtype, (ours.dtype, theirs.dtype)
    ours, theirs = ours.double(), theirs.double()
    assert torch.isfinite(ours).all()
    if dtype == torch.float32:
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        return
    ulp = 2**-7 * truth.abs() + 1e-6
    assert ((ours - truth).abs() <= ulp).all(), (ours - truth).abs().max()
    assert ((ours - theirs).abs() <= (theirs - truth).abs() + ulp).all()


def _grad(fn, logits, upstream_seed):
    x = logits.detach().clone().requires_grad_(True)
    out = fn(x)
    g = torch.Generator().manual_seed(upstream_seed)
    upstream = torch.randn(out.shape, generator=g).to(out.dtype)
    (out * upstream).sum().backward()
    return out.detach(), x.grad


def _grad_close(ours, theirs, dtype, truth=None):
    """fp32 with ``truth`` (TRL's formula run in float64): DESIGN §5's rule, TRL's float32 run as the reference in
    the dtype (two float32 results 1e-6 apart failed at V = 151936 on an AVX2 machine, each well within the rule);
    else close to TRL."""
    assert ours.dtype == theirs.dtype
    if truth is not None and dtype == torch.float32:
        assert_matches_oracle(ours, theirs, truth, dtype, "gradient")
        return
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(ours.double(), theirs.double(), **tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_selective_log_softmax_matches_trl(shape, dtype):
    logits = _logits(shape, dtype, seed=sum(shape))
    index = _index(shape[:-1], shape[-1], seed=len(shape))
    truth = torch.log_softmax(logits.double(), -1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    ours, g_ours = _grad(lambda x: rk_trl.selective_log_softmax(x, index), logits, 3)
    theirs, g_theirs = _grad(lambda x: TRL_SLS(x, index), logits, 3)
    g_truth = _grad(lambda x: TRL_SLS(x, index), logits.double(), 3)[1]
    assert ours.shape == theirs.shape == index.shape
    _close(ours, theirs, truth, dtype)
    _grad_close(g_ours, g_theirs, dtype, g_truth)


@pytest.mark.parametrize("dtype", DTYPES)
def test_selective_log_softmax_strided_temperature_row_mask(dtype):
    full = _logits((3, 9, 37), dtype, seed=11)
    logits = full[:, :-1]  # strided rows, as TRL calls it
    index = _index((3, 8), 37, seed=12)
    row_mask = torch.rand(3, 8, generator=torch.Generator().manual_seed(13)) > 0.3
    truth = torch.log_softmax(logits.double() / 0.7, -1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    truth = truth.masked_fill(~row_mask, 0.0)
    ours, g_ours = _grad(lambda x: rk_trl.selective_log_softmax(x, index, 0.7, row_mask), logits, 5)
    theirs, g_theirs = _grad(lambda x: TRL_SLS(x, index, temperature=0.7, row_mask=row_mask), logits, 5)
    _close(ours, theirs, truth, dtype)
    assert (ours[~row_mask] == 0).all()
    _grad_close(g_ours, g_theirs, dtype)
    assert (g_ours[~row_mask] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 4])
def test_selective_log_softmax_k_index_form(k, dtype):
    logits = _logits((2, 6, 53), dtype, seed=21 + k)
    index = _index((2, 6, k), 53, seed=22)
    truth = torch.log_softmax(logits.double() / 1.3, -1).gather(-1, index)
    ours, g_ours = _grad(lambda x: rk_trl.selective_log_softmax(x, index, temperature=1.3), logits, 7)
    theirs, g_theirs = _grad(lambda x: TRL_SLS(x, index, temperature=1.3), logits, 7)
    assert ours.shape == theirs.shape == (2, 6, k)
    _close(ours, theirs, truth, dtype)
    _grad_close(g_ours, g_theirs, dtype)


def test_selective_log_softmax_k_form_row_mask_and_errors():
    logits = _logits((2, 4, 9), torch.float32, seed=31)
    index = _index((2, 4, 3), 9, seed=32)
    row_mask = torch.ones(2, 4, 3, dtype=torch.bool)
    row_mask[0, 1] = False
    torch.testing.assert_close(
        rk_trl.selective_log_softmax(logits, index, row_mask=row_mask), TRL_SLS(logits, index, row_mask=row_mask)
    )
    empty = index[..., :0]   # K = 0 columns: an empty result, as TRL's gather gives
    assert rk_trl.selective_log_softmax(logits, empty).shape == TRL_SLS(logits, empty).shape == (2, 4, 0)
    with pytest.raises(ValueError, match="temperature"):
        rk_trl.selective_log_softmax(logits, index, temperature=0.0)
    with pytest.raises(ValueError, match="index"):
        rk_trl.selective_log_softmax(logits, index[:, :3])
    with pytest.raises(ValueError, match="outside"):
        rk_trl.selective_log_softmax(logits, torch.full((2, 4), 9))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_entropy_from_logits_matches_trl(shape, dtype):
    logits = _logits(shape, dtype, seed=41 + sum(shape))
    p = torch.softmax(logits.double(), -1)
    truth = -(p * torch.log_softmax(logits.double(), -1)).sum(-1)
    ours, g_ours = _grad(lambda x: rk_trl.entropy_from_logits(x, chunk_size=2), logits, 9)
    theirs, g_theirs = _grad(lambda x: TRL_ENT(x, chunk_size=2), logits, 9)
    g_truth = _grad(lambda x: TRL_ENT(x, chunk_size=2), logits.double(), 9)[1]
    assert ours.shape == theirs.shape == shape[:-1]
    _close(ours, theirs, truth, dtype)
    _grad_close(g_ours, g_theirs, dtype, g_truth)


def test_entropy_from_logits_chunk_size_and_masked_vocab():
    logits = _logits((5, 3, 17), torch.float32, seed=51)
    a = rk_trl.entropy_from_logits(logits)
    b = rk_trl.entropy_from_logits(logits, chunk_size=1)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, TRL_ENT(logits, chunk_size=4))
    masked = logits.clone()
    masked[..., :5] = float("-inf")  # masked vocabulary: TRL's fp32 path gives NaN here, ours does not
    ref = TRL_ENT(logits[..., 5:])
    torch.testing.assert_close(rk_trl.entropy_from_logits(masked), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="chunk_size"):
        rk_trl.entropy_from_logits(logits, chunk_size=0)
    row = logits[0, 0]   # one row [V]: a 0-d entropy
    assert rk_trl.entropy_from_logits(row).shape == ()
    torch.testing.assert_close(rk_trl.entropy_from_logits(row), a[0, 0])


def test_the_defaults_are_trls():
    logits = _logits((2, 5, 19), torch.float32, seed=64).requires_grad_(True)
    index = _index((2, 5), 19, seed=65)
    for ours, theirs in zip(rk_trl.selective_log_softmax_and_entropy(logits, index), TRL_SLSE(logits, index)):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        assert ours.requires_grad == theirs.requires_grad   # the entropy's gradient too, by default
    torch.testing.assert_close(rk_trl.selective_log_softmax(logits, index), TRL_SLS(logits, index))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("entropy_requires_grad", [True, False])
def test_selective_log_softmax_and_entropy_matches_trl(dtype, entropy_requires_grad):
    logits = _logits((3, 7, 29), dtype, seed=61)
    index = _index((3, 7), 29, seed=62)
    row_mask = torch.rand(3, 7, generator=torch.Generator().manual_seed(63)) > 0.25
    results = []
    for fn in (rk_trl.selective_log_softmax_and_entropy, TRL_SLSE):
        x = logits.detach().clone().requires_grad_(True)
        logp, ent = fn(x, index, entropy_requires_grad, temperature=0.9, row_mask=row_mask)
        assert ent.requires_grad == entropy_requires_grad
        loss = (logp.float() * torch.linspace(-1, 1, logp.numel()).view_as(logp)).sum()
        if entropy_requires_grad:
            loss = loss + (ent.float() * 0.5).sum()
        loss.backward()
        results.append((logp.detach(), ent.detach(), x.grad))
    (lo, eo, go), (lt, et, gt) = results
    z = logits.double() / 0.9
    logp_true = torch.log_softmax(z, -1).gather(-1, index.unsqueeze(-1)).squeeze(-1).masked_fill(~row_mask, 0)
    ent_true = (-(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1)).masked_fill(~row_mask, 0)
    _close(lo, lt, logp_true, dtype)
    _close(eo, et, ent_true, dtype)
    _grad_close(go, gt, dtype)


# ----------------------------------------------------------------------------- patching


def test_import_does_not_patch():
    assert trl_utils.selective_log_softmax is TRL_SLS
    assert trl_utils.entropy_from_logits is TRL_ENT


def test_patch_trl_context_manager_restores():
    orpo = pytest.importorskip("trl.experimental.orpo.orpo_trainer")
    assert orpo.selective_log_softmax is TRL_SLS
    with rk_trl.patch_trl() as handle:
        assert trl_utils.selective_log_softmax is rk_trl.selective_log_softmax
        assert trl_utils.entropy_from_logits is rk_trl.entropy_from_logits
        assert trl_utils.selective_log_softmax_and_entropy is rk_trl.selective_log_softmax_and_entropy
        assert orpo.selective_log_softmax is rk_trl.selective_log_softmax
        assert "trl.experimental.orpo.orpo_trainer.selective_log_softmax" in handle.patched
        with rk_trl.patch_trl():  # nested: a no-op that must not restore early
            pass
        assert trl_utils.selective_log_softmax is rk_trl.selective_log_softmax
    assert trl_utils.selective_log_softmax is TRL_SLS
    assert trl_utils.entropy_from_logits is TRL_ENT
    assert trl_utils.selective_log_softmax_and_entropy is TRL_SLSE
    assert orpo.selective_log_softmax is TRL_SLS


def test_patch_trl_function_form_and_late_imports():
    handle = rk_trl.patch_trl()
    try:
        # A module that imports the helper while patched gets ours, and the original back on restore.
        fake = type(sys)("trl._rk_test_late_module")
        fake.selective_log_softmax = trl_utils.selective_log_softmax
        sys.modules[fake.__name__] = fake
        assert fake.selective_log_softmax is rk_trl.selective_log_softmax
    finally:
        handle.restore()
        handle.restore()  # idempotent
    try:
        assert fake.selective_log_softmax is TRL_SLS
        assert trl_utils.selective_log_softmax is TRL_SLS
    finally:
        del sys.modules[fake.__name__]
    rk_trl.patch_trl()
    rk_trl.unpatch_trl()
    assert trl_utils.selective_log_softmax is TRL_SLS


WORDS = "the a cat dog sat ran on mat rug fast slow red blue big small".split()


def _tokenizer():
    """A word-level tokenizer built in memory (there is no model hub here)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>"] + WORDS)}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=word_level, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", bos_token="<eos>"
    )
    return tokenizer, len(vocab)


def _orpo_losses():
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset
    from transformers import GPT2Config, GPT2LMHeadModel
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    tokenizer, vocab_size = _tokenizer()
    words = WORDS
    g = torch.Generator().manual_seed(0)

    def sentence(n):
        return " ".join(words[i] for i in torch.randint(0, len(words), (n,), generator=g).tolist())

    data = Dataset.from_dict(
        {
            "prompt": [sentence(4) for _ in range(8)],
            "chosen": [" " + sentence(3) for _ in range(8)],
            "rejected": [" " + sentence(5) for _ in range(8)],
        }
    )
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=vocab_size,
        bos_token_id=1, eos_token_id=1, pad_token_id=0,
    )
    model = GPT2LMHeadModel(config)
    with tempfile.TemporaryDirectory() as out:
        args = ORPOConfig(
            output_dir=out, max_steps=3, per_device_train_batch_size=2, learning_rate=1e-2, logging_steps=1,
            report_to="none", use_cpu=True, save_strategy="no", max_length=32, max_completion_length=16, seed=0,
            disable_tqdm=True,
        )
        trainer = ORPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
        trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return [(h["loss"], h["grad_norm"], h["logps/chosen"], h["logps/rejected"]) for h in logs]


def test_orpo_trainer_losses_agree_with_patch(monkeypatch):
    pytest.importorskip("trl.experimental.orpo")
    baseline = _orpo_losses()
    calls = []
    fused = rk_trl._rk_logprobs

    def counting(*args, **kwargs):
        calls.append(1)
        return fused(*args, **kwargs)

    monkeypatch.setattr(rk_trl, "_rk_logprobs", counting)
    with rk_trl.patch_trl():
        patched = _orpo_losses()
    assert calls, "the patched ORPO run never called the fused op"
    assert len(baseline) == len(patched) == 3
    for (l0, g0, c0, r0), (l1, g1, c1, r1) in zip(baseline, patched):
        assert l1 == pytest.approx(l0, rel=1e-4)
        assert g1 == pytest.approx(g0, rel=1e-3)
        assert c1 == pytest.approx(c0, rel=1e-4)
        assert r1 == pytest.approx(r0, rel=1e-4)
    assert baseline[0][0] != baseline[-1][0]  # training moved


# ----------------------------------------------------------------------------- fused LM head (opt-in)


def _lm_head_inputs(dtype=torch.float32, N=37, H=24, V=53, bias=True):
    g = torch.Generator().manual_seed(71)
    hidden = torch.randn(N, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) * 0.4).to(dtype)
    b = (torch.randn(V, generator=g) * 0.5).to(dtype) if bias else None
    targets = torch.randint(0, V, (N,), generator=g)
    return hidden, weight, b, targets


def _lm_head_run(fn, hidden, weight, bias, targets, outputs, temperature=0.8, logit_scale=1.0, softcap=None):
    leaves = [t.clone().requires_grad_(True) if t is not None else None for t in (hidden, weight, bias)]
    out = fn.apply(*leaves, targets, temperature, 32768, softcap, logit_scale, outputs)
    g = torch.Generator().manual_seed(72)
    loss = (out[0] * torch.randn(out[0].shape, generator=g)).sum()
    if out[1] is not None:
        loss = loss + (out[1] * torch.randn(out[1].shape, generator=g)).sum()
    loss.backward()
    return [o.detach() if o is not None else None for o in out], [t.grad for t in leaves if t is not None]


@pytest.mark.parametrize("outputs", [("log_probs",), ("log_probs", "entropy")])
@pytest.mark.parametrize("logit_scale", [1.0, 0.5])
def test_fused_lm_head_matches_trl_chunked_logprob(outputs, logit_scale):
    from trl.kernels import ChunkedLogProbFunction

    args = _lm_head_inputs()
    ours, g_ours = _lm_head_run(rk_trl.FusedLMHeadFunction, *args, outputs, logit_scale=logit_scale)
    theirs, g_theirs = _lm_head_run(ChunkedLogProbFunction, *args, outputs, logit_scale=logit_scale)
    assert len(ours) == len(theirs) == 5
    for a, b in zip(ours, theirs):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.dtype == b.dtype
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_fused_lm_head_falls_back_to_trl(monkeypatch):
    from trl.kernels import ChunkedLogProbFunction

    calls = []
    monkeypatch.setattr(rk_trl, "_rk_linear_logprobs", lambda *a, **k: calls.append(1))
    args = _lm_head_inputs()
    for outputs, softcap in ((("log_probs", "entropy", "is_top1"), None), (("log_probs",), 30.0)):
        ours, _ = _lm_head_run(rk_trl.FusedLMHeadFunction, *args, outputs, softcap=softcap)
        theirs, _ = _lm_head_run(ChunkedLogProbFunction, *args, outputs, softcap=softcap)
        for a, b in zip(ours, theirs):
            assert (a is None and b is None) or torch.equal(a, b)
    assert not calls


def test_fused_lm_head_autocast_bf16():
    """Under bf16 autocast both project in bf16 and reduce in fp32; ours rounds the logits once
    (TRL adds the bias to an already rounded tile), so it is at least as close to the float64 truth."""
    from trl.kernels import ChunkedLogProbFunction

    hidden, weight, bias, targets = _lm_head_inputs(N=16, V=301)
    outputs = ("log_probs", "entropy")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, g_ours = _lm_head_run(rk_trl.FusedLMHeadFunction, hidden, weight, bias, targets, outputs)
        theirs, g_theirs = _lm_head_run(ChunkedLogProbFunction, hidden, weight, bias, targets, outputs)
    h64, w64, b64 = (t.bfloat16().double() for t in (hidden, weight, bias))
    z = (h64 @ w64.T + b64) / 0.8
    log_p = torch.log_softmax(z, -1)
    truth = (log_p.gather(-1, targets[:, None])[:, 0], -(log_p.exp() * log_p).sum(-1))
    for a, b, t in zip(ours[:2], theirs[:2], truth):
        assert a.dtype == b.dtype == torch.float32
        err_ours, err_theirs = (a.double() - t).abs().max(), (b.double() - t).abs().max()
        assert err_ours <= 1.25 * err_theirs + 1e-5, (err_ours, err_theirs)
        torch.testing.assert_close(a.double(), t, rtol=2e-2, atol=2e-2)
    for a, b in zip(g_ours, g_theirs):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2 * b.abs().max().item())


def test_patch_trl_lm_head_is_opt_in():
    with rk_trl.patch_trl():
        assert trl_utils._ChunkedLogProbFunction is not rk_trl.FusedLMHeadFunction
    original = trl_utils._ChunkedLogProbFunction
    with rk_trl.patch_trl(lm_head=True):
        assert trl_utils._ChunkedLogProbFunction is rk_trl.FusedLMHeadFunction
    assert trl_utils._ChunkedLogProbFunction is original


def _grpo_logs():
    from datasets import Dataset
    from transformers import GPT2Config, GPT2LMHeadModel
    from trl import GRPOConfig, GRPOTrainer

    tokenizer, vocab_size = _tokenizer()
    data = Dataset.from_dict({"prompt": ["the cat sat", "a dog ran", "red mat on", "big blue rug"]})

    def reward(completions, **kwargs):
        return [len(c) / 10 + (1.0 if "cat" in c else 0.0) for c in completions]

    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=vocab_size,
        bos_token_id=1, eos_token_id=1, pad_token_id=0,
    )
    model = GPT2LMHeadModel(config)
    with tempfile.TemporaryDirectory() as out:
        args = GRPOConfig(
            output_dir=out, max_steps=2, per_device_train_batch_size=4, num_generations=4, max_completion_length=6,
            learning_rate=1e-2, logging_steps=1, report_to="none", use_cpu=True, save_strategy="no", seed=0,
            disable_tqdm=True, bf16=False, beta=0.0,
        )
        trainer = GRPOTrainer(
            model=model, args=args, train_dataset=data, processing_class=tokenizer, reward_funcs=reward
        )
        trainer.train()
    return [(h["loss"], h["entropy"], h["grad_norm"]) for h in trainer.state.log_history if "loss" in h]


def test_grpo_trainer_agrees_with_lm_head_patch(monkeypatch):
    baseline = _grpo_logs()
    calls = []
    fused = rk_trl._rk_linear_logprobs

    def counting(*args, **kwargs):
        calls.append(1)
        return fused(*args, **kwargs)

    monkeypatch.setattr(rk_trl, "_rk_linear_logprobs", counting)
    with rk_trl.patch_trl(lm_head=True):
        patched = _grpo_logs()
    assert calls, "the patched GRPO run never called rk.linear_logprobs"
    assert len(baseline) == len(patched) == 2
    for (l0, e0, g0), (l1, e1, g1) in zip(baseline, patched):
        assert l1 == pytest.approx(l0, rel=1e-4, abs=1e-6)
        assert e1 == pytest.approx(e0, rel=1e-5)
        assert g1 == pytest.approx(g0, rel=1e-4)


def test_a_bad_index_is_reported_as_index():
    """TRL's argument is ``index``: a float, misshapen or misplaced one is named so, not as the op's ``targets``."""
    logits = _logits((2, 4, 9), torch.float32, seed=33)
    index = _index((2, 4), 9, seed=34)
    for fn in (rk_trl.selective_log_softmax, rk_trl.selective_log_softmax_and_entropy):
        with pytest.raises(TypeError, match="^index must have dtype"):
            fn(logits, index.float())
        with pytest.raises(ValueError, match="^index must have shape"):
            fn(logits, index[:, :3])
        with pytest.raises(ValueError, match="^index is on meta"):
            fn(logits, index.to("meta"))
