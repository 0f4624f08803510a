"""The ``ipvs`` mode: proxier, kernel protocol + fake, netlink adapter, node setup."""
