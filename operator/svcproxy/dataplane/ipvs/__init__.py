"""The ``ipvs`` mode.

``proxier`` (pure logic over the kernel protocols), ``kernel`` (the protocols and their
fakes); kernel adapters: ``netlink`` (IPVS client), ``nlpack`` (request packer, pure),
``nlsock`` (socket plumbing), ``dump`` (reply decoder, pure), ``addresses`` (VIPs),
``probe`` (modprobe, /proc, /sys), ``nodesetup`` (sysctls, masquerade); ``host`` wires
them for ``modes.build_proxier``.
"""
