"""What a node knows about itself that is not the wire: its memory, and the link a hop waits on.

Both the leader and a worker use these, so they live here rather than in either one: the leader
does not import worker.py (a leader process loads no stage code it does not run), and the frozen
ClusterConfig stays data (it holds the simulated link's numbers; LinkModel does the waiting).
"""
from __future__ import annotations

import time
from dataclasses import dataclass


def rss_mb() -> float | None:
    """This process's resident memory in MB: what each node reports for /health and /metrics."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    try:                                    # no /proc (macOS): the peak instead, in bytes there
        import resource
        import sys
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return round(peak / (2**20 if sys.platform == "darwin" else 1024), 1)
    except (ImportError, OSError):
        return None


@dataclass(frozen=True)
class LinkModel:
    """A simulated slower link on every hop, for benchmarks: each frame waits latency + bytes / bandwidth.

    LinkModel(delay_ms=20, mbps=100).seconds(3072) = 0.020 + 3072 * 8 / 100e6 = 0.02024576 s
    (one gpt2 activation row). mbps=0 means no bandwidth limit; both 0 means no wait at all.
    """
    delay_ms: float = 0.0
    mbps: float = 0.0

    @classmethod
    def of(cls, cluster) -> LinkModel:
        """The link a ClusterConfig describes (its link_delay_ms and link_mbps)."""
        return cls(cluster.link_delay_ms, cluster.link_mbps)

    def seconds(self, nbytes: int) -> float:
        return self.delay_ms / 1000 + (nbytes * 8 / (self.mbps * 1e6) if self.mbps > 0 else 0.0)

    def wait(self, nbytes: int) -> None:
        """Sleep as long as sending `nbytes` over this link would take."""
        t = self.seconds(nbytes)
        if t > 0:
            time.sleep(t)
