"""``svcproxy lab``: the command line of the local Kubernetes lab.

Dispatched from ``svcproxy/cli.py`` (``svcproxy lab ...``) or run on its own as
``svcproxy-lab ...`` (:func:`main`). Subcommands: ``up`` (idempotent; prints
the KUBECONFIG path on its last stdout line), ``down``, ``status``,
``exec NODE [--client] -- CMD``, ``client NODE``, ``stop-node NODE [--wipe]`` and
``start-node NODE [--no-agent]`` (one node leaving and joining), and ``kubelet`` (the
lab kubelet itself, started by ``up`` inside each node). Every subcommand takes
``--state-dir``; progress and errors go to stderr.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Any

from svcproxy_lab import network
from svcproxy_lab.cluster import DEFAULT_STATE, Lab, LabError
from svcproxy_lab.controlplane import ControlPlaneError


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="lab_command", metavar="COMMAND", required=True)

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--state-dir", type=Path, default=DEFAULT_STATE,
                       help=f"the lab's state folder (default {DEFAULT_STATE})")
        return p

    up = add("up", "start (or complete) a lab; prints the KUBECONFIG path last")
    up.add_argument("--nodes", type=int, default=3, help="number of nodes (default 3)")
    up.add_argument("--ipvs-nodes", type=int, default=0,
                    help="how many of the nodes (the last ones) are user-mode-linux guests "
                         "with IPVS (default 0)")
    up.add_argument("--kube-proxy", choices=("iptables", "nftables", "ipvs"),
                    help="also run the real kube-proxy in this mode on every node "
                         "(the peer of handover tests and benchmarks)")
    up.add_argument("--no-svcproxy", action="store_true",
                    help="do not apply CRDs or start the operator and agents")
    add("down", "stop the lab and remove every namespace, link and route it made")
    add("status", "show the lab's processes and nodes")
    ex = add("exec", "run a command in a node's network namespace (or its client namespace)")
    ex.add_argument("node", help="node-N or N")
    ex.add_argument("--client", action="store_true", help="run in the node's client namespace")
    ex.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    cl = add("client", "create (if needed) and print the client namespace behind a node")
    cl.add_argument("node", help="node-N or N")
    stop = add("stop-node", "stop a node's agent and kubelet (its Node object and Pods stay)")
    stop.add_argument("node", help="node-N")
    stop.add_argument("--wipe", action="store_true",
                      help="also destroy the node (Pods, kernel state) and its kubelet's state, "
                           "so that start-node brings up a new machine of that name")
    start = add("start-node", "start a node's kubelet, wait for its Node to be Ready, then its agent")
    start.add_argument("node", help="node-N")
    start.add_argument("--no-agent", action="store_true", help="start the kubelet only")
    from svcproxy_lab import kubelet

    kubelet.configure(sub.add_parser("kubelet", help="the lab kubelet (started by `lab up`)"))


def _guest_node(lab: Lab, index: int) -> Any:
    """Node ``index`` if it keeps its client namespace itself (a UML guest), else None."""
    if Path(f"/run/netns/svcp-node-{index}").exists():
        return None
    state = lab.load()
    for node in lab.nodes(state) if state else []:
        if node.index == index and callable(getattr(node, "run_client", None)):
            return node
    return None


def _index(node: str) -> int:
    try:
        return int(node.rsplit("-", 1)[-1])
    except ValueError:
        raise LabError(f"{node!r} is not a node name: use node-N or N") from None


def _exec_options(args: argparse.Namespace) -> list[str]:
    """Options given after NODE land in the command remainder: take them out up to ``--``."""
    rest = list(args.cmd)
    while rest and rest[0] != "--":
        opt = rest.pop(0)
        if opt == "--client":
            args.client = True
        elif opt == "--state-dir" and rest:
            args.state_dir = Path(rest.pop(0))
        elif opt.startswith("--state-dir="):
            args.state_dir = Path(opt.split("=", 1)[1])
        else:
            rest.insert(0, opt)  # no `--`: the command starts here
            break
    return rest[1:] if rest[:1] == ["--"] else rest


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except LabError as exc:
        print(f"svcproxy lab {args.lab_command}: {exc}", file=sys.stderr)
        return 1
    except ControlPlaneError as exc:
        print(f"svcproxy lab {args.lab_command}: {exc}", file=sys.stderr)
        return 1
    except network.NetworkError as exc:
        print(f"svcproxy lab {args.lab_command}: network setup failed: {exc}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    if args.lab_command == "kubelet":
        from svcproxy_lab import kubelet

        return kubelet.main(args)
    cmd = _exec_options(args) if args.lab_command == "exec" else []
    lab = Lab(args.state_dir)
    if args.lab_command == "up":
        kubeconfig = lab.up(args.nodes, args.ipvs_nodes, not args.no_svcproxy,
                            kube_proxy=args.kube_proxy)
        print(f"export KUBECONFIG={kubeconfig}", file=sys.stderr)
        print(kubeconfig)
        return 0
    if args.lab_command == "down":
        lab.down()
        return 0
    if args.lab_command == "status":
        print(lab.status())
        return 0 if lab.alive() else 1
    if args.lab_command == "stop-node":
        lab.stop_node(args.node, wipe=args.wipe)
        return 0
    if args.lab_command == "start-node":
        lab.start_node(args.node, agent=not args.no_agent)
        return 0
    if args.lab_command == "client":
        guest = _guest_node(lab, _index(args.node))
        if guest is not None:  # a guest node: its client namespace lives inside the guest
            print(guest.client_netns())
            return 0
        print(network.ensure_client_netns(_index(args.node)))
        return 0
    if args.lab_command == "exec":
        if not cmd:
            raise LabError("nothing to run: svcproxy lab exec NODE -- CMD ARGS...")
        index = _index(args.node)
        guest = _guest_node(lab, index)
        if args.client and guest is not None:
            proc = guest.run_client(cmd, timeout=3600)
            sys.stdout.buffer.write(proc.stdout)
            sys.stderr.buffer.write(proc.stderr)
            return int(proc.returncode)
        if args.client:
            ns = network.ensure_client_netns(index)
            return subprocess.run(network.in_netns(ns, cmd), check=False).returncode
        state = lab.load()
        if state is None:
            raise LabError(f"no lab in {lab.state_dir}: run `svcproxy lab up` first")
        nodes = {n.index: n for n in lab.nodes(state)}
        if index not in nodes:
            raise LabError(f"the lab has no node {index}; it has {sorted(nodes)}")
        node = nodes[index]
        if hasattr(node, "netns"):  # a namespace: let the command use our terminal directly
            return subprocess.run(network.in_netns(node.netns, cmd), check=False).returncode
        proc = node.run(cmd, timeout=3600)
        sys.stdout.buffer.write(proc.stdout)
        sys.stderr.buffer.write(proc.stderr)
        return proc.returncode
    raise LabError(f"unknown lab command {args.lab_command}")


def main(argv: list[str] | None = None) -> int:
    """The ``svcproxy-lab`` console script: the same parser as ``svcproxy lab``."""
    parser = argparse.ArgumentParser(prog="svcproxy-lab", description=__doc__.splitlines()[0])
    configure(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
