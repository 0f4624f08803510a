"""The ``svcproxy`` command line: one entry point, one subcommand per job.

Each subcommand lives in its own module, which exposes ``configure(parser)``
and ``run(args) -> int``. Modules are imported only when their subcommand
runs, so ``svcproxy lab`` does not pay for kopf and ``svcproxy agent`` does not
pay for the lab. ``lab`` and ``demo`` live in the separate ``svcproxy_lab``
distribution (a development tool, not shipped): they work where it is installed.
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
    "lab": ("svcproxy_lab.cli", "run a local Kubernetes lab: control plane, nodes, pods (dev)"),
    "operator": ("svcproxy.controller.main", "run the operator (kopf)"),
    "agent": ("svcproxy.agent.main", "run the node agent"),
    "plan": ("svcproxy.controller.plan", "show what a policy would program, without writing"),
    "status": ("svcproxy.controller.statuscmd", "show policies, programs and node reports"),
    "demo": ("svcproxy_lab.demo", "run the demo on a lab or (--kind) on kind: policies, traffic (dev)"),
}
# Subcommands from the lab distribution, which a release (wheel, image) does not carry.
LAB_PACKAGE = "svcproxy_lab"
LAB_MISSING = (
    "svcproxy {name}: the lab is a development tool and is not installed here; "
    "in a checkout of svcproxy run `make venv` (it installs ./lab), then .venv/bin/svcproxy {name}"
)


class Subcommand(Protocol):
    def configure(self, parser: argparse.ArgumentParser) -> None: ...

    def run(self, args: argparse.Namespace) -> int: ...


class LabNotInstalledError(RuntimeError):
    """A lab subcommand ran where the ``svcproxy_lab`` distribution is absent."""


def _load(name: str) -> Subcommand:
    module = SUBCOMMANDS[name][0]
    try:
        return cast(Subcommand, importlib.import_module(module))
    except ModuleNotFoundError as exc:
        # Only the lab's own absence is expected; a missing module inside it is a bug to show.
        if module.startswith(LAB_PACKAGE + ".") and exc.name == LAB_PACKAGE:
            raise LabNotInstalledError(LAB_MISSING.format(name=name)) from exc
        raise


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
    try:
        module = _load(name)
    except LabNotInstalledError as exc:
        print(exc, file=sys.stderr)
        return 2
    sub_parser = argparse.ArgumentParser(prog=f"svcproxy {name}", description=SUBCOMMANDS[name][1])
    module.configure(sub_parser)
    args = sub_parser.parse_args(argv[1:])
    return module.run(args)


if __name__ == "__main__":
    sys.exit(main())
