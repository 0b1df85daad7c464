"""Message schemas and the tensor codec: round trips, strict decoding, property tests."""

from __future__ import annotations

import msgpack
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from swarm.errors import ErrorCode, ProtocolError
from swarm.net.messages import (
    ErrorResponse,
    ForwardRequest,
    InferenceInput,
    InferenceOpen,
    InfoResponse,
    NewPusher,
    NewPushTarget,
    PushTarget,
    decode_message,
    encode_message,
)
from swarm.net.tensors import decode_tensor, encode_tensor
from swarm.types import LayerRange, PeerId


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64])
@pytest.mark.parametrize("shape", [(), (0,), (3,), (2, 5, 7), (1, 1, 1, 1, 2)])
def test_tensor_round_trip_is_bit_exact(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(0)
    if dtype == torch.int64:
        t = torch.randint(-(2**62), 2**62, shape, generator=gen)
    else:
        t = (torch.randn(shape, generator=gen) * 1e3).to(dtype)
    if t.numel() and dtype != torch.int64:
        t.view(-1)[0] = float("nan")
    wire = msgpack.packb(encode_tensor(t))
    back = decode_tensor(msgpack.unpackb(wire))
    assert back.dtype == dtype and back.shape == t.shape
    assert back.view(-1).view(torch.uint8).tolist() == t.view(-1).view(torch.uint8).tolist()


def test_non_contiguous_tensor_is_encoded_by_value() -> None:
    t = torch.arange(12, dtype=torch.float32).view(3, 4).t()
    back = decode_tensor(msgpack.unpackb(msgpack.packb(encode_tensor(t))))
    assert torch.equal(back, t)
    back.add_(1)  # decoded tensors are writable and own their memory


def test_encoded_view_outlives_temporary_tensor() -> None:
    wire = encode_tensor(torch.full((1000,), 7.0))  # the tensor is a temporary
    torch.randn(100_000)  # churn the allocator
    assert torch.equal(
        decode_tensor(msgpack.unpackb(msgpack.packb(wire))), torch.full((1000,), 7.0)
    )


@pytest.mark.parametrize(
    ("obj", "field"),
    [
        ({"dtype": "float64", "shape": [1], "data": b"\0" * 8}, "x.dtype"),
        ({"dtype": "float32", "shape": [2], "data": b"\0" * 4}, "x.data"),
        ({"dtype": "float32", "shape": [2**30, 2**30], "data": b""}, "x.data"),
        ({"dtype": "float32", "shape": [-1], "data": b""}, "x.shape"),
        ({"dtype": "float32", "shape": [1] * 9, "data": b"\0" * 4}, "x.shape"),
        ({"dtype": "float32", "shape": [1], "data": "abcd"}, "x.data"),
        ({"dtype": "float32", "shape": [1], "data": b"\0" * 4, "extra": 1}, "x"),
        ([1, 2], "x"),
    ],
)
def test_bad_tensor_maps_name_the_field(obj: object, field: str) -> None:
    with pytest.raises(ProtocolError, match=rf"^{field}"):
        decode_tensor(obj, "x")


def _sample_messages() -> list[object]:
    h = torch.randn(2, 3, 8).to(torch.bfloat16)
    pos = torch.arange(3).expand(2, 3).contiguous()
    return [
        InfoResponse(LayerRange(0, 12), "online", 0.5, 4096, "0.1.0", 123.0),
        ForwardRequest(h, pos, LayerRange(2, 4)),
        InferenceOpen(
            b"s" * 16,
            512,
            2,
            "bfloat16",
            LayerRange(0, 8),
            PushTarget(PeerId(b"p" * 32), "127.0.0.1", 4000, b"t" * 16),
        ),
        InferenceInput(5, h, pos),
        NewPushTarget(PushTarget(PeerId(b"q" * 32), "::1", 1, b"u")),
        NewPusher(PeerId(b"r" * 32)),
        ErrorResponse(ErrorCode.BAD_REQUEST, "boom"),
    ]


def test_messages_round_trip() -> None:
    for msg in _sample_messages():
        back = decode_message(encode_message(msg))
        assert type(back) is type(msg)
        for name, value in vars(msg).items():
            other = getattr(back, name)
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, other)
            elif name != "push_to":
                assert other == value


def _wire(**overrides: object) -> bytes:
    base = InfoResponse(LayerRange(0, 12), "online", 0.5, 4096, "0.1.0", 1.0).to_wire()
    base.update(overrides)
    return msgpack.packb({k: v for k, v in base.items() if v is not _DROP})


_DROP = object()


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"bogus": 1}, "message.bogus"),
        ({"free_cache_tokens": -1}, "message.free_cache_tokens"),
        ({"free_cache_tokens": "many"}, "message.free_cache_tokens"),
        ({"free_cache_tokens": True}, "message.free_cache_tokens"),
        ({"state": "sleeping"}, "message.state"),
        ({"layer_range": [5, 2]}, "message.layer_range"),
        ({"load": _DROP}, "message.load"),
        ({"v": 99}, "message.v"),
        ({"t": "nope"}, "message.t"),
        ({"version": "x" * 100}, "message.version"),
    ],
)
def test_strict_decoder_names_the_bad_field(overrides: dict[str, object], field: str) -> None:
    with pytest.raises(ProtocolError, match=rf"^{field}"):
        decode_message(_wire(**overrides))


def test_expected_type_is_enforced() -> None:
    with pytest.raises(ProtocolError, match="expected 'forward_request'"):
        wire = encode_message(ErrorResponse(ErrorCode.INTERNAL, "y"))
        decode_message(wire, expect=ForwardRequest)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_arbitrary_bytes_raise_only_protocol_error(data: bytes) -> None:
    try:
        decode_message(data)
    except ProtocolError:
        pass


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5)
    ),
    max_leaves=20,
)
_KEYS = ["t", "v", "dtype", "shape", "data", "hidden_states", "positions", "layer_range", "step"]
_TAGS = ["info_response", "forward_request", "inference_step", "inference_open", "error", "x"]


@settings(max_examples=120, deadline=None)
@given(
    st.dictionaries(st.sampled_from(_KEYS) | st.text(max_size=5), msgpack_values, max_size=8),
    st.sampled_from(_TAGS),
    st.booleans(),
)
def test_arbitrary_msgpack_values_raise_only_protocol_error(
    fields: dict[str, object], tag: str, keep_tag: bool
) -> None:
    if keep_tag:
        fields = {**fields, "t": tag, "v": 1}
    for data in (msgpack.packb(fields, use_bin_type=True), _safe_pack(list(fields.values()))):
        try:
            decode_message(data)
        except ProtocolError:
            pass


def _safe_pack(value: object) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


@settings(max_examples=200, deadline=None)
@given(msgpack_values)
def test_arbitrary_values_into_tensor_decoder(value: object) -> None:
    try:
        decode_tensor(value, "t")
    except ProtocolError:
        pass


@settings(max_examples=150, deadline=None)
@given(
    st.lists(msgpack_values, max_size=5)
    | st.tuples(st.integers(-2, 10), st.integers(-1, 2**64 - 1), msgpack_values, msgpack_values)
)
def test_arbitrary_values_into_rpc_envelope_decoder(value: object) -> None:
    from swarm.net.envelope import parse_envelope

    try:
        parse_envelope(msgpack.packb(list(value), use_bin_type=True))  # type: ignore[call-overload]
    except ProtocolError:
        pass
