"""The update parser under arbitrary input: it refuses with UpdateError or returns a sound update.

Property-based (hypothesis): random bytes, mutations of valid files (flipped bytes, any
truncation, appended junk, edited header JSON) and round trips of arbitrary valid updates.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as save_safetensors

from coordinator.aggregation import UpdateRejected, validate_update
from sitesagent import protocol
from sitesagent.updates import Update, UpdateError, decode_update, encode_update

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PARTIAL = {"fraction": 1.0, "gamma": 0.5}

# A dense "none" update of 4 parameters, but for whatever params a test puts in.
METADATA = {
    "format": protocol.UPDATE_FORMAT,
    "n_parameters": "4",
    "n_iterations": "1",
    "n_cases": "1",
    "mechanism": "none",
    "encoding": "dense",
}

floats32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


@st.composite
def valid_updates(draw) -> dict:
    """Arguments of encode_update for a valid sparse (partial) or dense (none) update."""
    n_parameters = draw(st.integers(1, 64))
    counts = {"n_iterations": draw(st.integers(1, 10**6)), "n_cases": draw(st.integers(1, 10**4))}
    if draw(st.booleans()):
        values = draw(st.lists(floats32, min_size=n_parameters, max_size=n_parameters))
        return dict(
            indices=None, values=values, n_parameters=n_parameters, mechanism="none", params={}, **counts
        )
    indices = sorted(draw(st.sets(st.integers(0, n_parameters - 1), max_size=n_parameters)))
    values = draw(st.lists(floats32, min_size=len(indices), max_size=len(indices)))
    return dict(
        indices=indices,
        values=values,
        n_parameters=n_parameters,
        mechanism="partial",
        params=PARTIAL,
        **counts,
    )


def encoded(arguments: dict) -> bytes:
    return encode_update(
        indices=torch.tensor(arguments["indices"], dtype=torch.int64)
        if arguments["indices"] is not None
        else None,
        values=torch.tensor(arguments["values"], dtype=torch.float32),
        **{k: v for k, v in arguments.items() if k not in ("indices", "values")},
    )


def assert_sound(update: Update) -> None:
    """What every decoded update guarantees, whatever bytes it came from."""
    assert update.values.dtype == torch.float32 and update.values.dim() == 1
    assert update.n_parameters >= 1 and update.n_iterations >= 1 and update.n_cases >= 1
    assert update.mechanism in protocol.MECHANISMS
    assert update.params == protocol.validate_mechanism(update.mechanism, update.params)
    if update.indices is None:
        assert update.encoding == "dense" and update.n_values == update.n_parameters
        return
    indices = update.indices.tolist()
    assert update.encoding == "sparse" and update.indices.dtype == torch.int64
    assert len(indices) == update.n_values <= update.n_parameters
    assert indices == sorted(set(indices))
    assert all(0 <= i < update.n_parameters for i in indices)


def decode_or_refuse(data: bytes) -> Update | None:
    """decode_update's two allowed outcomes; any other exception fails the property."""
    try:
        update = decode_update(data)
    except UpdateError:
        return None
    assert_sound(update)
    # The round's rules then either refuse it by name, or accept only finite values.
    try:
        validate_update(
            update, n_parameters=update.n_parameters, mechanism=update.mechanism, params=update.params
        )
    except UpdateRejected:
        return update
    assert bool(torch.isfinite(update.values).all())
    return update


@FAST
@given(st.binary(max_size=512))
def test_arbitrary_bytes_are_refused_or_sound(data):
    decode_or_refuse(data)


@FAST
@given(st.binary(max_size=64))
def test_arbitrary_bytes_after_a_plausible_header_length_are_refused_or_sound(tail):
    # Random bytes rarely start with a small header length; these always do.
    decode_or_refuse(len(tail).to_bytes(8, "little") + tail)


# JSON that parses badly in ways random bytes never reach: deep nesting, numbers too long to convert.
awkward_json = st.one_of(
    st.integers(1, 3000).map(lambda depth: "[" * depth + "]" * depth),
    st.integers(1, 3000).map(lambda depth: '{"a":' * depth + "1" + "}" * depth),
    st.integers(1, 6000).map(lambda digits: "1" * digits),
    st.text(alphabet='[]{}":,.-+eE0123456789 nultrfas', max_size=64),
)


@FAST
@given(awkward_json)
def test_awkward_header_json_is_refused_or_sound(text):
    data = text.encode()
    decode_or_refuse(len(data).to_bytes(8, "little") + data)


@FAST
@given(awkward_json)
def test_awkward_params_json_is_refused_or_sound(text):
    decode_or_refuse(save_safetensors({"values": torch.zeros(4)}, metadata={**METADATA, "params": text}))


def test_a_header_nested_too_deep_is_refused_not_crashed():
    # Regression: json.loads raised RecursionError, which escaped as a server error.
    data = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(UpdateError, match="header is not JSON"):
        decode_update(len(data).to_bytes(8, "little") + data)


def test_a_number_too_long_to_convert_is_refused_not_crashed():
    # Regression: json.loads raised a plain ValueError (Python's int digit limit), not UpdateError.
    data = b'{"a": ' + b"1" * 5000 + b"}"
    with pytest.raises(UpdateError, match="header is not JSON"):
        decode_update(len(data).to_bytes(8, "little") + data)
    metadata = {**METADATA, "params": '{"fraction": ' + "1" * 5000 + "}"}
    with pytest.raises(UpdateError, match="params is not JSON"):
        decode_update(save_safetensors({"values": torch.zeros(4)}, metadata=metadata))


@FAST
@given(valid_updates(), st.data())
def test_flipped_bytes_are_refused_or_sound(arguments, data):
    original = bytearray(encoded(arguments))
    for _ in range(data.draw(st.integers(1, 8))):
        position = data.draw(st.integers(0, len(original) - 1))
        original[position] ^= data.draw(st.integers(1, 255))
    decode_or_refuse(bytes(original))


@FAST
@given(valid_updates(), st.data())
def test_truncation_at_any_length_is_refused(arguments, data):
    original = encoded(arguments)
    length = data.draw(st.integers(0, len(original) - 1))
    assert decode_or_refuse(original[:length]) is None


@FAST
@given(valid_updates(), st.binary(min_size=1, max_size=64))
def test_appended_junk_is_refused_or_sound(arguments, junk):
    decode_or_refuse(encoded(arguments) + junk)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)


@FAST
@given(valid_updates(), st.data())
def test_edited_header_json_is_refused_or_sound(arguments, data):
    original = encoded(arguments)
    length = int.from_bytes(original[:8], "little")
    header = json.loads(original[8 : 8 + length])
    section = data.draw(st.sampled_from(sorted(header)))
    entry = header[section]
    key = data.draw(st.sampled_from(sorted(entry)) | st.text(max_size=8))
    replacement = data.draw(json_values | st.text(max_size=12) | st.integers(-(2**70), 2**70))
    if section == "__metadata__":
        # safetensors metadata values are strings; the parser sees whatever a tamperer writes.
        replacement = data.draw(st.sampled_from([replacement, json.dumps(replacement)]))
    entry[key] = replacement
    text = json.dumps(header).encode()
    decode_or_refuse(len(text).to_bytes(8, "little") + text + original[8 + length :])


@FAST
@given(valid_updates())
def test_valid_updates_round_trip_exactly(arguments):
    update = decode_update(encoded(arguments))
    assert_sound(update)
    assert update.values.tolist() == arguments["values"]
    assert (update.indices.tolist() if update.indices is not None else None) == arguments["indices"]
    assert (update.n_parameters, update.n_iterations, update.n_cases) == (
        arguments["n_parameters"],
        arguments["n_iterations"],
        arguments["n_cases"],
    )
    assert update.mechanism == arguments["mechanism"] and update.params == arguments["params"]
    assert all(math.isfinite(v) for v in update.values.tolist())
