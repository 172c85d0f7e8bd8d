"""The update wire format: one safetensors file per update, readable without trusting it.

An update is a flat float32 vector over the model's floating-point tensors, taken in
``protocol.flat_layout`` order (sorted names), in weight units: the agent has already multiplied
its released values back by N_k (DESIGN section 5, step 4). Two encodings:

- sparse (partial sharing, SVT): tensor ``indices`` (int64, 1-D, sorted, no repeats, each in
  [0, n_parameters)) and tensor ``values`` (float32, same length). Coordinates not sent are
  "no change proposed".
- dense (mechanism "none"): tensor ``values`` only, of length n_parameters.

The safetensors string metadata carries: ``format`` (``protocol.UPDATE_FORMAT``),
``n_parameters``, ``n_iterations`` (N_k, at least 1), ``n_cases`` (at least 1), ``mechanism``,
``params`` (JSON of the mechanism parameters actually applied) and ``encoding``
("sparse" or "dense"). Other metadata keys are ignored, so a later version can add some.

Decoding never executes anything from the file: the header is parsed as JSON by this module
and the tensor bytes by the safetensors library; there is no pickle and no ``torch.load``.
Every problem raises ``UpdateError`` with a message that names it.

Importing this module does not import torch; the functions that need it import it when called.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sitesagent import protocol

if TYPE_CHECKING:
    import numpy as np
    import torch

ENCODING_SPARSE = "sparse"
ENCODING_DENSE = "dense"
ENCODINGS = (ENCODING_SPARSE, ENCODING_DENSE)

REQUIRED_METADATA = ("format", "n_parameters", "n_iterations", "n_cases", "mechanism", "params", "encoding")

# safetensors' own dtype names for the two tensors of the format.
_WIRE_DTYPES = {protocol.UPDATE_INDICES: "I64", protocol.UPDATE_VALUES: "F32"}
_HEADER_LENGTH_BYTES = 8
_DECIMAL = re.compile(r"[0-9]{1,18}")


class UpdateError(ValueError):
    """An update that is not a well-formed update file; the message names the problem."""


@dataclass(frozen=True, eq=False)
class Update:
    """One decoded update. ``indices`` is None for a dense update.

    ``params`` holds the mechanism parameters as ``protocol.validate_mechanism`` returns them
    (floats, canonical names).
    """

    indices: torch.Tensor | None
    values: torch.Tensor
    n_parameters: int
    n_iterations: int
    n_cases: int
    mechanism: str
    params: dict[str, float]
    encoding: str

    @property
    def n_values(self) -> int:
        return int(self.values.numel())


# --- encoding -------------------------------------------------------------------------------


def encode_update(
    *,
    indices: Any,
    values: Any,
    n_parameters: int,
    n_iterations: int,
    n_cases: int,
    mechanism: str,
    params: Mapping[str, Any],
) -> bytes:
    """Write one update as safetensors bytes.

    ``indices`` is None for a dense update ("none" mechanism), else any 1-D integer tensor or
    array (written as int64); ``values`` any 1-D real tensor or array (written as float32).
    The same checks as ``decode_update`` run first, so the agent cannot write a file the
    coordinator would refuse for its form.
    """
    import safetensors.torch
    import torch

    clean_params = _checked_params(mechanism, params)
    counts = {
        "n_parameters": _checked_count("n_parameters", n_parameters),
        "n_iterations": _checked_count("n_iterations", n_iterations),
        "n_cases": _checked_count("n_cases", n_cases),
    }
    flat_values = _as_wire_tensor(values, torch.float32, protocol.UPDATE_VALUES)
    tensors = {protocol.UPDATE_VALUES: flat_values}
    if indices is None:
        check_dense_layout(flat_values, counts["n_parameters"])
        encoding = ENCODING_DENSE
    else:
        flat_indices = _as_wire_tensor(indices, torch.int64, protocol.UPDATE_INDICES)
        check_sparse_layout(flat_indices, flat_values, counts["n_parameters"])
        tensors[protocol.UPDATE_INDICES] = flat_indices
        encoding = ENCODING_SPARSE
    metadata = {
        "format": protocol.UPDATE_FORMAT,
        **{name: str(count) for name, count in counts.items()},
        "mechanism": mechanism,
        "params": json.dumps(clean_params, sort_keys=True),
        "encoding": encoding,
    }
    return safetensors.torch.save(tensors, metadata=metadata)


def _as_wire_tensor(data: Any, dtype: torch.dtype, name: str) -> torch.Tensor:
    import torch

    tensor = torch.as_tensor(data)
    if tensor.dim() != 1:
        raise UpdateError(f"{name} must be a 1-D vector, not of shape {tuple(tensor.shape)}")
    if dtype == torch.int64 and (
        tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool
    ):
        raise UpdateError(f"{name} must hold integers, not {tensor.dtype}")
    if dtype == torch.float32 and (tensor.is_complex() or tensor.dtype == torch.bool):
        raise UpdateError(f"{name} must hold real numbers, not {tensor.dtype}")
    # safetensors writes the tensor's own storage, so it must be a dense CPU copy.
    return tensor.detach().to(device="cpu", dtype=dtype).contiguous()


# --- decoding -------------------------------------------------------------------------------


def decode_update(data: bytes, *, max_bytes: int | None = None) -> Update:
    """Read one update from safetensors bytes, refusing anything that is not a well-formed update.

    ``max_bytes`` bounds the file size before any parsing. Raises ``UpdateError``.
    """
    import safetensors
    import safetensors.torch

    data = bytes(data)
    if max_bytes is not None and len(data) > max_bytes:
        raise UpdateError(f"update is {len(data)} bytes, more than the limit of {max_bytes} bytes")
    header = _read_header(data)
    metadata = header.pop("__metadata__", None)
    _check_tensor_entries(header)
    fields = _parse_metadata(metadata)
    has_indices = protocol.UPDATE_INDICES in header
    if has_indices != (fields["encoding"] == ENCODING_SPARSE):
        presence = "has an indices tensor" if has_indices else "has no indices tensor"
        raise UpdateError(f"encoding is {fields['encoding']} but the file {presence}")
    try:
        tensors = safetensors.torch.load(data)
    except (safetensors.SafetensorError, ValueError, RuntimeError) as error:
        raise UpdateError(f"not a valid safetensors file: {error}") from None
    values = tensors[protocol.UPDATE_VALUES]
    indices = tensors.get(protocol.UPDATE_INDICES)
    if indices is None:
        check_dense_layout(values, fields["n_parameters"])
    else:
        check_sparse_layout(indices, values, fields["n_parameters"])
    return Update(indices=indices, values=values, **fields)


def _read_header(data: bytes) -> dict[str, Any]:
    """Parse the safetensors JSON header ourselves, to name problems before the library runs."""
    if len(data) < _HEADER_LENGTH_BYTES:
        raise _not_safetensors(data, f"only {len(data)} bytes long")
    header_length = int.from_bytes(data[:_HEADER_LENGTH_BYTES], "little")
    if header_length > len(data) - _HEADER_LENGTH_BYTES:
        raise _not_safetensors(
            data,
            f"its header claims {header_length} bytes but only {len(data) - _HEADER_LENGTH_BYTES} follow",
        )
    raw = data[_HEADER_LENGTH_BYTES : _HEADER_LENGTH_BYTES + header_length]
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):
        # ValueError also covers a number too long to convert; RecursionError, nesting too deep.
        raise _not_safetensors(data, "the header is not JSON") from None
    if not isinstance(header, dict):
        raise _not_safetensors(data, "the header is not a JSON object")
    return header


def _not_safetensors(data: bytes, reason: str) -> UpdateError:
    # Only a hint: a real safetensors header length can also start with these bytes.
    if data[:4] == b"PK\x03\x04" or (
        data[:1] == b"\x80" and data[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")
    ):
        reason += "; it looks like a pickle or torch.save file, and those are refused"
    return UpdateError(f"not a safetensors file: {reason}")


def _check_tensor_entries(header: Mapping[str, Any]) -> None:
    unknown = sorted(set(header) - set(_WIRE_DTYPES))
    if unknown:
        raise UpdateError(f"unknown tensor(s) {', '.join(map(repr, unknown))} in update")
    if protocol.UPDATE_VALUES not in header:
        raise UpdateError(f"missing tensor {protocol.UPDATE_VALUES!r}")
    for name, entry in header.items():
        if not isinstance(entry, dict):
            raise UpdateError(f"not a valid safetensors file: entry for {name!r} is not an object")
        dtype = entry.get("dtype")
        if dtype != _WIRE_DTYPES[name]:
            raise UpdateError(f"tensor {name!r} has dtype {dtype}, expected {_WIRE_DTYPES[name]}")
        shape = entry.get("shape")
        if not isinstance(shape, list) or len(shape) != 1:
            raise UpdateError(f"tensor {name!r} has shape {shape}, expected a 1-D vector")


def _parse_metadata(metadata: Any) -> dict[str, Any]:
    if not isinstance(metadata, dict):
        raise UpdateError("update has no metadata")
    missing = [key for key in REQUIRED_METADATA if key not in metadata]
    if missing:
        raise UpdateError(f"metadata is missing {', '.join(missing)}")
    if metadata["format"] != protocol.UPDATE_FORMAT:
        raise UpdateError(f"metadata format is {metadata['format']!r}, expected {protocol.UPDATE_FORMAT!r}")
    if metadata["encoding"] not in ENCODINGS:
        raise UpdateError(f"metadata encoding is {metadata['encoding']!r}, expected sparse or dense")
    mechanism = metadata["mechanism"]
    if mechanism not in protocol.MECHANISMS:
        raise UpdateError(f"unknown mechanism {mechanism!r}")
    try:
        params = json.loads(metadata["params"])
    except (TypeError, ValueError, RecursionError):
        raise UpdateError(f"metadata params is not JSON: {metadata['params']!r}") from None
    if not isinstance(params, dict):
        raise UpdateError("metadata params must be a JSON object")
    return {
        "n_parameters": _parse_count(metadata, "n_parameters"),
        "n_iterations": _parse_count(metadata, "n_iterations"),
        "n_cases": _parse_count(metadata, "n_cases"),
        "mechanism": mechanism,
        "params": _checked_params(mechanism, params),
        "encoding": metadata["encoding"],
    }


def _parse_count(metadata: Mapping[str, Any], key: str) -> int:
    text = metadata[key]
    # Plain decimal digits only: int() would also take "+3", " 3", "3_000" and "٣".
    if not isinstance(text, str) or not _DECIMAL.fullmatch(text):
        raise UpdateError(f"metadata {key} must be a whole number, not {text!r}")
    return _checked_count(key, int(text))


def _checked_count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise UpdateError(f"{name} must be a whole number, not {value!r}")
    if value < 1:
        raise UpdateError(f"{name} must be at least 1, not {value}")
    return value


def _checked_params(mechanism: str, params: Mapping[str, Any]) -> dict[str, float]:
    try:
        return protocol.validate_mechanism(mechanism, params)
    except protocol.ProtocolError as error:
        raise UpdateError(f"bad mechanism parameters: {error}") from None


# --- the layout checks both sides run -------------------------------------------------------


def check_sparse_layout(indices: torch.Tensor, values: torch.Tensor, n_parameters: int) -> None:
    """Raise UpdateError unless indices/values form a valid sparse update of n_parameters."""
    import torch

    if indices.dtype != torch.int64:
        raise UpdateError(f"indices must be int64, not {indices.dtype}")
    if values.dtype != torch.float32:
        raise UpdateError(f"values must be float32, not {values.dtype}")
    if indices.dim() != 1 or values.dim() != 1:
        raise UpdateError("indices and values must be 1-D vectors")
    if indices.numel() != values.numel():
        raise UpdateError(f"indices has {indices.numel()} entries but values has {values.numel()}")
    if indices.numel() > n_parameters:
        raise UpdateError(f"{indices.numel()} values for a model of only {n_parameters} parameters")
    if indices.numel() == 0:
        return
    rises = indices[1:] > indices[:-1]
    if not bool(rises.all()):
        position = int((~rises).nonzero()[0, 0]) + 1
        raise UpdateError(f"indices must be sorted without repeats; entry {position} breaks the order")
    # Sorted, so the first and last entries bound them all.
    first, last = int(indices[0]), int(indices[-1])
    if first < 0 or last >= n_parameters:
        bad = first if first < 0 else last
        raise UpdateError(f"index {bad} is outside the model's {n_parameters} parameters")


def check_dense_layout(values: torch.Tensor, n_parameters: int) -> None:
    """Raise UpdateError unless values is a dense update of n_parameters float32 numbers."""
    import torch

    if values.dtype != torch.float32:
        raise UpdateError(f"values must be float32, not {values.dtype}")
    if values.dim() != 1 or values.numel() != n_parameters:
        raise UpdateError(f"a dense update needs {n_parameters} values, not shape {tuple(values.shape)}")


# --- sizes of cheaper encodings, for the bytes-on-the-wire measurements ---------------------


def encoded_sizes(indices: Any, values: Any, n_parameters: int) -> dict[str, int]:
    """Bytes on the wire of one sparse update under several encodings (payload only, no header).

    Keys: ``dense_float32`` (every coordinate), ``int64_float32`` (the format today),
    ``int32_float32`` (fits while n < 2**31), ``delta_varint_float32`` (gaps between sorted
    indices as LEB128 varints), ``delta_uint16_float32`` (gaps as uint16, with a 0xFFFF escape
    followed by a uint32 for larger gaps), ``bitmap_float32`` (one bit per parameter), the same
    three index codes with float16 values, and ``entropy_bound_float32``: log2(n choose k) bits,
    the least any code can spend on the index set, plus float32 values.

    Only the default (int64 + float32) is decodable. float16 halves the values but keeps 11
    significant bits and overflows past 65504: SVT's noise in weight units (N_k times a scale
    of 2*c*gamma/eps_release) can exceed that, so bfloat16 (same size) would be the safer half.
    """
    import numpy as np

    index_array = np.asarray(indices, dtype=np.int64).reshape(-1)
    count = int(np.asarray(values).size)
    if index_array.size != count:
        raise UpdateError(f"indices has {index_array.size} entries but values has {count}")
    gaps = _index_gaps(index_array)
    index_bytes = {
        "int64": 8 * count,
        "int32": 4 * count,
        "delta_varint": _varint_bytes(gaps),
        "delta_uint16": 2 * count + 4 * int(np.count_nonzero(gaps >= 0xFFFF)),
        "bitmap": math.ceil(n_parameters / 8),
    }
    sizes = {"dense_float32": 4 * n_parameters}
    sizes.update({f"{code}_float32": size + 4 * count for code, size in index_bytes.items()})
    for code in ("int64", "delta_varint", "bitmap"):
        sizes[f"{code}_float16"] = index_bytes[code] + 2 * count
    sizes["entropy_bound_float32"] = math.ceil(_log2_binomial(n_parameters, count) / 8) + 4 * count
    return sizes


def _index_gaps(indices: np.ndarray) -> np.ndarray:
    """Zero-based gaps: the first index, then how many coordinates each next index skips."""
    import numpy as np

    if indices.size == 0:
        return indices
    return np.diff(indices, prepend=-1) - 1


def _varint_bytes(gaps: np.ndarray) -> int:
    import numpy as np

    # One byte per 7 bits: a gap below 2**7 takes 1 byte, below 2**14 two, and so on.
    total = gaps.size
    for bits in range(7, 64, 7):
        total += int(np.count_nonzero(gaps >= (1 << bits)))
    return total


def _log2_binomial(n: int, k: int) -> float:
    if k <= 0 or k >= n:
        return 0.0
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2)
