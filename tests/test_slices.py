"""A worker gets its slice of the weights from the leader (cluster/slices.py, tools/from_leader.py).

    in process    a node serves blocks 2..3 of a file (plain and under TLS): the slice holds exactly those
                  tensors, byte for byte;
                  a .part with half the bytes resumes (fewer bytes fetched than the whole); a flipped
                  byte in the .part is caught (deleted, fetched again from 0); a node that holds
                  nothing says so; a lying node (a name with a path, a wrong checksum, more bytes than
                  it announced, a size its own file denies) is refused and nothing lands outside weights/
    processes     `nanopipe join --leader` with an empty weights folder and an unreachable url joins
                  through the leader and answers as one process does; the transfer is cut half-way
                  (a proxy drops the connection) and resumes; a byte flipped in the .part while the
                  transfer is cut is caught, and the answer is still right
"""
from __future__ import annotations

import hashlib
import os
import re
import socket
import subprocess
import sys
import threading

import numpy as np
import pytest
from helpers import log_of, read_tensors, self_signed_cert, wait_until

from nanopipe.cluster import slices
from nanopipe.cluster.net import accept, client_tls, listen, server_tls, welcome
from nanopipe.cluster.wire import Msg, recv_frame, send_frame
from nanopipe.safetensors_io import read_header, read_tensor, write_safetensors
from nanopipe.tools.from_leader import NothingThere, fetch_from_leader
from nanopipe.tools.localcluster import LocalCluster
from nanopipe.tools.pull import PullError, slice_path
from nanopipe.weights import SYNTHETIC_KEY, init_weights

TOKEN = "slice-test-secret"


def _unmarked(src: str, path: str) -> str:
    """The same tensors without the synthetic marker: a leader on real weights, as far as it can tell
    (on synthetic ones it tells workers to make them, not to fetch them)."""
    header = read_header(src)
    with open(src, "rb") as f:
        tensors = {name: read_tensor(f, info) for name, info in header.tensors.items()}
    meta = {k: v for k, v in header.metadata.items() if k not in (SYNTHETIC_KEY, "nanopipe_seed", "nanopipe_shape")}
    write_safetensors(path, tensors, meta)
    return path


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> str:
    """4 blocks of n_embd 128 (each ~0.8 MB): a worker's two blocks take several SLICE_DATA frames."""
    folder = tmp_path_factory.mktemp("served")
    init_weights(str(folder / "synthetic.safetensors"), n_layer=4, n_embd=128, n_head=4, n_ctx=64, seed=3)
    return _unmarked(str(folder / "synthetic.safetensors"), str(folder / "model.safetensors"))


class Node:
    """A listening node that answers role "weights" with `serve(sock, peer, hello)` (default: the real
    serve_slice on `own`), one connection at a time, in a thread."""

    def __init__(self, own: str | None = None, serve=None, filename: str = "model.safetensors", tls=None):
        self.tls = tls                  # (cert, key): the node listens with TLS, the fetch pins the cert
        self.srv = listen("127.0.0.1", 0)
        self.port = self.srv.getsockname()[1]
        self.logs: list = []
        self.serve = serve or (lambda sock, peer, hello: slices.serve_slice(
            sock, peer, hello, own, {"filename": filename}, self.logs.append))
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self):
        while True:
            try:
                sock, addr = self.srv.accept()
            except OSError:
                return
            try:
                sock, hello = accept(sock, peer=f"{addr[0]}:{addr[1]}", tls=self.tls and server_tls(*self.tls),
                                     token=TOKEN, roles=("weights",))
                self.serve(sock, f"{addr[0]}:{addr[1]}", hello)
            except Exception as e:        # the worker hung up mid-way: the next connection is served
                self.logs.append(f"closed: {type(e).__name__}: {e}")
            finally:
                sock.close()

    def fetch(self, folder, lo=2, hi=4, **kw):
        return fetch_from_leader("127.0.0.1", self.port, lo, hi, token=TOKEN, folder=str(folder),
                                 tls=self.tls and client_tls(self.tls[0]), log=self.logs.append, **kw)

    def close(self):
        self.srv.close()


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(slices, "CHUNK_BYTES", 64 * 1024)


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_the_slice_holds_exactly_its_blocks_byte_for_byte(tmp_path, model_file, small_chunks, tls):
    node = Node(model_file, tls=self_signed_cert(str(tmp_path)) if tls else None)
    try:
        path = node.fetch(tmp_path / "weights")
    finally:
        node.close()
    assert path == slice_path(str(tmp_path / "weights" / "model.safetensors"), 2, 4)
    assert os.listdir(tmp_path / "weights") == [os.path.basename(path)], "no .part or mark left behind"
    got, full = read_tensors(path), read_tensors(model_file)
    assert set(got) == {n for n in full if n.startswith(("h.2.", "h.3.")) and not n.endswith(".attn.bias")}
    for name, array in got.items():
        assert np.array_equal(array, full[name]), name          # the very bytes, copied
    meta = read_header(path).metadata
    assert meta["nanopipe_blocks"] == "2-3" and meta["n_layer"] == "4", meta
    sent = [line for line in node.logs if "Sending blocks 2-3" in line]
    assert len(sent) == 1 and "resuming" not in sent[0], node.logs


def test_a_part_resumes_and_a_flipped_byte_in_it_is_caught(tmp_path, model_file, small_chunks):
    folder = tmp_path / "weights"
    node = Node(model_file)
    try:
        whole = node.fetch(folder)
        data = open(whole, "rb").read()
        sha = hashlib.sha256(data).hexdigest()
        os.remove(whole)
        # half of it on disk, begun for these very bytes: only the rest crosses the wire
        part = whole + ".part"
        open(part, "wb").write(data[:len(data) // 2])
        open(part + ".sha256", "w").write(sha + "\n")
        node.logs.clear()
        assert node.fetch(folder) == whole and open(whole, "rb").read() == data
        received = [int(m.group(1)) for m in map(re.compile(r"Received (\d+) bytes").search, node.logs) if m]
        assert received == [len(data) - len(data) // 2], node.logs
        assert any(f"resuming at byte {len(data) // 2}" in line for line in node.logs), node.logs
        # the same half, one byte flipped: the sha256 catches it, the part is deleted and fetched from 0
        os.remove(whole)
        bad = bytearray(data[:len(data) // 2])
        bad[len(bad) // 2] ^= 0x01
        open(part, "wb").write(bytes(bad))
        open(part + ".sha256", "w").write(sha + "\n")
        node.logs.clear()
        assert node.fetch(folder) == whole and open(whole, "rb").read() == data
    finally:
        node.close()
    said = "\n".join(node.logs)
    assert re.search(r"its sha256 is [0-9a-f]{64}, not the [0-9a-f]{64} the leader .* computed", said), said
    assert "deleted it, fetching it again from byte 0" in said, said
    assert [int(m.group(1)) for m in re.finditer(r"Received (\d+) bytes", said)] == [len(data) - len(data) // 2,
                                                                                      len(data)], said


def test_a_node_without_those_blocks_says_so(tmp_path, model_file):
    node = Node(model_file)
    try:
        with pytest.raises(NothingThere, match=r"holds no file with blocks 2-5"):
            node.fetch(tmp_path / "weights", 2, 6)
    finally:
        node.close()
    assert not os.path.exists(tmp_path / "weights") or not os.listdir(tmp_path / "weights")


def test_join_leader_asks_the_leader_first_and_the_hub_only_when_it_has_nothing(tmp_path, model_file, monkeypatch):
    from httpserver import FileServer

    from nanopipe.tools.cli import leader_fetcher
    from nanopipe.weights import WeightsError
    monkeypatch.chdir(tmp_path)
    server = FileServer.serving({"/model.safetensors": model_file})
    src = {"name": "local", "url": server.url("/model.safetensors"), "filename": "model.safetensors"}
    full = os.path.join("weights", "model.safetensors")
    logs: list = []
    holder, empty = Node(model_file), Node(None)
    try:
        # the leader holds the blocks: they come from it, the hub is not asked
        path = leader_fetcher("127.0.0.1", holder.port, TOKEN, None, src, full, logs.append)(2, 4)
        assert path == slice_path(full, 2, 4) and server.requests == [], (server.requests, logs)
        os.remove(path)
        # a leader with nothing for that range says so, and the hub serves
        path = leader_fetcher("127.0.0.1", empty.port, TOKEN, None, src, full, logs.append)(2, 4)
        assert path == slice_path(full, 2, 4) and server.requests, logs
        said = "\n".join(logs)
        assert re.search(r"the leader holds no file with blocks 2-3 .*; downloading them from http://\S+ instead",
                         said), said
        os.remove(path)
        # ... and with no url either, the worker is told what to do
        with pytest.raises(WeightsError, match=r"holds no file with blocks 2-3 .*gives no url to download them "
                                               r"from; copy the weights file"):
            leader_fetcher("127.0.0.1", empty.port, TOKEN, None, {"filename": "model.safetensors"}, full,
                           logs.append)(2, 4)
    finally:
        holder.close()
        empty.close()
        server.stop()


def test_a_leader_with_nothing_names_its_workers_and_a_lying_one_is_passed_over(tmp_path, model_file, monkeypatch):
    """The leader holds no file with blocks 2..3 and names three peers: the asker itself (not asked),
    one that lies (more bytes than it announced: refused, said, and the next one asked), one that
    holds them. Entries that are not peers are left out. The hub is never asked."""
    from httpserver import FileServer

    from nanopipe.tools.cli import leader_fetcher
    from nanopipe.tools.from_leader import named_peers
    monkeypatch.chdir(tmp_path)
    server = FileServer.serving({"/model.safetensors": model_file})
    src = {"name": "local", "url": server.url("/model.safetensors"), "filename": "model.safetensors"}
    full = os.path.join("weights", "model.safetensors")
    liar, holder = Node(serve=_liar(model_file, extra=b"more")), Node(model_file, filename="elsewhere.safetensors")
    named = [{"rank": 3, "ip": "127.0.0.1", "port": 1}, {"rank": 1, "ip": "127.0.0.1", "port": liar.port},
             {"rank": "x", "ip": 5}, "junk", {"rank": 2, "ip": "127.0.0.1", "port": holder.port}]
    leader = Node(serve=lambda sock, peer, hello: slices.serve_slice(sock, peer, hello, None, None, leader.logs.append,
                                                                     peers=lambda: named))
    logs: list = []
    try:
        assert named_peers(named) == [(3, "127.0.0.1", 1), (1, "127.0.0.1", liar.port), (2, "127.0.0.1", holder.port)]
        path = leader_fetcher("127.0.0.1", leader.port, TOKEN, None, src, full, logs.append, rank=3)(2, 4)
    finally:
        for n in (liar, holder, leader):
            n.close()
        server.stop()
    said = "\n".join(logs)
    assert path == slice_path(full, 2, 4) and server.requests == [], (server.requests, said)
    assert "the leader holds no file with blocks 2-3" in said and "asking the workers it names" in said, said
    assert re.search(r"Not from worker 1 at 127\.0\.0\.1:\d+: refusing what worker 1 .* more bytes than", said), said
    assert re.search(r"Got blocks 2-3 from worker 2 at 127\.0\.0\.1:\d+", said), said
    assert ":1:" not in said and "worker 3" not in said, said          # itself: not asked
    with open(path, "rb") as got, open(_cut_to_file(model_file, str(tmp_path / "want"), 2, 4), "rb") as want:
        assert got.read() == want.read(), "the slice is not the holder's bytes"


def _liar(path, filename="model.safetensors", size_delta=0, sha=None, extra=b"", trailing=b""):
    """A node that serves the real slice of blocks 2..3 of `path`, with one lie told."""
    def serve(sock, peer, hello):
        welcome(sock, hello)
        ask = recv_frame(sock, "worker")
        assert ask.msg is Msg.SLICE_ASK
        s = slices.cut(path, 2, 4)
        data = b"".join(s.pieces(0)) + trailing
        send_frame(sock, Msg.SLICE_INFO, {"filename": filename, "size": len(data) + size_delta,
                                          "sha256": sha or hashlib.sha256(data).hexdigest()})
        start = recv_frame(sock, "worker")
        offset = start.meta["offset"]
        send_frame(sock, Msg.SLICE_DATA, {"offset": offset}, data[offset:] + extra)
    return serve


@pytest.mark.parametrize("lie, said", [
    (dict(filename="../../outside.safetensors"), r"refusing what the leader .* sent: the weights file name .* "
                                                  r"holds a path separator"),
    (dict(filename="/tmp/outside.safetensors"), r"holds a path separator"),
    (dict(sha="0" * 64), r"not the 0{64} the leader .* computed .*, twice: the file was deleted"),
    (dict(sha="not a checksum"), r"sha256 'not a checksum' is not 64 hex digits"),
    (dict(extra=b"more"), r"more bytes than the \d+ it announced"),
    (dict(trailing=b"\0" * 16), r"it announced \d+ bytes but the file's own header says \d+; deleted it"),
    (dict(size_delta=-1000), r"more bytes than the \d+ it announced"),
])
def test_a_lying_node_is_refused_and_nothing_is_written_outside_weights(tmp_path, model_file, lie, said):
    work = tmp_path / "work"
    work.mkdir()
    before = sorted(os.listdir(tmp_path))
    node = Node(serve=_liar(model_file, **lie))
    try:
        with pytest.raises(PullError, match=said):
            node.fetch(work / "weights")
    finally:
        node.close()
    assert sorted(os.listdir(tmp_path)) == before and not os.path.exists("/tmp/outside.safetensors")
    left = os.listdir(work / "weights") if os.path.exists(work / "weights") else []
    assert not [f for f in left if not f.endswith((".part", ".sha256"))], left      # nothing renamed into place
    if "sha" in lie or "trailing" in lie:
        assert left == [], left                     # a part that failed its check is deleted


def test_a_wrong_token_gets_nothing(tmp_path, model_file):
    node = Node(model_file)
    try:
        with pytest.raises(PullError, match=r"cannot fetch blocks 2-3 from the leader .*(secret|auth)"):
            fetch_from_leader("127.0.0.1", node.port, 2, 4, token="wrong", folder=str(tmp_path / "weights"),
                              log=node.logs.append)
    finally:
        node.close()
    assert not [line for line in node.logs if "Sending" in line], node.logs


# ---------------------------------------------------------------------------------------------
# real processes: `nanopipe join --leader` on a bare worker, through a proxy that can cut the transfer


class CuttingProxy:
    """A TCP proxy in front of the leader. The first connection that asks for role "weights" is cut
    once the leader has sent `cut_at` bytes on it; with `hold`, the next connections wait until
    release() (the test changes the .part meanwhile). `weights_bytes`: leader->worker bytes of each
    weights connection, in order."""

    def __init__(self, upstream: tuple, cut_at: int, hold: bool = False):
        self.upstream, self.cut_at = upstream, cut_at
        self.srv = listen("127.0.0.1", 0)
        self.port = self.srv.getsockname()[1]
        self.cut = threading.Event()
        self.released = threading.Event()
        if not hold:
            self.released.set()
        self.weights_bytes: list = []
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self):
        while True:
            try:
                down, _ = self.srv.accept()
            except OSError:
                return
            threading.Thread(target=self._conn, args=(down,), daemon=True).start()

    def _conn(self, down):
        if self.cut.is_set():
            self.released.wait(30)
        up = socket.create_connection(self.upstream)
        state = {"weights": False, "index": None}

        def worker_to_leader():
            seen = b""
            while (data := _recv(down)):
                seen = (seen + data)[-4096:]
                if not state["weights"] and b'"role":"weights"' in seen:
                    state["weights"], state["index"] = True, len(self.weights_bytes)
                    self.weights_bytes.append(0)
                up.sendall(data)
            _close(up, down)

        def leader_to_worker():
            while (data := _recv(up)):
                if state["weights"]:
                    i = state["index"]
                    if not self.cut.is_set() and self.weights_bytes[i] + len(data) >= self.cut_at:
                        data = data[:self.cut_at - self.weights_bytes[i]]
                        down.sendall(data)
                        self.weights_bytes[i] += len(data)
                        self.cut.set()
                        break
                    self.weights_bytes[i] += len(data)
                down.sendall(data)
            _close(up, down)

        threading.Thread(target=worker_to_leader, daemon=True).start()
        leader_to_worker()

    def close(self):
        self.srv.close()


def _recv(sock) -> bytes:
    try:
        return sock.recv(65536)
    except OSError:
        return b""


def _close(*socks):
    for s in socks:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        s.close()


class JoinThroughProxy(LocalCluster):
    """Rank 0 as usual; workers as `nanopipe join --leader PROXY` in a folder with no configs and an
    empty weights/, while model_weights.yaml's url refuses every connection."""

    proxy_port = None

    def command(self, rank: int) -> list:
        if rank == 0:
            return super().command(0)
        return [sys.executable, "-m", "nanopipe", "join", "--leader", f"127.0.0.1:{self.proxy_port}",
                "--config-dir", os.path.join(self.workdir, "no-configs-here")]


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.mark.parametrize("flip", [False, True], ids=["cut-and-resume", "cut-flip-a-byte-resume"])
def test_a_bare_worker_joins_through_the_leader_and_resumes_a_cut_transfer(tmp_path, model_file, flip):
    from nanopipe.decoding import SamplingParams
    from nanopipe.engine import Engine
    work = tmp_path / "node"
    (work / "weights").mkdir(parents=True)
    cl = JoinThroughProxy(model_file, nodes=2, workdir=str(work), ready_timeout=120,
                          weights_url=f"http://127.0.0.1:{_closed_port()}/model.safetensors")
    total = slices.cut(model_file, 2, 4).size
    proxy = CuttingProxy(("127.0.0.1", cl.cluster["port"]), cut_at=total // 2, hold=flip)
    cl.proxy_port = proxy.port
    part = slice_path(str(work / "weights" / "model.safetensors"), 2, 4) + ".part"
    params = SamplingParams("greedy", max_tokens=8)
    prompt = [15496, 995, 11, 616]
    try:
        if flip:
            cl.start_rank(0)
            cl.wait_leader()
            cl.start_rank(1)
            wait_until("the transfer cut half-way", proxy.cut.is_set, 90, detail=lambda: cl.logs())
            wait_until("the cut part on disk", lambda: os.path.exists(part) and os.path.getsize(part) > 0, 30)
            with open(part, "r+b") as f:        # one byte changed on disk while the transfer is cut
                f.seek(os.path.getsize(part) // 2)
                b = f.read(1)
                f.seek(-1, os.SEEK_CUR)
                f.write(bytes([b[0] ^ 0x40]))
            proxy.released.set()
            cl.wait_ready(120)
        else:
            cl.start()
        with cl.client(timeout=60) as c:
            got = c.generate(prompt, params)["token_ids"]
        log = log_of(cl, 1)
    finally:
        cl.stop()
        proxy.close()
    assert got == Engine.load(model_file).generate(list(prompt), params)["token_ids"], "cluster == one process"
    assert proxy.cut.is_set(), log
    assert "broke off" in log and "resuming" in log, log
    assert "Downloading" not in log and "cannot reach" not in log, log
    assert proxy.weights_bytes[0] < total, proxy.weights_bytes
    if not flip:
        # the second connection carried the rest, not the whole slice again
        assert len(proxy.weights_bytes) == 2 and proxy.weights_bytes[1] < total, proxy.weights_bytes
        assert re.search(r"resuming at byte [1-9]\d*", log), log
    else:
        assert re.search(r"its sha256 is [0-9a-f]{64}, not the [0-9a-f]{64} the leader .* computed", log), log
        assert "deleted it, fetching it again from byte 0" in log, log
        assert len(proxy.weights_bytes) == 3 and proxy.weights_bytes[2] >= total, proxy.weights_bytes
    assert sorted(os.listdir(work / "weights")) == ["model.layers-2-3.safetensors"], os.listdir(work / "weights")


# ---------------------------------------------------------------------------------------------
# real processes: a worker serves the blocks it holds, when the leader holds no file with them


def _leader_slice(src: str, path: str, hi: int) -> str:
    """Rank 0's own slice of `src` (blocks 0..hi-1, the embeddings and the head), as a leader that
    downloaded only its share holds: no other block is in it, nor in its weights/ folder."""
    from nanopipe import gpt2_tensors as gt
    from nanopipe.weights import slice_metadata
    header = read_header(src)
    with open(src, "rb") as f:
        tensors = {n: read_tensor(f, t) for n, t in header.tensors.items() if gt.stage_needs(n, 0, hi, rank0=True)}
    write_safetensors(path, tensors, slice_metadata(header, "test", 0, hi))
    return path


def _cut_to_file(src: str, path: str, lo: int, hi: int) -> str:
    """The slice file of blocks lo..hi-1 a node would send, written whole (a worker's slice on disk)."""
    with open(path, "wb") as f:
        for piece in slices.cut(src, lo, hi).pieces(0):
            f.write(piece)
    return path


class FilesPerRank(LocalCluster):
    """Rank 0 on its own slice, rank 1 on its own slice (`files`: {rank: path}); rank 2, started by
    the test, is a bare `nanopipe join --leader` in a folder of its own."""

    files: dict = {}

    def command(self, rank: int) -> list:
        cmd = super().command(rank)
        at = cmd.index("--weights")
        return cmd[:at + 1] + [self.files[rank]] + cmd[at + 2:]


def _ask(port: int, frames: list, token: str = TOKEN) -> list:
    """Dial a node's port with role "weights", send `frames` ((msg, meta) each, the next once the
    previous is answered) and return what came back: [(msg name, meta)], "closed" where it hung up."""
    from nanopipe.cluster.net import dial
    from nanopipe.cluster.wire import ConnectionClosed
    sock, _, _ = dial("127.0.0.1", port, role="weights", token=token, attempts=3, who="node")
    got = []
    try:
        sock.settimeout(60)
        for msg, meta in frames:
            send_frame(sock, msg, meta)
            try:
                f = recv_frame(sock, "node", max_payload=slices.MAX_CHUNK_BYTES)
                got.append((f.msg.name, {k: v for k, v in f.meta.items() if k != "message"}))
            except (ConnectionClosed, OSError):
                got.append("closed")
                break
    finally:
        sock.close()
    return got


def test_a_worker_serves_its_blocks_when_the_leader_holds_none(tmp_path, model_file):
    """Ranks 0 and 1 each hold only their own slice (0-1 and 2-3); rank 2, configured but absent,
    joins with `nanopipe join --leader` on a bare machine (empty weights/, the url unreachable). The
    re-plan gives it block 3: the leader holds no file with it and names its workers; rank 1's slice
    file holds it, and rank 1 sends it from its data port. The answer equals one process's. Then the
    same bad asks go to the leader and to rank 1, and both refuse them the same way."""
    from nanopipe.decoding import SamplingParams
    from nanopipe.engine import Engine
    srcs = tmp_path / "files"
    srcs.mkdir()
    cl = FilesPerRank(model_file, nodes=3, workdir=str(tmp_path / "cluster"), ready_timeout=120,
                      env={"NANOPIPE_TOKEN": TOKEN}, cluster_extra={"rejoin_grace_s": 10, "heartbeat_s": 0.2},
                      weights_url=f"http://127.0.0.1:{_closed_port()}/model.safetensors")
    cl.files = {0: _leader_slice(model_file, str(srcs / "leader.safetensors"), 2),
                1: _cut_to_file(model_file, str(srcs / "rank1.safetensors"), 2, 4)}
    bare = tmp_path / "bare"
    (bare / "weights").mkdir(parents=True)
    params = SamplingParams("greedy", max_tokens=8)
    prompt = [15496, 995, 11, 616]
    try:
        cl.start_rank(0)
        cl.wait_leader()
        cl.start_rank(1)
        # (the grace is long enough for rank 1 to start on a loaded machine: rank 0 cannot hold blocks 2-3)
        wait_until("rank 2 gone and the ring 0 -> 1 up", lambda: "Re-planned (rank 2 (node2) is gone)" in log_of(cl, 0),
                   120, detail=cl.logs)
        with open(cl.log_path(2), "ab") as out:
            cl.procs[2] = subprocess.Popen([sys.executable, "-m", "nanopipe", "join", "--leader", cl.leader_addr,
                                            "--config-dir", str(bare / "no-configs-here")], stdout=out,
                                           stderr=subprocess.STDOUT, env=cl.env, cwd=str(bare))
        wait_until("the re-plan over three", lambda: "Re-planned (rank 2 (node2) joined)" in log_of(cl, 0), 120,
                   detail=cl.logs)
        with cl.client(timeout=60) as c:
            got = c.generate(prompt, params)["token_ids"]
        log2, log1, log0 = log_of(cl, 2), log_of(cl, 1), log_of(cl, 0)
        rank1_port = cl.cluster["workers"][0]["port"]
        bad = {     # each node asked for blocks it holds (the leader 0-1, rank 1 2-3), then wrongly
            "layers backwards": lambda held: [(Msg.SLICE_ASK, {"layers": [3, 1]})],
            "layers not numbers": lambda held: [(Msg.SLICE_ASK, {"layers": ["a", "b"]})],
            "not an ask": lambda held: [(Msg.PING, {})],
            "offset past the end": lambda held: [(Msg.SLICE_ASK, {"layers": held}),
                                                 (Msg.SLICE_FROM, {"offset": 10**12})],
            "negative offset": lambda held: [(Msg.SLICE_ASK, {"layers": held}), (Msg.SLICE_FROM, {"offset": -1})],
            "no SLICE_FROM": lambda held: [(Msg.SLICE_ASK, {"layers": held}), (Msg.PING, {})],
        }
        answers = {what: (_ask(cl.cluster["port"], frames([0, 2])), _ask(rank1_port, frames([2, 4])))
                   for what, frames in bad.items()}
        nothing = (_ask(cl.cluster["port"], [(Msg.SLICE_ASK, {"layers": [0, 4]})]),
                   _ask(rank1_port, [(Msg.SLICE_ASK, {"layers": [0, 4]})]))
        from nanopipe.cluster.net import HandshakeError
        for port in (cl.cluster["port"], rank1_port):
            with pytest.raises(HandshakeError):
                _ask(port, [(Msg.SLICE_ASK, {"layers": [2, 4]})], token="wrong")
        after = log_of(cl, 1)
    finally:
        cl.stop()
    assert got == Engine.load(model_file).generate(list(prompt), params)["token_ids"], "cluster == one process"
    assert re.search(r"Got blocks 3-3 from worker 1 at 127\.0\.0\.1:\d+ \(the leader holds no file", log2), log2
    assert "holds no file with blocks 3-3" in log2 and "Downloading" not in log2, log2
    assert "Sending blocks 3-3 to the worker at" in log1 and "Sent blocks 3-3" in log1, log1
    assert "Sending" not in log0, log0
    # stored under the model's name, as a slice from the leader is (rank 1's file is named otherwise)
    assert sorted(os.listdir(bare / "weights")) == ["model.layers-3-3.safetensors"], os.listdir(bare / "weights")
    for what, (leader, worker) in answers.items():
        kinds = [x if x == "closed" else x[0] for x in leader], [x if x == "closed" else x[0] for x in worker]
        assert kinds[0] == kinds[1] and leader[-1] == "closed", (what, leader, worker)
    assert nothing[0][0][0] == nothing[1][0][0] == "ERROR", nothing
    assert nothing[0][0][1]["code"] == nothing[1][0][1]["code"] == "no_slice", nothing
    assert [p["rank"] for p in nothing[0][0][1]["peers"]] == [1, 2], nothing      # the leader names its workers
    assert "SLICE_ASK needs \"layers\": [lo, hi]" in after and "expected SLICE_FROM" in after, after
