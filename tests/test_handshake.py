"""The handshake proves the token both ways, and a file name from outside never leaves weights/.

    dialer with the token, listener without it          -> the dialer refuses the listener
    `join --leader` to a fake leader that lacks the token -> refused, nothing fetched, exit non-zero
    a leader (with the token) enrolling "../../escape/x"  -> refused, nothing written outside weights/
    no token anywhere                                     -> works as before (and proves nothing)
"""
from __future__ import annotations

import hashlib
import hmac
import os
import socket
import subprocess
import sys
import threading

import pytest

from nanopipe.cluster.net import HandshakeError, accept, dial, welcome
from nanopipe.cluster.wire import (
    Msg,
    acceptor_proof,
    acceptor_proof_ok,
    auth_proof,
    make_nonce,
    proof_ok,
    recv_frame,
    send_frame,
)
from nanopipe.config import ConfigError, weights_file

TOKEN = "handshake secret"


# ---------------------------------------------------------------------------------------------
# the proofs


def test_acceptor_proof_is_the_documented_hmac():
    a, b = make_nonce(), make_nonce()
    expected = hmac.new(TOKEN.encode(), b"nanopipe-acceptor" + bytes.fromhex(a) + bytes.fromhex(b),
                        hashlib.sha256).hexdigest()
    assert acceptor_proof(TOKEN, a, b) == expected
    assert acceptor_proof_ok(TOKEN, a, b, expected)
    assert not acceptor_proof_ok(TOKEN, a, make_nonce(), expected)        # another dialer's nonce: replay fails
    assert not acceptor_proof_ok(TOKEN, a, b, acceptor_proof("other", a, b))
    assert not acceptor_proof_ok(TOKEN, a, b, auth_proof(TOKEN, a))       # the dialer's proof is not the answer
    assert not acceptor_proof_ok(TOKEN, a, b, None)
    assert acceptor_proof(None, a, b) is None and acceptor_proof_ok(None, a, b, None)


@pytest.mark.parametrize("proof", ["é" * 64, "\ud800", "ab" * 31 + "é", 7, ["ab"], None])
def test_a_proof_that_is_not_ascii_hex_is_simply_wrong(proof):
    """hmac.compare_digest raises TypeError on a non-ASCII str: that must be a failed check, not a crash."""
    nonce = make_nonce()
    assert proof_ok(TOKEN, nonce, proof) is False
    assert acceptor_proof_ok(TOKEN, nonce, make_nonce(), proof) is False


def test_a_dialer_signs_only_a_nonce_never_an_answer():
    """A fake listener that sends the acceptor's message as its 'nonce' gets no signature of it."""
    a, b = make_nonce(), make_nonce()
    forged = (b"nanopipe-acceptor" + bytes.fromhex(a) + bytes.fromhex(b)).hex()
    with pytest.raises(Exception, match="not 64 hex digits"):
        auth_proof(TOKEN, forged)


# ---------------------------------------------------------------------------------------------
# dial / accept in one process


def listener(token, reply=None):
    """A one-connection listener running nanopipe's accept(); returns (port, box) where box gets the HELLO."""
    srv = socket.create_server(("127.0.0.1", 0))
    box = {}

    def serve():
        conn, addr = srv.accept()
        srv.close()
        try:
            sock, hello = accept(conn, peer="dialer", tls=None, token=token, roles=("client",))
            box["hello"] = hello
            (reply or welcome)(sock, hello, {"model": "m"})
            recv_frame(sock, "dialer")          # until the dialer hangs up
        except Exception as e:
            box["error"] = e
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    box["thread"] = t
    return srv.getsockname()[1], box


def test_both_sides_prove_the_token():
    port, box = listener(TOKEN)
    sock, _, meta = dial("127.0.0.1", port, role="client", token=TOKEN)
    sock.close()
    box["thread"].join(5)
    assert meta["model"] == "m" and meta["proof"] == box["hello"].answer is not None


def test_a_listener_without_the_token_is_refused():
    """The listener has no token, so it accepts anyone and cannot answer: the dialer must not trust it."""
    port, box = listener(None)
    with pytest.raises(HandshakeError, match="did not prove that it knows the cluster secret"):
        dial("127.0.0.1", port, role="client", token=TOKEN)


def test_a_listener_with_a_wrong_answer_is_refused():
    def forged(sock, hello, meta):
        send_frame(sock, Msg.WELCOME, {**meta, "proof": acceptor_proof("guessed", make_nonce(), hello["nonce"])})
    port, box = listener(None, reply=forged)
    with pytest.raises(HandshakeError, match="did not prove"):
        dial("127.0.0.1", port, role="client", token=TOKEN)


def test_without_a_token_nothing_is_proven_and_everything_passes():
    port, box = listener(None)
    sock, _, meta = dial("127.0.0.1", port, role="client", token=None)
    sock.close()
    assert meta == {"model": "m"}           # no proof: there is nothing to prove with


def test_a_dialer_without_the_token_is_rejected():
    port, box = listener(TOKEN)
    with pytest.raises(HandshakeError, match="authentication failed"):
        dial("127.0.0.1", port, role="client", token=None)


# ---------------------------------------------------------------------------------------------
# file names from outside


@pytest.mark.parametrize("name", ["../../escape/evil.safetensors", "/etc/evil.safetensors", "", ".", "..",
                                  "a\0b.safetensors", "..\\..\\evil.safetensors", "C:evil.safetensors",
                                  "sub/gpt2.safetensors", "evil\n.safetensors", "x" * 256, None, 7, ["a"]])
def test_a_file_name_from_outside_must_be_plain(name):
    with pytest.raises(ConfigError, match="must be|holds|is a directory|is longer"):
        weights_file(name)


def test_a_plain_file_name_lands_in_the_weights_folder():
    assert weights_file("gpt2.safetensors") == os.path.join("weights", "gpt2.safetensors")
    assert weights_file("model-v1.2.safetensors", "w") == os.path.join("w", "model-v1.2.safetensors")


def test_model_weights_yaml_with_a_path_for_filename_is_refused(tmp_path):
    from nanopipe.config import load_weights_config
    (tmp_path / "model_weights.yaml").write_text(
        "gpt2:\n  url: https://example.invalid/m.safetensors\n  filename: ../../escape/evil.safetensors\n")
    with pytest.raises(ConfigError, match=r"'filename'.*holds a path separator"):
        load_weights_config(str(tmp_path), "gpt2")


# ---------------------------------------------------------------------------------------------
# `nanopipe join --leader` against a fake leader, as real processes


EVIL = "../../escape/evil.safetensors"


class FakeLeader:
    """A socket server that speaks just enough of the leader's side to enrol a worker, then register
    it with layers 2..3 of a tiny model, so the worker goes on to fetch its weights.

    `knows_token`: answers with the proof a real leader gives (as docs/PROTOCOL.md says to compute
    it), else with none; `filename`: the weights file name it hands out; `cluster`: fields that replace
    those of the cluster it sends (ClusterConfig.to_wire's form)."""

    def __init__(self, knows_token: bool, filename: str, cluster: dict | None = None):
        self.knows_token, self.filename, self.cluster = knows_token, filename, cluster or {}
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.port = self.srv.getsockname()[1]
        self.hellos, self.errors = [], []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.srv.accept()
            except OSError:
                return
            threading.Thread(target=self._conn, args=(conn,), daemon=True).start()

    def _conn(self, conn):
        with conn:
            try:
                nonce = make_nonce()
                send_frame(conn, Msg.CHALLENGE, {"nonce": nonce, "version": 1})
                hello = recv_frame(conn, "worker").meta
                self.hellos.append(hello)
                proof = None
                if self.knows_token:
                    assert hmac.compare_digest(hello["proof"], auth_proof(TOKEN, nonce))
                if self.knows_token and "nonce" in hello:       # (a dialer of an older version sends none)
                    proof = hmac.new(TOKEN.encode(), b"nanopipe-acceptor" + bytes.fromhex(nonce)
                                     + bytes.fromhex(hello["nonce"]), hashlib.sha256).hexdigest()
                if hello.get("enrol"):
                    cluster = {"nodes": [[0, "lead", "127.0.0.1", self.port], [1, "w1", "127.0.0.1", 9]],
                               "port": self.port, "bind": None, "max_sessions": 4, "heartbeat_s": 1.0,
                               "rejoin_grace_s": 10.0, **self.cluster}
                    send_frame(conn, Msg.WELCOME, {"proof": proof, "enrol": {
                        "rank": 1, "host": "w1", "cluster": cluster, "model": "local", "n_head": 4,
                        "weights": {"name": "local", "url": "http://127.0.0.1:9/m.safetensors",
                                    "filename": self.filename, "sha256": None}}})
                    return
                send_frame(conn, Msg.WELCOME, {"proof": proof, "rank": 1, "n_layer": 4, "n_head": 4, "n_embd": 64,
                                               "n_ctx": 128, "n_vocab": 50257, "model": "local", "heartbeat_s": 1.0,
                                               "layers": [2, 4], "next": ["127.0.0.1", self.port], "next_rank": 0,
                                               "prev_rank": 0})
                while True:
                    frame = recv_frame(conn, "worker")
                    if frame.msg is Msg.ERROR:
                        self.errors.append(frame.meta.get("message"))
            except Exception:
                return

    def close(self):
        self.srv.close()


def join_fake(fake: FakeLeader, tmp_path):
    node = tmp_path / "node"
    (node / "configs").mkdir(parents=True)        # no cluster_config.yaml: the secret is NANOPIPE_TOKEN
    return subprocess.run([sys.executable, "-m", "nanopipe", "join", "--leader", f"127.0.0.1:{fake.port}",
                           "--config-dir", str(node / "configs")], capture_output=True, text=True, cwd=str(node),
                          timeout=90, env=dict(os.environ, NANOPIPE_TOKEN=TOKEN, PYTHONUNBUFFERED="1"))


def files_under(root) -> list:
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def test_join_refuses_a_fake_leader_without_the_token(tmp_path):
    fake = FakeLeader(knows_token=False, filename="local.safetensors")
    try:
        r = join_fake(fake, tmp_path)
    finally:
        fake.close()
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert "did not prove that it knows the cluster secret" in out and "Traceback" not in out, out
    assert len(fake.hellos) == 1, f"the worker came back to register with a leader it should not trust:\n{out}"
    assert not os.path.exists(tmp_path / "node" / "weights"), files_under(tmp_path)


def test_a_weights_name_from_the_leader_never_leaves_weights(tmp_path):
    fake = FakeLeader(knows_token=True, filename=EVIL)
    try:
        r = join_fake(fake, tmp_path)
    finally:
        fake.close()
    out = r.stdout + r.stderr
    assert not os.path.exists(tmp_path / "escape"), f"wrote outside weights/: {files_under(tmp_path)}\n{out}"
    assert all(f.startswith(os.path.join("node", "configs")) or f.startswith(os.path.join("node", "weights"))
               for f in files_under(tmp_path)), files_under(tmp_path)
    assert r.returncode != 0, out
    assert repr(EVIL) in out and "holds a path separator" in out and "Traceback" not in out, out



@pytest.mark.parametrize("field, value, says", [
    ("heartbeat_s", "1s", "the leader at 127.0.0.1:PORT: key 'heartbeat_s' must be int or float, got '1s'"),
    ("nodes", [[0, "lead", "127.0.0.1", 0]], "the leader at 127.0.0.1:PORT: nodes[0]: 'port' must be between 1 and "
                                             "65535, got 0"),
    ("max_sesions", 4, "the leader at 127.0.0.1:PORT: unknown key 'max_sesions' (did you mean 'max_sessions'?)"),
])
def test_a_cluster_the_leader_sends_is_checked_naming_the_field(tmp_path, field, value, says):
    """The cluster a leader enrols a worker with is read back by ClusterConfig.from_wire: a bad field
    is one line naming the leader and the field, not a traceback, and nothing is downloaded."""
    fake = FakeLeader(knows_token=True, filename="local.safetensors", cluster={field: value})
    try:
        r = join_fake(fake, tmp_path)
    finally:
        fake.close()
    out = r.stdout + r.stderr
    assert r.returncode == 1 and "Traceback" not in out, out
    assert says.replace("PORT", str(fake.port)) in out and "Run the same version on every node" in out, out
    assert not os.path.exists(tmp_path / "node" / "weights"), files_under(tmp_path)
