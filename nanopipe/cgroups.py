"""Child cgroups (v1) for tests and benchmarks: a CPU quota or a memory limit on one process of a
local cluster (needs root, or a delegated cgroup; `why_not_writable` says why not).

    with CGroup("cpu", {"cpu.cfs_period_us": 100000, "cpu.cfs_quota_us": 25000}) as cpu:
        LocalCluster(..., wrap={1: cpu.wrapper()})      # rank 1 runs at 25% of one core

The wrapper is `sh -c 'echo $$ > .../cgroup.procs && exec "$@"'`: the shell moves itself into the
group, then becomes the node's process (same pid), so everything the node allocates is charged
there. A memory group is made under this process's own memory group (the hierarchy's limits keep
applying); a cpu group under this process's cpu group. On exit the group is removed (once empty).
"""
from __future__ import annotations

import os
import time
import uuid

ROOT = "/sys/fs/cgroup"


def own_path(controller: str) -> str | None:
    """This process's v1 cgroup path for `controller` ("cpu", "memory"), e.g. "/" or "/a/b"."""
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                _, ctrls, path = line.strip().split(":", 2)
                if controller in ctrls.split(","):
                    return path
    except OSError:
        pass
    return None


def why_not_writable(controller: str) -> str | None:
    """None if a child cgroup of `controller` can be made here, else the reason (for a skip)."""
    path = own_path(controller)
    if path is None:
        return f"no cgroup v1 '{controller}' controller in /proc/self/cgroup"
    base = os.path.join(ROOT, controller, path.lstrip("/"))
    if not os.path.isdir(base):
        return f"{base} is not mounted"
    probe = os.path.join(base, f"nanopipe-probe-{uuid.uuid4().hex[:8]}")
    try:
        os.mkdir(probe)
        os.rmdir(probe)
    except OSError as e:
        return f"cannot create a cgroup under {base}: {e.strerror}"
    return None


class CGroup:
    def __init__(self, controller: str, settings: dict):
        self.controller, self.settings = controller, settings
        base = os.path.join(ROOT, controller, (own_path(controller) or "/").lstrip("/"))
        self.path = os.path.join(base, f"nanopipe-test-{os.getpid()}-{uuid.uuid4().hex[:8]}")

    def __enter__(self):
        os.mkdir(self.path)
        for name, value in self.settings.items():
            with open(os.path.join(self.path, name), "w") as f:
                f.write(str(value))
        return self

    def wrapper(self) -> list:
        """argv prefix that runs a command inside this group."""
        procs = os.path.join(self.path, "cgroup.procs")
        return ["sh", "-c", f'echo $$ > {procs} && exec "$@"', "sh"]

    def pids(self) -> list:
        try:
            with open(os.path.join(self.path, "cgroup.procs")) as f:
                return [int(x) for x in f.read().split()]
        except OSError:
            return []

    def read(self, name: str) -> str:
        with open(os.path.join(self.path, name)) as f:
            return f.read().strip()

    def __exit__(self, *exc):
        # the cluster has stopped its processes; a group can only be removed once it is empty
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                os.rmdir(self.path)
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"could not remove {self.path}: processes {self.pids()} still in it")
