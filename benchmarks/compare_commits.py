"""compare_commits: one benchmark, two commits, same run, alternating order; prints JSON.

Issue #16 ("behaviour unchanged"): the agent's sync was redesigned, and its
benchmark figures must stay within noise of before. Figures from two runs on
this shared machine cannot be set side by side, so this script measures both
commits in one run:

* a temporary ``git worktree`` of each commit (default ``3a1e563``, the last
  commit before the redesign merge, and ``HEAD``), under a temporary
  directory outside the repository, removed at the end;
* the same benchmark script (default ``benchmarks/sync_scale.py``) run from
  each tree as a subprocess, with ``PYTHONPATH`` set to that tree's
  ``operator/`` (and ``lab/``, once the lab has its own distribution) and the
  same arguments for both: by file path where ``benchmarks/`` is a plain
  folder, as ``python -m benchmarks.NAME`` from the tree's root where it is a
  package; the child reports which ``svcproxy`` it imported
  (``svcproxy.__file__``; sync_scale's UML guest reports its own), and a run
  that did not import its own tree's sources fails the comparison;
* ``--reps`` repetitions in ABBA order (old, new / new, old / ...), so a slow
  spell of the machine hits both commits alike;
* from the JSON each run prints: per mode, table size and figure (agent cold
  sync, agent one change, the agent's own part of it, and the kernel tool's
  own figures as a control that no commit can move), the median and min-max
  of each commit, the ratio new / old of the medians, and the ratio of each
  repetition's back-to-back pair (median and min-max).

Options both trees' benchmark does not accept are dropped for both (and named in
the output), and figures are read from whatever modes and sizes each JSON holds,
so a change of the benchmark's CLI or output between the commits shows up
instead of breaking the run. Usage (root, from the repository):

    .venv/bin/python -m benchmarks.compare_commits [--old 3a1e563] [--new HEAD] [--reps 5]
        [--script benchmarks/sync_scale.py]
        [--bench-args '--sizes 1000 --ipvs-sizes 1000 --repeat 21']
        [--output benchmarks/results/compare_commits.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

DEFAULT_ARGS = "--sizes 1000 --ipvs-sizes 1000 --repeat 21"

# Figures of a sync_scale size entry: what svcproxy's code decides, and the kernel tool's
# own (iptables-restore, ipvsadm -R): the tool's figures do not depend on the commit, so
# their ratio is the noise floor of the run.
AGENT_FIGURES = ("cold_sync_seconds", "one_change_seconds", "agent_own_seconds")
CONTROL_FIGURES = ("tool_cold_seconds", "tool_one_change_seconds")

# Runs in the child: the benchmark as ``python -m NAME`` or ``python FILE`` would run it
# (``runpy``; argv: "module"|"path", target, the benchmark's arguments), and at exit the
# files svcproxy and svcproxy_lab came from, for the parent to check.
CHILD = """\
import atexit, json, os, runpy, sys
def _where():
    files = {name: getattr(sys.modules.get(name), "__file__", None) for name in ("svcproxy", "svcproxy_lab")}
    with open(os.environ["SVCPROXY_COMPARE_WHERE"], "w") as out:
        json.dump(files, out)
atexit.register(_where)
how, target = sys.argv[1], sys.argv[2]
sys.argv = sys.argv[2:]
if how == "module":
    runpy.run_module(target, run_name="__main__", alter_sys=True)
else:
    runpy.run_path(target, run_name="__main__")
"""

# Processes whose presence says the machine is shared during the run (reported, not acted on):
# /proc/PID/comm names (at most 15 characters): labs, UML guests, kind, builds, test runs.
NEIGHBOURS = ("kube-apiserver", "etcd", "kubelet", "kube-controller", "kube-scheduler", "kube-proxy",
              "containerd", "containerd-shim", "dockerd", "kind", "linux", "linux.uml", "go", "cc1",
              "pytest", "pip")


def log(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


def git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                          text=True).stdout.strip()


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def neighbours() -> dict[str, int]:
    """How many processes of each name in ``NEIGHBOURS`` run now (other work on the machine)."""
    seen: dict[str, int] = {}
    for comm in Path("/proc").glob("[0-9]*/comm"):
        try:
            name = comm.read_text().strip()
        except OSError:
            continue
        if name in NEIGHBOURS:
            seen[name] = seen.get(name, 0) + 1
    return dict(sorted(seen.items()))


@dataclass
class Tree:
    label: str  # "old" / "new"
    ref: str
    sha: str
    subject: str
    path: Path

    @property
    def operator(self) -> Path:
        return self.path / "operator"

    @property
    def lab(self) -> Path | None:
        """The lab's own distribution (since the lab moved out of ``operator/``), if any."""
        return self.path / "lab" if (self.path / "lab" / "svcproxy_lab").is_dir() else None

    def invocation(self, script: Path) -> tuple[list[str], Path]:
        """How this tree's benchmark runs (its CLI changed when ``benchmarks/`` became a
        package): ``-m benchmarks.NAME`` from the tree's root, else the file from its
        folder (what ``python FILE`` puts first on the path). Child argv head and cwd."""
        if (self.path / script.parent / "__init__.py").is_file():
            return ["module", ".".join(script.with_suffix("").parts)], self.path
        return ["path", str(self.path / script)], self.path / script.parent


def options_of(tokens: list[str]) -> list[list[str]]:
    """``--flag [value]`` groups of an argument list (a value is any token after a flag
    that is not itself a flag; ``--flag=value`` is one group)."""
    groups: list[list[str]] = []
    for token in tokens:
        if token.startswith("--") or not groups:
            groups.append([token])
        else:
            groups[-1].append(token)
    return groups


def accepted(tree: Tree, script: Path, groups: list[list[str]], env: dict[str, str]) -> set[str]:
    """The option names of ``groups`` that the tree's benchmark lists in its ``--help``."""
    head, cwd = tree.invocation(script)
    proc = subprocess.run([sys.executable, "-c", CHILD, *head, "--help"], cwd=cwd, env=env,
                          capture_output=True, text=True, check=False, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"{tree.label} ({tree.sha[:7]}): {script} --help failed:\n{proc.stderr[-2000:]}")
    listed = set(re.findall(r"--[A-Za-z0-9][A-Za-z0-9_-]*", proc.stdout))
    return {g[0].split("=", 1)[0] for g in groups} & listed


def child_env(tree: Tree, where: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in (tree.operator, tree.lab) if p)
    env["SVCPROXY_COMPARE_WHERE"] = str(where)
    env.pop("PYTHONSTARTUP", None)
    return env


def parse_report(stdout: str) -> dict[str, Any]:
    """The benchmark's JSON: the whole stdout, else the last line that is a JSON object."""
    try:
        report: dict[str, Any] = json.loads(stdout)
        return report
    except json.JSONDecodeError:
        for line in reversed(stdout.splitlines()):
            if line.startswith("{"):
                try:
                    report = json.loads(line)
                    return report
                except json.JSONDecodeError:
                    continue
    raise ValueError("no JSON object on the benchmark's stdout")


def figures_of(report: dict[str, Any]) -> tuple[dict[str, float], dict[str, str]]:
    """``mode/services/figure -> value`` for every mode block with ``sizes``, and the
    errors of mode blocks that failed (``{"error": ...}``)."""
    values: dict[str, float] = {}
    errors: dict[str, str] = {}
    for mode, block in report.items():
        if not isinstance(block, dict):
            continue
        if "error" in block and "sizes" not in block:
            errors[mode] = str(block["error"])[-500:]
            continue
        for entry in block.get("sizes") or []:
            if not isinstance(entry, dict):
                continue
            n = entry.get("services")
            for field in (*AGENT_FIGURES, *CONTROL_FIGURES):
                value = entry.get(field)
                if isinstance(value, int | float) and not isinstance(value, bool):
                    values[f"{mode}/{n}/{field}"] = float(value)
    return values, errors


def check_import(tree: Tree, name: str, file: str | None, under: Path) -> None:
    """Fail the comparison if the child imported ``name`` from outside ``under``."""
    if not file or not Path(file).resolve().is_relative_to(under.resolve()):
        raise RuntimeError(f"{tree.label} ({tree.sha[:7]}): the benchmark imported {name} from {file},"
                           f" not from {under}")


def run_one(tree: Tree, script: Path, args: list[str], scratch: Path, *, rep: int,
            position: int, timeout: float) -> dict[str, Any]:
    where = scratch / f"where-{tree.label}-{rep}.json"
    stderr_path = scratch / f"stderr-{tree.label}-{rep}.log"
    head, cwd = tree.invocation(script)
    cmd = [sys.executable, "-c", CHILD, *head, *args]
    record: dict[str, Any] = {"rep": rep, "position": position, "commit": tree.label,
                              "loadavg_before": loadavg(), "neighbours": neighbours()}
    log(f"rep {rep} #{position}: {tree.label} {tree.sha[:7]}: {head[1]} {shlex.join(args)}")
    start = time.monotonic()
    with stderr_path.open("w") as err:
        proc = subprocess.run(cmd, cwd=cwd, env=child_env(tree, where),
                              stdout=subprocess.PIPE, stderr=err, text=True, check=False,
                              timeout=timeout)
    record["seconds"] = round(time.monotonic() - start, 1)
    record["loadavg_after"] = loadavg()
    record["returncode"] = proc.returncode
    if proc.returncode != 0:
        record["error"] = stderr_path.read_text()[-2000:]
        log(f"  failed (exit status {proc.returncode}):\n{record['error']}")
        return record
    files = json.loads(where.read_text())
    record["svcproxy_file"] = files["svcproxy"]
    check_import(tree, "svcproxy", files["svcproxy"], tree.operator)
    if files.get("svcproxy_lab") or tree.lab:
        record["svcproxy_lab_file"] = files.get("svcproxy_lab")
        check_import(tree, "svcproxy_lab", files.get("svcproxy_lab"), tree.lab or tree.operator)
    report = parse_report(proc.stdout)
    for mode, block in report.items():  # a mode run elsewhere (ipvs: a UML guest) may say too
        if isinstance(block, dict) and "svcproxy_file" in block:
            record.setdefault("svcproxy_file_by_mode", {})[mode] = block["svcproxy_file"]
            check_import(tree, f"svcproxy ({mode})", block["svcproxy_file"], tree.operator)
    record["source"] = report.get("source")
    if record["source"] and Path(record["source"]).resolve() != tree.operator.resolve():
        raise RuntimeError(f"{tree.label}: the benchmark measured {record['source']}, not {tree.operator}")
    record["started"] = report.get("started")
    record["figures"], errors = figures_of(report)
    if errors:
        record["mode_errors"] = errors
    log(f"  {record['seconds']} s, svcproxy from {files['svcproxy']}: "
        + ", ".join(f"{k} {v}" for k, v in record["figures"].items()))
    return record


def spread(values: list[float], digits: int) -> dict[str, Any]:
    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits), "n": len(values),
            "values": [round(v, digits) for v in values]}


def summarize(runs: list[dict[str, Any]], reps: int) -> dict[str, Any]:
    """Per figure: each commit's median and min-max, the ratio new / old of the medians,
    and the spread of the per-repetition ratios (each pair ran back to back)."""
    per: dict[str, dict[str, dict[int, float]]] = {}
    for run in runs:
        for key, value in run.get("figures", {}).items():
            per.setdefault(key, {"old": {}, "new": {}})[run["commit"]][run["rep"]] = value
    out: dict[str, Any] = {}
    for key in sorted(per):
        mode, services, figure = key.split("/", 2)
        old, new = per[key]["old"], per[key]["new"]
        entry: dict[str, Any] = {
            "mode": mode, "services": int(services) if services.isdigit() else services,
            "figure": figure,
            "role": "agent" if figure in AGENT_FIGURES else "kernel tool alone (control)",
        }
        for label, values in (("old", old), ("new", new)):
            if values:
                entry[label] = spread([values[r] for r in sorted(values)], 5)
        if not old or not new:
            entry["note"] = "measured by one commit only"
            out[key] = entry
            continue
        old_median, new_median = statistics.median(old.values()), statistics.median(new.values())
        entry["ratio_new_over_old_of_medians"] = round(new_median / old_median, 3) if old_median else None
        paired = [new[r] / old[r] for r in range(reps) if r in old and r in new and old[r]]
        if paired:
            entry["paired_ratio"] = spread(paired, 3)
        out[key] = entry
    return out


def add_tree(label: str, ref: str, base: Path) -> Tree:
    sha = git("rev-parse", "--verify", f"{ref}^{{commit}}")
    path = base / f"{label}-{sha[:7]}"
    git("worktree", "add", "--detach", str(path), sha)
    return Tree(label, ref, sha, git("log", "-1", "--format=%s", sha), path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", default="3a1e563", help="the commit before (default: 3a1e563)")
    parser.add_argument("--new", default="HEAD", help="the commit after (default: HEAD)")
    parser.add_argument("--reps", type=int, default=5, help="repetitions of the pair (ABBA order)")
    parser.add_argument("--script", default="benchmarks/sync_scale.py",
                        help="the benchmark, as a path inside each tree")
    parser.add_argument("--bench-args", default=DEFAULT_ARGS,
                        help=f"arguments for the benchmark, the same for both (default: {DEFAULT_ARGS!r})")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per benchmark run")
    parser.add_argument("--output", help="also write the JSON document to this file")
    args = parser.parse_args(argv)
    script = Path(args.script)
    groups = options_of(shlex.split(args.bench_args))
    doc: dict[str, Any] = {
        "benchmark": str(script),
        "command": "python -m benchmarks.compare_commits " + shlex.join(
            argv if argv is not None else sys.argv[1:]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "loadavg_start": loadavg(), "neighbours_start": neighbours(),
                    "kernel": os.uname().release, "python": sys.executable},
        "order": "ABBA: even repetitions old then new, odd ones new then old",
    }
    base = Path(tempfile.mkdtemp(prefix="svcproxy-compare-"))
    trees: list[Tree] = []
    try:
        for label, ref in (("old", args.old), ("new", args.new)):
            trees.append(add_tree(label, ref, base))
        doc["commits"] = {t.label: {"ref": t.ref, "sha": t.sha, "subject": t.subject} for t in trees}
        for tree in trees:
            if not (tree.path / script).is_file():
                raise RuntimeError(f"{tree.label} ({tree.sha[:7]}) has no {script}")
        names = set.intersection(*(accepted(t, script, groups, child_env(t, base / "help.json"))
                                   for t in trees))
        bench_args = [token for g in groups if g[0].split("=", 1)[0] in names for token in g]
        doc["bench_args"] = bench_args
        dropped = [shlex.join(g) for g in groups if g[0].split("=", 1)[0] not in names]
        if dropped:
            doc["dropped_args"] = dropped
            log(f"dropped (not accepted by both trees): {dropped}")
        runs: list[dict[str, Any]] = []
        for rep in range(args.reps):
            order = trees if rep % 2 == 0 else trees[::-1]
            for position, tree in enumerate(order):
                runs.append(run_one(tree, script, bench_args, base, rep=rep, position=position,
                                    timeout=args.timeout))
        doc["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        doc["machine"]["loadavg_end"] = loadavg()
        doc["figures"] = summarize(runs, args.reps)
        doc["runs"] = runs
    finally:
        for tree in trees:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree.path)], cwd=ROOT,
                           check=False, capture_output=True)
        subprocess.run(["git", "worktree", "prune"], cwd=ROOT, check=False, capture_output=True)
        shutil.rmtree(base, ignore_errors=True)
    text = json.dumps(doc, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
