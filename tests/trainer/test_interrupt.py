"""Ctrl-C / SIGTERM: the stage finishes its step, writes a checkpoint and stops; --resume goes on exactly."""
import os
import signal
import subprocess
import sys

import pytest

from rlhf_kernels.trainer.interrupt import StopOnSignal, StoppedBySignal

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_the_first_signal_sets_the_flag_the_second_ctrl_c_interrupts_and_handlers_come_back():
    before = {s: signal.getsignal(s) for s in StopOnSignal.SIGNALS}
    with pytest.raises(KeyboardInterrupt):
        with StopOnSignal() as stop:
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop.requested == signal.SIGTERM and stop.agreed(None)
            os.kill(os.getpid(), signal.SIGINT)
    assert {s: signal.getsignal(s) for s in StopOnSignal.SIGNALS} == before
    with StopOnSignal() as stop:
        assert not stop.agreed(None)
        stop.raise_if_requested("sft", 1, 2, "x")  # nothing asked: no exception


def test_sft_stopped_by_a_signal_checkpoints_its_step_and_resumes_exactly(tmp_path, tiny, monkeypatch):
    from rlhf_kernels.trainer import sft
    from rlhf_kernels.trainer.checkpoint import latest_checkpoint

    kw = dict(tiny, steps=6, batch_size=16, n_train=300)
    _, _, full = sft.train_sft(sft.SFTConfig(**kw, out_dir=str(tmp_path / "a")))
    calls, clip = [], sft.clip_grad_norm

    def clip_then_signal(*args):  # the signal lands inside step 3, between its backward and its update
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return clip(*args)

    monkeypatch.setattr(sft, "clip_grad_norm", clip_then_signal)
    with pytest.raises(StoppedBySignal, match=r"stopped by SIGINT after step 3 of 6") as stopped:
        sft.train_sft(sft.SFTConfig(**kw, out_dir=str(tmp_path / "b")))
    assert stopped.value.step == 3 and latest_checkpoint(str(tmp_path / "b")).endswith("step_000003")
    monkeypatch.setattr(sft, "clip_grad_norm", clip)
    _, _, resumed = sft.train_sft(sft.SFTConfig(**kw, out_dir=str(tmp_path / "b"), resume=True))
    keys = ("loss", "grad_norm", "lr")
    assert [[r[k] for k in keys] for r in resumed] == [[r[k] for k in keys] for r in full]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_the_cli_exits_128_plus_the_signal_and_prints_the_command_that_resumes(tmp_path, signum):
    out = str(tmp_path / "run")
    args = ["sft", "--out_dir", out, "--steps", "100000", "--batch_size", "4", "--n_train", "64",
            "--n_embd", "16", "--n_layer", "1", "--n_head", "2", "--n_positions", "32", "--max_len", "32",
            "--log_every", "1", "--no_progress", "--device", "cpu", "--threads", "1"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "rlhf_kernels.trainer.cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:  # wait until steps are running
            if line.startswith("step 2 "):
                break
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signum, stderr
    assert f"stopped by {signal.Signals(signum).name} after step" in stderr
    assert f"continue with: rlhf-kernels sft --out_dir {out}" in stderr and stderr.rstrip().endswith("--resume")
    assert os.path.isfile(os.path.join(out, "ckpt", "latest")) and not os.path.exists(os.path.join(out, "final"))


def test_a_cli_run_ended_by_stop_after_reports_its_checkpoint_not_a_final_model(tmp_path, capsys):
    from rlhf_kernels.trainer.cli import main

    out = str(tmp_path / "run")
    assert main(["sft", "--out_dir", out, "--steps", "5", "--stop_after", "2", "--batch_size", "4", "--n_train",
                 "64", "--n_embd", "16", "--n_layer", "1", "--n_head", "2", "--n_positions", "32", "--max_len", "32",
                 "--no_progress", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert f"stopped after step 2 of 5 (stop_after); checkpoint in {out}/ckpt" in printed
    assert "saved ->" not in printed and not os.path.exists(os.path.join(out, "final"))
