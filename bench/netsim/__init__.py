"""A multi-host network on one machine: replicas and workers in their own
network namespaces behind shaped links (net.py), a paramstore cluster on them
(cluster.py), and the benchmark `python -m bench.netsim` (__main__.py)."""

from .net import NetsimUnavailable, Shape, SimNet, capabilities, leftovers, remove_stale, unavailable

__all__ = ["NetsimUnavailable", "Shape", "SimNet", "capabilities", "leftovers", "remove_stale", "unavailable"]
