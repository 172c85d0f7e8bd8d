"""``python -m sitesagent``: the site agent's command line.

Heavy modules (torch, MONAI) are imported inside the commands, so ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path


def _positive_float(text: str) -> float:
    from sitesagent.protocol import ProtocolError, positive_finite

    try:
        return positive_finite("--max-epsilon", text)
    except ProtocolError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _delta(text: str) -> float:
    from sitesagent.protocol import ProtocolError, positive_finite

    try:
        delta = positive_finite("--delta", text, allow_zero=True)
    except ProtocolError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if delta >= 1:
        raise argparse.ArgumentTypeError(f"--delta must be below 1, not {delta}")
    return delta


def _names(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    if not names:
        raise argparse.ArgumentTypeError("give at least one name")
    return names


def _mechanisms(text: str) -> tuple[str, ...]:
    from sitesagent.protocol import MECHANISMS

    names = _names(text)
    unknown = sorted(set(names) - set(MECHANISMS))
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown mechanism {', '.join(unknown)}; known: {', '.join(MECHANISMS)}"
        )
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sitesagent",
        description="The site agent: trains the federation's model next to this hospital's scans.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    synth = commands.add_parser("synth", help="write synthetic BraTS-layout cases")
    synth.add_argument("--out", required=True, type=Path, help="folder to write the cases into")
    synth.add_argument("--cases", required=True, type=int, help="how many cases")
    synth.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    synth.add_argument(
        "--style", type=int, default=0, help="the site's scanner character, 0, 1, 2, ... (default 0)"
    )
    synth.add_argument(
        "--size",
        default="small",
        help="'small' (48^3, for CPU), 'brats' (240x240x155) or a whole number N for N^3",
    )

    run = commands.add_parser(
        "run", help="take tasks from the coordinator, train, and upload protected updates"
    )
    run.add_argument("--server", required=True, help="the coordinator's URL, e.g. https://fl.example.org")
    run.add_argument(
        "--token",
        default=os.environ.get("SITE_TOKEN"),
        help="this site's token (or set SITE_TOKEN, which keeps it out of process listings)",
    )
    run.add_argument("--data", required=True, type=Path, help="the site's cases in the BraTS layout")
    run.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    run.add_argument(
        "--max-epsilon",
        type=_positive_float,
        default=None,
        help=(
            "this site's own epsilon limit over all tasks, at --delta; the agent computes each task's "
            "cost itself, so the coordinator cannot override it"
        ),
    )
    run.add_argument(
        "--delta",
        type=_delta,
        default=1e-5,
        help="the delta the --max-epsilon limit is stated at (default 1e-5; 0 allows pure-DP rounds only)",
    )
    run.add_argument(
        "--max-round-epsilon",
        type=_positive_float,
        default=None,
        help="the most one round may cost this site, at --delta (the site's minimum protection)",
    )
    run.add_argument(
        "--federations",
        type=_names,
        default=None,
        help="comma-separated names of the only federations this site serves (default: every one it accepted)",
    )
    run.add_argument(
        "--mechanisms",
        type=_mechanisms,
        default=None,
        help="comma-separated mechanisms this site accepts, e.g. dpsgd (default: every protected one)",
    )
    run.add_argument(
        "--allow-unprotected",
        action="store_true",
        help="accept tasks with no formal privacy guarantee (none, partial sharing); off by default",
    )
    run.add_argument(
        "--state-file",
        type=Path,
        default=None,
        help="where the agent remembers its spend and uploads (default: DATA/.sitesagent-state.json)",
    )
    run.add_argument("--once", action="store_true", help="finish after one task")
    run.add_argument("--poll-seconds", type=float, default=10.0, help="how often to ask for work when idle")
    run.add_argument("--no-progress", action="store_true", help="no progress bar on the terminal")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.command == "synth":
        return _synth(args)
    return _run(args)


def _synth(args: argparse.Namespace) -> int:
    from sitesagent.synth import write_synthetic_cases

    size: str | int = int(args.size) if args.size.isdigit() else args.size
    try:
        folders = write_synthetic_cases(
            args.out,
            args.cases,
            seed=args.seed,
            style=args.style,
            size=size,
            on_case=lambda i, total: print(
                f"\rwriting case {i}/{total}", end="", file=sys.stderr, flush=True
            ),
        )
    except ValueError as error:
        print(f"\nerror: {error}", file=sys.stderr)
        return 2
    print(f"\nwrote {len(folders)} cases to {args.out}", file=sys.stderr)
    return 0


def _run(args: argparse.Namespace) -> int:
    if not args.token:
        print(
            "error: give the site's token with --token or the SITE_TOKEN environment variable",
            file=sys.stderr,
        )
        return 2
    from sitesagent.agent import Agent, AgentConfig

    config = AgentConfig(
        server=args.server,
        token=args.token,
        data=args.data,
        device=args.device,
        max_epsilon=args.max_epsilon,
        delta=args.delta,
        max_round_epsilon=args.max_round_epsilon,
        federations=args.federations,
        mechanisms=args.mechanisms,
        allow_unprotected=args.allow_unprotected,
        state_file=args.state_file,
        poll_seconds=args.poll_seconds,
        progress_bar=not args.no_progress,
    )
    return Agent(config).run(once=args.once)
