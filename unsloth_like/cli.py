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
    import sys

    from .demo import DEMO_BASE, DemoSettings, run_demo
    from .testing.zoo import ZOO

    # a built-in name, not a folder of that name
    zoo = (args.model in ZOO or args.model == DEMO_BASE) and not Path(args.model).exists()
    settings = DemoSettings(
        output_dir=Path(args.output_dir),
        architecture=args.model if zoo else DEMO_BASE,
        model=None if zoo else args.model,
        dataset=args.dataset,
        chat_template=args.chat_template,
        load_in_4bit=args.load_in_4bit,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        max_seq_length=args.max_seq_length,
        seed=args.seed,
        overwrite=args.overwrite,
        cache_dir=Path(args.zoo_cache) if args.zoo_cache else None,
    )
    try:
        run_demo(settings)
    except ValueError as error:  # bad settings, refused before any training: the message says what to do
        print(f"unsloth-like demo: error: {error}", file=sys.stderr)
        return 2
    return 0


def _bench(args: argparse.Namespace) -> int:
    import sys

    from .bench import report

    try:
        shape = report.settings(args, report.device_type())
    except ValueError as error:  # refused before any measurement
        print(f"unsloth-like bench: error: {error}", file=sys.stderr)
        return 2
    report.run(args, shape)
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


EXPORT_FORMATS = ("merged_16bit", "merged_4bit", "gguf", "lora")


def _export(args: argparse.Namespace) -> int:
    """Load SOURCE (an adapter directory, or a model directory for gguf) and save it as --to says."""
    import sys

    source = Path(args.source)
    try:
        if args.to != "gguf" and (args.quantization or args.no_modelfile):
            raise ValueError(f"-q/--no-modelfile apply to --to gguf only, not --to {args.to}.")
        if args.to != "gguf" and not (source / "adapter_config.json").is_file():
            raise ValueError(f"{source} is not an adapter directory (no adapter_config.json): {args.to} saves a "
                             "trained LoRA adapter with its base model. For a whole model use --to gguf.")
        from .models.loader import FastLanguageModel

        model, tokenizer = FastLanguageModel.from_pretrained(str(source), load_in_4bit=False)
        if args.to == "gguf":
            paths = model.save_pretrained_gguf(args.output, tokenizer, quantization_method=args.quantization or ["q8_0"],
                                               overwrite=args.overwrite, modelfile=not args.no_modelfile)
        else:
            paths = [model.save_pretrained_merged(args.output, tokenizer, save_method=args.to, overwrite=args.overwrite)]
    except (ValueError, OSError) as error:  # bad input, existing files, disk space: the message says what to do
        print(f"unsloth-like export: error: {error}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


def _chat(args: argparse.Namespace) -> int:
    import sys

    from .chat import ChatSettings, run_chat

    settings = ChatSettings(source=Path(args.source), max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature, system=args.system, load_in_4bit=args.load_in_4bit)
    try:
        run_chat(settings)
    except (ValueError, ImportError) as error:  # a source we cannot load, a missing extra: the message says what to do
        print(f"unsloth-like chat: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print()
    return 0


def _train(args: argparse.Namespace) -> int:
    import sys

    from .train_job import FIELDS, make_settings, read_config, run_training

    try:
        config = read_config(args.config) if args.config else {}
        settings = make_settings(config, {name: getattr(args, name) for name in FIELDS})
    except ValueError as error:  # refused before anything is loaded: the message says what to do
        print(f"unsloth-like train: error: {error}", file=sys.stderr)
        return 2
    run_training(settings)
    return 0


def _add_train_flags(parser: argparse.ArgumentParser) -> None:
    """A flag per TrainSettings field (default None: the config file's value, else the field's default)."""
    from .train_job import EXPORT_FORMATS, FIELDS, LIST_FIELDS, TrainSettings

    defaults = TrainSettings()
    list_help = {"target_modules": "LoRA targets (default: every projection)",
                 "export": f"after training, save the model as any of {', '.join(EXPORT_FORMATS)} into "
                           "<output-dir>/<format>",
                 "quantization": "GGUF methods for --export gguf, e.g. q4_k_m q8_0 (default q8_0)"}
    for name in FIELDS:
        flag = "--" + name.replace("_", "-")
        default = getattr(defaults, name)
        shown = f" (default {default})" if default not in ("", None) else ""
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=f"{name}{shown}")
        elif name in LIST_FIELDS:
            parser.add_argument(flag, nargs="+", default=None, help=list_help[name])
        elif name == "use_gradient_checkpointing":
            parser.add_argument(flag, default=None, help='"unsloth" (default, offloaded), "true" or "false"',
                                type=lambda v: {"true": True, "false": False}.get(v.lower(), v))
        else:
            kind = type(default) if default not in ("", None) else str
            parser.add_argument(flag, type=kind, default=None, help=f"{name}{shown}")


def _add_gguf_flags(parser: argparse.ArgumentParser, when: str) -> None:
    parser.add_argument("-q", "--quantization", action="append", metavar="METHOD",
                        help=f"{when}q8_0 (default), f16, bf16, f32, q4_0, q4_1, q5_0, q5_1, q2_k, q3_k_s/m/l, "
                             "q4_k_s/m, q5_k_s/m, q6_k; repeat for several files from one pass")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output")
    parser.add_argument("--no-modelfile", action="store_true", help=f"{when}do not write an Ollama Modelfile")


def build_parser() -> argparse.ArgumentParser:
    from .testing.zoo import ZOO

    parser = argparse.ArgumentParser(prog="unsloth-like", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")

    doctor = commands.add_parser("doctor", help="print versions, device, bf16 support and kernel backends")
    doctor.set_defaults(run=_doctor)

    demo = commands.add_parser(
        "demo", help="finetune a model with LoRA through TRL, answer before/after, export 16-bit, GGUF and a Modelfile",
        description="With no options: a small Llama pretrained here on plain text about animals (once, about "
                    "1.5 min on CPU, then cached) is taught to answer questions in the chat format with built-in "
                    "chats, on CPU in about half a minute. --model/--dataset/--chat-template make it a real "
                    "finetune.",
    )
    demo.add_argument("--output-dir", default="outputs/demo", help="where the adapter and exports go")
    demo.add_argument(
        "--model",
        default="demo",
        help="a model directory or hub id; 'demo' (the default): the pretrained demo base; or a tiny zoo "
             "architecture with random weights (it learns the answers' form, not their content): "
             + ", ".join(sorted(name for name, spec in ZOO.items() if not spec.is_vlm)),
    )
    demo.add_argument("--dataset", help="a json/jsonl/parquet file, a saved datasets folder or a hub id, with "
                                        "'messages' (its last 3 rows are held back for the answers) or 'text'")
    demo.add_argument("--chat-template", help="a chat template name (e.g. llama-3.1, chatml, qwen-2.5)")
    demo.add_argument("--load-in-4bit", action="store_true", help="QLoRA: NF4 base weights (works on CPU too)")
    demo.add_argument("--learning-rate", type=float,
                      help="default 2e-3 for the demo base, 3e-3 for a zoo model, 2e-4 otherwise")
    demo.add_argument("--max-seq-length", type=int, default=128, help="tokens per training row (default 128)")
    demo.add_argument("--max-steps", type=int, default=400, help="optimizer steps (default 400)")
    demo.add_argument("--seed", type=int, default=3407)
    demo.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    demo.add_argument("--zoo-cache", default=None, help="where tiny models are cached (default ~/.cache/unsloth_like/zoo)")
    demo.set_defaults(run=_demo)

    gguf = commands.add_parser(
        "gguf", help="convert a transformers checkpoint directory to GGUF (llama.cpp / Ollama), in-process"
    )
    gguf.add_argument("checkpoint", help="directory with config.json, safetensors weights and the tokenizer")
    gguf.add_argument("output", help="a .gguf file (one method) or a directory (files named <checkpoint>.<METHOD>.gguf)")
    _add_gguf_flags(gguf, when="")
    gguf.set_defaults(run=_gguf)

    export = commands.add_parser(
        "export", help="save a trained adapter merged into its base (16-bit or 4-bit), or as GGUF (+ Modelfile)",
        description="Load SOURCE as FastLanguageModel.from_pretrained does (an adapter directory brings its base "
                    "model) and save it: merged_16bit / merged_4bit (save_pretrained_merged), gguf "
                    "(save_pretrained_gguf, with an Ollama Modelfile), or lora (the adapter and tokenizer).")
    export.add_argument("source", help="an adapter directory (adapter_config.json); for --to gguf also a model directory")
    export.add_argument("output", help="the directory to write")
    export.add_argument("--to", choices=EXPORT_FORMATS, default="merged_16bit", help="what to write (default merged_16bit)")
    _add_gguf_flags(export, when="with --to gguf: ")
    export.set_defaults(run=_export)

    train = commands.add_parser(
        "train", help="LoRA/QLoRA finetuning through TRL's SFTTrainer, from flags or a YAML/JSON config; resumable",
        description="from_pretrained -> get_chat_template -> get_peft_model -> SFTTrainer -> the adapter in "
                    "<output-dir>/lora (checkpoints in <output-dir>/checkpoints; --resume continues from the "
                    "newest). Flags override the config file.")
    train.add_argument("--config", help="a .yaml/.yml/.json file of the settings below")
    _add_train_flags(train)
    train.set_defaults(run=_train)

    chat = commands.add_parser(
        "chat", help="talk to a model directory, an adapter directory or a GGUF file (multi-turn, streamed)",
        description="Type a message and press Enter; /reset starts a new conversation, /exit (or Ctrl-D) quits. "
                    "A GGUF file runs through llama.cpp (llama-cpp-python) with the chat template it carries.")
    chat.add_argument("source", help="a model directory, an adapter directory (adapter_config.json) or a .gguf file")
    chat.add_argument("--max-new-tokens", type=int, default=256)
    chat.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    chat.add_argument("--system", help="a system message for every conversation")
    chat.add_argument("--load-in-4bit", action="store_true", help="load a model directory with NF4 weights")
    chat.set_defaults(run=_chat)

    from .bench.report import add_arguments

    bench = commands.add_parser(
        "bench", help="benchmark plain HF + PEFT against ours (LoRA/QLoRA, several lengths): JSON, Markdown, PNG",
        description="Each cell (mode x sequence length) runs every variant in a fresh process on the same seeded "
                    "weights and batch, then writes report-<device>.json/.md/.png. CPU: the zoo Llama; GPU: "
                    "Llama-3.1-8B's dimensions with random weights.")
    add_arguments(bench)
    bench.set_defaults(run=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)
