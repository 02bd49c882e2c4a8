"""What the ingress and the engine replicas send each other: plain data, so Ray serializes it cheaply."""

from __future__ import annotations

from dataclasses import dataclass, field

REPLICA_HEADER = "x-loraplex-replica"


@dataclass(frozen=True)
class ProxiedRequest:
    """One HTTP request as the ingress received it, body read in full."""

    method: str
    path: str
    query_string: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)  # lower-case names, as ASGI has them
    body: bytes = b""


@dataclass(frozen=True)
class ResponseHead:
    """Status and headers of a replica's response; its body follows as `bytes` chunks."""

    status: int
    headers: list[tuple[bytes, bytes]]

    def header(self, name: str) -> str | None:
        wanted = name.lower().encode()
        return next((value.decode("latin-1") for key, value in self.headers if key.lower() == wanted), None)
