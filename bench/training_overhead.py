"""What `sitesagent.training.train` costs over a plain MONAI training loop doing the same work.

    .venv/bin/python bench/training_overhead.py [--preset tiny] [--size 48] [--iterations 10]
        [--runs 5] [--device cpu|cuda] [--json PATH]

Both sides train the same model (built from the same seed) on the same synthetic cases, with
the same transforms (`sitesagent.data.train_transforms`), cache, batch size, optimiser, loss and
number of steps. The plain loop is MONAI's BraTS tutorial loop written out by hand: a
CacheDataset, a shuffling DataLoader, Adam, DiceLoss and ``loss.item()`` each step. It runs
twice: as the tutorial has it, feeding the network MONAI MetaTensors, and feeding it plain
tensors as `train` does. MetaTensor's per-operation metadata tracking costs time, so the second
is the fair baseline for what `train` adds: hooks (a no-op object here), the seeded generator,
the forked RNG, the device and roi checks and the result record.

Each run is timed end to end (dataset caching included) and, apart, the loop alone; the loops
take turns, after one untimed warm-up each. Figures are the median of ``--runs`` and the best
run (on a shared machine other work only adds time, so the best is the steadier), in wall time
and in this process's CPU time (which other processes on the machine disturb far less). The
overhead is (ours - plain) / plain; the target is under 5%.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from monai.data import CacheDataset, DataLoader  # noqa: E402
from monai.losses import DiceLoss  # noqa: E402

from sitesagent import data, model, synth, training  # noqa: E402


@dataclass
class Clock:
    """Wall and CPU seconds since creation, and since `lap` (the start of the loop)."""

    wall: float = field(default_factory=time.perf_counter)
    cpu: float = field(default_factory=time.process_time)
    loop_wall: float = 0.0
    loop_cpu: float = 0.0

    def lap(self) -> None:
        self.loop_wall, self.loop_cpu = time.perf_counter(), time.process_time()

    def read(self) -> dict[str, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        return {
            "total_s": wall - self.wall,
            "loop_s": wall - self.loop_wall,
            "total_cpu_s": cpu - self.cpu,
            "loop_cpu_s": cpu - self.loop_cpu,
        }


def plain_monai_loop(
    network: torch.nn.Module,
    cases: Sequence[data.Case],
    config: training.TrainConfig,
    *,
    plain_tensors: bool = False,
) -> dict[str, float]:
    """The tutorial's loop. ``plain_tensors`` strips the batch of MONAI's MetaTensor before the
    forward pass, as `train` does."""
    clock = Clock()
    device = torch.device("cuda" if config.device == "cuda" else "cpu")
    dataset = CacheDataset(
        [case.as_item() for case in cases],
        data.train_transforms(config.roi_size),
        num_workers=None,
        progress=False,
    )
    loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=True, num_workers=config.num_workers)
    network.to(device).train()
    optimizer = torch.optim.Adam(network.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    loss_function = DiceLoss(smooth_nr=0, smooth_dr=1e-5, squared_pred=True, to_onehot_y=False, sigmoid=True)
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda")
    total = config.n_iterations(len(cases))
    clock.lap()
    step = 0
    while step < total:
        for batch in loader:
            images, labels = batch["image"].to(device), batch["label"].to(device)
            if plain_tensors:
                images, labels = images.as_tensor(), labels.as_tensor()
            optimizer.zero_grad()
            with torch.autocast(device.type, enabled=device.type == "cuda"):
                loss = loss_function(network(images), labels)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            loss.item()
            step += 1
            if step == total:
                break
    return clock.read()


class _LapAtTraining(training.NoHooks):
    def __init__(self, clock: Clock):
        self.clock = clock

    def on_phase(self, name: str) -> None:
        if name == "training":
            self.clock.lap()


def ours(
    network: torch.nn.Module, cases: Sequence[data.Case], config: training.TrainConfig
) -> dict[str, float]:
    clock = Clock()
    training.train(network, cases, config, hooks=_LapAtTraining(clock))
    return clock.read()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", choices=sorted(model.PRESETS))
    parser.add_argument("--size", type=int, default=48, help="synthetic volume side, voxels; also the crop")
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    config = training.TrainConfig(max_iterations=args.iterations, roi_size=args.size, device=args.device)
    with tempfile.TemporaryDirectory() as folder:
        synth.write_synthetic_cases(folder, args.cases, seed=0, style=0, size=args.size)
        cases = data.discover_cases(folder)
        loops: dict[str, Callable] = {
            "plain": plain_monai_loop,
            "plain_tensors": functools.partial(plain_monai_loop, plain_tensors=True),
            "ours": ours,
        }
        timings: dict[str, list[dict[str, float]]] = {name: [] for name in loops}
        for run in range(args.runs + 1):  # run 0 warms every loop up and is not counted
            for name, loop in loops.items():
                figures = loop(model.build_model(model.preset(args.preset), seed=0), cases, config)
                if run:
                    timings[name].append(figures)
    report = summarise(timings, args)
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


FIGURES = ("total_s", "loop_s", "total_cpu_s", "loop_cpu_s")


def summarise(timings: dict[str, list[dict[str, float]]], args: argparse.Namespace) -> dict:
    median = {name: _statistic(runs, statistics.median) for name, runs in timings.items()}
    # On a shared machine other work only ever adds time, so the fastest run is the steadiest figure.
    best = {name: _statistic(runs, min) for name, runs in timings.items()}
    return {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        "device": args.device,
        "preset": args.preset,
        "parameters": model.count_parameters(model.preset(args.preset)),
        "volume": args.size,
        "cases": args.cases,
        "iterations": args.iterations,
        "runs": args.runs,
        "median": median,
        "best": best,
        "runs_s": {
            name: [{k: round(v, 4) for k, v in run.items()} for run in runs] for name, runs in timings.items()
        },
        "overhead_pct": {
            statistic: {baseline: _overhead(figures, baseline) for baseline in ("plain", "plain_tensors")}
            for statistic, figures in (("median", median), ("best", best))
        },
    }


def _statistic(runs: list[dict[str, float]], statistic) -> dict[str, float]:
    return {figure: statistic(run[figure] for run in runs) for figure in FIGURES}


def _overhead(figures: dict[str, dict[str, float]], baseline: str) -> dict[str, float]:
    return {figure: 100 * (figures["ours"][figure] / figures[baseline][figure] - 1) for figure in FIGURES}


def print_report(report: dict) -> None:
    print(
        f"{report['preset']} SegResNet ({report['parameters']:,} parameters), "
        f"{report['cases']} cases of {report['volume']}^3, {report['iterations']} steps, "
        f"device {report['device']}, {report['machine']}; median and best of {report['runs']} runs"
    )
    labels = {
        "plain": "MONAI tutorial loop",
        "plain_tensors": "same, plain tensors",
        "ours": "sitesagent train()",
    }
    for name, label in labels.items():
        for statistic in ("median", "best"):
            figures = report[statistic][name]
            per_step = 1000 * figures["loop_s"] / report["iterations"]
            print(
                f"  {label:>20} {statistic:>6}: wall {figures['total_s']:7.3f} s (loop {figures['loop_s']:7.3f} s, "
                f"{per_step:6.1f} ms/step), CPU {figures['total_cpu_s']:7.3f} s (loop {figures['loop_cpu_s']:7.3f} s)"
            )
    for statistic, overheads in report["overhead_pct"].items():
        for baseline, overhead in overheads.items():
            print(
                f"  train() over {labels[baseline]:<20} {statistic:>6}: wall {overhead['total_s']:+6.1f}% "
                f"(loop {overhead['loop_s']:+6.1f}%), CPU {overhead['total_cpu_s']:+6.1f}% "
                f"(loop {overhead['loop_cpu_s']:+6.1f}%)"
            )
    print("  target: under +5%")


if __name__ == "__main__":
    sys.exit(main())
