"""Prefix-aware request routing for Ray Serve (imported only where Ray is installed).

Requests whose prompts start alike carry the same route key (`miaotui.serve.cluster.route_key`); they go to the
replica that ranks first for that key by rendezvous hashing, so the prefix stays in that replica's prefix cache
and only the keys of a replica that leaves or joins move. When that replica's queue is full (its
max_ongoing_requests), the request goes to the least loaded of the others; requests without a key go to the least
loaded replica.
"""

from __future__ import annotations

import hashlib

from ray.serve.request_router import RequestRouter


def rank(key: str, replica_id: str) -> bytes:
    return hashlib.sha256(f"{key}/{replica_id}".encode()).digest()


class PrefixAffinityRouter(RequestRouter):
    """Equal route keys to the same replica while it takes requests; else the least loaded."""

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        args = pending_request.args if pending_request is not None else None
        key = args[0].get("route_key") if args and isinstance(args[0], dict) else None
        if key is None or len(candidate_replicas) < 2:
            return [candidate_replicas]
        ranked = sorted(candidate_replicas, key=lambda r: rank(key, r.replica_id.unique_id))
        return [ranked[:1], ranked[1:]]
