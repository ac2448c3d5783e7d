"""Reliability figures in one command: `docs/reliability.md` and `bench/results/reliability/`.

1. schemathesis over every route of the OpenAPI schema (generation, models, jobs, files, metrics) with
   a valid key and real names: `tests/service/test_schema_fuzz.py` run with `XATL_FUZZ_EXAMPLES`
   examples per route and mode — cases tried, 5xx seen, schema violations.
2. Faults on the job pipeline: `tests/jobs/test_faults.py` run with `XATL_FAULT_JOBS` jobs (kill -9
   of the worker's process tree at points of each job's life; Redis restarted with jobs queued; the
   API restarted during streams; the data directory full and unwritable) — faults injected and
   survived, from what the tests report.
3. Load on a GLA model (`bench/reliability/load.py`): concurrent streams with random disconnects and
   a long prompt every few seconds — server errors, p99 inter-token latency, slots freed, memory.

    python bench/reliability/run.py                                    # the issue's sizes (long)
    python bench/reliability/run.py --fuzz-examples 140 --fault-jobs 10 --streams 32 --seconds 120 \\
        --long-prompt-tokens 4096                                      # what fits a shared 2-core machine
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, RESULTS, environment, relative_paths, write_results  # noqa: E402
from load import add_arguments, load_options, run_load  # noqa: E402

RESULTS_FILE = RESULTS / "reliability" / "results.json"
GOALS = {"fuzz_cases": 5000, "fault_jobs": 10, "streams": 256, "seconds": 300, "long_prompt_tokens": 16384,
         "p99_ms": 200, "rss_change": 0.10}


def run_pytest(tests: list[str], env: dict, report: Path, timeout: float) -> dict:
    """Run `tests` in a pytest process of their own; what they wrote to `report`, and how it ended."""
    report.unlink(missing_ok=True)
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    lines = report.read_text().splitlines() if report.is_file() else []
    return {"passed": done.returncode == 0, "seconds": time.monotonic() - started,
            "summary": (done.stdout.strip().splitlines() or [""])[-1],
            "failures": relative_paths(done.stdout[-3000:]) if done.returncode else "",
            "reports": [json.loads(line) for line in lines]}


def base_env(data_dir: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("XATL_")}
    return {**env, "XATL_DATA_DIR": str(data_dir.resolve())}


def fuzz(args, work: Path) -> dict:
    env = {**base_env(Path(args.data_dir)), "XATL_FUZZ_EXAMPLES": str(args.fuzz_examples),
           "XATL_FUZZ_REPORT": str(work / "fuzz.jsonl")}
    result = run_pytest(["tests/service/test_schema_fuzz.py"], env, work / "fuzz.jsonl", timeout=3 * 3600)
    modes = result["reports"]
    result.update(cases=sum(m["cases"] for m in modes), server_errors=sum(m["server_errors"] for m in modes),
                  schema_violations=sum(m["schema_violations"] for m in modes),
                  operations=max((m["operations"] for m in modes), default=0))
    return result


def faults(args, work: Path) -> dict:
    # no XATL_TEST_REDIS_URL: the tests start a Redis of their own (the Redis test restarts its own anyway)
    env = {**base_env(Path(args.data_dir)), "XATL_FAULT_JOBS": str(args.fault_jobs),
           "XATL_FAULT_REPORT": str(work / "faults.jsonl"), "XATL_FAULT_SEED": str(args.seed)}
    return run_pytest(["tests/jobs/test_faults.py"], env, work / "faults.jsonl", timeout=3 * 3600)


def markdown(result: dict) -> str:
    env, f, k, load = result["environment"], result.get("fuzz"), result.get("faults"), result.get("load")
    lines = ["# Reliability: hostile input, faults and load, measured\n",
             f"Measured on {env['date'][:10]} at commit `{env['git_commit']}` with `{env['command']}` "
             f"({env['machine']['cpu']}, {env['machine']['cores']} cores, shared with other work: "
             f"load average {result['load_average'][0]:.1f} at the start). Regenerate with "
             "`python bench/reliability/run.py` (flags set the sizes; the defaults are the issue's).\n",
             "| what | tried | result | goal |", "|---|---|---|---|"]
    if f:
        statuses = {}
        for mode in f["reports"]:
            for code, count in mode["statuses"].items():
                statuses[code] = statuses.get(code, 0) + count
        lines += [
            f"| schemathesis, every route ({f['operations']} operations: generation, models, jobs, files, "
            f"metrics), valid key and real names | {f['cases']:,} cases ({result['settings']['fuzz_examples']} "
            f"examples per route and mode, positive and negative) | {f['server_errors']} server errors (5xx), "
            f"{f['schema_violations']} schema violations; statuses "
            + ", ".join(f"{c}: {n:,}" for c, n in sorted(statuses.items())) + " | ≥ 5,000 cases, 0, 0 |"]
    if k:
        by_test = {r["test"]: r for r in k["reports"]}
        kill = by_test.get("kill_9")
        if kill:
            landed = {}
            for stage in kill["landed"]:
                landed[stage] = landed.get(stage, 0) + 1
            lines.append(
                f"| kill -9 of the worker's process tree, one per job | {kill['kills']} kills in {kill['jobs']} jobs "
                f"(landed in: {', '.join(f'{s} {n}' for s, n in sorted(landed.items()))}) | {kill['succeeded']} of "
                f"{kill['jobs']} jobs succeeded, each resumed from what it had saved; at most "
                f"{kill['most_runs_at_once']} run of a job at once; {kill['half_written_listed']} half-written models "
                f"listed in {kill['model_list_polls']:,} polls of /v1/models | 10 jobs, all succeed |")
        redis = by_test.get("redis_restart")
        if redis:
            lines.append(f"| Redis restarted with jobs queued (one created while it was down: answered in "
                         f"{redis['create_while_down_seconds']:.1f} s) | {redis['jobs']} jobs | "
                         f"{redis['succeeded']} of {redis['jobs']} ran to success | every job runs |")
        api = by_test.get("api_restart")
        if api:
            lines.append(f"| the API restarted (SIGTERM) during a job-event stream and a completion stream | "
                         f"1 restart | event stream: {api['follow']}, completion: {api['completion']} "
                         f"({api['stop_seconds']:.1f} s to stop); followed again from the last event: every event "
                         f"once; job {api['job']} | a clean end or error, jobs intact |")
        storage = by_test.get("storage")
        if storage:
            lines.append("| data directory full (" + storage["faults"]["full"]["how"] + ") and unwritable ("
                         + storage["faults"]["unwritable"]["how"] + ") | 2 jobs | failed with `"
                         + storage["faults"]["full"]["code"] + "` and `" + storage["faults"]["unwritable"]["code"]
                         + f"`; uploads, served model and worker intact; the next job {storage['next_job']} | a "
                         "clear error, nothing else lost |")
        lines.append(f"| fault tests | {k['summary']} | {'all passed' if k['passed'] else 'FAILED'} | |")
    if load:
        s = load["settings"]
        it, during = load["inter_token"], load["inter_token_during_long_prompts"]
        lines += [
            f"| load: {s['streams']} concurrent streams for {s['seconds']:.0f} s on {s['model']}, "
            f"{s['disconnect_fraction']:.0%} of clients leaving mid-stream, a {s['long_prompt_tokens']:,}-token prompt "
            f"every {s['long_prompt_every_s']:.0f} s | {load['streams_started']:,} streams "
            f"({load['streams_disconnected_by_client']:,} left early), {load['long_prompts']} long prompts | "
            f"{load['server_errors']} server errors, {load['refused_429']} refused (429) | no server error |",
            f"| inter-token latency of running streams | {it['n']:,} gaps | p50 {it['p50_ms']:.0f} ms, p99 "
            f"{it['p99_ms']:.0f} ms, max {it['max_ms']:.0f} ms; while a long prompt was in: p99 "
            f"{during.get('p99_ms', float('nan')):.0f} ms ({during['n']:,} gaps) | p99 < 200 ms |",
            f"| slots freed at the end | | {load['requests_left_in_engine']:.0f} requests left in the engine | 0 |",
            f"| server memory (RSS) | after warm-up → end | {load['rss_start_bytes'] / 2**20:,.0f} MiB → "
            f"{load['rss_end_bytes'] / 2**20:,.0f} MiB ({load['rss_change']:+.1%}) | within 10% |",
        ]
    lines += ["", *notes(result)]
    return "\n".join(lines) + "\n"


def notes(result: dict) -> list[str]:
    """What was run smaller than the goal, and which goals were missed — said plainly."""
    s, out = result["settings"], ["## What this run was, and where it falls short\n"]
    smaller = [f"{name.replace('_', ' ')} {s[name]:,} (goal {goal:,})" for name, goal in GOALS.items()
               if name in s and s[name] < goal]
    if smaller:
        out.append("Run smaller than the issue asks, to fit the machine: " + "; ".join(smaller) + ".\n")
    missed = []
    f, k, load = result.get("fuzz"), result.get("faults"), result.get("load")
    if f and (f["cases"] < GOALS["fuzz_cases"] or f["server_errors"] or f["schema_violations"]):
        missed.append(f"schemathesis: {f['cases']:,} cases, {f['server_errors']} 5xx, "
                      f"{f['schema_violations']} schema violations")
    if k and not k["passed"]:
        missed.append(f"fault tests failed: {k['summary']}")
    if load:
        if load["server_errors"]:
            missed.append(f"load: {load['server_errors']} server errors ({load['server_error_samples'][:3]})")
        if load["inter_token"].get("p99_ms", 0) >= GOALS["p99_ms"]:
            missed.append(f"load: p99 inter-token latency {load['inter_token']['p99_ms']:.0f} ms (goal < 200 ms)")
        if abs(load["rss_change"]) > GOALS["rss_change"]:
            missed.append(f"load: memory changed {load['rss_change']:+.1%} (goal within 10%)")
        if load["requests_left_in_engine"]:
            missed.append(f"load: {load['requests_left_in_engine']:.0f} requests left in the engine")
    out.append(("Goals missed: " + "; ".join(missed) + ".") if missed else "No goal missed at the size run.")
    for remark in result.get("remarks", []):
        out += ["", remark]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fuzz-examples", type=int, default=140, help="schemathesis examples per route and mode")
    parser.add_argument("--fault-jobs", type=int, default=10, help="jobs in the kill -9 test")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip", action="append", default=[], choices=["fuzz", "faults", "load"])
    parser.add_argument("--remark", action="append", default=[], help="a line added to the document's notes")
    parser.add_argument("--rerender", action="store_true",
                        help="measure nothing: write the document again from the last results.json (with --remark)")
    add_arguments(parser)
    args = parser.parse_args()
    if args.rerender:
        saved = RESULTS_FILE.read_text()
        result = json.loads(saved)
        result["remarks"] = args.remark or result.get("remarks", [])
        write_document(result)
        return
    load_average = os.getloadavg()
    started = environment()  # the date and commit the measurement starts from
    result: dict = {"settings": {"fuzz_examples": args.fuzz_examples, "fault_jobs": args.fault_jobs,
                                 **load_options(args)}, "load_average": load_average, "remarks": args.remark}
    with tempfile.TemporaryDirectory(prefix="xatl-reliability-") as scratch:
        work = Path(scratch)
        if "fuzz" not in args.skip:
            print("schemathesis ...", flush=True)
            result["fuzz"] = fuzz(args, work)
            print(f"  {result['fuzz']['cases']:,} cases, {result['fuzz']['summary']}", flush=True)
        if "faults" not in args.skip:
            print("faults ...", flush=True)
            result["faults"] = faults(args, work)
            print(f"  {result['faults']['summary']}", flush=True)
        if "load" not in args.skip:
            print("load ...", flush=True)
            result["load"] = run_load(work / "load", Path(args.data_dir), **load_options(args))
            print(f"  {result['load']['server_errors']} server errors, p99 "
                  f"{result['load']['inter_token'].get('p99_ms', 0):.0f} ms", flush=True)
    result["settings"]["fuzz_cases"] = result.get("fuzz", {}).get("cases", 0)
    result["environment"] = {**environment(), "date": started["date"], "git_commit": started["git_commit"]}
    write_document(result)


def write_document(result: dict) -> None:
    text = markdown(result)
    folder = write_results("reliability", result, text)  # a rerender keeps the measurement's environment
    (REPO / "docs").mkdir(exist_ok=True)
    (REPO / "docs" / "reliability.md").write_text(relative_paths(text))
    print(f"wrote docs/reliability.md and {relative_paths(str(folder))}/")


if __name__ == "__main__":
    main()
