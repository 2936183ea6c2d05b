"""The top-level ``rlhf-kernels`` entry point: its help names every command, and unknown ones exit 2."""
import pytest

from rlhf_kernels.cli import TRAINER_COMMANDS, main


def test_help_lists_what_every_command_does(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    listed = [line.split()[1] for line in out.splitlines() if line.strip().startswith("rlhf-kernels ")]
    named = {name for entry in listed for name in entry.split("|")}
    assert named == {"info", "settings", "bench", *TRAINER_COMMANDS}, out


def test_no_command_or_an_unknown_one_exits_2(capsys):
    assert main([]) == 2
    assert "what to run" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exited:  # argparse's own exit, as the console script sees it
        main(["frobnicate"])
    assert exited.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
