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


def _gguf(args: argparse.Namespace) -> int:
    import sys

    from .save.gguf import convert

    try:
        paths = convert(args.checkpoint, args.output, args.quantization or ["q8_0"], overwrite=args.overwrite,
                        modelfile=not args.no_modelfile)
    except (ValueError, OSError) as error:  # bad input, existing files, disk space: the message says what to do
        print(f"unsloth-like gguf: error: {error}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
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

    gguf = commands.add_parser(
        "gguf", help="convert a transformers checkpoint directory to GGUF (llama.cpp / Ollama), in-process"
    )
    gguf.add_argument("checkpoint", help="directory with config.json, safetensors weights and the tokenizer")
    gguf.add_argument("output", help="a .gguf file (one method) or a directory (files named <checkpoint>.<METHOD>.gguf)")
    gguf.add_argument("-q", "--quantization", action="append", metavar="METHOD",
                      help="q8_0 (default), f16, bf16, f32, q4_0, q4_1, q5_0, q5_1, q2_k, q3_k_s/m/l, q4_k_s/m, "
                           "q5_k_s/m, q6_k; repeat for several files from one pass")
    gguf.add_argument("--overwrite", action="store_true", help="replace existing output files")
    gguf.add_argument("--no-modelfile", action="store_true", help="do not write an Ollama Modelfile")
    gguf.set_defaults(run=_gguf)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)
