"""Connections between nodes: listen, accept, dial with backoff, and the handshake every connection makes.

    peer dials  ->  listener sends CHALLENGE {nonce A}
                <-  peer sends HELLO {role, rank, version, proof = HMAC(token, A), nonce B}
    listener checks version and proof, then answers by role: WELCOME {..., proof = HMAC(token,
    "nanopipe-acceptor" + A + B)} or REJECT; the peer checks WELCOME's proof before it trusts a word.

Nothing about a prompt, a token or an activation is sent before the proofs check out, and with a
token each side has proved to the other that it knows it (wire.py's auth_proof, acceptor_proof).

Without an auth_token every proof passes: anyone who can reach a port can join as a worker, open
a data link as rank r-1 and feed (or read) activations, or generate; and a worker trusts whatever
answers at the leader's address. That is fine on a private network of your own machines only; the
leader says so at start. With a token, a stranger gets the CHALLENGE, then a REJECT, and nothing
else, and a node that dials a stranger refuses it.

A listening port serves through `serve_accepts`: running out of file descriptors (EMFILE) or a
connection aborted before accept() only pauses it; a connection gets HANDSHAKE_TIMEOUT_S in all to
finish the handshake, and at most MAX_PENDING_HANDSHAKES may be in it at once.
"""
from __future__ import annotations

import errno
import logging
import select
import socket
import ssl
import struct
import threading
import time

from .wire import (
    PROTOCOL_VERSION,
    ConnectionClosed,
    Msg,
    ProtocolError,
    WireError,
    acceptor_proof,
    acceptor_proof_ok,
    auth_proof,
    is_nonce,
    make_nonce,
    proof_ok,
    recv_frame,
    send_frame,
)

HANDSHAKE_TIMEOUT_S = 10.0     # a dialer's bound on connect + handshake; a listener's on the whole handshake
MAX_PENDING_HANDSHAKES = 64    # connections a port holds in the handshake at once; more are closed at once


class HandshakeError(WireError):
    """The peer failed the handshake (wrong secret, wrong version, wrong role); named in the message.
    `code` is "auth" when the secret was wrong (REJECT's `code`), else None."""

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        self.code = code


class HttpPeer(HandshakeError):
    """The peer is an HTTP server (the web app's port, say), not a nanopipe node."""


# A nanopipe node speaks first (CHALLENGE) within milliseconds of a connect; an HTTP server waits for
# the request. After this long without a byte, `dial(..., sniff_http=True)` asks the port over a
# second connection whether it talks HTTP, instead of waiting out the handshake timeout.
SNIFF_AFTER_S = 1.0


def _readable(sock, timeout: float) -> bool:
    """True once sock has bytes (or is closed) to read, False after timeout seconds of silence."""
    if hasattr(select, "poll"):         # select.select fails on descriptors >= 1024
        p = select.poll()
        p.register(sock.fileno(), select.POLLIN)
        return bool(p.poll(int(timeout * 1000)))
    return bool(select.select([sock], [], [], timeout)[0])


def http_status(host: str, port: int, timeout: float = 2.0) -> str | None:
    """The status line if an HTTP server answers at host:port ("HTTP/1.1 200 OK"), else None.

    Sends `HEAD / HTTP/1.0` only if the port says nothing first: a nanopipe node sends its
    CHALLENGE at once and is left alone."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(0.5)
            try:
                if s.recv(1):
                    return None
            except socket.timeout:
                pass
            s.settimeout(timeout)
            s.sendall(b"HEAD / HTTP/1.0\r\nHost: nanopipe-probe\r\n\r\n")
            reply = s.recv(256)
    except OSError:
        return None
    return reply.split(b"\r\n", 1)[0].decode("latin-1") if reply.startswith(b"HTTP/") else None


def parse_addr(addr: str, default_port: int | None = None) -> tuple:
    """'10.0.0.1:65432' -> ('10.0.0.1', 65432)."""
    host, _, port = addr.rpartition(":")
    if not host:
        if default_port is None:
            raise ValueError(f"address {addr!r} must be HOST:PORT")
        return addr, default_port
    try:
        return host, int(port)
    except ValueError:
        raise ValueError(f"address {addr!r} must be HOST:PORT with a numeric port") from None


def listen(host: str, port: int, backlog: int = 64) -> socket.socket:
    srv = bind(host, port)
    srv.listen(backlog)
    return srv


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port but not yet listening: the port is ours (a second nanopipe on it
    fails here, at once), while a peer that dials it meanwhile is refused and retries. `serve`
    binds before it spends minutes loading weights and measuring, then listens (`listen_on`)."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        srv.bind((host, port))
    except OSError as e:
        srv.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}; is another nanopipe running, or "
                      "is the port taken? Change 'port' in cluster_config.yaml") from None
    return srv


def listen_on(srv: socket.socket, backlog: int = 64) -> socket.socket:
    """Start listening on a socket from `bind`; fails like `listen` if another listener got there first."""
    host, port = srv.getsockname()[:2]
    try:
        srv.listen(backlog)
    except OSError as e:
        srv.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}; is another nanopipe running, or "
                      "is the port taken? Change 'port' in cluster_config.yaml") from None
    return srv


def max_act_bytes(config, max_sessions: int) -> int:
    """The largest ACT payload a data link accepts: every session's whole context at once,
    max_sessions * n_ctx rows of n_embd float32s. gpt2-small with 16 sessions: 16 * 1024 * 768 * 4
    = 48 MiB. A header claiming more is refused before anything is allocated."""
    return max_sessions * config.n_ctx * config.n_embd * 4


KEEPALIVE = {"TCP_KEEPIDLE": 10, "TCP_KEEPINTVL": 5, "TCP_KEEPCNT": 3}   # a vanished peer is noticed in ~25 s


def tune(sock: socket.socket):
    """Activations are small and latency-bound: send each frame at once. And probe idle links: a
    side that only listens (a worker waiting for its leader, a client waiting for tokens) would
    otherwise wait forever for a peer whose machine lost power, as no FIN or RST ever comes."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in KEEPALIVE.items():
        if hasattr(socket, name):                 # Linux; other systems keep their defaults
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


def close_now(sock):
    """Close a socket that another thread may be blocked on: shutdown() wakes that thread at once
    (close() alone would leave it waiting for a peer that may be behind a cut cable)."""
    if sock is None:
        return
    for op in (lambda: sock.shutdown(socket.SHUT_RDWR), sock.close):
        try:
            op()
        except OSError:
            pass


class TLSStream:
    """A TLS connection that several threads may use at once, like a plain socket.

    Our links are full duplex across threads: a worker's heartbeat thread writes STATS while its
    main thread waits in recv on the same connection; the leader sends STATUS to a worker whose
    thread is reading it; a client's sender thread streams tokens while its reader waits for the
    next request. A plain socket allows that. An SSL object does not: OpenSSL forbids two threads
    in one SSL at a time and CPython's ssl module does not serialize them (cpython#151508), so a
    blocked SSL_read racing an SSL_write corrupts the heap (CI saw the leader die with `free():
    corrupted unsorted chunks`).

    So the SSL object runs non-blocking and every call into it holds one lock, which is never held
    while waiting: a thread that must wait for the socket releases the lock and polls the fd.

        reader: [lock] SSL_read -> want read [unlock]  poll(readable) ...  [lock] SSL_read -> data
        writer:                [lock] SSL_write -> done [unlock]

    A second lock keeps each sendall() whole, so two senders never interleave their frames.
    """

    def __init__(self, ssock: ssl.SSLSocket):
        self._s = ssock
        self._lock = threading.Lock()          # one thread inside the SSL object at a time
        self._send_lock = threading.Lock()     # one sendall() at a time
        self._timeout = ssock.gettimeout()     # None: block; seconds: raise socket.timeout
        self._send_timeout = None              # a bound on sends only: SO_SNDTIMEO, see setsockopt
        self._closed = False
        ssock.setblocking(False)

    def _call(self, op, *args, timeout):
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                if self._closed:
                    raise OSError(errno.EBADF, "the TLS connection is closed")
                try:
                    return op(*args)
                except ssl.SSLWantReadError:
                    want_write = False
                except ssl.SSLWantWriteError:
                    want_write = True
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise socket.timeout("timed out")
            _wait_fd(self._s.fileno(), want_write, left)

    def recv_into(self, buf, nbytes: int = 0) -> int:
        return self._call(self._s.recv_into, buf, nbytes or len(buf), timeout=self._timeout)

    def recv(self, nbytes: int) -> bytes:
        return self._call(self._s.recv, nbytes, timeout=self._timeout)

    def sendall(self, data):
        view = memoryview(data).cast("B")
        timeouts = [t for t in (self._timeout, self._send_timeout) if t is not None]
        with self._send_lock:
            sent = 0
            while sent < len(view):     # a retry after want-write passes the same bytes, as OpenSSL requires
                sent += self._call(self._s.send, view[sent:], timeout=min(timeouts) if timeouts else None)

    def settimeout(self, seconds):
        self._timeout = seconds

    def gettimeout(self):
        return self._timeout

    def setsockopt(self, level, option, value):
        """As a socket's. SO_SNDTIMEO (`struct.pack("ll", seconds, microseconds)`) also bounds
        sendall here: this socket never blocks in the kernel, so the kernel's bound would not apply."""
        self._s.setsockopt(level, option, value)
        if (level, option) == (socket.SOL_SOCKET, socket.SO_SNDTIMEO) and isinstance(value, bytes):
            seconds, micros = struct.unpack("ll", value)
            self._send_timeout = (seconds + micros / 1e6) or None

    def version(self):
        with self._lock:
            return None if self._closed else self._s.version()

    def shutdown(self, how):
        """Wake threads waiting on this connection: shuts the TCP socket without touching the SSL
        object another thread may be in (SSLSocket.shutdown would drop it)."""
        socket.socket.shutdown(self._s, how)

    def close(self):
        with self._lock:
            if not self._closed:
                self._closed = True
                self._s.close()

    def __getattr__(self, name):       # fileno, getpeername, setsockopt, ...: the TCP socket's
        return getattr(self._s, name)


def _wait_fd(fd: int, for_write: bool, timeout: float | None):
    """Block until fd is readable (or writable), or timeout seconds pass; either way the caller retries."""
    if hasattr(select, "poll"):
        p = select.poll()
        p.register(fd, select.POLLOUT if for_write else select.POLLIN)
        p.poll(None if timeout is None else max(0, int(timeout * 1000) + 1))
    else:
        select.select([] if for_write else [fd], [fd] if for_write else [], [], timeout)


def tls_wrap(ctx: ssl.SSLContext, sock: socket.socket, server_side: bool = False) -> TLSStream:
    """Run the TLS handshake on sock (bounded by its timeout) and return the thread-safe stream."""
    return TLSStream(ctx.wrap_socket(sock, server_side=server_side))


def client_tls(cafile: str | None):
    if not cafile:
        return None
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.check_hostname = False          # nodes are addressed by IP; the pinned certificate is the check
    return ctx


def server_tls(cert: str | None, key: str | None):
    if not cert:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    return ctx


def dial(host: str, port: int, *, role: str, rank: int | None = None, token: str | None = None,
         attempts: int = 1, backoff_s: float = 0.5, max_backoff_s: float = 5.0, log=None, who: str = "",
         tls=None, extra: dict | None = None, timeout: float = HANDSHAKE_TIMEOUT_S, sniff_http: bool = False) -> tuple:
    """Connect and pass the handshake, retrying with exponential backoff.

    Returns (sock, attempt, welcome meta). Raises OSError after the last attempt, HandshakeError if
    refused. `timeout` bounds the connect and the handshake; the returned socket blocks.
    `sniff_http`: if the peer stays silent SNIFF_AFTER_S, find out whether it is an HTTP server and
    raise HttpPeer at once (plain TCP only).
    """
    delay = backoff_s
    for attempt in range(1, attempts + 1):
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as e:
            if attempt == attempts:
                raise OSError(f"cannot reach {who or 'peer'} at {host}:{port} after {attempts} attempt(s): "
                              f"{e.strerror or e}") from None
            if log:
                log(f"Connection to {host}:{port} failed ({e.strerror or e}); retrying in {delay:.1f}s "
                    f"(attempt {attempt})")
            time.sleep(delay)
            delay = min(max_backoff_s, delay * 2)
            continue
        try:
            tune(sock)
            if tls is not None:
                sock = tls_wrap(tls, sock)
            peer = f"{who or 'peer'} at {host}:{port}"
            if sniff_http and tls is None and not _readable(sock, min(SNIFF_AFTER_S, timeout)):
                status = http_status(host, port)
                if status is not None:
                    raise HttpPeer(f"{host}:{port} is an HTTP server ({status}), not a nanopipe node")
            welcome = hello(sock, role=role, rank=rank, token=token, peer=peer, extra=extra)
            sock.settimeout(None)
            return sock, attempt, welcome
        except BaseException:
            sock.close()
            raise
    raise AssertionError("unreachable")


def accept(sock, *, peer: str, tls, token: str | None, roles: tuple, here: str = "",
           deadline_s: float = HANDSHAKE_TIMEOUT_S) -> tuple:
    """The listening side of a new connection, the mirror of `dial`: tune it, TLS if configured,
    CHALLENGE / HELLO, all within `deadline_s` in total (a peer that connects and says nothing, or
    says a byte every few seconds, is dropped when it runs out).

    Returns (sock, HELLO meta); under TLS, sock is the TLSStream to use from now on. Answer with
    `welcome(sock, hello, meta)` or REJECT. Raises HandshakeError, WireError, OSError or ValueError
    after closing the connection. `here` says what this port is, for a peer that asked for a role
    not served here ("this is worker 1's data port; the leader listens on 10.0.0.1:65432").
    """
    try:
        clock = _Deadline(deadline_s, sock)
    except RuntimeError:                    # no thread for the timer: as if the deadline had passed
        close_now(sock)
        raise
    try:
        tune(sock)
        sock.settimeout(deadline_s)
        if tls is not None:
            sock = clock.watch(tls_wrap(tls, sock, server_side=True))
        hello = challenge(sock, token=token, peer=peer, roles=roles, here=here)
        if not clock.stop():
            raise OSError(errno.ETIMEDOUT, "handshake deadline")
        return sock, hello
    except BaseException as e:
        close_now(sock)
        if clock.stop() is False and isinstance(e, (OSError, WireError)):
            raise HandshakeError(f"{peer} did not finish the handshake within {deadline_s:g}s (a stalled or "
                                 "trickling peer); closed it") from None
        raise


class _Deadline:
    """Close a socket if the handshake on it is not over after `seconds`, however the peer trickles
    its bytes (a per-read timeout restarts with every byte). `stop()` ends the wait: True if it was
    in time, False if the socket was closed for being late."""

    def __init__(self, seconds: float, sock):
        self.sock, self.lock, self.done, self.expired = sock, threading.Lock(), False, False
        self.timer = threading.Timer(seconds, self._expire)
        self.timer.daemon = True
        self.timer.start()

    def watch(self, sock):
        """From now on close this one (the TLS stream that took the socket over)."""
        self.sock = sock
        return sock

    def _expire(self):
        with self.lock:
            if self.done:
                return
            self.done = self.expired = True
        close_now(self.sock)

    def stop(self) -> bool:
        with self.lock:
            self.done = True
        self.timer.cancel()
        return not self.expired


class Hello(dict):
    """A HELLO's meta, plus `answer`: the proof this side owes the dialer in its WELCOME (None
    without a token, or for a dialer that sent no nonce of its own)."""
    answer: str | None = None


def welcome(sock, hello: Hello, meta: dict | None = None):
    """Accept the peer: WELCOME with `meta` and this side's proof that it knows the token."""
    meta = dict(meta or {})
    if getattr(hello, "answer", None) is not None:
        meta["proof"] = hello.answer
    send_frame(sock, Msg.WELCOME, meta)


# errors from accept() that say nothing about the listening socket: wait and accept again
TRANSIENT_ACCEPT_ERRORS = {getattr(errno, name) for name in (
    "EMFILE", "ENFILE", "ENOBUFS", "ENOMEM", "ECONNABORTED", "ECONNRESET", "EPROTO", "EPERM", "EINTR",
    "EAGAIN", "ETIMEDOUT", "ENETDOWN", "ENETUNREACH", "EHOSTDOWN", "EHOSTUNREACH") if hasattr(errno, name)}
_WHY = {errno.EMFILE: "this process is out of file descriptors (raise `ulimit -n`, or find what holds them)",
        errno.ENFILE: "the system is out of file descriptors"}


def serve_accepts(srv: socket.socket, handle, *, stopped, log, what: str,
                  max_pending: int = MAX_PENDING_HANDSHAKES, refusal_log_s: float = 10.0):
    """Accept connections on `srv` until stopped(), each served on its own thread by
    handle(sock, addr, slot); the handler runs `accept` (the handshake) and calls slot() when it is
    over, however it ended.

    A transient accept() error (out of file descriptors, a connection aborted in the backlog) is
    logged once, then accept() is retried with a backoff of 0.05 s doubling to 1 s, and a line says
    when it works again. With `max_pending` connections still in the handshake a new one is closed
    at once (logged at most once per `refusal_log_s`). Returns when stopped(); raises OSError if the
    listening socket itself fails.
    """
    pending = threading.Semaphore(max_pending)
    failing = None                          # (first errno, since when, how many) while accept() fails
    backoff = 0.05
    refused, refused_logged = 0, -refusal_log_s
    while not stopped():
        try:
            sock, addr = srv.accept()
        except OSError as e:
            if stopped():
                return
            if e.errno not in TRANSIENT_ACCEPT_ERRORS:
                raise OSError(f"{what} stopped accepting connections: {e.strerror or e}") from None
            if failing is None:
                failing = (e.errno, time.monotonic(), 0)
                log(f"Cannot accept connections on {what}: {e.strerror or e}"
                    + (f"; {_WHY[e.errno]}" if e.errno in _WHY else "")
                    + "; still serving the connections it has, and retrying", logging.WARNING)
            failing = (failing[0], failing[1], failing[2] + 1)
            time.sleep(backoff)
            backoff = min(1.0, backoff * 2)
            continue
        if failing is not None:
            log(f"Accepting connections on {what} again, after {failing[2]} failed attempt(s) over "
                f"{time.monotonic() - failing[1]:.1f}s")
            failing, backoff = None, 0.05
        if not pending.acquire(blocking=False):
            close_now(sock)
            refused += 1
            if time.monotonic() - refused_logged >= refusal_log_s:
                log(f"Refused {refused} connection(s) on {what} (the last from {addr[0]}:{addr[1]}): "
                    f"{max_pending} others are still in the handshake (at most {HANDSHAKE_TIMEOUT_S:g}s each)",
                    logging.WARNING)
                refused, refused_logged = 0, time.monotonic()
            continue
        slot = _Slot(pending)
        try:
            threading.Thread(target=handle, args=(sock, addr, slot), daemon=True,
                             name=f"conn-{addr[0]}:{addr[1]}").start()
        except RuntimeError as e:           # can't start new thread: as transient as EMFILE
            slot()
            close_now(sock)
            log(f"Dropped a connection on {what} from {addr[0]}:{addr[1]}: {e}", logging.WARNING)
            time.sleep(backoff)


class _Slot:
    """One place among the connections in the handshake; calling it frees the place (once)."""

    def __init__(self, sem: threading.Semaphore):
        self.sem, self.lock, self.freed = sem, threading.Lock(), False

    def __call__(self):
        with self.lock:
            if self.freed:
                return
            self.freed = True
        self.sem.release()


def hello(sock, *, role: str, rank, token, peer: str, extra: dict | None = None) -> dict:
    """The dialing side of the handshake. Returns the WELCOME meta."""
    try:
        challenge = recv_frame(sock, peer)
        if challenge.msg is not Msg.CHALLENGE:
            raise HandshakeError(f"{peer} opened with {challenge.msg.name}, expected CHALLENGE; is it a nanopipe node?")
        nonce, mine = challenge.meta.get("nonce"), make_nonce()
        if token and not is_nonce(nonce):
            raise HandshakeError(f"{peer} sent a CHALLENGE without a valid nonce; is it a nanopipe node?")
        meta = {"role": role, "rank": rank, "version": PROTOCOL_VERSION, "proof": auth_proof(token, nonce),
                "nonce": mine}
        meta.update(extra or {})
        send_frame(sock, Msg.HELLO, meta)
        reply = recv_frame(sock, peer)
    except ConnectionClosed:
        raise HandshakeError(f"{peer} closed the connection during the handshake (wrong auth_token?)") from None
    if reply.msg is Msg.REJECT:
        code = reply.meta.get("code")
        raise HandshakeError(f"{peer} refused us: {reply.meta.get('reason', 'no reason given')}",
                             code=code if isinstance(code, str) else None)
    if reply.msg is not Msg.WELCOME:
        raise HandshakeError(f"{peer} answered HELLO with {reply.msg.name}, expected WELCOME")
    if not acceptor_proof_ok(token, nonce, mine, reply.meta.get("proof")):
        raise HandshakeError(f"{peer} did not prove that it knows the cluster secret (auth_token / NANOPIPE_TOKEN): "
                             "it is not a node of this cluster, has no secret set, or runs an older nanopipe; "
                             "refusing to trust it")
    return reply.meta


def challenge(sock, *, token: str | None, peer: str, roles: tuple, here: str = "") -> dict:
    """The listening side: send CHALLENGE, check HELLO. Returns the HELLO meta (a Hello, carrying the
    proof this side owes); the caller answers `welcome(sock, hello, ...)` or REJECT. Raises
    HandshakeError after sending REJECT."""
    nonce = make_nonce()
    send_frame(sock, Msg.CHALLENGE, {"nonce": nonce, "version": PROTOCOL_VERSION})
    frame = recv_frame(sock, peer, max_payload=0)
    if frame.msg is not Msg.HELLO:
        raise ProtocolError(f"{peer}: expected HELLO, got {frame.msg.name}")
    meta = frame.meta
    if meta.get("version") != PROTOCOL_VERSION:
        reject(sock, f"protocol version {meta.get('version')!r} is not this node's {PROTOCOL_VERSION}; "
                     "run the same nanopipe version on every node")
        raise HandshakeError(f"{peer} speaks protocol version {meta.get('version')!r}, we speak {PROTOCOL_VERSION}")
    if not proof_ok(token, nonce, meta.get("proof")):
        reject(sock, "authentication failed: wrong or missing cluster secret (auth_token / NANOPIPE_TOKEN)",
               code="auth")
        raise HandshakeError(f"{peer} failed authentication (wrong or missing auth_token)", code="auth")
    if meta.get("role") not in roles:
        reject(sock, f"role {meta.get('role')!r} not accepted here (expected {' or '.join(roles)})"
                     + (f": {here}" if here else ""))
        raise HandshakeError(f"{peer} asked for role {meta.get('role')!r}; expected {' or '.join(roles)}")
    sock.settimeout(None)
    hello = Hello(meta)
    if token and is_nonce(meta.get("nonce")):       # a dialer of an older version sends none, checks none
        hello.answer = acceptor_proof(token, nonce, meta["nonce"])
    return hello


def reject(sock, reason: str, code: str | None = None):
    """REJECT with the reason; `code` "auth" tells a dialer its secret was wrong (it shows a hint)."""
    try:
        send_frame(sock, Msg.REJECT, {"reason": reason, **({"code": code} if code else {})})
    except OSError:
        pass
