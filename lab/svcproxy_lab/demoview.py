"""What the demo shows: the table of policies, a clients x Pods grid per Service, verdicts.

Pure functions over the counts a demo collected (``demo.py`` on the lab, ``demokind.py``
on kind; no cluster, no network here), so that the demo's output and its tests
(``tests/e2e/test_demo.py``, ``tests/kind/test_kind_demo.py``) read the same numbers:
:func:`verdict` says in one line what each scheduler did (sh pinned each client to one
Pod, wrr followed the weights, rr spread evenly), :func:`grid` draws one Service's
requests as a bar per client row and Pod column, and :func:`plot` writes the same grids
as one PNG (matplotlib, from the bench extra). :meth:`Outcome.add` counts one client's
answers into its row.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BAR = 10  # characters of a full bar: every request of a client row went to this Pod


@dataclass
class Outcome:
    """One Service after its traffic: who answered whom, and what its status said."""

    name: str
    title: str  # the policy in words, e.g. "ipvs sh + ClientIP"
    expect: str  # "pinned" | "weighted" | "even" | "random"
    pods: list[str]
    weights: dict[str, int]  # Pod -> weight the policy gives it (1 when it sets none)
    requests: int  # per client
    grid: dict[str, Counter[str]] = field(default_factory=dict)  # client -> Pod -> answers
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    status: dict[str, Any] = field(default_factory=dict)  # table row: mode, scheduler, ...

    def add(self, client: str, answers: Sequence[str | None]) -> None:
        """One client's answers in order: a Pod's name, or None for a failed request.

        Requests the client did not report at all count as failed too.
        """
        row = self.grid.setdefault(client, Counter())
        self.failed += max(self.requests - len(answers), 0)
        for pod in answers:
            if pod is None:
                self.failed += 1
            else:
                row[pod] += 1

    def column(self, pod: str) -> int:
        return sum(row.get(pod, 0) for row in self.grid.values())

    def answered(self) -> int:
        return sum(sum(row.values()) for row in self.grid.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "service": self.name, "policy": self.title, "expect": self.expect,
            "pods": self.pods, "weights": self.weights, "requests_per_client": self.requests,
            "clients": {c: dict(row) for c, row in self.grid.items()},
            "failed": self.failed, "errors": self.errors[:5], "status": self.status,
            "verdict": verdict(self),
        }


def pinned(o: Outcome) -> tuple[int, int]:
    """Clients that only one Pod answered, and clients that got any answer."""
    rows = [row for row in o.grid.values() if sum(row.values())]
    return sum(1 for row in rows if len(+row) == 1), len(rows)


def expected_share(o: Outcome) -> dict[str, float]:
    total = sum(o.weights.get(p, 1) for p in o.pods) or 1
    return {p: o.weights.get(p, 1) / total for p in o.pods}


def observed_share(o: Outcome) -> dict[str, float]:
    total = o.answered() or 1
    return {p: o.column(p) / total for p in o.pods}


def evenness(o: Outcome) -> float:
    """The largest distance of one client's count for one Pod from an even split."""
    fair = o.requests / max(len(o.pods), 1)
    return max((abs(row.get(p, 0) - fair) for row in o.grid.values() for p in o.pods),
               default=0.0)


def _shares(o: Outcome) -> str:
    seen, want = observed_share(o), expected_share(o)
    return ", ".join(f"{short(p)} {seen[p]:.0%} (weight {o.weights.get(p, 1)}: {want[p]:.0%})"
                     for p in o.pods)


def verdict(o: Outcome) -> str:
    """One line: what the scheduler did with these clients."""
    if o.expect == "pinned":
        n, total = pinned(o)
        used = sum(1 for p in o.pods if o.column(p))
        return f"{n}/{total} clients pinned to one Pod each ({used} of {len(o.pods)} Pods in use)"
    if o.expect == "weighted":
        return f"shares follow the weights: {_shares(o)}"
    if o.expect == "even":
        fair = o.requests / max(len(o.pods), 1)
        return (f"even spread: every client got {fair:.1f} from each Pod, "
                f"at most {evenness(o):.1f} off")
    shares = observed_share(o)
    return "random pick per connection: " + ", ".join(f"{short(p)} {shares[p]:.0%}" for p in o.pods)


def short(pod: str) -> str:
    """A Deployment Pod's name without its ReplicaSet hash: web-canary-7c9d8-x2kfj -> web-canary-x2kfj."""
    parts = pod.split("-")
    return "-".join([*parts[:-2], parts[-1]]) if len(parts) >= 3 else pod


def table(outcomes: Sequence[Outcome]) -> str:
    cols = ("service", "policy", "mode", "scheduler", "affinity", "programmed")
    rows = [[o.name, o.title, str(o.status.get("mode", "?")), str(o.status.get("scheduler", "-")),
             str(o.status.get("affinity", "None")), str(o.status.get("programmed", "?"))]
            for o in outcomes]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def _cell(count: int, full: int, width: int) -> str:
    if not count:
        return ".".ljust(width)
    bar = "█" * max(1, round(BAR * count / max(full, 1)))
    return f"{bar} {count}".ljust(width)


def grid(o: Outcome) -> str:
    """Rows: clients (node and source address); columns: the Service's Pods; a bar per cell."""
    names = [short(p) for p in o.pods]
    width = max([BAR + 4, *(len(n) + 2 for n in names)])
    label = max([len("client"), *(len(c) for c in o.grid)]) + 2
    lines = [f"{o.name}  ({o.title}): {verdict(o)}",
             "client".ljust(label) + "".join(n.ljust(width) for n in names)]
    for client, row in o.grid.items():
        lines.append(client.ljust(label)
                     + "".join(_cell(row.get(p, 0), o.requests, width) for p in o.pods))
    if o.expect == "weighted":
        lines.append("weight".ljust(label)
                     + "".join(str(o.weights.get(p, 1)).ljust(width) for p in o.pods))
    if o.failed:
        lines.append(f"failed requests: {o.failed}")
    return "\n".join(line.rstrip() for line in lines)


def plot(outcomes: Sequence[Outcome], path: Path) -> None:
    """One heat map per Service (clients x Pods, counts written in), side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clients = list(outcomes[0].grid) if outcomes else []
    fig, axes = plt.subplots(1, len(outcomes), figsize=(3.2 * len(outcomes), 0.35 * len(clients) + 2),
                             squeeze=False)
    for ax, o in zip(axes[0], outcomes, strict=True):
        cells = [[o.grid.get(c, Counter()).get(p, 0) for p in o.pods] for c in clients]
        ax.imshow(cells, cmap="Blues", vmin=0, vmax=o.requests, aspect="auto")
        for i, row in enumerate(cells):
            for j, n in enumerate(row):
                ax.text(j, i, str(n), ha="center", va="center", fontsize=7,
                        color="white" if n > o.requests / 2 else "black")
        ax.set_xticks(range(len(o.pods)), [short(p) for p in o.pods], rotation=30, ha="right",
                      fontsize=7)
        ax.set_yticks(range(len(clients)), clients if ax is axes[0][0] else [""] * len(clients),
                      fontsize=7)
        ax.set_title(f"{o.name}\n{o.title}", fontsize=9)
    fig.suptitle("svcproxy demo: requests per client (rows) and Pod (columns), one policy per Service",
                 fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)

