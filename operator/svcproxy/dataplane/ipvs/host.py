"""The ipvs proxier on this host's kernel: which adapters it gets.

:func:`create` is what ``modes.build_proxier("ipvs")`` calls. It asks ``probe``
whether the kernel has IPVS at all before importing the netlink adapters (pyroute2's
memory is then paid only on nodes with IPVS), then builds the proxier
on ``netlink.NetlinkIpvs`` and ``addresses.NetlinkAddresses``, or on ``AbsentIpvs``
with the address adapter imported on first use, and hands it the node setup.
"""

from __future__ import annotations

from collections.abc import Sequence

from svcproxy.dataplane.ipvs import nodesetup, probe
from svcproxy.dataplane.ipvs.kernel import AbsentIpvs, AddressKernel
from svcproxy.dataplane.ipvs.proxier import IpvsProxier


class _LazyAddresses:
    """The netlink address adapter, imported on first use (only ``cleanup`` uses it when
    IPVS is missing: it still removes a leftover ``svcproxy0``)."""

    def __init__(self) -> None:
        self._real: AddressKernel | None = None

    def _get(self) -> AddressKernel:
        if self._real is None:
            from svcproxy.dataplane.ipvs.addresses import NetlinkAddresses

            self._real = NetlinkAddresses()
        return self._real

    def ensure_interface(self, name: str) -> None:
        self._get().ensure_interface(name)

    def delete_interface(self, name: str) -> None:
        self._get().delete_interface(name)

    def addresses(self, name: str) -> set[str]:
        return self._get().addresses(name)

    def add_addresses(self, name: str, addresses: Sequence[str]) -> list[str]:
        return self._get().add_addresses(name, addresses)

    def delete_addresses(self, name: str, addresses: Sequence[str]) -> list[str]:
        return self._get().delete_addresses(name, addresses)


def create(config: object) -> IpvsProxier:
    """The real-kernel proxier (called by ``modes.build_proxier``)."""
    interface = getattr(config, "interface", "svcproxy0")
    missing = probe.ipvs_missing()
    if missing:
        return IpvsProxier(AbsentIpvs(missing), _LazyAddresses(), interface=interface,
                           unprepare=nodesetup.unprepare)
    from svcproxy.dataplane.conntrack import ConntrackCleaner
    from svcproxy.dataplane.ipvs.addresses import NetlinkAddresses
    from svcproxy.dataplane.ipvs.netlink import NetlinkIpvs

    return IpvsProxier(
        NetlinkIpvs(),
        NetlinkAddresses(),
        interface=interface,
        prepare=lambda: nodesetup.prepare(config),
        unprepare=nodesetup.unprepare,
        conntrack=ConntrackCleaner(),
    )
