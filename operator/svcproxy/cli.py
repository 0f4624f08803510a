"""The ``svcproxy`` command line: one entry point, one subcommand per job.

Each subcommand lives in its own module, which exposes ``configure(parser)``
and ``run(args) -> int``. Modules are imported only when their subcommand
runs, so ``svcproxy lab`` does not pay for kopf and ``svcproxy agent`` does not
pay for the lab.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Protocol, cast

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "crds": ("svcproxy.api.crdgen", "write the CRD YAML generated from the API models"),
    "lab": ("svcproxy.lab.cli", "run a local Kubernetes lab: control plane, nodes, pods"),
    "operator": ("svcproxy.controller.main", "run the operator (kopf)"),
    "agent": ("svcproxy.agent.main", "run the node agent"),
    "plan": ("svcproxy.controller.plan", "show what a policy would program, without writing"),
    "status": ("svcproxy.controller.statuscmd", "show policies, programs and node reports"),
    "demo": ("svcproxy.demo", "run the demo on a lab: policies applied, traffic shown"),
}


class Subcommand(Protocol):
    def configure(self, parser: argparse.ArgumentParser) -> None: ...

    def run(self, args: argparse.Namespace) -> int: ...


def _load(name: str) -> Subcommand:
    return cast(Subcommand, importlib.import_module(SUBCOMMANDS[name][0]))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="svcproxy", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    # Parse the subcommand name first, then let only that module build its parser.
    if not argv or argv[0] not in SUBCOMMANDS:
        parser.parse_args(argv or ["--help"])
        return 2
    name = argv[0]
    module = _load(name)
    sub_parser = argparse.ArgumentParser(prog=f"svcproxy {name}", description=SUBCOMMANDS[name][1])
    module.configure(sub_parser)
    args = sub_parser.parse_args(argv[1:])
    return module.run(args)


if __name__ == "__main__":
    sys.exit(main())
