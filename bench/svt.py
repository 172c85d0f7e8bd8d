"""How fast the privacy mechanisms are on a SegResNet-sized delta, against floors and a Python loop.

    .venv/bin/python bench/svt.py [--repeats 7] [--threads N] [--device cpu|cuda] [--json PATH]

Times ``svt`` and ``partial_share`` on a 4.7-million-coordinate float32 delta at fraction 0.1
(median and fastest of ``--repeats`` runs after one warm-up), next to what no implementation
can beat: one read of the delta, and drawing as many Laplace values as ``svt`` draws in the
same calls. It also times ``svt_python_loop``, Alg. 1 one coordinate at a time, on a
50,000-coordinate slice and scales that up to the full delta (the loop's work grows linearly
with the coordinates). docs/performance-svt.md holds the figures and how to read them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import torch

# Imported as `bench.svt` by the tests, or run as a script: either way `_common` (which puts the
# repository on sys.path) sits beside this file.
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from sitesagent import privacy  # noqa: E402
from sitesagent.protocol import selection_count, svt_noise_scales, svt_split  # noqa: E402

N_PARAMETERS = 4_700_000  # MONAI SegResNet in the BraTS configuration
LOOP_SLICE = 50_000
FRACTION = 0.1
GAMMA = 1e-3
TAU = 1e-4
ROUND_EPSILON = 1.0
CPU = torch.device("cpu")


def svt_python_loop(
    delta: Sequence[float],
    *,
    fraction: float,
    gamma: float,
    tau: float,
    eps_threshold: float,
    eps_query: float,
    eps_release: float,
    rng: random.Random,
) -> tuple[list[int], list[float]]:
    """SVT (Lyu, Su and Li 2017, Alg. 1, as DESIGN section 6 words it), one coordinate at a time.

    The slow, literal version: the yardstick ``svt`` is timed against, and the reference the
    tests compare its output distribution with.
    """
    params = {"fraction": fraction, "gamma": gamma, "tau": tau}
    params |= {"eps_threshold": eps_threshold, "eps_query": eps_query, "eps_release": eps_release}
    scales = svt_noise_scales(params, len(delta))
    count = selection_count(fraction, len(delta))

    def laplace(scale: float) -> float:
        return scale * math.copysign(rng.expovariate(1.0), rng.random() - 0.5)

    def clip(value: float) -> float:
        return min(max(value, -gamma), gamma)

    threshold = tau + laplace(scales["threshold"])
    selected: list[int] = []
    unselected = list(range(len(delta)))
    for _ in range(privacy.MAX_PASSES):
        rng.shuffle(unselected)
        passed_over = []
        for coordinate in unselected:
            if abs(clip(delta[coordinate])) + laplace(scales["query"]) >= threshold:
                selected.append(coordinate)
                if len(selected) == count:
                    break
            else:
                passed_over.append(coordinate)
        if len(selected) == count:
            break
        unselected = passed_over
    selected.sort()
    return selected, [clip(delta[coordinate]) + laplace(scales["release"]) for coordinate in selected]


class Timings(NamedTuple):
    wall: list[float]  # seconds on the clock
    cpu: list[float]  # seconds this process ran, all threads together: what a busy machine can't inflate


def timings(run: Callable[[int], object], repeats: int, device: torch.device = CPU) -> Timings:
    """How long ``run(seed)`` takes for ``repeats`` seeds, after one untimed warm-up."""
    run(repeats)
    wall, cpu = [], []
    for seed in range(repeats):
        synchronize(device)
        wall_start, cpu_start = time.perf_counter(), time.process_time()
        run(seed)
        synchronize(device)
        wall.append(time.perf_counter() - wall_start)
        cpu.append(time.process_time() - cpu_start)
    return Timings(wall, cpu)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def counting_laplace_draws() -> Iterator[list[int]]:
    """Count the Laplace values ``privacy`` draws inside the block (one entry per draw call)."""
    counts: list[int] = []
    original = privacy._laplace

    def counting(scale, count, generator, device):
        counts.append(count)
        return original(scale, count, generator, device)

    privacy._laplace = counting
    try:
        yield counts
    finally:
        privacy._laplace = original


def measure(repeats: int, device: torch.device) -> dict:
    delta = torch.randn(N_PARAMETERS, generator=torch.Generator().manual_seed(0)).mul_(1e-4)
    split = svt_split(ROUND_EPSILON, fraction=FRACTION, n_parameters=N_PARAMETERS)
    params = {"fraction": FRACTION, "gamma": GAMMA, "tau": TAU, **split}
    loop_slice = delta[:LOOP_SLICE].tolist()
    delta = delta.to(device)

    def seeded(seed: int) -> torch.Generator:
        return torch.Generator(device=device).manual_seed(seed)

    def run_svt(seed: int) -> object:
        return privacy.svt(delta, generator=seeded(seed), **params)

    draws = []
    for seed in range(repeats):
        with counting_laplace_draws() as counts:
            run_svt(seed)
        draws.append(sum(counts))
    noise_draws = int(statistics.median(draws))

    measured = {
        "svt": timings(run_svt, repeats, device),
        "partial_share": timings(
            lambda seed: privacy.partial_share(delta, fraction=FRACTION, gamma=GAMMA), repeats, device
        ),
        "read_floor": timings(lambda seed: delta.sum(), repeats, device),
        "noise_floor": timings(
            lambda seed: privacy._laplace(1.0, noise_draws, seeded(seed), device), repeats, device
        ),
        "randperm_n": timings(
            lambda seed: torch.randperm(N_PARAMETERS, generator=seeded(seed), device=device), repeats, device
        ),
        "python_loop_slice": timings(
            lambda seed: svt_python_loop(loop_slice, rng=random.Random(seed), **params), repeats
        ),
    }
    median = {f"{name}_s": statistics.median(times.wall) for name, times in measured.items()}
    return {
        "n_parameters": N_PARAMETERS,
        "selected": selection_count(FRACTION, N_PARAMETERS),
        "params": params,
        "noise_draws": noise_draws,
        "python_loop_slice": LOOP_SLICE,
        "repeats": repeats,
        **median,
        "python_loop_extrapolated_s": median["python_loop_slice_s"] * N_PARAMETERS / LOOP_SLICE,
        "svt_over_noise_floor": median["svt_s"] / median["noise_floor_s"],
        "fastest_s": {name: min(times.wall) for name, times in measured.items()},
        "median_cpu_s": {name: statistics.median(times.cpu) for name, times in measured.items()},
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": _common.cpu_model(),
        "cpus": os.cpu_count(),
    }


def report(figures: dict) -> str:
    n = figures["n_parameters"]
    fastest, cpu = figures["fastest_s"], figures["median_cpu_s"]
    rows = [
        ("svt", "svt"),
        ("partial_share", "partial_share"),
        ("floor: one read of the delta (sum)", "read_floor"),
        (f"floor: {figures['noise_draws']:,} Laplace draws (as many as svt)", "noise_floor"),
        ("for comparison: torch.randperm(n)", "randperm_n"),
        (f"Python loop (CPU) on {figures['python_loop_slice']:,} coordinates", "python_loop_slice"),
    ]
    return "\n".join(
        [
            f"delta: {n:,} float32 coordinates, fraction {FRACTION} (c = {figures['selected']:,}),"
            f" gamma {GAMMA}, tau {TAU}, epsilon {ROUND_EPSILON} split by protocol.svt_split",
            f"torch {figures['torch']} on {figures['device']}, {figures['threads']} threads,"
            f" {figures['cpus']} CPUs, {figures['cpu']}; {figures['repeats']} runs",
            f"{'':<52}{'median':>10}{'fastest':>13}{'CPU time':>13}",
            *(
                f"{label:<52}{figures[name + '_s'] * 1e3:7.1f} ms{fastest[name] * 1e3:10.1f} ms"
                f"{cpu[name] * 1e3:10.1f} ms"
                for label, name in rows
            ),
            f"{f'Python loop, extrapolated to {n:,}':<52}{figures['python_loop_extrapolated_s']:7.1f} s",
            f"{'svt / noise floor (medians)':<52}{figures['svt_over_noise_floor']:7.1f} x",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per figure (median)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--device", type=torch.device, default=CPU, help="where the delta lives (cpu, cuda)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    figures = measure(args.repeats, args.device)
    print(report(figures))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
