"""cluster/node.py: what the leader and a worker both know about themselves (memory, the simulated link)."""
import pytest

from nanopipe.cluster.node import LinkModel, rss_mb
from nanopipe.config import ClusterConfig, Node


def test_the_simulated_link_waits_latency_plus_bytes_over_bandwidth():
    """One gpt2 row (768 float32 = 3072 bytes) over 20 ms / 100 Mbit/s: 0.020 + 3072 * 8 / 1e8 s."""
    assert LinkModel(delay_ms=20, mbps=100).seconds(3072) == pytest.approx(0.02024576, rel=1e-12)
    assert LinkModel(delay_ms=0, mbps=0).seconds(10**9) == 0.0, "no link configured: no wait"
    assert LinkModel(delay_ms=5, mbps=0).seconds(10**9) == pytest.approx(0.005), "mbps=0: no bandwidth limit"


def test_the_link_comes_from_the_cluster_config_which_only_holds_numbers():
    nodes = (Node(0, "a", "127.0.0.1", 65432), Node(1, "b", "127.0.0.1", 65433))
    cc = ClusterConfig(port=65432, nodes=nodes, link_delay_ms=7.5, link_mbps=40.0)
    assert LinkModel.of(cc) == LinkModel(7.5, 40.0)
    assert not hasattr(cc, "link_sleep"), "the config is data; LinkModel does the waiting"


def test_rss_mb_is_this_process_s_memory():
    mb = rss_mb()
    assert mb is None or 1 < mb < 1e6, f"rss_mb() = {mb}"
