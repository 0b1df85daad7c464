"""DHT datagrams as they travel (inside the private-swarm seal, when there is one).

A datagram is ``kind (1 byte) || message id (20 bytes) || msgpack body``, as in rpcudp, with
our own bodies (version 2 of the DHT wire; rpcudp's two-element requests are malformed here):

- request, kind ``0x00``: ``[name, args, meta]``; ``name`` one of ping / store / find_node /
  find_value, ``args`` rpcudp's arguments (the sender's node id first), ``meta`` a map with
  ``"c"`` (bool: the sender is client-only, do not add it) and, optionally, ``"t"`` (the
  address token the recipient handed this sender, echoed to prove its address) and ``"p"``
  (padding bytes, ignored: a request without a token is padded to `PADDED_REQUEST_BYTES`,
  as QUIC pads its first datagram, so that the reply it may draw is large enough);
- response, kind ``0x01``: ``[value, meta]``; ``meta`` holds ``"id"`` (the responder's
  20-byte node id, so every reply tells who answered), ``"c"`` (the responder is client-only),
  optionally ``"t"`` (a token for the requester to echo) and ``"r"`` (True: the answer is
  larger than an unproven address may be sent; ``value`` is None and the requester asks again
  echoing ``"t"``).

Amplification (RFC 9000 §8.1): a node never sends an address that has not echoed its token
more than `AMPLIFICATION` times the bytes it received from it in the request being answered.

`decode_datagram` is the one decoder of peer datagrams: anything else is None, never an error.

Bodies are packed and parsed by `msgpack`'s C extension. Its encoding is byte for byte the
one of ``umsgpack`` (rpcudp's pure-Python msgpack, used here before: the smallest form of
each integer, string and byte string; floats as float64), so nodes of either version read
each other. Parsing is as strict or stricter: str or bytes map keys only, no extension types
(but msgpack's timestamp, which becomes a ``msgpack.Timestamp`` that no field takes, as
``umsgpack``'s ``datetime`` did), no bytes after the body (``umsgpack`` ignored them); a
map's duplicate key keeps its last value (``umsgpack`` refused the datagram). Packing and
parsing in pure Python was the largest share of a node's CPU per datagram
(benchmarks/README.md, "Where a datagram's CPU goes").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

__all__ = [
    "AMPLIFICATION",
    "MAX_REQUEST_BYTES",
    "PADDED_REQUEST_BYTES",
    "RPC_NAMES",
    "Request",
    "Response",
    "decode_datagram",
    "encode_request",
    "encode_response",
]

_REQUEST, _RESPONSE = b"\x00", b"\x01"
RPC_NAMES = frozenset({"ping", "store", "find_node", "find_value"})
MAX_REQUEST_BYTES = 8_192  # what one store may carry; `SwarmProtocol.store_records` chunks
_MAX_TOKEN_BYTES = 32
AMPLIFICATION = 3  # the most reply bytes per request byte to an unproven address
# A request without a token is padded to this size: it may then draw a reply of up to
# 1,440 bytes (a find_node reply of 20 IPv6 contacts) without a token round trip.
PADDED_REQUEST_BYTES = 480


@dataclass(frozen=True)
class Request:
    name: str
    args: tuple[Any, ...]
    client_only: bool
    token: bytes | None


@dataclass(frozen=True)
class Response:
    value: Any
    node_id: bytes
    client_only: bool
    token: bytes | None
    retry: bool = False  # too large for an unproven address: ask again with ``token``


def encode_request(
    msg_id: bytes,
    name: str,
    args: tuple[Any, ...],
    *,
    client_only: bool,
    token: bytes | None,
    pad: bool = False,
) -> bytes:
    """A request datagram, padded to `PADDED_REQUEST_BYTES` if ``pad``. Raises ValueError if
    its body exceeds `MAX_REQUEST_BYTES`."""
    meta: dict[str, Any] = {"c": client_only}
    if token is not None:
        meta["t"] = token
    body: bytes = msgpack.packb([name, list(args), meta], use_bin_type=True)
    if len(body) > MAX_REQUEST_BYTES:
        raise ValueError(f"a DHT {name} request of {len(body)} bytes exceeds {MAX_REQUEST_BYTES}")
    short = PADDED_REQUEST_BYTES - 21 - len(body) - 5  # "p" and a bin header cost 5 bytes
    if pad and short > 0:
        meta["p"] = bytes(short)
        body = msgpack.packb([name, list(args), meta], use_bin_type=True)
    return _REQUEST + msg_id + body


def encode_response(
    msg_id: bytes,
    value: Any,
    *,
    node_id: bytes,
    client_only: bool,
    token: bytes | None,
    retry: bool = False,
) -> bytes:
    meta: dict[str, Any] = {"id": node_id, "c": client_only}
    if token is not None:
        meta["t"] = token
    if retry:
        meta["r"] = True
    body: bytes = msgpack.packb([value, meta], use_bin_type=True)
    return _RESPONSE + msg_id + body


def _meta(value: object, allowed: frozenset[str]) -> dict[str, Any] | None:
    if not isinstance(value, dict) or not set(value) <= allowed:
        return None
    if not isinstance(value.get("c", False), bool):
        return None
    token = value.get("t")
    if token is not None and not (isinstance(token, bytes) and len(token) <= _MAX_TOKEN_BYTES):
        return None
    if not isinstance(value.get("r", False), bool) or not isinstance(value.get("p", b""), bytes):
        return None
    return value


def _no_ext(code: int, data: bytes) -> object:
    raise ValueError(f"msgpack extension type {code} is not allowed")


_REQUEST_META = frozenset({"c", "t", "p"})
_RESPONSE_META = frozenset({"id", "c", "t", "r"})


def decode_datagram(datagram: bytes) -> tuple[bytes, Request | Response] | None:
    """(message id, request or response) of a peer's datagram, or None if it is malformed."""
    if len(datagram) < 22:
        return None
    kind, msg_id = datagram[:1], datagram[1:21]
    try:
        body = msgpack.unpackb(
            datagram[21:], raw=False, strict_map_key=True, use_list=True, ext_hook=_no_ext
        )
    except Exception:  # msgpack raises many types on bad input; all mean "malformed"
        return None
    if kind == _REQUEST:
        ok = isinstance(body, list) and len(body) == 3 and isinstance(body[0], str)
        ok = ok and body[0] in RPC_NAMES
        meta = _meta(body[2], _REQUEST_META) if ok else None
        if meta is None or not isinstance(body[1], list) or not body[1]:
            return None
        return msg_id, Request(body[0], tuple(body[1]), meta.get("c", False), meta.get("t"))
    if kind == _RESPONSE:
        meta = _meta(body[1], _RESPONSE_META) if isinstance(body, list) and len(body) == 2 else None
        node_id = meta.get("id") if meta is not None else None
        if meta is None or not (isinstance(node_id, bytes) and len(node_id) == 20):
            return None
        retry = meta.get("r", False)
        if retry and meta.get("t") is None:
            return None  # a retry names the token to echo
        return msg_id, Response(body[0], node_id, meta.get("c", False), meta.get("t"), retry)
    return None
