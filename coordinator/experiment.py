"""The comparison of Li et al. 2019, reproducible: centralised training, federated averaging
without privacy, partial sharing at several fractions, SVT at several epsilons, and patient-level
DP-SGD at several epsilons over the whole run, all on the same data split, the same model, the
same seeds, and the same number of training steps.

It runs in one process with the very functions the system runs elsewhere (the agent's training,
evaluation and privacy code, the coordinator's aggregation), without HTTP in between: the
protocol adds no arithmetic, so it would only add minutes. No Django here.
"""

from __future__ import annotations

import json
import re
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from coordinator.aggregation import aggregate
from sitesagent import accountant, protocol
from sitesagent.data import Case, discover_cases, split_cases
from sitesagent.model import ModelConfig, build_model, flat_to_state, state_to_flat
from sitesagent.privacy import partial_share, svt
from sitesagent.training import TrainConfig, evaluate, train

# BraTS 2018 case names carry their institution: Brats18_<institution>_<patient>_1, e.g.
# Brats18_2013_10_1, Brats18_CBICA_AAB_1, Brats18_TCIA01_131_1. Li et al. split the 285
# training cases into 13 sites by institution.
BRATS_INSTITUTION = re.compile(r"^Brats\d*_(?P<institution>[A-Za-z]+\d*|\d{4})_")


@dataclass(frozen=True)
class Setting:
    """One configuration of the comparison."""

    name: str
    mechanism: str  # "centralised", or a protocol mechanism
    params: dict[str, Any] = field(default_factory=dict)
    delta: float = 0.0  # the delta its epsilons are stated at (0: pure DP)

    @property
    def event(self) -> dict | None:
        if self.mechanism == "centralised":
            return None
        return protocol.round_event(self.mechanism, self.params)

    @property
    def epsilon_per_round(self) -> float | None:
        return None if self.event is None else accountant.event_epsilon(self.event, self.delta)

    def epsilon_spent(self, rounds: int) -> float | None:
        """The accountant's epsilon over ``rounds`` rounds, at this setting's delta."""
        return None if self.event is None else accountant.composed_epsilon([self.event] * rounds, self.delta)


@dataclass
class Study:
    sites: dict[str, tuple[list[Case], list[Case]]]  # site -> (train, validation)
    model: ModelConfig
    rounds: int
    iterations: int  # local steps per site per round
    roi_size: int
    lr: float
    device: str
    seed: int


@dataclass
class Outcome:
    setting: Setting
    per_round: list[dict[str, float]]  # federated (case-weighted) Dice after each round
    per_site: dict[str, dict[str, float]]  # the final model's Dice at each site
    seconds: float

    @property
    def final(self) -> dict[str, float]:
        return self.per_round[-1]


def sites_from_brats(root: Path, seed: int) -> dict[str, tuple[list[Case], list[Case]]]:
    """Real BraTS: one site per institution, named by the token in the case names."""
    groups: dict[str, list[Case]] = defaultdict(list)
    for case in discover_cases(root):
        match = BRATS_INSTITUTION.match(case.name)
        groups[match.group("institution") if match else "unknown"].append(case)
    return {name: split_cases(cases, val_fraction=0.2, seed=seed) for name, cases in sorted(groups.items())}


def sites_from_folders(folders: Sequence[Path], seed: int) -> dict[str, tuple[list[Case], list[Case]]]:
    return {
        folder.name: split_cases(discover_cases(folder), val_fraction=0.2, seed=seed) for folder in folders
    }


@dataclass(frozen=True)
class DpSgdPlan:
    """DP-SGD rows: each target epsilon is over the whole run (``rounds`` rounds of ``steps``)."""

    epsilons: Sequence[float]
    sample_rate: float
    clip: float
    delta: float
    rounds: int
    steps: int


def calibrated_noise(target: float, *, sample_rate: float, steps: int, rounds: int, delta: float) -> float:
    """The smallest noise multiplier (to 0.1%) whose ``rounds`` rounds cost at most ``target``."""

    def cost(sigma: float) -> float:
        event = {
            "kind": protocol.EVENT_POISSON_GAUSSIAN,
            "sample_rate": sample_rate,
            "noise_multiplier": sigma,
            "steps": steps,
        }
        return accountant.composed_epsilon([event] * rounds, delta)

    low, high = 0.3, 1.0
    while cost(high) > target:
        low, high = high, high * 2
        if high > 1e4:
            raise ValueError(f"no noise multiplier up to 1e4 brings the run within epsilon {target}")
    while (high - low) / high > 1e-3:
        middle = (low + high) / 2
        low, high = (low, middle) if cost(middle) <= target else (middle, high)
    return high


def default_settings(
    n_parameters: int,
    *,
    fractions: Sequence[float],
    epsilons: Sequence[float],
    svt_fraction: float,
    gamma: float,
    dpsgd: DpSgdPlan | None = None,
) -> list[Setting]:
    settings = [Setting("centralised", "centralised"), Setting("FedAvg, no privacy", protocol.MECHANISM_NONE)]
    for fraction in fractions:
        settings.append(
            Setting(
                f"partial sharing Q={fraction:g}",
                protocol.MECHANISM_PARTIAL,
                {"fraction": fraction, "gamma": gamma},
            )
        )
    for epsilon in epsilons:
        split = protocol.svt_split(epsilon, fraction=svt_fraction, n_parameters=n_parameters)
        params = {"fraction": svt_fraction, "gamma": gamma, "tau": gamma / 10, **split}
        settings.append(Setting(f"SVT eps={epsilon:g}", protocol.MECHANISM_SVT, params))
    if dpsgd is not None:
        settings += [_dpsgd_setting(epsilon, dpsgd) for epsilon in dpsgd.epsilons]
    return settings


def _dpsgd_setting(epsilon: float, plan: DpSgdPlan) -> Setting:
    sigma = calibrated_noise(
        epsilon, sample_rate=plan.sample_rate, steps=plan.steps, rounds=plan.rounds, delta=plan.delta
    )
    params = {
        "noise_multiplier": sigma,
        "max_grad_norm": plan.clip,
        "sample_rate": plan.sample_rate,
        "steps": plan.steps,
        "crops_per_case": 1,
    }
    name = f"DP-SGD eps={epsilon:g} over the run (sigma={sigma:.3g})"
    return Setting(name, protocol.MECHANISM_DPSGD, params, delta=plan.delta)


def run(study: Study, setting: Setting, on_progress: Callable[[str], None] = print) -> Outcome:
    started = time.perf_counter()
    model = build_model(study.model, seed=study.seed)
    per_round = []
    for round_number in range(1, study.rounds + 1):
        if setting.mechanism == "centralised":
            _train_centralised(model, study, round_number)
        else:
            _federated_round(model, study, setting, round_number)
        scores, per_site = _evaluate_everywhere(model, study)
        per_round.append(scores)
        on_progress(
            f"  {setting.name}: round {round_number}/{study.rounds} mean Dice {scores['dice_mean']:.3f}"
        )
    return Outcome(setting, per_round, per_site, time.perf_counter() - started)


def _train_config(study: Study, seed: int, iterations: int) -> TrainConfig:
    return TrainConfig(
        local_epochs=1,
        max_iterations=iterations,
        roi_size=(study.roi_size,) * 3,
        lr=study.lr,
        device=study.device,
        seed=seed,
    )


def _train_centralised(model: torch.nn.Module, study: Study, round_number: int) -> None:
    """All sites' training cases pooled, for as many steps as all sites together take in a round."""
    pooled = [case for train_cases, _ in study.sites.values() for case in train_cases]
    steps = study.iterations * len(study.sites)
    train(model, pooled, _train_config(study, study.seed * 1000 + round_number, steps))


def _federated_round(model: torch.nn.Module, study: Study, setting: Setting, round_number: int) -> None:
    base_state = {name: tensor.detach().cpu().clone() for name, tensor in model.state_dict().items()}
    base_flat = state_to_flat(base_state)
    updates = []
    for index, (train_cases, _) in enumerate(study.sites.values()):
        local = build_model(study.model, seed=study.seed)
        local.load_state_dict(base_state)
        seed = study.seed * 1000 + round_number * 100 + index
        result = train(local, train_cases, _train_config(study, seed, study.iterations), **_dp(setting, seed))
        per_step = (state_to_flat(local.state_dict()) - base_flat) / result.n_iterations
        indices, values = _protect(setting, per_step, seed=study.seed * 100_000 + round_number * 100 + index)
        updates.append(_Update(indices, values * result.n_iterations, result.n_iterations))
    next_flat = aggregate(
        base_flat, updates, rule="mean", device=study.device if study.device != "auto" else "auto"
    )
    model.load_state_dict(flat_to_state(next_flat, base_state))


def _dp(setting: Setting, seed: int) -> dict:
    """DP-SGD's training arguments for a DP-SGD setting (seeded: the study must replay; the agent
    itself always draws fresh OS entropy), else none."""
    if setting.mechanism != protocol.MECHANISM_DPSGD:
        return {}
    from sitesagent.dpsgd import DpSgdConfig

    return {"dp": DpSgdConfig(**setting.params), "generator": torch.Generator().manual_seed(seed)}


@dataclass(frozen=True)
class _Update:
    indices: torch.Tensor | None
    values: torch.Tensor
    n_iterations: int


def _protect(setting: Setting, per_step: torch.Tensor, *, seed: int):
    if setting.mechanism in (protocol.MECHANISM_NONE, protocol.MECHANISM_DPSGD):
        return None, per_step  # DP-SGD's noise went in while training: the delta is post-processing
    if setting.mechanism == protocol.MECHANISM_PARTIAL:
        return partial_share(per_step, **setting.params)
    # A fixed seed makes the study reproducible; the agent itself always draws fresh OS entropy.
    return svt(per_step, **setting.params, generator=torch.Generator().manual_seed(seed))


def _evaluate_everywhere(
    model: torch.nn.Module, study: Study
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """The model's Dice at each site, and their mean weighted by validation cases."""
    config = _train_config(study, study.seed, 1)
    per_site = {name: evaluate(model, val_cases, config) for name, (_, val_cases) in study.sites.items()}
    weights = {name: len(val_cases) for name, (_, val_cases) in study.sites.items()}
    total = sum(weights.values())
    federated = {
        key: sum(per_site[name][key] * weights[name] for name in per_site) / total
        for key in ("dice_et", "dice_wt", "dice_tc", "dice_mean")
    }
    return federated, per_site


# --- the report --------------------------------------------------------------------------------


def markdown_table(outcomes: Sequence[Outcome], rounds: int) -> str:
    lines = [
        "| configuration | epsilon per round per site | epsilon spent per site | delta | Dice ET | Dice WT | Dice TC | mean Dice |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for outcome in outcomes:
        setting = outcome.setting
        delta = f"{setting.delta:g}"
        if setting.mechanism == "centralised":
            per_round = spent = delta = "n/a (data pooled)"
        elif setting.event is None:
            per_round = spent = delta = "no formal guarantee"
        else:
            per_round, spent = f"{setting.epsilon_per_round:.4g}", f"{setting.epsilon_spent(rounds):.4g}"
        final = outcome.final
        lines.append(
            f"| {setting.name} | {per_round} | {spent} | {delta} | {final['dice_et']:.3f} | {final['dice_wt']:.3f} "
            f"| {final['dice_tc']:.3f} | {final['dice_mean']:.3f} |"
        )
    return "\n".join(lines)


def html_report(outcomes: Sequence[Outcome], study: Study, command: str) -> str:
    import plotly.graph_objects as go
    import plotly.io as pio

    curves = go.Figure()
    for outcome in outcomes:
        curves.add_trace(
            go.Scatter(
                x=list(range(1, len(outcome.per_round) + 1)),
                y=[r["dice_mean"] for r in outcome.per_round],
                mode="lines+markers",
                name=outcome.setting.name,
            )
        )
    curves.update_layout(
        title="Mean Dice of the global model after each round",
        xaxis_title="round",
        yaxis_title="mean Dice (ET, WT, TC)",
    )
    bars = go.Figure()
    for region in ("dice_et", "dice_wt", "dice_tc", "dice_mean"):
        bars.add_trace(
            go.Bar(
                x=[o.setting.name for o in outcomes],
                y=[o.final[region] for o in outcomes],
                name=region.removeprefix("dice_").upper(),
            )
        )
    bars.update_layout(title="Final Dice per configuration", barmode="group", yaxis_title="Dice")
    table = markdown_table(outcomes, study.rounds)
    rows = "".join(
        "<tr>" + "".join(f"<td>{cell.strip()}</td>" for cell in line.strip("|").split("|")) + "</tr>"
        for line in table.splitlines()[2:]
    )
    header = "".join(f"<th>{cell.strip()}</th>" for cell in table.splitlines()[0].strip("|").split("|"))
    setup = {
        "sites": {name: [len(t), len(v)] for name, (t, v) in study.sites.items()},
        "model": study.model.to_dict(),
        "rounds": study.rounds,
        "iterations": study.iterations,
        "roi_size": study.roi_size,
        "lr": study.lr,
        "seed": study.seed,
    }
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>Privacy-utility comparison</title>"
        "<style>body{font-family:system-ui,sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px}</style></head><body>"
        "<h1>Federated BraTS: the privacy-utility comparison of Li et al. 2019</h1>"
        f"<p>Command: <code>{command}</code></p><table><tr>{header}</tr>{rows}</table>"
        f"{pio.to_html(curves, include_plotlyjs=True, full_html=False)}"
        f"{pio.to_html(bars, include_plotlyjs=False, full_html=False)}"
        f"<h2>Setup</h2><pre>{json.dumps(setup, indent=2)}</pre></body></html>"
    )


def outcomes_json(outcomes: Sequence[Outcome]) -> str:
    return json.dumps(
        [
            {
                "setting": asdict(o.setting),
                "per_round": o.per_round,
                "per_site": o.per_site,
                "seconds": o.seconds,
            }
            for o in outcomes
        ],
        indent=2,
    )


def describe_split(study: Study) -> str:
    return ", ".join(f"{name}: {len(t)} train / {len(v)} validation" for name, (t, v) in study.sites.items())
