"""The benchmark still runs: one small ``make bench`` round over real queues, every figure produced.

Benchmarks are not tests (issue 13, point 3): nothing here looks at a
timing. It runs ``bench/run.py`` once, as ``make bench`` does but at one
small size (SMOKE_SIZE messages per MTA, one round, SMOKE_DISPATCH messages
per dispatch benchmark, pymailq and the targets read at that size so that
every table and every profile path is exercised), writes its BENCHMARKS.md
and README headline into a temporary directory, and checks that each figure
is there, measured, and was checked by the bench (the bench stops with
exit 1 when a timed command fails or does not do its job). About a minute.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_VENV = os.path.join(ROOT, ".bench-venv")
SMOKE_SIZE = 1000
SMOKE_DISPATCH = 200
BENCH = os.path.join(ROOT, "bench")

PER_SIZE = {
    "postfix": ["postqueue -j", "read every queue file", "list the queue from its files (envelopes parsed)",
                "plan, no header", "plan, one header",
                "qrunner run, hold all", "qrunner release --all", "postsuper -h", "postsuper -H",
                "postqueue -j, then postsuper -h", "postqueue -j, then postsuper -H",
                "plan, one header (beside pymailq)", "pymailq, headers parsed", "jq | xargs postqueue -i",
                "qrunner run, no header", "flush service, qrunner's client (process)", "postqueue -i per message",
                "flush service, qrunner's client (loop)", "floor: the plan in plain Python and lupa, no header",
                "floor: the plan in plain Python and lupa, one header"],
    "exim": ["exim -bpr", "read every -H file", "exipick -i, header criterion", "plan, no header", "plan, one header",
             "qrunner run, hold all", "qrunner release --all", "exim -Mf", "exim -Mt",
             "floor: the plan in plain Python and lupa, one header"],
}
PER_DISPATCH = {
    "postfix": ["re-injection, qrunner run (msg/s)", "SMTP injection, one session (msg/s)"],
    "exim": [f"-Mc dispatch, concurrency {c} (msg/s)" for c in (1, 2, 4)],
}
MEMORY = ["plan, no header", "plan, one header", "qrunner run, hold all", "qrunner release --all"]
SECTIONS = ["## Machine", "## Targets (issue 13, point 2)", "## Postfix: planning", "## Exim: planning",
            "## Against today's tools", "## Dispatch", "## Hold and release", "## Memory and time per message",
            "## The 100,000 size", "## Profiles of missed targets"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, postfix_available, exim_available):
    if not os.access(os.path.join(BENCH_VENV, "bin", "py-spy"), os.X_OK):
        from mta_available import skip_or_fail
        skip_or_fail(f"the bench-only venv {BENCH_VENV} is missing (make test and make bench install it)")
    out = tmp_path_factory.mktemp("bench")
    readme = out / "README.md"
    shutil.copy(os.path.join(ROOT, "README.md"), readme)
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "run.py"), "--sizes", str(SMOKE_SIZE), "--repeat", "1",
         "--dispatch-repeat", "1", "--dispatch", str(SMOKE_DISPATCH), "--pymailq-size", str(SMOKE_SIZE),
         "--target-size", str(SMOKE_SIZE),
         "--bench-venv", BENCH_VENV, "--output", str(out / "BENCHMARKS.md"), "--readme", str(readme),
         "--json", str(out / "results.json"), "--out-dir", str(out)],
        capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with open(out / "results.json") as f:
        results = json.load(f)
    return {"results": results, "report": (out / "BENCHMARKS.md").read_text(), "readme": readme.read_text(),
            "log": result.stdout, "out": out}


def _figure(results, mta, size, name):
    key = f"{mta}|{size}|{name}"
    assert key in results["figures"], f"no figure {key}; have {sorted(results['figures'])}"
    return results["figures"][key]


def test_every_figure_is_measured(smoke):
    results = smoke["results"]
    wanted = [(mta, SMOKE_SIZE, name) for mta, names in PER_SIZE.items() for name in names]
    wanted += [(mta, SMOKE_DISPATCH, name) for mta, names in PER_DISPATCH.items() for name in names]
    for mta, size, name in wanted:
        figure = _figure(results, mta, size, name)
        assert len(figure["runs"]) == 1, (mta, name, figure)
        assert all(math.isfinite(run) and run > 0 for run in figure["runs"]), (mta, name, figure)
    assert len(results["figures"]) == len(wanted), sorted(set(results["figures"]) - {
        f"{m}|{s}|{n}" for m, s, n in wanted})


def test_memory_is_measured_for_qrunner(smoke):
    for mta in PER_SIZE:
        for name in MEMORY:
            figure = _figure(smoke["results"], mta, SMOKE_SIZE, name)
            assert figure["max_rss_kb"] and min(figure["max_rss_kb"]) > 0, (mta, name)
            assert figure["tree_rss_kb"] and min(figure["tree_rss_kb"]) > 0, (mta, name)
            # qrunner's own processes (the command and its Lua worker), apart from the MTA tools it runs
            assert figure["qrunner_rss_kb"] and min(figure["qrunner_rss_kb"]) > 0, (mta, name)


def test_the_report_has_every_table_and_the_machine(smoke):
    report = smoke["report"]
    for section in SECTIONS:
        assert section in report, section
    for fact in ("nproc", "memory", "cpu", "Debian", "Postfix", "Exim", "Python", "lupa"):
        assert f"| {fact} |" in report, fact
    assert "?" not in [line.split("|")[2].strip() for line in report.splitlines()
                       if line.startswith(("| Postfix |", "| Exim |", "| lupa |", "| pymailq |"))]


def test_every_target_at_the_target_size_has_a_verdict(smoke):
    targets = smoke["report"].split("## Targets (issue 13, point 2)", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in targets.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 14, rows
    at_size = [row for row in rows if "100,000" not in row]
    assert len(at_size) == 7
    for row in at_size:
        assert "**met**" in row or "**missed**" in row or "**not judged**" in row, row
    for row in rows:
        if "100,000" in row:
            assert "not measured" in row, row
    if any("**missed**" in row for row in rows):
        profiles = smoke["report"].split("## Profiles of missed targets", 1)[1]
        assert "samples at 250 Hz" in profiles and "| qrunner function" in profiles, profiles[:2000]


def test_the_readme_headline_is_rewritten_from_the_same_run(smoke):
    readme = smoke["readme"]
    block = readme.split("<!-- bench:headline:start", 1)[1].split("<!-- bench:headline:end -->", 1)[0]
    assert "Headline figures of the last `make bench`" in block
    assert "Postfix planning, no header read" in block
    assert "not measured yet" not in block
    tools = block.split("Against the tools admins use today", 1)[1]
    for tool in ("jq", "pymailq", "exipick"):
        assert tool in tools, tool


def test_the_report_can_be_written_again_from_the_kept_results(smoke):
    """--from-json measures nothing and writes the same BENCHMARKS.md from the run's results.json."""
    again = smoke["out"] / "again.md"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "run.py"), "--from-json",
                             str(smoke["out"] / "results.json"), "--output", str(again), "--readme", ""],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert again.read_text() == smoke["report"]


def _bench(module: str):
    """A module of bench/ (report, results), imported as the bench imports its own: with bench/ first on sys.path."""
    sys.path.insert(0, BENCH)
    try:
        return importlib.import_module(module)
    finally:
        sys.path.remove(BENCH)


def test_a_missed_target_names_its_floor_only_when_the_floor_is_past_it():
    """The report's verdict (bench/report.py): a floor measured past the target is named, in its own words."""
    Target = _bench("report").Target

    def verdict(measured, bound, at_most=True, words="floor is"):
        return Target("t", measured, 1.5 if at_most else 10, at_most, "x", "floor", bound=bound,
                      bound_words=words).verdict

    assert verdict(1.4, 1.8) == "**met**"
    assert verdict(2.2, 1.8) == "**missed**; floor is 1.80x"
    assert verdict(2.2, 1.8, words="bounded: the tools alone take") == "**missed**; bounded: the tools alone take 1.80x"
    assert verdict(2.2, 1.2) == "**missed**"
    assert verdict(2.2, None) == "**missed**"
    assert verdict(9.0, 8.0, at_most=False) == "**missed**; floor is 8.00x"
    assert verdict(9.0, 12.0, at_most=False) == "**missed**"
    assert Target("t", None, 1.5, True, "x", "floor", "why").verdict == "not measured"


def test_a_met_postfix_target_is_not_judged_when_the_run_measured_postqueue_j_two_ways_apart():
    """bench/report.py listing_doubt: postqueue -j alone (planning rounds) against the listing inside "postqueue -j,
    then postsuper" less postsuper alone (hold rounds); more than 2x apart, a met verdict is withheld."""
    report, results = _bench("report"), _bench("results")
    listing_doubt, targets, Figure, Results = report.listing_doubt, report.targets, results.Figure, results.Results

    def run(listing_alone):
        r = Results(sizes=[10_000], target_size=10_000, dispatch_messages=1000)
        for name, runs in (("postqueue -j", [listing_alone] * 3), ("plan, no header", [1.4 * listing_alone] * 3),
                           ("postsuper -h", [0.3] * 3), ("postqueue -j, then postsuper -h", [0.64] * 3),
                           ("postsuper -H", [0.3] * 3), ("postqueue -j, then postsuper -H", [0.64] * 3)):
            r.add("postfix", 10_000, name, Figure(runs=runs, count=10_000))
        return r

    slowed = run(1.3)
    assert "1.300 s in the planning rounds and 0.340 s" in listing_doubt(slowed, 10_000)
    verdict = targets(slowed)[0].verdict
    assert verdict.startswith("**not judged**: `postqueue -j` took 1.300 s"), verdict
    assert listing_doubt(run(0.4), 10_000) == ""
    assert targets(run(0.4))[0].verdict == "**met**"
    assert listing_doubt(Results(sizes=[10_000]), 10_000) == ""  # nothing to compare: no doubt

    # postsuper alone slower than postqueue -j then postsuper (a slowed hold group): no listing time left at all
    slowed_hold = run(0.4)
    slowed_hold.add("postfix", 10_000, "postsuper -h", Figure(runs=[2.0] * 3, count=10_000))
    slowed_hold.add("postfix", 10_000, "postsuper -H", Figure(runs=[2.0] * 3, count=10_000))
    slowed_hold.add("postfix", 10_000, "qrunner run, hold all", Figure(runs=[2.4] * 3, count=10_000))
    assert "no time at all in the hold and release rounds" in listing_doubt(slowed_hold, 10_000)
    hold = next(t for t in targets(slowed_hold) if t.what.startswith("hold"))
    assert hold.verdict.startswith("**not judged**"), hold.verdict  # 1.2x postsuper -h: would read as met
    exim = Results(sizes=[10_000], target_size=10_000, dispatch_messages=1000)
    exim.figures.update(slowed_hold.figures)
    exim.add("exim", 10_000, "plan, one header", Figure(runs=[0.2] * 3, count=10_000))
    exim.add("exim", 10_000, "exim -bpr", Figure(runs=[0.2] * 3, count=10_000))
    assert next(t for t in targets(exim) if t.what.endswith("against the listing")).verdict == "**met**"
