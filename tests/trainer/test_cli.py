"""CLI: configs from files + flags, JSONL inputs, and clear errors for bad configs and data."""
import json

import pytest
import torch

from rlhf_kernels.trainer.cli import main
from rlhf_kernels.trainer.config import make_config, parse_flags
from rlhf_kernels.trainer.data import DataError, load_jsonl
from rlhf_kernels.trainer.ppo import PPOConfig
from rlhf_kernels.trainer.sft import SFTConfig

TINY_FLAGS = ["--n_embd", "32", "--n_layer", "1", "--n_head", "2", "--n_positions", "32", "--max_len", "32",
              "--no_progress"]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_config_file_and_flag_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("steps: 7\nlr: 0.01\nbatch_size: 4\n")
    file, flags = parse_flags(["--config", str(f), "--lr", "0.5", "--resume", "--backend", "torch"])
    cfg = make_config(SFTConfig, file, flags)
    assert (cfg.steps, cfg.lr, cfg.batch_size, cfg.resume, cfg.backend) == (7, 0.5, 4, True, "torch")
    j = tmp_path / "c.json"
    j.write_text(json.dumps({"kl_coef": 0.2, "missing_eos_penalty": None}))
    cfg = make_config(PPOConfig, str(j), {"kl_in_reward": "false"})
    assert cfg.kl_coef == 0.2 and cfg.missing_eos_penalty is None and cfg.kl_in_reward is False


@pytest.mark.parametrize("cls, values, match", [
    (SFTConfig, {"stepz": 3}, r"unknown config key\(s\).*stepz"),
    (SFTConfig, {"steps": "many"}, r"'steps': expected int"),
    (SFTConfig, {"resume": "maybe"}, r"'resume': expected a boolean"),
    (SFTConfig, {"steps": 0}, r"steps and batch_size must be >= 1"),
    (PPOConfig, {"kl_estimator": "k9"}, r"kl_estimator must be"),
    (PPOConfig, {"kl_estimator": "k2"}, r"only valid as a loss term"),
    (PPOConfig, {"rollout_batch": 10, "minibatches": 3}, r"divisible"),
    (SFTConfig, {"device": "tpu"}, r"device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
    (SFTConfig, {"backend": "nope"}, r"backend must be one of"),
    (SFTConfig, {"backend": "cuda", "device": "cpu"}, r"backend 'cuda' cannot run on device cpu"),
    (SFTConfig, {"threads": -2}, r"threads must be >= 0, got -2"),
    (SFTConfig, {"warmup_steps": -1}, r"warmup_steps must be >= 0"),
    (SFTConfig, {"n_head": 0}, r"n_head must be >= 1"),
    (SFTConfig, {"max_len": 1}, r"max_len must be >= 2"),
    (PPOConfig, {"max_new_tokens": 64}, r"max_new_tokens must be in \[1, max_len = 64\)"),
])
def test_bad_configs_raise_clear_errors(cls, values, match):
    with pytest.raises(ValueError, match=match):
        make_config(cls, None, values)


def test_max_len_is_cut_to_the_positions_of_the_model_that_runs(tmp_path, tiny):
    """A GPT-2's learned positions bound max_len once the model exists (a longer sequence would index past its
    position table): the stage warns and cuts to them. A stage that loads its model (ppo --sft) is not held to the
    config's n_positions, which describes only a model built from the config; rotary models have no table."""
    import types

    from rlhf_kernels.trainer.models import fit_max_len
    from rlhf_kernels.trainer.sft import train_sft

    with pytest.warns(UserWarning, match=r"max_len 40 is more than the model's 32 learned positions"):
        _, _, history = train_sft(SFTConfig(**{**tiny, "max_len": 40}, out_dir=str(tmp_path / "sft"), steps=1))
    assert len(history) == 1
    cfg = make_config(PPOConfig, None, {"max_len": 4096})  # no model yet: nothing to hold it to
    gpt2 = types.SimpleNamespace(config=types.SimpleNamespace(n_positions=1024))
    rotary = types.SimpleNamespace(config=types.SimpleNamespace(max_position_embeddings=2048))
    rm = types.SimpleNamespace(body=gpt2)  # a ScalarHeadModel: its body's positions
    with pytest.warns(UserWarning):
        assert fit_max_len(cfg, rotary, rm).max_len == 1024
    assert fit_max_len(cfg, rotary) is cfg
    with pytest.raises(ValueError, match="max_new_tokens must be in"):  # the cut leaves no room for a prompt
        fit_max_len(make_config(PPOConfig, None, {"max_len": 2048, "max_new_tokens": 1500}), gpt2)


def test_asking_for_cuda_without_a_gpu_names_device(monkeypatch):
    from rlhf_kernels.trainer.models import device_of

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"device 'cuda:1': no CUDA device is available here"):
        device_of("cuda:1")
    assert device_of("auto").type == "cpu"


@pytest.mark.parametrize("loader, what", [("build_policy", "model"), ("load_tokenizer", "tokenizer")])
def test_a_model_name_that_resolves_to_nothing_is_a_value_error(loader, what, monkeypatch):
    from rlhf_kernels.trainer import models

    # no network here either way: answer from the cache at once. The variable alone is read at import, so the
    # libraries' flags are set too (without them each lookup waited on the network: 70 s of the CPU suite)
    import huggingface_hub.constants
    import transformers.utils.hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(transformers.utils.hub, "_is_offline_mode", True, raising=False)  # transformers < 5
    name = "no-such-org/no-such-model-rk"
    arg = models.ModelConfig(model=name) if loader == "build_policy" else name
    with pytest.raises(ValueError, match=f"{what} '{name}' is neither"):
        getattr(models, loader)(arg)


def test_long_prompts_are_cut_to_leave_room_for_the_response():
    from rlhf_kernels.trainer.models import ModelConfig, build_policy
    from rlhf_kernels.trainer.rollout import SamplingConfig, generate_responses

    torch.manual_seed(0)
    model, tok = build_policy(ModelConfig(n_layer=1, n_embd=16, n_head=2, n_positions=32))
    rows = [{"prompt": "x" * 200}, {"prompt": "ab"}]  # the first alone is 6x the model's 32 positions
    out = generate_responses(model, tok, rows, SamplingConfig(1.0, 0, 1.0, 8), torch.device("cpu"), 32)
    assert out["prompt_len"] == 24 and out["input_ids"].shape[1] <= 32
    with pytest.raises(ValueError, match="max_new_tokens must be in"):
        generate_responses(model, tok, rows, SamplingConfig(1.0, 0, 1.0, 32), torch.device("cpu"), 32)


def test_bad_data_gives_clear_errors(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="empty"):
        load_jsonl(str(empty), "sft")
    with pytest.raises(DataError, match="not found"):
        load_jsonl(str(tmp_path / "nope.jsonl"), "sft")
    p = _jsonl(tmp_path / "x.jsonl", [{"prompt": "a", "answer": "b"}])
    with pytest.raises(DataError, match=r"missing column\(s\) \['response'\]"):
        load_jsonl(p, "sft")
    p = _jsonl(tmp_path / "y.jsonl", [{"prompt": "a", "chosen": "b"}])
    with pytest.raises(DataError, match=r"missing column\(s\) \['rejected'\]"):
        load_jsonl(p, "rm")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    with pytest.raises(DataError, match="could not parse"):
        load_jsonl(str(bad), "ppo")


def test_cli_errors_exit_2_with_message(tmp_path, capsys):
    assert main(["sft", "--stepz", "3"]) == 2
    assert "unknown config key" in capsys.readouterr().err
    p = _jsonl(tmp_path / "x.jsonl", [{"prompt": "a"}])
    assert main(["sft", "--data", p, "--out_dir", str(tmp_path / "o")]) == 2
    assert "missing column(s) ['response']" in capsys.readouterr().err
    assert main(["ppo", "--out_dir", str(tmp_path / "o")]) == 2
    assert "--sft" in capsys.readouterr().err
    assert main(["frobnicate"]) == 2
    assert main(["sft", "--help"]) == 0
    assert "--batch_size" in capsys.readouterr().out


def test_cli_sft_rm_ppo_on_jsonl(tmp_path, capsys):
    from rlhf_kernels.tasks import get_task
    t = get_task()
    sft = _jsonl(tmp_path / "sft.jsonl", t.sft_data(64, 0))
    prefs = _jsonl(tmp_path / "prefs.jsonl", t.preference_data(64, 0))
    prompts = _jsonl(tmp_path / "prompts.jsonl", [{"prompt": r["prompt"], "extra": 1} for r in t.prompts(32, 0)])
    cfg = tmp_path / "sft.yaml"
    cfg.write_text(f"data: {sft}\nsteps: 3\nbatch_size: 8\n")
    d = str(tmp_path)
    assert main(["sft", "--config", str(cfg), "--out_dir", d + "/sft", *TINY_FLAGS]) == 0
    assert main(["rm", "--data", prefs, "--init", d + "/sft/final", "--steps", "3", "--batch_size", "8",
                 "--out_dir", d + "/rm", *TINY_FLAGS]) == 0
    assert "held-out accuracy" in capsys.readouterr().out
    assert main(["ppo", "--data", prompts, "--sft", d + "/sft/final", "--rm", d + "/rm/final", "--steps", "2",
                 "--rollout_batch", "8", "--max_new_tokens", "6", "--out_dir", d + "/ppo", *TINY_FLAGS]) == 0
    import os
    assert os.path.isfile(d + "/ppo/final/model.safetensors")


def test_cli_stages_queue_target_checks_and_check_each_step(tmp_path, monkeypatch):
    """Under the CLI the ops queue their target checks (rk.async_target_checks) and each step checks them once,
    where the loop syncs anyway; the variable is restored afterwards and a user's own setting is left alone."""
    import os

    import rlhf_kernels as rk
    from rlhf_kernels.ops import _deferred_checks

    from rlhf_kernels.tasks import get_task

    sft = _jsonl(tmp_path / "sft.jsonl", get_task().sft_data(16, 0))
    modes = []
    real = rk.check_pending_targets
    monkeypatch.setattr(rk, "check_pending_targets",
                        lambda: (modes.append(_deferred_checks.validation_mode()), real()))
    monkeypatch.delenv("RLHF_KERNELS_VALIDATE", raising=False)
    def args(out):
        return ["sft", "--data", sft, "--steps", "2", "--batch_size", "4", "--out_dir", str(tmp_path / out),
                *TINY_FLAGS]

    assert main(args("o")) == 0
    assert modes == ["async", "async"] and "RLHF_KERNELS_VALIDATE" not in os.environ
    modes.clear()
    monkeypatch.setenv("RLHF_KERNELS_VALIDATE", "1")
    assert main(args("o2")) == 0
    assert modes == ["sync", "sync"] and os.environ["RLHF_KERNELS_VALIDATE"] == "1"
