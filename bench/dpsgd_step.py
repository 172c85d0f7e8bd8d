"""What a DP-SGD training step costs against the non-private step, on the same crops.

    .venv/bin/python bench/dpsgd_step.py [--presets tiny cpu] [--size 48] [--batch 2]
        [--runs 7] [--threads N] [--json PATH]

For each model preset, one batch of ``--batch`` crops of ``--size``^3 (synthetic cases through
`sitesagent.data.train_transforms`, as training sees them) goes through two steps, taken in
turns on every run after a warm-up:

- **plain**: `sitesagent.training`'s non-private step: Adam, mean Dice loss, one backward pass
  (no mixed precision: the CPU).
- **dpsgd**: `sitesagent.dpsgd.private_step` on the per-sample compatible model behind Opacus's
  GradSampleModule, with `dpsgd.make_optimizer`'s DPOptimizer (sigma 1, C 1, q 1, one crop per
  case, so the same ``--batch`` cases every step): per-crop gradients, grouping by case,
  clipping, noise for every coordinate, then Adam.

Data loading is left out of both: it is the same work either way. Figures are the median and
the fastest of ``--runs`` steps (on a shared machine other work only adds time), in wall time
and in this process's CPU time (which others' work disturbs less), and the ratio dpsgd / plain;
the goal is within 2x.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
from monai.data import list_data_collate  # noqa: E402
from opacus import GradSampleModule  # noqa: E402

from sitesagent import data, dpsgd, model, synth, training  # noqa: E402

GOAL = 2.0


def crops(size: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` training crops of the whole ``size``^3 synthetic volumes, one case each."""
    with tempfile.TemporaryDirectory() as folder:
        synth.write_synthetic_cases(folder, batch, seed=0, style=0, size=size)
        dataset = data.make_dataset(data.discover_cases(folder), data.train_transforms((size,) * 3))
        items = list_data_collate([dataset[i] for i in range(batch)])
    return training._to_device(items, torch.device("cpu"))


def steps(
    preset: str, images: torch.Tensor, labels: torch.Tensor, *, with_opacus_conv: bool
) -> dict[str, Callable[[], None]]:
    """The steps to time, each a function of no arguments, on models built from the same seed."""
    config = training.TrainConfig(max_iterations=1, roi_size=images.shape[-1], device="cpu")
    plain_model = model.build_model(model.preset(preset), seed=0).train()
    adam = torch.optim.Adam(plain_model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    loss = training.dice_loss()
    scaler = torch.amp.GradScaler("cpu", enabled=False)

    def plain() -> None:
        training._step(plain_model, images, labels, adam, loss, scaler, False)

    return {"plain": plain, "dpsgd": private_step(preset, images, labels, config, opacus_conv=False)} | (
        {"dpsgd_opacus_conv": private_step(preset, images, labels, config, opacus_conv=True)}
        if with_opacus_conv
        else {}
    )


def private_step(
    preset: str,
    images: torch.Tensor,
    labels: torch.Tensor,
    config: training.TrainConfig,
    *,
    opacus_conv: bool,
) -> Callable[[], None]:
    """A DP-SGD step as `training.train(dp=...)` takes it; with ``opacus_conv``, through Opacus's
    own GradSampleModule (its unfold-based Conv3d sampler) instead of `dpsgd.per_sample_module`."""
    batch = images.shape[0]
    network = model.make_per_sample_compatible(model.build_model(model.preset(preset), seed=0)).train()
    per_sample = (
        GradSampleModule(network, loss_reduction="sum") if opacus_conv else dpsgd.per_sample_module(network)
    )
    settings = dpsgd.DpSgdConfig(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=1.0, steps=1)
    optimizer = dpsgd.make_optimizer(network, config, settings, batch, dpsgd.mechanism_generator(None))
    per_crop_loss = training.dice_loss(reduction="none")

    def step() -> None:
        dpsgd.private_step(
            per_sample, optimizer, [(images, labels)], per_crop_loss, n_cases=batch, crops_per_case=1
        )

    return step


def interleaved_wall_and_cpu(
    functions: dict[str, Callable[[], None]], runs: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and process CPU seconds of each call, the functions in turns, after one warm-up each.
    CPU time is what other people's work on a shared machine disturbs least."""
    for function in functions.values():
        function()
    wall: dict[str, list[float]] = {name: [] for name in functions}
    cpu: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(runs):
        for name, function in functions.items():
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            function()
            wall[name].append(time.perf_counter() - start_wall)
            cpu[name].append(time.process_time() - start_cpu)
    return wall, cpu


def main(argv: list[str] | None = None) -> int:
    parser = _common.argument_parser(__doc__)
    parser.add_argument("--presets", nargs="+", default=["tiny", "cpu"], choices=sorted(model.PRESETS))
    parser.add_argument(
        "--size", type=int, default=48, help="crop side in voxels (the whole synthetic volume)"
    )
    parser.add_argument("--batch", type=int, default=2, help="crops per step, one per case")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument(
        "--opacus-conv", action="store_true", help="also time the step with Opacus's own Conv3d sampler"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    load_before = _common.load_average()
    images, labels = crops(args.size, args.batch)
    results: dict[str, Any] = {"batch": args.batch, "size": args.size, "presets": {}}
    for preset in args.presets:
        functions = steps(preset, images, labels, with_opacus_conv=args.opacus_conv)
        wall, cpu = interleaved_wall_and_cpu(functions, args.runs)
        figures = {name: _common.summary(seconds) for name, seconds in wall.items()}
        cpu_figures = {name: _common.summary(seconds) for name, seconds in cpu.items()}
        results["presets"][preset] = {
            "parameters": model.count_parameters(model.preset(preset)),
            **figures,
            "cpu": cpu_figures,
            "ratio_median": {name: figures[name]["median"] / figures["plain"]["median"] for name in figures},
            "ratio_best": {name: figures[name]["min"] / figures["plain"]["min"] for name in figures},
            "cpu_ratio_median": {
                name: cpu_figures[name]["median"] / cpu_figures["plain"]["median"] for name in cpu_figures
            },
        }
    results["machine"] = _common.machine() | {"load_average_before": load_before}
    print_report(results)
    _common.write_json(args.json, results)
    return 0


def print_report(results: dict[str, Any]) -> None:
    print(
        f"one training step, batch {results['batch']} crops of {results['size']}^3, CPU; "
        f"{_common.machine_line(results['machine'])}"
    )
    labels = {"plain": "non-private", "dpsgd": "DP-SGD", "dpsgd_opacus_conv": "DP-SGD, Opacus's conv sampler"}
    for preset, figures in results["presets"].items():
        print(f"  {preset} SegResNet ({figures['parameters']:,} parameters)")
        for name, label in labels.items():
            if name in figures:
                step = figures[name]
                cpu = figures["cpu"][name]
                print(
                    f"    {label:>30}: {1000 * step['median']:8.1f} ms a step (best {1000 * step['min']:8.1f}), "
                    f"CPU {1000 * cpu['median']:8.1f} ms; {figures['ratio_median'][name]:.2f}x the non-private "
                    f"step (best {figures['ratio_best'][name]:.2f}x, CPU {figures['cpu_ratio_median'][name]:.2f}x)"
                )
    print(f"  goal: DP-SGD within {GOAL:g}x the non-private step")


if __name__ == "__main__":
    sys.exit(main())
