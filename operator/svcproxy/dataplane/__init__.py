"""The kernel half of the node agent: one proxier per proxy mode.

Layout (imports go downwards only; no mode imports another):

* ``table``   plain frozen values (VirtualServer, RealServer, VSKey); pure.
* ``diff``    desired vs observed table -> operations; pure.
* ``proxier`` the ``Proxier`` protocol every mode implements, results, typed errors.
* ``modes``   builds a proxier by mode name and detects what the node supports.
* ``netfilter`` the one adapter that runs iptables-save / iptables-restore.
* ``ipvs/``, ``iptables/``, ``userspace/`` one package per mode.

The agent (``svcproxy.agent``) is the only caller.
"""
