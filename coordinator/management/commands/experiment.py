"""``python manage.py experiment``: the paper's comparison, written as an HTML and a Markdown report.

CPU defaults (synthetic sites, a small SegResNet) finish in about half an hour on two cores;
``--data`` with real BraTS 2018 and ``--full`` give the paper's setting on a GPU.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError


class Command(BaseCommand):
    help = "Centralised vs FedAvg vs partial sharing vs SVT on the same split; writes a report."

    def add_arguments(self, parser):
        parser.add_argument("--out", type=Path, default=Path("reports/experiment"), help="report folder")
        parser.add_argument(
            "--data",
            type=Path,
            default=None,
            help="real BraTS 2018 training data (BraTS layout); split into sites by institution",
        )
        parser.add_argument("--sites", type=int, default=3, help="synthetic sites (ignored with --data)")
        parser.add_argument("--cases", type=int, default=8, help="synthetic cases per site")
        parser.add_argument("--size", default="small", help="synthetic volume size: small, brats, or N")
        parser.add_argument("--rounds", type=int, default=5)
        parser.add_argument("--iterations", type=int, default=8, help="local steps per site per round")
        parser.add_argument("--roi", type=int, default=48, help="training crop edge")
        parser.add_argument("--lr", type=float, default=1e-3)
        parser.add_argument("--fractions", default="0.1,0.01", help="partial-sharing fractions Q")
        parser.add_argument(
            "--epsilons",
            default="200000,20000,2000",
            help="SVT epsilons per site per round (split as DESIGN section 6)",
        )
        parser.add_argument("--svt-fraction", type=float, default=0.01)
        parser.add_argument(
            "--dp-epsilons",
            default="1,3,8",
            help="DP-SGD: per-site epsilons over the whole run; the noise is calibrated to each",
        )
        parser.add_argument("--dp-sample-rate", type=float, default=0.5, help="DP-SGD: Poisson rate q")
        parser.add_argument("--dp-clip", type=float, default=1.0, help="DP-SGD: per-case clip norm C")
        parser.add_argument("--dp-delta", type=float, default=1e-5, help="DP-SGD: delta of the epsilons")
        parser.add_argument("--gamma", type=float, default=1e-3, help="clip bound on the per-step delta")
        parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
        parser.add_argument("--full", action="store_true", help="the BraTS SegResNet (4.7 M parameters)")
        parser.add_argument(
            "--preset",
            default=None,
            choices=["tiny", "cpu", "brats"],
            help="the model preset (default: cpu, or brats with --full)",
        )
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument(
            "--only",
            default="centralised,none,partial,svt,dpsgd",
            help="which kinds of configuration to run (default: all five)",
        )

    def handle(self, *args, **options):
        from coordinator import experiment
        from sitesagent.model import count_parameters, preset

        out: Path = options["out"]
        out.mkdir(parents=True, exist_ok=True)
        sites = self._sites(options, out)
        model = preset(options["preset"] or ("brats" if options["full"] else "cpu"))
        study = experiment.Study(
            sites=sites,
            model=model,
            rounds=options["rounds"],
            iterations=options["iterations"],
            roi_size=options["roi"],
            lr=options["lr"],
            device=options["device"],
            seed=options["seed"],
        )
        settings = experiment.default_settings(
            count_parameters(model),
            fractions=_floats(options["fractions"]),
            epsilons=_floats(options["epsilons"]),
            svt_fraction=options["svt_fraction"],
            gamma=options["gamma"],
            dpsgd=experiment.DpSgdPlan(
                epsilons=_floats(options["dp_epsilons"]),
                sample_rate=options["dp_sample_rate"],
                clip=options["dp_clip"],
                delta=options["dp_delta"],
                rounds=options["rounds"],
                steps=options["iterations"],
            ),
        )
        kinds = set(options["only"].split(","))
        settings = [setting for setting in settings if setting.mechanism in kinds]
        if not settings:
            raise CommandError(
                f"--only {options['only']} matches no configuration (centralised, none, partial, svt, dpsgd)"
            )
        self.stdout.write(f"Sites: {experiment.describe_split(study)}")
        outcomes = []
        for setting in settings:
            self.stdout.write(f"{setting.name}...")
            outcomes.append(experiment.run(study, setting, on_progress=self.stdout.write))
            self._write(out, outcomes, study)
        self.stdout.write(self.style.SUCCESS(f"Report: {out / 'report.html'} and {out / 'report.md'}"))

    def _sites(self, options, out: Path):
        from coordinator import experiment
        from sitesagent.synth import write_synthetic_cases

        if options["data"] is not None:
            if not options["data"].is_dir():
                raise CommandError(f"--data {options['data']} is not a folder")
            return experiment.sites_from_brats(options["data"], options["seed"])
        folders = []
        for index in range(options["sites"]):
            folder = out / "data" / f"site-{index + 1}"
            if not folder.exists():
                write_synthetic_cases(
                    folder, options["cases"], seed=1000 + index, style=index, size=_size(options["size"])
                )
            folders.append(folder)
        return experiment.sites_from_folders(folders, options["seed"])

    def _write(self, out: Path, outcomes, study) -> None:
        from coordinator import experiment

        command = "python manage.py experiment " + shlex.join(sys.argv[2:])
        (out / "report.md").write_text(
            f"Command: `{command}`\n\nSites: {experiment.describe_split(study)}\n\n"
            + experiment.markdown_table(outcomes, study.rounds)
            + "\n"
        )
        (out / "report.html").write_text(experiment.html_report(outcomes, study, command))
        (out / "outcomes.json").write_text(experiment.outcomes_json(outcomes))


def _size(text: str) -> str | int:
    return int(text) if text.isdigit() else text


def _floats(text: str) -> list[float]:
    try:
        return [float(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise CommandError(f"expected numbers separated by commas, not {text!r}") from None
