"""POST /cluster/leave: drain a worker from the page (a button by the node) or any program.

    POST /cluster/leave {"rank": 2}        (with `Authorization: Bearer <api_token>` when one is set)
    -> 200 {"left": 2, "message": "rank 2 (pi1) drained: ring 0 -> 1 -> 0"}

What `nanopipe leave --rank 2` does: the leader re-plans without the node between two steps
(requests in flight go on; nanopipe/cluster/replan.py), then tells it to stop, and answers once
it is drained. A rank that cannot leave (the leader itself, one not in the cluster) is a 400 saying
why; a leader that cannot be reached, a 503.
"""
from __future__ import annotations

from flask import Flask, jsonify

from ..cluster.leader_client import ClientError
from ..decoding import is_int
from .body import check_fields, json_body
from .connection import connect
from .errors import ApiError, leader_error


def register(app: Flask):
    """Add POST /cluster/leave to `app`."""
    @app.post("/cluster/leave")
    def cluster_leave():
        body = json_body()
        check_fields(body, ("rank",))
        rank = body.get("rank")
        if not is_int(rank) or rank < 1:
            raise ApiError(400, f"rank: must be a worker's rank, an integer >= 1 (got {rank!r:.40})", param="rank")
        client = connect()
        try:
            done = client.leave(rank)
        except ClientError as e:
            raise leader_error(e) from None
        finally:
            client.close()
        return jsonify(left=rank, message=done.get("message"))
