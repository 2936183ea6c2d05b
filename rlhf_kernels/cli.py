"""``rlhf-kernels``: the command-line entry point.

    rlhf-kernels info                     versions, device, live backends, current settings
    rlhf-kernels settings [--update-readme README.md]   every environment variable (a markdown table)
    rlhf-kernels bench [...]              kernel benchmarks (benchmarks/run.py)
    rlhf-kernels sft|rm|ppo|grpo|dpo [...]  one trainer stage (rlhf_kernels/trainer); --help lists its keys
    rlhf-kernels demo [...]               SFT -> reward model -> PPO on the embedded task, with its gold reward
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

TRAINER_COMMANDS = ("sft", "rm", "ppo", "grpo", "dpo", "demo")


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # the whole docstring, verbatim: the command list is the help a first-time user needs
    parser = argparse.ArgumentParser(prog="rlhf-kernels", description=__doc__.replace("``", ""),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("info", "settings", "bench") + TRAINER_COMMANDS, help="what to run")
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    args, rest = parser.parse_known_args(argv[:1])
    if args.command == "info":
        from .info import info

        info()
        return 0
    if args.command == "settings":
        from . import settings

        rest = argv[1:]
        if rest[:1] == ["--update-readme"] and len(rest) == 2:
            changed = settings.update_readme(rest[1])
            print(f"{rest[1]}: settings table {'updated' if changed else 'already up to date'}")
            return 0
        if rest:
            print("usage: rlhf-kernels settings [--update-readme README.md]", file=sys.stderr)
            return 2
        sys.stdout.write(settings.markdown())
        return 0
    if args.command == "bench":
        # benchmarks/ lives beside the package in the repository (an editable install), not inside it
        repo_root = Path(__file__).resolve().parent.parent
        if (repo_root / "benchmarks" / "run.py").exists() and str(repo_root) not in sys.path:
            sys.path.insert(0, str(repo_root))
        try:
            from benchmarks.run import main as bench_main
        except ImportError as exc:
            print(f"rlhf-kernels bench needs the repository's benchmarks/ folder on the path ({exc})", file=sys.stderr)
            return 2
        return int(bench_main(argv[1:]) or 0)
    try:
        from .trainer.cli import main as trainer_main
    except ImportError as exc:
        print(f"rlhf-kernels {args.command}: the trainer is not available ({exc})", file=sys.stderr)
        return 2
    return int(trainer_main(argv) or 0)


if __name__ == "__main__":
    sys.exit(main())
