"""Bytes on the wire for one SVT update of the BraTS SegResNet, and what encoding them costs.

    .venv/bin/python bench/wire.py [--repeats 9] [--n-iterations 100] [--json PATH]

One real ``sitesagent.privacy.svt`` call on a 4,702,227-coordinate per-step delta at fraction
0.1 (c = 470,223), with the coordinator's default SVT parameters, gives the update. Then:

- sizes: our format (``encode_update``: int64 indices + float32 values in safetensors) against
  the dense float32 delta, and the cheaper codes ``sitesagent.updates.encoded_sizes`` computes
  (int32, uint16 gaps, LEB128 varint gaps, bitmap; float16 values), plus the same file through
  zlib (what HTTP compression would give with no protocol change);
- the floor: the information bound for the index set (log2 C(n, c) bits) plus 16-bit values;
- half precision: the error float16 and bfloat16 rounding adds, next to the Laplace noise the
  mechanism already put in each released value (scale ``protocol.svt_noise_scales``), for
  eps_release from the default up to a thousand times it, and whether values overflow float16;
- time: ``encode_update`` and ``decode_update`` next to one copy of the file's bytes (the floor
  for any encoder that has to produce them), and vectorised prototypes of the varint + float16
  and bitmap + float16 codes, checked to round-trip.

Every time is the median of ``--repeats`` interleaved runs after one warm-up.
"""

from __future__ import annotations

import math
import sys
import time
import zlib
from typing import Any

import _common  # puts the repository on sys.path, so it comes before sitesagent
import numpy as np
import torch

from sitesagent import protocol
from sitesagent.privacy import svt
from sitesagent.updates import decode_update, encode_update, encoded_sizes

SEGRESNET_BRATS_PARAMETERS = 4_702_227  # MONAI 1.6.1's state dict, BraTS configuration
DEFAULT_SVT = protocol.DEFAULT_SVT_PARAMS  # what a federation uses when it sets none
EPS_RELEASE_SWEEP = (0.5, 5.0, 50.0, 500.0, 50_000.0)
FLOAT16_MAX = float(torch.finfo(torch.float16).max)


def main() -> None:
    parser = _common.argument_parser(__doc__)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument(
        "--n-iterations", type=int, default=100, help="N_k, local iterations (values are sent times N_k)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n", type=int, default=SEGRESNET_BRATS_PARAMETERS, help="model parameters")
    arguments = parser.parse_args()
    torch.set_num_threads(1)  # as the other CPU benchmarks: the shared sandbox stalls thread pools

    results: dict[str, Any] = {"machine": _common.machine(), "n_parameters": arguments.n}
    print(f"# {_common.machine_line(results['machine'])}", flush=True)
    delta = per_step_delta(arguments.n, arguments.seed)
    started = time.perf_counter()
    indices, per_step_values = run_svt(delta, DEFAULT_SVT, arguments.seed)
    results["svt_seconds"] = time.perf_counter() - started
    values = per_step_values * arguments.n_iterations
    blob = encode(indices, values, arguments.n, arguments.n_iterations, DEFAULT_SVT)

    results["params"] = DEFAULT_SVT
    results["n_iterations"] = arguments.n_iterations
    results["selected"] = int(indices.numel())
    results["sizes"] = wire_sizes(indices, values, blob, arguments.n)
    results["floor_bytes"] = floor_bytes(arguments.n, int(indices.numel()))
    results["half_precision"] = half_precision_sweep(delta, arguments.seed, arguments.n_iterations)
    results["timings"] = timings(indices, values, blob, arguments)
    results["machine"]["load_average_after"] = _common.load_average()
    report(results)
    _common.write_json(arguments.json, results)


# --- the update ------------------------------------------------------------------------------


def per_step_delta(n: int, seed: int) -> torch.Tensor:
    """A stand-in per-step delta: normal, spread like gamma (most of it inside the clip bound)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=generator) * DEFAULT_SVT["gamma"]


def run_svt(delta: torch.Tensor, params: dict[str, float], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    return svt(delta, **params, generator=torch.Generator().manual_seed(seed + 1))


def encode(indices: torch.Tensor, values: torch.Tensor, n: int, n_iterations: int, params: dict) -> bytes:
    return encode_update(
        indices=indices,
        values=values,
        n_parameters=n,
        n_iterations=n_iterations,
        n_cases=20,
        mechanism=protocol.MECHANISM_SVT,
        params=params,
    )


# --- sizes -----------------------------------------------------------------------------------


def wire_sizes(indices: torch.Tensor, values: torch.Tensor, blob: bytes, n: int) -> dict[str, int]:
    sizes = encoded_sizes(indices, values, n)
    sizes["safetensors_file"] = len(blob)
    sizes["safetensors_file_zlib1"] = len(zlib.compress(blob, 1))
    sizes["safetensors_file_zlib6"] = len(zlib.compress(blob, 6))
    sizes["indices_plus_values_8_bytes"] = 8 * int(indices.numel())
    return sizes


def floor_bytes(n: int, count: int) -> dict[str, Any]:
    """The least an update of ``count`` of ``n`` coordinates can take with 16-bit values.

    The index set is one of C(n, count) equally likely sets (SVT samples coordinates uniformly
    when, as here, the noise dominates), so no code beats log2 C(n, count) bits on average.
    Values get 16 bits: the narrowest standard float whose rounding the noise dwarfs (see the
    half-precision figures).
    """
    log2_sets = (math.lgamma(n + 1) - math.lgamma(count + 1) - math.lgamma(n - count + 1)) / math.log(2)
    index_bytes = math.ceil(log2_sets / 8)
    return {
        "index_bits_per_entry": log2_sets / count,
        "index_bytes": index_bytes,
        "value_bytes": 2 * count,
        "total": index_bytes + 2 * count,
    }


# --- half precision --------------------------------------------------------------------------


def half_precision_sweep(delta: torch.Tensor, seed: int, n_iterations: int) -> list[dict[str, float]]:
    """Rounding error of 16-bit values against the release noise, for several eps_release."""
    rows = []
    for eps_release in EPS_RELEASE_SWEEP:
        params = {**DEFAULT_SVT, "eps_release": eps_release}
        _, values = run_svt(delta, params, seed)
        scale = protocol.svt_noise_scales(params, delta.numel())["release"]
        rows.append({"eps_release": eps_release, **rounding_errors(values, scale, n_iterations)})
        print(f"  half precision at eps_release {eps_release} measured", file=sys.stderr, flush=True)
    return rows


def rounding_errors(per_step: torch.Tensor, scale: float, n_iterations: int) -> dict[str, float]:
    """How 16-bit storage of the released per-step values compares with their Laplace(scale) noise.

    The rounding is post-processing of an already private release, so it costs no privacy; the
    question is only accuracy: the error's standard deviation over the noise's (sqrt(2) * scale),
    and the share of variance it adds. Per-step values (weight units / N_k) are what a 16-bit code
    should carry, with N_k in the header; in weight units float16 overflows.
    """
    noise_std = math.sqrt(2) * scale
    row: dict[str, float] = {"release_scale": scale, "max_abs_per_step": float(per_step.abs().max())}
    for name, dtype in (("float16", torch.float16), ("bfloat16", torch.bfloat16)):
        error = per_step.to(dtype).to(torch.float32) - per_step
        finite = torch.isfinite(error)
        rms = float(error[finite].pow(2).mean().sqrt())
        row[f"{name}_overflow_share"] = float((~finite).float().mean())
        row[f"{name}_rms_error_over_noise_std"] = rms / noise_std
        row[f"{name}_max_error_over_scale"] = float(error[finite].abs().max()) / scale
        row[f"{name}_added_variance_share"] = (rms / noise_std) ** 2
    in_weight_units = per_step * n_iterations
    overflowing = in_weight_units.abs() > FLOAT16_MAX
    row["float16_overflow_share_in_weight_units"] = float(overflowing.float().mean())
    return row


# --- cheaper codes, as vectorised prototypes -------------------------------------------------


def varint_encode(numbers: np.ndarray) -> np.ndarray:
    """LEB128: 7 bits a byte, the high bit set on every byte of a number but its last."""
    numbers = numbers.astype(np.uint64)
    lengths = np.ones(numbers.size, dtype=np.int64)
    top = int(numbers.max(initial=0))
    for bits in range(7, max(top.bit_length(), 1), 7):
        lengths += numbers >= np.uint64(1 << bits)
    if top < 0x80:
        return numbers.astype(np.uint8)  # one byte each: the usual case at a tenth
    starts = np.cumsum(lengths) - lengths
    out = np.empty(int(lengths.sum()), dtype=np.uint8)
    for k in range(int(lengths.max())):
        has = np.flatnonzero(lengths > k)
        seven = (numbers[has] >> np.uint64(7 * k)) & np.uint64(0x7F)
        more = (lengths[has] > k + 1).astype(np.uint64) << np.uint64(7)
        out[starts[has] + k] = (seven | more).astype(np.uint8)
    return out


def varint_decode(data: np.ndarray) -> np.ndarray:
    ends = np.flatnonzero(data < 0x80)
    if ends.size == data.size:
        return data.astype(np.int64)  # one byte each
    lengths = np.diff(ends, prepend=-1)
    starts = ends - lengths + 1
    numbers = (data[starts] & 0x7F).astype(np.int64)
    for k in range(1, int(lengths.max())):
        has = np.flatnonzero(lengths > k)
        numbers[has] |= (data[starts[has] + k] & 0x7F).astype(np.int64) << (7 * k)
    return numbers


def to_half(per_step: np.ndarray) -> np.ndarray:
    # torch converts to float16 about twice as fast as NumPy here.
    return torch.from_numpy(per_step).half().numpy()


def from_half(halves: np.ndarray, n_iterations: int) -> torch.Tensor:
    return torch.from_numpy(halves).float().mul_(n_iterations)


def varint_f16_encode(indices: np.ndarray, per_step: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    gaps = np.diff(indices, prepend=-1) - 1
    return varint_encode(gaps), to_half(per_step)


def varint_f16_decode(gap_bytes: np.ndarray, halves: np.ndarray, n_iterations: int):
    indices = np.cumsum(varint_decode(gap_bytes) + 1) - 1
    return indices, from_half(halves, n_iterations)


def bitmap_f16_encode(indices: np.ndarray, per_step: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    mask = np.zeros(n, dtype=bool)
    mask[indices] = True
    return np.packbits(mask, bitorder="little"), to_half(per_step)


def bitmap_f16_decode(bits: np.ndarray, halves: np.ndarray, n: int, n_iterations: int):
    indices = np.flatnonzero(np.unpackbits(bits, count=n, bitorder="little"))
    return indices, from_half(halves, n_iterations)


def check_round_trip(name: str, decoded: tuple[np.ndarray, np.ndarray], indices: np.ndarray) -> None:
    if not np.array_equal(decoded[0], indices):
        raise AssertionError(f"{name} prototype does not give back the indices")


# --- timing ----------------------------------------------------------------------------------


def timings(indices: torch.Tensor, values: torch.Tensor, blob: bytes, arguments) -> dict[str, Any]:
    n, n_iterations = arguments.n, arguments.n_iterations
    index_array = indices.numpy()
    per_step = (values / n_iterations).numpy()
    varint_parts = varint_f16_encode(index_array, per_step)
    bitmap_parts = bitmap_f16_encode(index_array, per_step, n)
    check_round_trip("varint", varint_f16_decode(*varint_parts, n_iterations), index_array)
    check_round_trip("bitmap", bitmap_f16_decode(*bitmap_parts, n, n_iterations), index_array)
    functions = {
        "copy_file_bytes": lambda: bytearray(blob),
        "encode_update": lambda: encode(indices, values, n, n_iterations, DEFAULT_SVT),
        "decode_update": lambda: decode_update(blob),
        "varint_f16_encode": lambda: varint_f16_encode(index_array, per_step),
        "varint_f16_decode": lambda: varint_f16_decode(*varint_parts, n_iterations),
        "bitmap_f16_encode": lambda: bitmap_f16_encode(index_array, per_step, n),
        "bitmap_f16_decode": lambda: bitmap_f16_decode(*bitmap_parts, n, n_iterations),
        "zlib1_compress_file": lambda: zlib.compress(blob, 1),
    }
    samples = _common.interleaved_runs(functions, arguments.repeats)
    return {name: _common.summary(times) for name, times in samples.items()}


# --- report ----------------------------------------------------------------------------------


def report(results: dict[str, Any]) -> None:
    n, count = results["n_parameters"], results["selected"]
    sizes, floor = results["sizes"], results["floor_bytes"]
    today = sizes["safetensors_file"]
    fraction = DEFAULT_SVT["fraction"]
    print(f"\nn = {n:,}, c = {count:,} released (fraction {fraction}), N_k = {results['n_iterations']}")
    print(f"svt(): {results['svt_seconds'] * 1e3:.0f} ms (one call)")
    print(f"\n{'encoding':<34} {'bytes':>12} {'of ours':>8} {'x floor':>8}")
    for name, size in sorted(sizes.items(), key=lambda item: -item[1]):
        print(f"{name:<34} {size:>12,} {size / today:>8.0%} {size / floor['total']:>8.2f}")
    print(
        f"{'floor: log2 C(n,c) bits + float16':<34} {floor['total']:>12,} {floor['total'] / today:>8.0%}"
        f" {1:>8.2f}   ({floor['index_bits_per_entry']:.2f} bits an index)"
    )
    print("\nhalf precision of the released per-step values, against the release noise:")
    print(
        f"{'eps_release':>11} {'scale b':>10} {'f16 rms err/std':>16} {'f16 var share':>14} "
        f"{'bf16 rms err/std':>17} {'f16 overflow':>13} {'f16 overflow x N_k':>19}"
    )
    for row in results["half_precision"]:
        print(
            f"{row['eps_release']:>11g} {row['release_scale']:>10.4g} "
            f"{row['float16_rms_error_over_noise_std']:>16.2e} "
            f"{row['float16_added_variance_share']:>14.1e} {row['bfloat16_rms_error_over_noise_std']:>17.2e} "
            f"{row['float16_overflow_share']:>13.1%} {row['float16_overflow_share_in_weight_units']:>19.1%}"
        )
    print(f"\ntimes, median of {results['timings']['encode_update']['runs']} runs:")
    for name, timing in results["timings"].items():
        print(f"  {name:<24} {timing['median'] * 1e3:>9.2f} ms")
    floor_ms = results["timings"]["copy_file_bytes"]["median"]
    for name in ("encode_update", "decode_update"):
        print(f"  {name} / one copy of the file: {results['timings'][name]['median'] / floor_ms:.1f}x")


if __name__ == "__main__":
    main()
