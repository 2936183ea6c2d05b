"""Merges what a lent-GPU session brought back into ``benchmarks/results/``.

    python -m benchmarks.merge_gpu_results --run run4 /work/.device/1/g.tgz /work/.device/2/g2.tgz
    python -m benchmarks.merge_gpu_results --run run4 --results benchmarks/results DIR_OR_TGZ ...

Why: each device call runs ``benchmarks/gpu_suite.sh`` in a fresh ``OUT`` that starts from the committed
results, so every archive (``TAR_OUT``) holds a full copy of ``results/`` plus that call's new rows and its logs.
Copying one archive's folder over the committed one would drop the other calls' rows; merging by hand is slow
on a session's clock and easy to get wrong. Per device folder, in the order the archives are given:

* ``results.csv``: the rows of runs not yet in the committed file, merged by cell (op, mode, dtype, shape,
  provider), a later run replacing an earlier one (``report.merge``);
* ``meta.json``: those runs' entries; ``run.log``: their blocks, appended;
* ``trainer.*``: taken from the last archive whose ``trainer.csv`` differs from the committed one;
* ``results.md``, ``summary.md`` and the plots: regenerated from the merged rows (``report``).

Each archive's own logs (the files beside its ``results/``: ``gpu_suite.log``, ``pytest_gpu.log``, ``ncu_*``,
...) are copied to ``<device>/logs/<run>/``; where a name repeats, a later call's copy gets a ``callN_`` prefix.
The device tool's console logs live outside the archives: pass them with ``--extra``. Nothing is deleted. Afterwards:
``python -m benchmarks.update_readme`` and a look at the diff.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import re
import shutil
import sys
import tarfile
import tempfile
from typing import Dict, List, Optional, Sequence, Set

from . import common, report

HERE = os.path.dirname(os.path.abspath(__file__))
RUN_HEADER = "# rlhf_kernels benchmark run "


def _unpack(source: str, into: str) -> str:
    """The directory holding ``source``'s files: ``source`` itself, or where its tarball was extracted."""
    if os.path.isdir(source):
        return source
    if not tarfile.is_tarfile(source):
        raise ValueError(f"{source}: neither a directory nor a tar archive")
    with tarfile.open(source) as tar:
        members = [m for m in tar.getmembers() if m.isfile() or m.isdir()]  # no links or devices
        for m in members:
            target, base = os.path.realpath(os.path.join(into, m.name)), os.path.realpath(into)
            if target != base and not target.startswith(base + os.sep):
                raise ValueError(f"{source}: member {m.name!r} would land outside the extraction folder")
        tar.extractall(into, members=members)
    return into


def _run_ids(rows: Sequence[Dict[str, object]]) -> Set[str]:
    return {str(r["run_id"]) for r in rows}


def _log_blocks(text: str) -> List[tuple]:
    """``(run_id, block)`` for each benchmark run in a ``run.log``; text before the first run gets ``None``."""
    starts = [m.start() for m in re.finditer("^" + re.escape(RUN_HEADER), text, re.MULTILINE)]
    blocks: List[tuple] = []
    if not starts or starts[0] > 0:
        blocks.append((None, text[: starts[0] if starts else len(text)]))
    for a, b in zip(starts, starts[1:] + [len(text)]):
        block = text[a:b]
        blocks.append((block[len(RUN_HEADER):].split(None, 1)[0] if block[len(RUN_HEADER):].strip() else "", block))
    return blocks


def merge_device(committed: str, incoming: Sequence[str], log=print) -> Set[str]:
    """Merges the device folders ``incoming`` (one per archive, in call order) into ``committed``; returns the
    run ids added.

    A run is new when the committed ``results.csv`` did not hold it before the merge: every archive also carries
    the committed rows of its commit, some of which a newer run here may already have replaced. New runs are
    merged oldest first (run ids are UTC timestamps), so a cell ends with its latest measurement.
    """
    os.makedirs(committed, exist_ok=True)
    csv_path = os.path.join(committed, "results.csv")
    rows = report.read_csv(csv_path)
    known = _run_ids(rows)
    by_run: Dict[str, Dict[tuple, Dict[str, object]]] = {}
    for folder in incoming:
        for r in report.read_csv(os.path.join(folder, "results.csv")):
            if str(r["run_id"]) not in known:
                by_run.setdefault(str(r["run_id"]), {})[common.key_of(r)] = r
    added = set(by_run)
    if added:
        for run_id in sorted(by_run):
            rows = report.merge(rows, list(by_run[run_id].values()))
        report.write_csv(csv_path, rows)
        meta = _merged_meta(committed, incoming, added, _run_ids(rows))
        common.write_json(os.path.join(committed, "meta.json"), meta)
        _append_log_blocks(os.path.join(committed, "run.log"), incoming, added)
        with open(os.path.join(committed, "results.md"), "w") as fh:
            fh.write(report.results_markdown(rows, meta))
        with open(os.path.join(committed, "summary.md"), "w") as fh:
            fh.write(report.summary_markdown(rows, meta))
        _plots(committed, rows, meta, log)
        count = sum(len(cells) for cells in by_run.values())
        log(f"{os.path.basename(committed)}: {count} rows from run(s) {', '.join(sorted(added))}")
    mine = os.path.join(committed, "trainer.csv")
    changed = [f for f in incoming if os.path.isfile(os.path.join(f, "trainer.csv"))
               and not (os.path.isfile(mine) and filecmp.cmp(os.path.join(f, "trainer.csv"), mine, shallow=False))]
    if changed:  # the last call that re-ran the trainer
        for name in ("trainer.csv", "trainer.md", "trainer.log"):
            if os.path.isfile(os.path.join(changed[-1], name)):
                shutil.copyfile(os.path.join(changed[-1], name), os.path.join(committed, name))
        log(f"{os.path.basename(committed)}: trainer results replaced")
    return added


def _merged_meta(committed: str, incoming: Sequence[str], added: Set[str], live: Set[str]) -> Dict[str, object]:
    mine = common.read_json(os.path.join(committed, "meta.json"))
    runs = dict(mine.get("runs", {}))
    for folder in incoming:
        theirs = common.read_json(os.path.join(folder, "meta.json"))
        runs.update({k: v for k, v in theirs.get("runs", {}).items() if k in added})
    runs = {k: v for k, v in runs.items() if k in live}
    latest = max(runs) if runs else None
    top = dict(runs[latest]) if latest else {k: v for k, v in mine.items() if k != "runs"}
    top["runs"] = runs
    return top


def _append_log_blocks(mine: str, incoming: Sequence[str], added: Set[str]) -> None:
    """The ``run.log`` blocks of the added runs, each once, oldest first."""
    blocks: Dict[str, str] = {}
    for folder in incoming:
        path = os.path.join(folder, "run.log")
        if os.path.isfile(path):
            with open(path) as fh:
                for run_id, block in _log_blocks(fh.read()):
                    if run_id in added:
                        blocks.setdefault(run_id, block)
    if blocks:
        with open(mine, "a") as fh:
            fh.write("".join(blocks[k] for k in sorted(blocks)))


def _plots(folder: str, rows, meta, log) -> None:
    try:
        for op in sorted({str(r["op"]) for r in rows}):
            report.plot_op(os.path.join(folder, f"{op.replace('+', '_')}.png"), op, rows, meta)
        report.plot_summary(os.path.join(folder, "summary.png"), rows, meta)
    except ImportError as exc:
        log(f"plots skipped: matplotlib missing ({exc})")


def _free_name(dest: str, name: str, prefix: str) -> str:
    """``name``, or ``prefix + name`` where ``dest`` already holds a ``name`` (an earlier call's copy)."""
    return name if not os.path.exists(os.path.join(dest, name)) else prefix + name


def copy_logs(source: str, dest: str, call: int, log=print) -> List[str]:
    """The archive's top-level files (not its ``results/``) into ``dest``, prefixed ``call<call>_`` when taken."""
    os.makedirs(dest, exist_ok=True)
    copied = []
    for name in sorted(os.listdir(source)):
        path = os.path.join(source, name)
        if not os.path.isfile(path) or name.endswith((".tgz", ".part")):
            continue
        target = _free_name(dest, name, f"call{call}_")
        shutil.copyfile(path, os.path.join(dest, target))
        copied.append(target)
    log(f"logs of call {call}: {len(copied)} files to {dest}")
    return copied


def merge(sources: Sequence[str], run: str, results: str, device: Optional[str] = None, extra: Sequence[str] = (),
          log=print) -> Dict[str, Set[str]]:
    """Merges each archive or directory in ``sources``, in order; returns the run ids added per device folder.

    Every archive's logs, and the files ``extra`` (the device tool's console logs), go to ``<device>/logs/<run>/``
    of each device folder that gained rows (a call that only ran tests or profiles brings none), else of ``device``.
    """
    missing = [path for path in extra if not os.path.isfile(path)]
    if missing:
        raise ValueError(f"--extra: no such file: {', '.join(missing)}")
    added: Dict[str, Set[str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        unpacked = []
        for i, source in enumerate(sources, 1):
            unpacked.append(_unpack(source, os.path.join(tmp, str(i))))
        per_device: Dict[str, List[str]] = {}
        for root in unpacked:
            inner = os.path.join(root, "results")  # absent where a call ran no benchmark (tests, profiles)
            for name in sorted(os.listdir(inner)) if os.path.isdir(inner) else ():
                if not name.startswith("cpu-") and os.path.isfile(os.path.join(inner, name, "results.csv")):
                    per_device.setdefault(name, []).append(os.path.join(inner, name))
        for name, folders in sorted(per_device.items()):
            new = merge_device(os.path.join(results, name), folders, log)
            if new:
                added[name] = new
        targets = sorted(added) or ([device] if device else [])
        if not targets:
            raise ValueError("no archive brought benchmark rows; name the device folder for the logs with --device")
        for name in targets:
            dest = os.path.join(results, name, "logs", run)
            for i, root in enumerate(unpacked, 1):
                copy_logs(root, dest, i, log)
            for k, path in enumerate(extra, 1):  # a repeated name (console.log of two calls) keeps both
                shutil.copyfile(path, os.path.join(dest, _free_name(dest, os.path.basename(path), f"extra{k}_")))
    return added


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sources", nargs="+", help="gpu_suite TAR_OUT archives or OUT folders, in the order they ran")
    p.add_argument("--run", required=True, help="the logs' folder name under <device>/logs/, e.g. run4")
    p.add_argument("--results", default=os.path.join(HERE, "results"), help="default: benchmarks/results")
    p.add_argument("--device", help="device folder for the logs when no archive brought rows, e.g. nvidia-h200")
    p.add_argument("--extra", nargs="*", default=(), help="more files for the logs folder (the console logs)")
    args = p.parse_args(argv)
    try:
        added = merge(args.sources, args.run, args.results, args.device, args.extra)
    except (OSError, ValueError) as exc:
        print(f"merge_gpu_results: {exc}", file=sys.stderr)
        return 2
    if not any(added.values()):
        print("merge_gpu_results: no new benchmark rows in these archives", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
