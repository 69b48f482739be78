"""A client of the leader: what `nanopipe generate --leader`, the web app and the tests use.

    with LeaderClient.connect("127.0.0.1:65432") as c:
        result = c.generate([15496, 995], SamplingParams("greedy", max_tokens=5), on_token=print)

One generation at a time per connection; open one connection per concurrent chat. Tokens arrive
as they are sampled (TOKEN frames), then a DONE frame with the stats.
"""
from __future__ import annotations

import itertools

from . import wire
from .net import HandshakeError, HttpPeer, client_tls, dial, parse_addr
from .wire import ConnectionClosed, Msg, WireError, read_status_text, recv_frame, send_frame, state_request


class ClientError(RuntimeError):
    """The leader is unreachable, refused us, or the generation failed; `kind` says which."""

    def __init__(self, message: str, kind: str = "cluster", field: str | None = None,
                 retry_after_s: float | None = None):
        super().__init__(message)
        self.kind = kind        # "unreachable" | "unauthorized" (up, wrong token) | "invalid" (bad request)
        #                         | "busy" (queue full: retry later) | "cluster" (failed mid-way)
        self.field = field      # for "invalid": the request field at fault, if one is
        self.retry_after_s = retry_after_s      # for "busy": how long the leader asks us to wait

    @classmethod
    def of(cls, meta: dict) -> "ClientError":
        """The leader's ERROR frame as an exception."""
        retry = meta.get("retry_after_s")
        return cls(meta.get("message", "the leader reported an error"), meta.get("kind", "cluster"), meta.get("field"),
                   retry if isinstance(retry, (int, float)) and not isinstance(retry, bool) else None)


class LeaderClient:
    """One handshaken connection to the leader (`connect`): generate, status, cancel; close when done."""

    _ids = itertools.count(1)

    def __init__(self, sock, addr: str, welcome: dict):
        self.sock, self.addr, self.welcome = sock, addr, welcome

    @classmethod
    def connect(cls, addr: str, token: str | None = None, timeout: float = 5.0, tls_ca: str | None = None,
                attempts: int = 1) -> "LeaderClient":
        host, port = parse_addr(addr, 65432)
        try:
            sock, _, welcome = dial(host, port, role="client", token=token, attempts=attempts, who="leader",
                                    tls=client_tls(tls_ca), timeout=timeout, sniff_http=True)
        except HttpPeer as e:
            raise ClientError(f"{e}: the web app? A client wants the leader's own port (`port` in "
                              "cluster_config.yaml, 65432 as shipped), not the web port", "unreachable") from None
        except HandshakeError as e:
            if e.code == "auth":    # the leader is up and answered: our secret is not its secret
                raise ClientError(f"{e}: the leader at {addr} is up, but its cluster token differs from this "
                                  "one; use the same auth_token (cluster_config.yaml) or NANOPIPE_TOKEN here "
                                  "as on the leader", "unauthorized") from None
            raise ClientError(str(e), "unreachable") from None
        except OSError as e:
            raise ClientError(f"leader at {addr} is unreachable: {e}. Is `nanopipe serve --rank 0` running?",
                              "unreachable") from None
        return cls(sock, addr, welcome)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def status(self) -> dict:
        """Every node's state, live sessions and counters (see Leader.status)."""
        self._send(*state_request())
        while True:
            frame = self._recv()
            if frame.msg is Msg.STATE:
                return frame.meta

    def generate(self, prompt=None, params=None, on_token=None, on_status=None, echo: bool = False,
                 top_logprobs: int = 0, text: bool = True, on_event=None, **fields) -> dict:
        """Run one generation. `prompt` is token ids (a list) or text (a str, tokenized by the leader).
        `params` is a SamplingParams or None (the leader's defaults); `fields` override single values
        (strategy, temperature, top_k, top_p, max_tokens, seed, stop, frequency_penalty,
        presence_penalty, repetition_penalty, logit_bias, and trace=True for per-hop data); a
        field left out means the leader's default, and the leader infers the strategy from the
        fields sent (decoding.infer_strategy).
        on_token(id, text) sees each token; on_event(meta) sees each TOKEN frame's whole meta."""
        meta = {"request": f"r{next(self._ids)}", "echo": echo, "top_logprobs": top_logprobs, "text": text}
        meta["prompt_ids" if isinstance(prompt, list) else "prompt"] = prompt
        if params is not None:
            meta.update(params.sent_fields())
        meta.update({k: v for k, v in fields.items() if v is not None})
        self._send(Msg.GENERATE, meta)
        tail = ""
        while True:
            frame = self._recv()
            m = frame.meta
            if frame.msg is Msg.TOKEN:
                self.session = m.get("session")
                if on_token is not None:
                    on_token(m["token"], m.get("text", ""))
                if on_event is not None:
                    on_event(m)
            elif frame.msg is Msg.STATUS:
                if on_status is not None:
                    on_status(read_status_text(frame))
            elif frame.msg is Msg.DONE:
                tail = m.pop("tail", "") or ""
                if tail and on_token is not None:
                    on_token(None, tail)
                return m
            elif frame.msg is Msg.ERROR:
                raise ClientError.of(m)

    def generate_batch(self, prompts: list, params=None, seeds: list | None = None, on_token=None, on_status=None,
                       echo: bool = False, top_logprobs: int = 0, text: bool = True, **fields) -> list:
        """Run several generations as one batch: the leader queues them together, so they are
        concurrent sessions of one scheduler step. `prompts` are token-id lists; `seeds[i]` (if
        given) overrides the seed of generation i. on_token(i, id, text) sees generation i's tokens.
        Returns the results in prompt order; the first error raises ClientError (the caller closes
        the connection, which cancels the rest).

            c.generate_batch([[15496], [15496]], SamplingParams("sampling", seed=None), seeds=[7, 8])
        """
        base = f"r{next(self._ids)}"
        meta = {"request": base, "echo": echo, "top_logprobs": top_logprobs, "text": text}
        if params is not None:      # stop, penalties and bias too: each generation applies them itself
            meta.update(params.sent_fields())
        meta.update({k: v for k, v in fields.items() if v is not None})
        items = []
        for i, prompt in enumerate(prompts):
            item = {"request": f"{base}.{i}", "prompt_ids": list(prompt)}
            if seeds is not None and seeds[i] is not None:
                item["seed"] = seeds[i]
            items.append(item)
        index = {item["request"]: i for i, item in enumerate(items)}
        self._send(*wire.generate_batch(meta, items))
        results: list = [None] * len(items)
        left = len(items)
        while left:
            frame = self._recv()
            m = frame.meta
            i = index.get(m.get("request"))
            if frame.msg is Msg.ERROR:
                raise ClientError.of(m)
            if frame.msg is Msg.STATUS and on_status is not None:
                on_status(read_status_text(frame))
            if i is None:
                continue
            if frame.msg is Msg.TOKEN and on_token is not None:
                on_token(i, m["token"], m.get("text", ""))
            elif frame.msg is Msg.DONE:
                tail = m.pop("tail", "") or ""
                if tail and on_token is not None:
                    on_token(i, None, tail)
                if results[i] is None:
                    left -= 1
                results[i] = m
        return results

    def cancel(self):
        sid = getattr(self, "session", None)
        if sid:
            self._send(Msg.CANCEL, {"session": sid})

    def _send(self, msg, meta):
        try:
            send_frame(self.sock, msg, meta)
        except OSError as e:
            raise ClientError(f"lost the connection to the leader at {self.addr}: {e}", "unreachable") from None

    def _recv(self):
        try:
            return recv_frame(self.sock, f"leader {self.addr}")
        except ConnectionClosed:
            raise ClientError(f"the leader at {self.addr} closed the connection", "unreachable") from None
        except (WireError, OSError) as e:
            raise ClientError(f"lost the connection to the leader at {self.addr}: {e}", "unreachable") from None

