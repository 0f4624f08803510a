"""The ``iptables`` mode: NAT rule text (rules.py) and the proxier that applies it."""
