"""How fast the coordinator aggregates a round, next to the floor of reading the same bytes once.

    .venv/bin/python bench/aggregate.py [--device cpu|cuda] [--json PATH] [--repeats R] [--threads T]

Model: MONAI SegResNet in the BraTS configuration, 4,702,227 floating-point parameters (counted
from MONAI 1.6.1's state dict). Updates: sparse at fraction 0.1 (c = 470,223 coordinates, int64
indices + float32 values, 5.6 MB each), N_k drawn from 50..500. Every figure is the median of
``--repeats`` runs after one warm-up.

- floor: one read pass over the bytes aggregation must read (the base and every update's indices
  and values), timed as summing each tensor on the same device, the same way.
- aggregate: ``coordinator.aggregation.aggregate`` on decoded updates held on the CPU, as the
  Celery worker has them; on CUDA also with the updates already on the GPU.
- decode: ``sitesagent.updates.decode_update`` on the safetensors bytes, reported apart.
- robust rules (median, trimmed mean, mean with a norm bound) for 13 updates.
- bytes on the wire of one update under other encodings (``encoded_sizes``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import _common  # noqa: E402  (puts the repository on sys.path)
import torch

from coordinator.aggregation import aggregate  # noqa: E402
from sitesagent import protocol  # noqa: E402
from sitesagent.updates import Update, decode_update, encode_update, encoded_sizes  # noqa: E402

SEGRESNET_BRATS_PARAMETERS = 4_702_227
FRACTION = 0.1
SITE_COUNTS = (13, 100)
ROBUST_SITES = 13
PARTIAL = {"fraction": FRACTION, "gamma": 0.01}


def main() -> None:
    arguments = parse_arguments()
    if arguments.threads:
        torch.set_num_threads(arguments.threads)
    device = torch.device(arguments.device)
    n = arguments.n
    print(f"# {machine_line(device)}", flush=True)
    base = torch.randn(n, generator=torch.Generator().manual_seed(0))
    blobs = make_update_blobs(n, max(SITE_COUNTS), seed=1)
    results: dict = {"machine": machine(device), "n_parameters": n, "fraction": FRACTION, "runs": []}
    for count in SITE_COUNTS:
        results["runs"].append(measure_mean(base, blobs[:count], device, arguments.repeats))
    results["robust"] = measure_robust(base, blobs[:ROBUST_SITES], device, arguments.repeats)
    results["wire_bytes"] = wire_sizes(blobs[0], n)
    report(results)
    if arguments.json:
        Path(arguments.json).write_text(json.dumps(results, indent=2) + "\n")


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: index_add_ is serial on the CPU)",
    )
    parser.add_argument("--n", type=int, default=SEGRESNET_BRATS_PARAMETERS, help=argparse.SUPPRESS)
    return parser.parse_args()


def machine(device: torch.device) -> dict:
    info = {**_common.machine(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def machine_line(device: torch.device) -> str:
    return ", ".join(f"{key} {value}" for key, value in machine(device).items())


# --- data -----------------------------------------------------------------------------------


def make_update_blobs(n: int, count: int, *, seed: int) -> list[bytes]:
    generator = torch.Generator().manual_seed(seed)
    c = protocol.selection_count(FRACTION, n)
    blobs = []
    for _ in range(count):
        indices = torch.randperm(n, generator=generator)[:c].sort().values
        blobs.append(
            encode_update(
                indices=indices,
                values=torch.randn(c, generator=generator) * 1e-3,
                n_parameters=n,
                n_iterations=int(torch.randint(50, 501, (1,), generator=generator)),
                n_cases=20,
                mechanism="partial",
                params=PARTIAL,
            )
        )
    return blobs


# --- timing ---------------------------------------------------------------------------------


def median_seconds(
    functions: Mapping[str, Callable[[], object]], repeats: int, device: torch.device
) -> dict[str, float]:
    """The median time of each function, taken in turns so that all see the same machine state.

    Interleaving matters on a shared machine: a floor timed a second before the aggregation can
    meet another memory load than the aggregation does.
    """

    def timed(function: Callable[[], object]) -> float:
        synchronize(device)
        start = time.perf_counter()
        function()
        synchronize(device)
        return time.perf_counter() - start

    for function in functions.values():
        timed(function)  # warm-up: first-touch page faults, CUDA context and kernels
    samples: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            samples[name].append(timed(function))
    return {name: statistics.median(times) for name, times in samples.items()}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def read_pass(tensors: list[torch.Tensor]) -> None:
    for tensor in tensors:
        tensor.sum()


def tensors_of(base: torch.Tensor, updates: list[Update]) -> list[torch.Tensor]:
    tensors = [base]
    for update in updates:
        if update.indices is not None:
            tensors.append(update.indices)
        tensors.append(update.values)
    return tensors


def on_device(update: Update, device: torch.device) -> Update:
    indices = None if update.indices is None else update.indices.to(device)
    return dataclasses.replace(update, indices=indices, values=update.values.to(device))


# --- measurements ---------------------------------------------------------------------------


def measure_mean(base: torch.Tensor, blobs: list[bytes], device: torch.device, repeats: int) -> dict:
    updates = [decode_update(blob) for blob in blobs]
    resident = [on_device(update, device) for update in updates]
    device_tensors = tensors_of(base.to(device), resident)
    timed: dict[str, Callable[[], object]] = {
        "floor_s": lambda: read_pass(device_tensors),
        "aggregate_s": lambda: aggregate(base, updates, device=device.type),
        "decode_s": lambda: [decode_update(blob) for blob in blobs],
    }
    if device.type == "cuda":
        base_on_device = device_tensors[0]
        timed["aggregate_resident_s"] = lambda: aggregate(base_on_device, resident, device="cuda")
        timed["host_to_device_copy_s"] = lambda: [tensor.to(device) for tensor in tensors_of(base, updates)]
    run = {
        "sites": len(blobs),
        "update_bytes": sum(len(blob) for blob in blobs),
        "read_bytes": sum(tensor.numel() * tensor.element_size() for tensor in tensors_of(base, updates)),
        **median_seconds(timed, repeats, device),
    }
    run["ratio"] = run["aggregate_s"] / run["floor_s"]
    if device.type == "cuda":
        run["ratio_resident"] = run["aggregate_resident_s"] / run["floor_s"]
    print(f"  measured {len(blobs)} sites", file=sys.stderr, flush=True)
    return run


def measure_robust(base: torch.Tensor, blobs: list[bytes], device: torch.device, repeats: int) -> dict:
    updates = [decode_update(blob) for blob in blobs]
    variants = {
        "mean": {"rule": "mean"},
        "mean_norm_bound": {"rule": "mean", "norm_bound": 0.5},
        "median": {"rule": "median"},
        "trimmed_mean": {"rule": "trimmed_mean", "trim_fraction": 0.1},
    }
    # The robust rules take about a second each on a CPU; fewer repeats keep the run short.
    repeats = min(repeats, 3) if device.type == "cpu" else repeats
    functions = {
        name: (lambda kwargs=kwargs: aggregate(base, updates, device=device.type, **kwargs))
        for name, kwargs in variants.items()
    }
    return median_seconds(functions, repeats, device)


def wire_sizes(blob: bytes, n: int) -> dict:
    update = decode_update(blob)
    sizes = encoded_sizes(update.indices, update.values, n)
    sizes["safetensors_file"] = len(blob)
    return sizes


# --- report ---------------------------------------------------------------------------------


def report(results: dict) -> None:
    print(f"n = {results['n_parameters']:,} parameters, fraction {results['fraction']}, rule mean")
    header = (
        f"{'sites':>5} {'read MB':>8} {'floor ms':>9} {'aggregate ms':>13} {'ratio':>6} {'decode ms':>10}"
    )
    resident = "aggregate_resident_s" in results["runs"][0]
    if resident:
        header += f" {'on-GPU agg ms':>14} {'ratio':>6} {'H2D copy ms':>12}"
    print(header)
    for run in results["runs"]:
        line = (
            f"{run['sites']:>5} {run['read_bytes'] / 1e6:>8.1f} {run['floor_s'] * 1e3:>9.2f} "
            f"{run['aggregate_s'] * 1e3:>13.2f} {run['ratio']:>6.2f} {run['decode_s'] * 1e3:>10.2f}"
        )
        if resident:
            line += (
                f" {run['aggregate_resident_s'] * 1e3:>14.2f} {run['ratio_resident']:>6.2f}"
                f" {run['host_to_device_copy_s'] * 1e3:>12.2f}"
            )
        print(line)
    print(f"\nrules, {ROBUST_SITES} sites:")
    for name, seconds in results["robust"].items():
        print(f"  {name:<16} {seconds * 1e3:>10.1f} ms")
    print("\nbytes on the wire, one update:")
    for name, size in results["wire_bytes"].items():
        print(f"  {name:<24} {size:>12,}")


if __name__ == "__main__":
    main()
