"""Run timm's own model tests on every name vitzoo shares with timm and write the table into docs/parity.md.

    python tests/upstream/run_timm_suite.py [--results docs/timm_suite.jsonl] [--out docs/parity.md]
                                            [--report] [-- PYTEST_ARGS...]

The full run (every case on every shared name) takes many hours on CPU, so it is incremental: each finished case is
appended to the results file, and a new run runs only the cases not there yet, smallest model first (delete the file
to start over). A case during which the process died (killed, out of memory) is recorded as failed with that reason
and not tried again; the cases an interrupt (Ctrl-C, ``timeout -s INT``) cuts short are left to the next run.
``--report`` only rewrites the section from the results file. ``VITZOO_TIMM_SUITE`` (default ``all``) chooses the
names as in tests/test_timm_suite.py, e.g. ``VITZOO_TIMM_SUITE='vit_small*'`` for a sample. Upstream's
``TORCH_DEVICE=cuda`` runs the cases on a GPU (each record names its device); pytest-xdist's ``-- -n 8`` runs them in
parallel.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # ``tests.conftest`` and this checkout's vitzoo, as under ``python -m pytest``

import vitzoo  # noqa: E402
from tests.test_timm_suite import PRETRAINED_TEST, UPSTREAM_TESTS, upstream, upstream_cases  # noqa: E402
from vitzoo.size import estimate_params  # noqa: E402
from vitzoo.validate import SUITE_HEADING, split_suite_section  # noqa: E402

UPSTREAM_COMMIT = "aa4b5850c1543fa488abf260f18390eda46cf85d"
SUITE = "tests/test_timm_suite.py"
CASE_ID = re.compile(r"\[(test_\w+?)-(.+)\]$")
DIED = "the process ended during this case (killed, or out of memory)"


def read_results(path: Path) -> dict[str, dict]:
    """The last record of each case in the results file (outcome ``started``: the process died in it)."""
    results: dict[str, dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            results[record["case"]] = record
    return results


def _record(case: str, outcome: str, error: str = "", seconds: float = 0.0) -> dict:
    match = CASE_ID.search(case)
    test, model = match.groups() if match else (case, "")
    return {"case": case, "test": test, "model": model, "outcome": outcome, "error": error, "seconds": seconds,
            "device": _device(), "torch": torch.__version__}


@functools.cache
def _device() -> str:
    """Where upstream runs the cases (its ``TORCH_DEVICE``), a GPU by its name."""
    device = torch.device(upstream.torch_device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def node_id(test: str, model: str) -> str:
    """The pytest node id of ``test`` on ``model`` in tests/test_timm_suite.py."""
    function = "test_upstream_pretrained" if test == PRETRAINED_TEST else "test_upstream"
    return f"{SUITE}::{function}[{test}-{model}]"


def chosen_cases() -> list[tuple[str, str]]:
    """(upstream test, model name) of every case ``VITZOO_TIMM_SUITE`` chooses."""
    return [(test, name) for test in (*UPSTREAM_TESTS, PRETRAINED_TEST) for name, _ in upstream_cases(test)]


def pending(done: dict[str, dict]) -> list[str]:
    """The chosen cases not in ``done``, smallest model first: an interrupted run has covered the most names."""
    cases = chosen_cases()
    size = {name: estimate_params(vitzoo.model_spec(name.partition(".")[0])) for _, name in cases}
    cases.sort(key=lambda case: (size[case[1]], case[1], case[0]))
    return [case for case in (node_id(*c) for c in cases) if case not in done]


def final(record: dict) -> dict:
    """A case's outcome, a case the process died in counting as failed."""
    return {**record, "outcome": "failed", "error": DIED} if record["outcome"] == "started" else record


def _first_line(report: pytest.TestReport) -> str:
    if report.skipped and isinstance(report.longrepr, tuple):
        return str(report.longrepr[2]).removeprefix("Skipped: ")
    crash = getattr(report.longrepr, "reprcrash", None)
    lines = [line.strip() for line in (crash.message if crash else str(report.longrepr)).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):  # TorchScript: "RuntimeError:", then the message
        return f"{lines[0]} {lines[1]}"
    return lines[0] if lines else ""


class Recorder:
    """pytest plugin (on the controller under xdist): appends each case's start and outcome to the results file,
    so a process that dies in a case leaves that case ``started``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.open: set[str] = set()  # started, no outcome yet
        path.parent.mkdir(parents=True, exist_ok=True)
        for record in read_results(path).values():
            if record["outcome"] == "started":
                self._append(final(record))  # recorded as failed, so it is not tried again

    def _append(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def pytest_runtest_logstart(self, nodeid: str, location: tuple) -> None:
        self.open.add(nodeid)
        self._append(_record(nodeid, "started"))

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when != "call" and report.passed:
            return
        self.open.discard(report.nodeid)
        error = "" if report.passed else _first_line(report)
        self._append(_record(report.nodeid, report.outcome, error, round(report.duration, 2)))

    def forget_open(self) -> None:
        """Drop the start records of the cases an interrupt cut short, so the next run tries them again."""
        lines = self.path.read_text().splitlines()
        kept = [line for line in lines
                if not ((record := json.loads(line))["outcome"] == "started" and record["case"] in self.open)]
        self.path.write_text("".join(line + "\n" for line in kept))


def suite_section(results: dict[str, dict]) -> str:
    """Markdown: per upstream test, passed / failed / skipped counts, then each failure and its first line."""
    by_test: dict[str, list[dict]] = defaultdict(list)
    for record in results.values():
        by_test[record["test"]].append(record)
    seconds = sum(r.get("seconds", 0) for r in results.values())
    shared = _shared_cases()
    names = {r["model"].partition(".")[0] for r in results.values()}
    not_run = shared - {(r["test"], r["model"]) for r in results.values()}
    missing = len(not_run)
    lines = [
        SUITE_HEADING, "",
        f"timm's `tests/test_models.py` at commit `{UPSTREAM_COMMIT}` (vendored unchanged as "
        "`tests/upstream/timm_test_models.py`), each test function run as written on the vitzoo names it is "
        "parametrized with, `timm.create_model` replaced by `vitzoo.create_model`; `test_model_load_pretrained` "
        "reads an offline hub cache holding timm's randomly initialised weights of each name. Cases run on a GPU "
        "(upstream's `TORCH_DEVICE=cuda`) make every tensor and model there (the GPU is the default device of the "
        "test body).", "",
        f"{len(results)} of the {len(shared)} cases, on {len(names)} of the "
        f"{len({m.partition('.')[0] for _, m in shared})} names vitzoo shares with timm, "
        f"{seconds / 60:.0f} min of test time ({_devices(results)})"
        + (f"; {missing} cases not run yet (a run continues where the last one stopped: the results of each case "
           "are kept in docs/timm_suite.jsonl)" if missing else "")
        + ", generated by:", "",
        "```bash\nmake timm-suite   # python tests/upstream/run_timm_suite.py\n```", "",
        "| upstream test | passed | failed | skipped |", "| --- | --- | --- | --- |",
    ]
    for test in (*UPSTREAM_TESTS, PRETRAINED_TEST):
        outcomes = [r["outcome"] for r in by_test.get(test, [])]
        lines.append(f"| `{test}` | {outcomes.count('passed')} | {outcomes.count('failed')} | "
                     f"{outcomes.count('skipped')} |")
    unrun = Counter(model.partition(".")[0] for _, model in not_run)
    if unrun:
        lines += ["", f"Cases not run yet, by name ({len(unrun)} names): "
                  + ", ".join(f"`{n}` ({count})" for n, count in sorted(unrun.items())) + "."]
    for test in (*UPSTREAM_TESTS, PRETRAINED_TEST):
        failed = sorted((r for r in by_test.get(test, []) if r["outcome"] == "failed"), key=lambda r: r["model"])
        if failed:
            lines += ["", f"### `{test}` failures", "", "| model | first line of the error |", "| --- | --- |"]
            lines += [f"| `{r['model']}` | {r['error'].replace('|', chr(92) + '|')} |" for r in failed]
    return "\n".join(lines) + "\n"


def _shared_cases() -> set[tuple[str, str]]:
    """(upstream test, model name) of every case on a name vitzoo shares with timm."""
    chosen = os.environ.get("VITZOO_TIMM_SUITE")
    os.environ["VITZOO_TIMM_SUITE"] = "all"
    try:
        return set(chosen_cases())
    finally:
        if chosen is None:
            del os.environ["VITZOO_TIMM_SUITE"]
        else:
            os.environ["VITZOO_TIMM_SUITE"] = chosen


def _devices(results: dict[str, dict]) -> str:
    """Where the cases ran: how many on each device and torch."""
    runs = Counter((r["device"], r["torch"]) for r in results.values())
    return "; ".join(f"{count} cases on {'CPU' if device == 'cpu' else f'an {device}'}, torch {version}"
                     for (device, version), count in runs.most_common())


def write_section(out: Path, section: str) -> None:
    """Replace (or add) the section of timm's own tests at the end of ``out``, keeping the rest."""
    head = split_suite_section(out.read_text())[0].rstrip("\n") + "\n\n" if out.exists() else ""
    out.write_text(head + section)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=ROOT / "docs" / "timm_suite.jsonl")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "parity.md")
    parser.add_argument("--report", action="store_true", help="only write the section from the results file")
    parser.add_argument("pytest_args", nargs="*", help="more pytest arguments, after --")
    args = parser.parse_args(argv)
    if not args.report:
        os.environ.setdefault("VITZOO_TIMM_SUITE", "all")
        os.chdir(ROOT)
        recorder = Recorder(args.results)
        cases = pending(read_results(args.results))
        print(f"{len(cases)} cases to run")
        try:
            exit_code = pytest.main(["-q", "-p", "no:cacheprovider", *cases, *args.pytest_args],
                                    plugins=[recorder]) if cases else pytest.ExitCode.OK
        except KeyboardInterrupt:  # the second interrupt: xdist's workers got it too (timeout -s INT)
            exit_code = pytest.ExitCode.INTERRUPTED
        if exit_code == pytest.ExitCode.INTERRUPTED:
            recorder.forget_open()
    results = {case: final(r) for case, r in read_results(args.results).items()}
    write_section(args.out, suite_section(results))
    print(f"{len(results)} cases; section {SUITE_HEADING!r} written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
