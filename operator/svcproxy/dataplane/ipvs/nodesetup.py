"""Node setup the ``ipvs`` mode needs besides IPVS rules: sysctls and masquerade.

Called by ``IpvsProxier`` on each full sync (``prepare``) and on cleanup
(``unprepare``), through the closures ``host.create`` builds. Sysctls are
written under /proc/sys (idempotent); the masquerade rule lives in the
nat chain ``SVCPROXY-IPVS-POSTROUTING`` via the netfilter adapter: IPVS
NAT rewrites only the destination, so replies from a real server find
their way back only when the client routes through this node; traffic from
outside the cluster CIDRs (node-local clients, hairpin) is masqueraded.
"""

from __future__ import annotations

from pathlib import Path

from svcproxy.dataplane.netfilter import Jump, Netfilter, detect_backend
from svcproxy.dataplane.proxier import DataplaneError, KernelError

SYSCTLS = {
    "net/ipv4/ip_forward": "1",
    # IPVS connections in conntrack, so netfilter NAT (masquerade) can see them.
    "net/ipv4/vs/conntrack": "1",
    # A removed real server's connections are dropped at once, not black-holed.
    "net/ipv4/vs/expire_nodest_conn": "1",
    # Persistence templates of a weight-0 real server expire, so affinity lets go.
    "net/ipv4/vs/expire_quiescent_template": "1",
    # The node must not answer ARP for VIPs on svcproxy0.
    "net/ipv4/conf/all/arp_ignore": "1",
    "net/ipv4/conf/all/arp_announce": "2",
}
CHAIN = "SVCPROXY-IPVS-POSTROUTING"
JUMP = Jump("nat", "POSTROUTING", f"-m comment --comment svcproxy-ipvs -j {CHAIN}")


def set_sysctls(root: Path = Path("/proc/sys")) -> list[DataplaneError]:
    errors: list[DataplaneError] = []
    for name, value in SYSCTLS.items():
        path = root / name
        try:
            if path.read_text().strip() != value:
                path.write_text(value)
        except OSError as err:
            errors.append(KernelError(f"could not set {name.replace('/', '.')}={value}: {err}"))
    return errors


def masquerade_rules(cluster_cidrs: tuple[str, ...], masquerade_all: bool) -> list[str]:
    base = "-m ipvs --ipvs --vdir ORIGINAL --vmethod MASQ"
    if masquerade_all or not cluster_cidrs:
        return [f"-A {CHAIN} {base} -j MASQUERADE"]
    rules = [f"-A {CHAIN} -s {cidr} {base} -j RETURN" for cidr in cluster_cidrs]
    return [*rules, f"-A {CHAIN} {base} -j MASQUERADE"]


def prepare(config: object) -> list[DataplaneError]:
    errors = set_sysctls() if getattr(config, "set_sysctls", True) else []
    backend, _reason = detect_backend()
    if not backend:
        return errors  # no iptables: IPVS still works for clients routed via the node
    rules = masquerade_rules(
        tuple(getattr(config, "cluster_cidrs", ())), bool(getattr(config, "masquerade_all", False))
    )
    text = "*nat\n:" + CHAIN + " - [0:0]\n" + "\n".join(rules) + "\nCOMMIT\n"
    failures: list[DataplaneError] = []
    for legacy in (False, True):  # nft first; x_tables where the kernel lacks nft NAT
        try:
            nf = Netfilter(legacy=legacy)
            nf.restore(text)
            nf.ensure_jumps([JUMP])
            return errors
        except DataplaneError as err:
            failures.append(err)
    return errors + failures[-1:]


def unprepare() -> None:
    if detect_backend()[0]:
        for legacy in (False, True):
            try:
                Netfilter(legacy=legacy).remove("nat", CHAIN, [JUMP])
            except DataplaneError:
                continue  # that backend is not usable here: nothing of ours in it
