"""causal_lm_logprobs on tiny random GPT-2 / Llama / Qwen2 models vs log_softmax of the model's own logits."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from rlhf_kernels.integrations.hf import causal_lm_body, causal_lm_logprobs, shifted_targets  # noqa: E402

VOCAB = 97


def _gpt2(tie=True):
    cfg = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=4, n_positions=64, vocab_size=VOCAB, bos_token_id=1, eos_token_id=1,
        pad_token_id=0, tie_word_embeddings=tie,
    )
    return transformers.GPT2LMHeadModel(cfg)


def _llama():
    cfg = transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=1, eos_token_id=1, pad_token_id=0,
    )
    return transformers.LlamaForCausalLM(cfg)


def _qwen2():
    cfg = transformers.Qwen2Config(
        num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=1, eos_token_id=1, pad_token_id=0,
        tie_word_embeddings=True,
    )
    return transformers.Qwen2ForCausalLM(cfg)


MODELS = {"gpt2": _gpt2, "gpt2-untied": lambda: _gpt2(tie=False), "llama": _llama, "qwen2": _qwen2}


def _model(name, seed=0):
    torch.manual_seed(seed)
    model = MODELS[name]()
    model.eval()  # no dropout: the two paths must see the same network
    model.config._attn_implementation = "eager"
    with torch.no_grad():  # make the head's output far from uniform
        model.get_output_embeddings().weight.mul_(20.0)
    return model


def _inputs(padding, seed=1, B=3, L=11):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, VOCAB, (B, L), generator=g)
    attention_mask = torch.ones(B, L, dtype=torch.long)
    if padding == "right":
        attention_mask[1, 7:] = 0
        attention_mask[2, 4:] = 0
    elif padding == "left":
        attention_mask[1, :3] = 0
        attention_mask[2, :6] = 0
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    return input_ids, attention_mask


def _reference(model, input_ids, attention_mask, targets, temperature=1.0):
    """log_softmax of the model's own logits at the target ids (float64), and the entropy."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.double() / temperature
    log_p = torch.log_softmax(logits, -1)
    valid = targets != -100
    logp = log_p.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * valid
    entropy = -(log_p.exp() * log_p).sum(-1) * valid
    return logp, entropy


@pytest.mark.parametrize("padding", ["none", "right", "left"])
@pytest.mark.parametrize("name", list(MODELS))
def test_matches_model_logits(name, padding):
    model = _model(name)
    input_ids, attention_mask = _inputs(padding)
    head_calls = []
    hook = model.get_output_embeddings().register_forward_hook(lambda *a: head_calls.append(1))
    try:
        logp, entropy = causal_lm_logprobs(model, input_ids, attention_mask, return_entropy=True)
    finally:
        hook.remove()
    assert not head_calls, "the LM head module ran: full logits were built"
    assert logp.shape == entropy.shape == input_ids.shape and logp.dtype == torch.float32
    targets = shifted_targets(input_ids, attention_mask)
    ref_logp, ref_entropy = _reference(model, input_ids, attention_mask, targets)
    torch.testing.assert_close(logp.double(), ref_logp, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(entropy.double(), ref_entropy, rtol=1e-4, atol=1e-4)
    assert (logp[:, -1] == 0).all()
    assert (logp[attention_mask == 0] == 0).all()
    assert ref_logp.min() < -1.0  # non-trivial distributions


def test_shifted_targets():
    input_ids = torch.tensor([[5, 6, 7, 8], [0, 0, 3, 4], [9, 10, 0, 0]])
    attention_mask = (input_ids != 0).long()
    expected = torch.tensor([[6, 7, 8, -100], [-100, -100, 4, -100], [10, -100, -100, -100]])
    assert torch.equal(shifted_targets(input_ids, attention_mask), expected)
    assert torch.equal(shifted_targets(input_ids, None)[0], expected[0])


def test_left_padding_scores_like_unpadded():
    model = _model("llama")
    ids = torch.randint(2, VOCAB, (1, 8), generator=torch.Generator().manual_seed(3))
    alone = causal_lm_logprobs(model, ids, torch.ones_like(ids))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(ids)], 1)
    torch.testing.assert_close(causal_lm_logprobs(model, padded, mask)[:, 3:], alone, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["gpt2", "llama", "qwen2"])
def test_gradients_match_model_logits(name):
    model = _model(name)
    input_ids, attention_mask = _inputs("right", seed=4)
    g = torch.Generator().manual_seed(5)
    w_logp = torch.randn(input_ids.shape, generator=g)
    w_ent = torch.randn(input_ids.shape, generator=g)

    def grads(loss):
        model.zero_grad(set_to_none=True)
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    logp, entropy = causal_lm_logprobs(model, input_ids, attention_mask, return_entropy=True, temperature=0.8)
    ours = grads((logp * w_logp).sum() + (entropy * w_ent).sum())
    targets = shifted_targets(input_ids, attention_mask)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float() / 0.8
    log_p = torch.log_softmax(logits, -1)
    valid = targets != -100
    ref_logp = log_p.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * valid
    ref_ent = -(log_p.exp() * log_p).sum(-1) * valid
    theirs = grads((ref_logp * w_logp).sum() + (ref_ent * w_ent).sum())
    assert ours.keys() == theirs.keys() and len(ours) > 5
    for key in theirs:
        scale = theirs[key].abs().max().clamp(min=1e-3)
        torch.testing.assert_close(ours[key] / scale, theirs[key] / scale, rtol=1e-4, atol=1e-4, msg=key)


@pytest.mark.parametrize("chunk_by", [None, "vocab"])
def test_frozen_head_gradients_reach_the_body(chunk_by):
    """LoRA-style: the LM head frozen (and untied), the body trains. The body's gradients match the model's own
    logits; the head gets none. Without entropy this takes the frozen-head path (the body's gradient direction
    computed in the forward); with chunk_by="vocab" the slabs' recompute path."""
    model = _model("gpt2-untied")
    model.get_output_embeddings().weight.requires_grad_(False)
    input_ids, attention_mask = _inputs("right", seed=8)
    w_logp = torch.randn(input_ids.shape, generator=torch.Generator().manual_seed(9))

    def grads(loss):
        model.zero_grad(set_to_none=True)
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    logp = causal_lm_logprobs(model, input_ids, attention_mask, temperature=0.9, chunk_size=7, chunk_by=chunk_by)
    ours = grads((logp * w_logp).sum())
    targets = shifted_targets(input_ids, attention_mask)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float() / 0.9
    ref_logp = torch.log_softmax(logits, -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    theirs = grads((ref_logp * (targets != -100) * w_logp).sum())
    assert ours.keys() == theirs.keys() and "lm_head.weight" not in ours and len(ours) > 5
    for key in theirs:
        scale = theirs[key].abs().max().clamp(min=1e-3)
        torch.testing.assert_close(ours[key] / scale, theirs[key] / scale, rtol=1e-4, atol=1e-4, msg=key)


def test_explicit_targets_temperature_and_errors():
    model = _model("qwen2")
    input_ids, attention_mask = _inputs("none", seed=6)
    g = torch.Generator().manual_seed(7)
    targets = torch.randint(0, VOCAB, input_ids.shape, generator=g)
    targets[0, :4] = -100
    logp = causal_lm_logprobs(model, input_ids, attention_mask, targets=targets, temperature=1.7)
    ref, _ = _reference(model, input_ids, attention_mask, targets, temperature=1.7)
    torch.testing.assert_close(logp.double(), ref, rtol=1e-4, atol=1e-4)
    assert (logp[0, :4] == 0).all()
    with pytest.raises(ValueError, match="targets"):
        causal_lm_logprobs(model, input_ids, attention_mask, targets=targets[:, :3])
    with pytest.raises(ValueError, match="attention_mask"):
        causal_lm_logprobs(model, input_ids, attention_mask[:, :3])
    with pytest.raises(ValueError, match="input_ids"):
        causal_lm_logprobs(model, input_ids[0], None)


def test_body_lookup_and_no_mask():
    model = _model("gpt2")
    assert causal_lm_body(model) is model.transformer
    assert causal_lm_body(_model("llama")).__class__.__name__ == "LlamaModel"
    with pytest.raises(ValueError, match="decoder body"):
        causal_lm_body(torch.nn.Linear(2, 2))
    input_ids, _ = _inputs("none", seed=8)
    torch.testing.assert_close(
        causal_lm_logprobs(model, input_ids, None), causal_lm_logprobs(model, input_ids, torch.ones_like(input_ids))
    )


def test_bias_and_logit_scale_folded():
    """A head with a bias and a config logit_scale (Cohere-style) are honoured; softcapping is refused."""
    model = _model("gpt2-untied")
    head = model.get_output_embeddings()
    head.bias = torch.nn.Parameter(torch.randn(VOCAB) * 3)
    input_ids, attention_mask = _inputs("none", seed=9)
    targets = shifted_targets(input_ids, attention_mask)
    ref, _ = _reference(model, input_ids, attention_mask, targets)  # GPT-2's forward applies the bias
    torch.testing.assert_close(causal_lm_logprobs(model, input_ids, attention_mask).double(), ref, rtol=1e-4, atol=1e-4)
    model.config.logit_scale = 0.5
    scaled = causal_lm_logprobs(model, input_ids, attention_mask)
    ref_scaled, _ = _reference(model, input_ids, attention_mask, targets, temperature=2.0)
    torch.testing.assert_close(scaled.double(), ref_scaled, rtol=1e-4, atol=1e-4)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(NotImplementedError, match="soft-caps"):
        causal_lm_logprobs(model, input_ids, attention_mask)


def test_granite_divides_its_logits_by_logits_scaling():
    """Granite's head output is ``logits / logits_scaling``: folded into the temperature as T·logits_scaling."""
    cfg = transformers.GraniteConfig(
        num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=1, eos_token_id=1, pad_token_id=0,
        logits_scaling=4.0,
    )
    torch.manual_seed(0)
    model = transformers.GraniteForCausalLM(cfg).eval()
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(20.0)
    input_ids, attention_mask = _inputs("right", seed=10)
    targets = shifted_targets(input_ids, attention_mask)
    ref, ref_entropy = _reference(model, input_ids, attention_mask, targets, temperature=1.5)   # the model's logits
    logp, entropy = causal_lm_logprobs(model, input_ids, attention_mask, temperature=1.5, return_entropy=True)
    torch.testing.assert_close(logp.double(), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(entropy.double(), ref_entropy, rtol=1e-4, atol=1e-4)


def test_a_float32_head_on_a_bfloat16_body():
    """Mixed dtypes: the log-probs are those of the body's bfloat16 output times the head's float32 weight, in
    float32 (the model's own forward would refuse the mix)."""
    model = _model("llama")   # untied: the head keeps float32 while the body goes to bfloat16
    model.model.to(torch.bfloat16)
    input_ids, attention_mask = _inputs("none", seed=11)
    targets = shifted_targets(input_ids, attention_mask)
    with torch.no_grad():
        hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        log_p = torch.log_softmax(hidden.double() @ model.lm_head.weight.double().T, -1)
    ref = log_p.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * (targets != -100)
    logp = causal_lm_logprobs(model, input_ids, attention_mask)
    assert logp.dtype == torch.float32
    torch.testing.assert_close(logp.double(), ref, rtol=1e-4, atol=1e-4)


def test_heads_that_cannot_be_used_are_clear_errors(monkeypatch):
    model = _model("gpt2-untied")
    input_ids, attention_mask = _inputs("none", seed=12)
    model.config.logit_scale = 0.0
    with pytest.raises(NotImplementedError, match="logit scale 0.0"):
        causal_lm_logprobs(model, input_ids, attention_mask)
    model.config.logit_scale = None
    monkeypatch.setattr(model, "get_output_embeddings", lambda: torch.nn.Identity())   # a head without a weight
    with pytest.raises(ValueError, match="no output embedding"):
        causal_lm_logprobs(model, input_ids, attention_mask)
