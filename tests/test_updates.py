"""The update wire format: round trips, and every malformed file refused with a named reason."""

from __future__ import annotations

import io
import json
import pathlib
import pickle
import random

import numpy as np
import pytest
import torch
from safetensors.torch import save as save_safetensors

from sitesagent import protocol
from sitesagent.updates import UpdateError, decode_update, encode_update, encoded_sizes

PARTIAL = {"fraction": 0.1, "gamma": 0.01}
N = 100


def sparse_tensors() -> dict[str, torch.Tensor]:
    return {
        "indices": torch.tensor([3, 17, 42, 99], dtype=torch.int64),
        "values": torch.tensor([0.5, -0.25, 0.125, 1.0], dtype=torch.float32),
    }


def good_metadata(**changes: str) -> dict[str, str]:
    metadata = {
        "format": protocol.UPDATE_FORMAT,
        "n_parameters": str(N),
        "n_iterations": "7",
        "n_cases": "3",
        "mechanism": "partial",
        "params": json.dumps(PARTIAL),
        "encoding": "sparse",
    }
    metadata.update(changes)
    return metadata


def crafted(tensors: dict[str, torch.Tensor] | None = None, **metadata_changes: str) -> bytes:
    """A file written by the safetensors library itself, so only the named part is wrong."""
    return save_safetensors(
        sparse_tensors() if tensors is None else tensors, metadata=good_metadata(**metadata_changes)
    )


def raw_file(header: object, payload: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + payload


def refused(data: bytes, match: str, **kwargs: int) -> None:
    with pytest.raises(UpdateError, match=match):
        decode_update(data, **kwargs)


# --- round trips ----------------------------------------------------------------------------


def test_sparse_update_round_trips():
    tensors = sparse_tensors()
    data = encode_update(
        indices=tensors["indices"],
        values=tensors["values"],
        n_parameters=N,
        n_iterations=7,
        n_cases=3,
        mechanism="partial",
        params=PARTIAL,
    )
    update = decode_update(data)
    assert update.encoding == "sparse"
    assert update.indices is not None and update.indices.dtype == torch.int64
    assert update.values.dtype == torch.float32
    assert torch.equal(update.indices, tensors["indices"])
    assert torch.equal(update.values, tensors["values"])
    assert (update.n_parameters, update.n_iterations, update.n_cases) == (N, 7, 3)
    assert update.mechanism == "partial"
    assert update.params == {"fraction": 0.1, "gamma": 0.01}
    assert update.n_values == 4


def test_dense_update_round_trips():
    values = torch.linspace(-1, 1, N)
    data = encode_update(
        indices=None, values=values, n_parameters=N, n_iterations=1, n_cases=1, mechanism="none", params={}
    )
    update = decode_update(data)
    assert update.encoding == "dense"
    assert update.indices is None
    assert torch.equal(update.values, values)
    assert update.params == {}


def test_svt_parameters_survive_the_round_trip_exactly():
    params = {
        "fraction": 0.1,
        "gamma": 1e-3,
        "tau": 0.0,
        "eps_threshold": 0.1,
        "eps_query": 0.7,
        "eps_release": 0.2,
    }
    data = encode_update(
        indices=[5], values=[0.1], n_parameters=N, n_iterations=2, n_cases=2, mechanism="svt", params=params
    )
    assert decode_update(data).params == {name: float(value) for name, value in params.items()}


def test_encode_takes_numpy_and_writes_the_wire_dtypes():
    data = encode_update(
        indices=np.array([1, 2], dtype=np.int32),
        values=np.array([0.5, 0.25], dtype=np.float64),
        n_parameters=N,
        n_iterations=1,
        n_cases=1,
        mechanism="partial",
        params=PARTIAL,
    )
    update = decode_update(data)
    assert update.indices.dtype == torch.int64 and update.values.dtype == torch.float32
    assert update.values.tolist() == [0.5, 0.25]


def test_an_empty_sparse_update_round_trips():
    data = encode_update(
        indices=torch.zeros(0, dtype=torch.int64),
        values=torch.zeros(0),
        n_parameters=N,
        n_iterations=1,
        n_cases=1,
        mechanism="partial",
        params=PARTIAL,
    )
    assert decode_update(data).n_values == 0


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"indices": [3, 2]}, "sorted"),
        ({"indices": [2, 2]}, "sorted"),
        ({"indices": [2, N]}, "outside"),
        ({"indices": [-1, 2]}, "outside"),
        ({"indices": [1, 2, 3]}, "3 entries but values has 2"),
        ({"indices": [0.5, 1.5]}, "integers"),
        ({"indices": None}, "dense update needs 100"),
        ({"n_iterations": 0}, "n_iterations must be at least 1"),
        ({"n_cases": 1.5}, "n_cases must be a whole number"),
        ({"params": {"fraction": 0.1}}, "needs the parameter gamma"),
        ({"mechanism": "magic"}, "mechanism must be one of"),
        ({"values": [[0.5, 0.25]]}, "1-D"),
    ],
)
def test_encode_refuses_what_decode_would_refuse(changes, match):
    arguments = {
        "indices": [1, 2],
        "values": [0.5, 0.25],
        "n_parameters": N,
        "n_iterations": 1,
        "n_cases": 1,
        "mechanism": "partial",
        "params": PARTIAL,
    }
    arguments.update(changes)
    with pytest.raises(UpdateError, match=match):
        encode_update(**arguments)


# --- malformed files ------------------------------------------------------------------------


def test_random_bytes_are_not_an_update():
    generator = random.Random(1234)
    for length in (0, 3, 8, 64, 4096):
        refused(bytes(generator.getrandbits(8) for _ in range(length)), "not a safetensors file")


def test_pickle_bytes_are_refused_and_never_run(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (pathlib.Path.touch, (marker,))

    refused(pickle.dumps(Payload()), "pickle")
    assert not marker.exists()


def test_torch_save_files_are_refused():
    buffer = io.BytesIO()
    torch.save(sparse_tensors(), buffer)
    refused(buffer.getvalue(), "torch.save")


def test_a_header_that_is_not_json_is_refused():
    refused((5).to_bytes(8, "little") + b"{nope", "header is not JSON")


def test_a_header_that_is_not_an_object_is_refused():
    refused(raw_file([1, 2, 3]), "not a JSON object")


def test_a_truncated_file_is_refused():
    data = crafted()
    refused(data[:-3], "not a valid safetensors file")


def test_a_file_over_the_size_limit_is_refused_before_parsing():
    data = crafted()
    assert decode_update(data, max_bytes=len(data)).n_values == 4
    refused(data, f"{len(data)} bytes, more than the limit of {len(data) - 1}", max_bytes=len(data) - 1)


def test_a_file_without_metadata_is_refused():
    refused(save_safetensors(sparse_tensors()), "no metadata")


@pytest.mark.parametrize(
    "key", ["format", "n_parameters", "n_iterations", "n_cases", "mechanism", "params", "encoding"]
)
def test_each_missing_metadata_key_is_named(key):
    tensors = sparse_tensors()
    metadata = good_metadata()
    del metadata[key]
    refused(save_safetensors(tensors, metadata=metadata), f"missing {key}")


@pytest.mark.parametrize("text", ["1.5", "-3", "abc", "+3", " 3", "3_000", "", "1e3", "99999999999999999999"])
@pytest.mark.parametrize("key", ["n_parameters", "n_iterations", "n_cases"])
def test_counts_must_be_plain_whole_numbers(key, text):
    refused(crafted(**{key: text}), f"{key} must be a whole number")


@pytest.mark.parametrize("key", ["n_iterations", "n_cases", "n_parameters"])
def test_counts_must_be_at_least_one(key):
    refused(crafted(**{key: "0"}), f"{key} must be at least 1")


def test_an_unknown_mechanism_is_refused():
    refused(crafted(mechanism="laplace-ish"), "unknown mechanism 'laplace-ish'")


def test_params_that_are_not_json_are_refused():
    refused(crafted(params="{fraction: 0.1"), "params is not JSON")


def test_params_that_are_not_an_object_are_refused():
    refused(crafted(params="[0.1, 0.01]"), "params must be a JSON object")


def test_params_the_mechanism_does_not_take_are_refused():
    refused(crafted(params=json.dumps({"fraction": 0.1, "gamma": -1})), "bad mechanism parameters: gamma")
    refused(crafted(params=json.dumps({"fraction": 0.1})), "needs the parameter gamma")


def test_another_format_version_is_refused():
    refused(crafted(format="fl-update/0"), "format is 'fl-update/0'")


def test_an_unknown_encoding_is_refused():
    refused(crafted(encoding="zipped"), "encoding is 'zipped'")


def test_a_missing_values_tensor_is_refused():
    refused(crafted({"indices": torch.tensor([1, 2])}), "missing tensor 'values'")


def test_an_unknown_tensor_is_refused():
    tensors = {**sparse_tensors(), "extra": torch.zeros(2)}
    refused(crafted(tensors), "unknown tensor.*'extra'")


@pytest.mark.parametrize(
    ("name", "dtype", "expected"),
    [("indices", torch.int32, "I64"), ("values", torch.float64, "F32"), ("values", torch.float16, "F32")],
)
def test_wrong_dtypes_are_refused(name, dtype, expected):
    tensors = sparse_tensors()
    tensors[name] = tensors[name].to(dtype)
    refused(crafted(tensors), f"tensor '{name}' has dtype .*, expected {expected}")


def test_a_two_dimensional_tensor_is_refused():
    tensors = sparse_tensors()
    tensors["values"] = tensors["values"].reshape(2, 2)
    refused(crafted(tensors), "tensor 'values' has shape \\[2, 2\\], expected a 1-D vector")


def test_indices_and_values_of_different_lengths_are_refused():
    tensors = sparse_tensors()
    tensors["values"] = tensors["values"][:3].clone()
    refused(crafted(tensors), "indices has 4 entries but values has 3")


def test_a_dense_update_of_the_wrong_length_is_refused():
    refused(
        crafted({"values": torch.zeros(N - 1)}, encoding="dense", mechanism="none", params="{}"), "needs 100"
    )


def test_the_encoding_must_match_the_tensors():
    refused(crafted({"values": torch.zeros(N)}), "encoding is sparse but the file has no indices")
    refused(crafted(encoding="dense"), "encoding is dense but the file has an indices tensor")


@pytest.mark.parametrize(
    ("indices", "match"),
    [
        ([3, 3, 42, 99], "sorted without repeats; entry 1"),
        ([3, 17, 9, 99], "entry 2"),
        ([3, 17, 42, 100], "index 100"),
    ],
)
def test_bad_indices_in_a_file_are_refused(indices, match):
    tensors = sparse_tensors()
    tensors["indices"] = torch.tensor(indices)
    refused(crafted(tensors), match)


def test_unknown_metadata_keys_are_ignored():
    assert decode_update(crafted(comment="from a later agent")).n_values == 4


# --- sizes of other encodings ---------------------------------------------------------------


def test_encoded_sizes_of_a_small_known_update():
    indices = np.array([0, 1, 200, 70_000])
    sizes = encoded_sizes(indices, np.zeros(4, dtype=np.float32), 100_000)
    assert sizes["dense_float32"] == 400_000
    assert sizes["int64_float32"] == 48
    assert sizes["int32_float32"] == 32
    # Gaps 0, 0, 198, 69799: varints of 1, 1, 2 and 3 bytes.
    assert sizes["delta_varint_float32"] == 7 + 16
    # Four uint16 gaps, the last one escaped to a uint32.
    assert sizes["delta_uint16_float32"] == 8 + 4 + 16
    assert sizes["bitmap_float32"] == 12_500 + 16
    assert sizes["int64_float16"] == 32 + 8
    assert sizes["delta_varint_float16"] == 7 + 8
    assert sizes["bitmap_float16"] == 12_500 + 8


def test_encoded_sizes_order_for_a_tenth_of_the_coordinates():
    n = 1_000_000
    generator = np.random.default_rng(5)
    indices = np.sort(generator.choice(n, n // 10, replace=False))
    sizes = encoded_sizes(indices, np.zeros(indices.size, dtype=np.float32), n)
    # At a tenth, the mean gap is ~9: one varint byte nearly always, below a bitmap's n/8.
    assert sizes["entropy_bound_float32"] < sizes["delta_varint_float32"] < sizes["bitmap_float32"]
    assert sizes["bitmap_float32"] < sizes["int32_float32"] < sizes["int64_float32"] < sizes["dense_float32"]
