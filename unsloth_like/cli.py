"""The command line: ``python -m unsloth_like <command>`` (also installed as ``unsloth-like``)."""

from __future__ import annotations

import argparse
from pathlib import Path


def _doctor(args: argparse.Namespace) -> int:
    from .env import collect_env, format_env

    info = collect_env()
    print(format_env(info))
    return 1 if info.missing_required else 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import DemoSettings, run_demo

    settings = DemoSettings(
        output_dir=Path(args.output_dir),
        architecture=args.model,
        max_steps=args.max_steps,
        seed=args.seed,
        overwrite=args.overwrite,
        cache_dir=Path(args.zoo_cache) if args.zoo_cache else None,
    )
    run_demo(settings)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .testing.zoo import ZOO

    parser = argparse.ArgumentParser(prog="unsloth-like", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")

    doctor = commands.add_parser("doctor", help="print versions, device, bf16 support and kernel backends")
    doctor.set_defaults(run=_doctor)

    demo = commands.add_parser(
        "demo", help="finetune a tiny built-in model on a built-in chat dataset and save the adapter"
    )
    demo.add_argument("--output-dir", default="outputs/demo", help="where the trained adapter goes")
    demo.add_argument(
        "--model",
        default="llama",
        choices=sorted(name for name, spec in ZOO.items() if not spec.is_vlm),
        help="which tiny zoo architecture to train",
    )
    demo.add_argument("--max-steps", type=int, default=40, help="optimizer steps")
    demo.add_argument("--seed", type=int, default=3407)
    demo.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    demo.add_argument("--zoo-cache", default=None, help="where tiny models are cached (default ~/.cache/unsloth_like/zoo)")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)
