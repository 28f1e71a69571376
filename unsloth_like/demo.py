"""The built-in end-to-end job: load the demo base with ``FastLanguageModel``, add LoRA with
``FastLanguageModel.get_peft_model`` (fused LoRA path, offloaded checkpointing on GPU), finetune
it through TRL's ``SFTTrainer`` on the replies only (``train_on_responses_only``), and export it
the ways a user ships a model.

The demo base (``demo_base``) is a small Llama pretrained here at first use (about a minute and a
half on two CPU cores, then cached) on plain text about 24 animals; it has never seen a question
or a chat template. The built-in chats (``demo_data``) ask about 16 of the animals; the held-back
questions ask about the other 8 and describe colour/thing pairs the chats never show, so a right
answer after the finetune comes from pretraining knowledge put into the taught form.

Runs anywhere (on two CPU cores about two minutes the first time, half a minute once the base is
cached; GPU if present) with nothing downloaded. It is what ``make demo`` / ``python -m unsloth_like demo`` runs.
``<output_dir>`` gets:

* the adapter and tokenizer (``adapter_model.safetensors`` ...), ``demo_summary.json``;
* ``loss.png``, the loss curve (when matplotlib is installed: ``unsloth-like[plots]``);
* ``merged/``: 16-bit weights with the adapter merged in, which plain transformers loads;
* ``gguf/``: ``q8_0`` and ``q4_k_m`` GGUF files and an Ollama ``Modelfile``.

It answers the held-back questions greedily before and after training, then with the merged
model (plain transformers) and the ``q8_0`` GGUF through llama.cpp, when llama-cpp-python is
installed (``unsloth-like[gguf-check]``); it prints three of them and, for the built-in data, how
many of all the held-back questions each stage answers exactly.
A zoo architecture name (``architecture``) trains that zoo model's random weights instead: it
learns the answers' form, not their content.

The same job is real use with ``model`` (a model directory or hub id), ``dataset`` (a
json/jsonl/parquet file, a saved ``datasets`` folder or a hub id, with ``messages`` or ``text``; with
``messages`` its last rows are the held-back prompts), ``chat_template`` and ``load_in_4bit``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .data_files import check_dataset_source, load_training_dataset
from .env import is_bfloat16_supported
from .demo_base import demo_base_dir
from .demo_data import demo_chats, held_back_questions
from .models.loader import FastLanguageModel
from .responses_only import train_on_responses_only
from .testing.zoo import get_spec, zoo_model_dir


_MAX_LENGTH = 128
_ANSWER_TOKENS = 24
_HELD_BACK = 3  # rows of a user's dataset held back; prompts printed
DEMO_BASE = "demo"  # ``architecture`` of the pretrained demo base; other names are random zoo models
_GGUF_METHODS = ("q8_0", "q4_k_m")


@dataclass
class DemoSettings:
    output_dir: Path = Path("outputs/demo")
    architecture: str = DEMO_BASE  # when ``model`` is None: the demo base, or a zoo model's name
    max_steps: int = 400
    seed: int = 3407
    overwrite: bool = False
    n_conversations: int = 256
    batch_size: int = 8
    learning_rate: float | None = None  # None: 2e-3 for the demo base, 3e-3 for a random zoo model, 2e-4 for a real one
    lora_rank: int = 16
    cache_dir: Path | None = None  # zoo cache; None = ~/.cache/unsloth_like/zoo
    model: str | None = None  # a model directory or hub id instead of the demo base or a zoo model
    dataset: str | None = None  # a json/jsonl/parquet file, a saved datasets folder or a hub id (not the built-in chats)
    chat_template: str | None = None  # a name from chat_templates.CHAT_TEMPLATES
    load_in_4bit: bool = False  # QLoRA: NF4 base weights (bitsandbytes; on CPU the dequantisation is ours where needed)
    max_seq_length: int = _MAX_LENGTH


@dataclass
class DemoResult:
    output_dir: Path
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    device: str = "cpu"
    prompts: list[str] = field(default_factory=list)  # the held-back questions
    answers: dict[str, list[str]] = field(default_factory=dict)  # "before", "after", "merged", "llama.cpp"
    expected: list[str] | None = None  # the right answers (the built-in data only)

    def exact(self, stage: str) -> int:
        """How many held-back questions ``stage`` answered exactly right (built-in data only)."""
        return sum(a == b for a, b in zip(self.answers[stage], self.expected, strict=True))

    @property
    def first_loss(self) -> float:
        return self.losses[0]

    @property
    def last_loss(self) -> float:
        return self.losses[-1]


def _check_settings(settings: DemoSettings) -> None:
    if settings.model is None and settings.architecture != DEMO_BASE:
        spec = get_spec(settings.architecture)
        if spec.is_vlm:
            raise ValueError(f"The demo trains text models; {spec.name!r} is a vision-language model.")
    if settings.max_steps < 1:
        raise ValueError(f"max_steps must be at least 1, got {settings.max_steps}.")
    if settings.chat_template is not None:
        from .chat_templates import lookup_chat_template

        lookup_chat_template(settings.chat_template)  # an unknown name is refused here, before loading
    if settings.dataset is not None:
        check_dataset_source(settings.dataset)
    out = Path(settings.output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"Output path {out} exists and is not a directory; choose another --output-dir.")
    if out.is_dir() and any(out.iterdir()) and not settings.overwrite:
        raise ValueError(f"Output directory {out} is not empty; pass --overwrite to replace it.")


def _replace_dir(staging: Path, out: Path) -> None:
    """Move the finished ``staging`` directory to ``out`` by renames only, so a killed run never
    leaves a directory that looks finished, and an old ``out`` is removed only once the new one
    is in place."""
    previous = None
    if out.exists():
        previous = out.with_name(f".{out.name}-previous-{staging.name}")
        out.rename(previous)
    staging.rename(out)
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)


def run_demo(settings: DemoSettings | None = None, *, log=print) -> DemoResult:
    """Train, answer held-back prompts before and after, export (adapter, merged, GGUF) to
    ``settings.output_dir``, and report (see the module docstring)."""
    settings = settings or DemoSettings()
    _check_settings(settings)  # fail before anything is built or trained

    from trl import SFTConfig, SFTTrainer

    # the data first: a dataset the demo cannot use is refused before a model is built or loaded
    dataset, prompts, expected = _training_data(settings)
    torch.manual_seed(settings.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    source = settings.model or str(_zoo_source(settings, log))
    name = Path(settings.model.rstrip("/")).name if settings.model else (
        "llama" if settings.architecture == DEMO_BASE else settings.architecture)
    model, tokenizer = FastLanguageModel.from_pretrained(source, max_seq_length=settings.max_seq_length,
                                                         load_in_4bit=settings.load_in_4bit)
    if settings.chat_template is not None:
        from .chat_templates import get_chat_template

        tokenizer = get_chat_template(tokenizer, chat_template=settings.chat_template)
    model = FastLanguageModel.get_peft_model(
        model, r=settings.lora_rank, lora_alpha=settings.lora_rank, lora_dropout=0.0,
        target_modules="all-linear", random_state=settings.seed, use_gradient_checkpointing="unsloth",
    )
    learning_rate = settings.learning_rate or (
        2e-4 if settings.model else 2e-3 if settings.architecture == DEMO_BASE else 3e-3)
    answers = {"before": _greedy_answers(model, tokenizer, prompts)} if prompts else {}

    out = Path(settings.output_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        config = SFTConfig(
            output_dir=str(staging / "trainer"),
            max_steps=settings.max_steps,
            per_device_train_batch_size=settings.batch_size,
            learning_rate=learning_rate,
            lr_scheduler_type="constant",
            logging_steps=max(1, settings.max_steps // 40),  # about 40 points: the printed log and loss.png
            save_strategy="no",
            report_to="none",
            seed=settings.seed,
            max_length=settings.max_seq_length,
            bf16=is_bfloat16_supported(),
            fp16=False,
            use_cpu=device == "cpu",
        )
        trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
        if "messages" in dataset.column_names:  # chats: the loss on the replies only, as Unsloth's notebooks do
            # a reply cut off by max_seq_length leaves nothing to learn: such rows are dropped, with a count
            train_on_responses_only(trainer, drop_fully_masked=True)
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        if not losses or not all(math.isfinite(x) for x in losses):
            raise RuntimeError(f"Training produced no finite losses: {losses}.")
        if prompts:
            answers["after"] = _greedy_answers(model, tokenizer, prompts)

        shutil.rmtree(staging / "trainer", ignore_errors=True)
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        plotted = _plot_losses(losses, staging / "loss.png")
        model.save_pretrained_merged(staging / "merged", tokenizer, save_method="merged_16bit")
        # the files are named after their folder (<name>-demo.Q8_0.gguf); the folder is then called gguf
        named = staging / f"{name}-demo"
        written = model.save_pretrained_gguf(named, tokenizer, quantization_method=list(_GGUF_METHODS))
        named.rename(staging / "gguf")
        gguf_paths = [staging / "gguf" / path.name for path in written]
        if prompts:
            answers["merged"] = _merged_answers(staging / "merged", prompts)
        if prompts and importlib.util.find_spec("llama_cpp") is not None:
            answers["llama.cpp"] = _llama_cpp_answers(gguf_paths[0], staging / "merged", prompts)
        result = DemoResult(output_dir=out, losses=losses, seconds=seconds, device=device, prompts=prompts,
                            answers=answers, expected=expected)
        summary = {"settings": {k: str(v) for k, v in asdict(settings).items()},
                   "device": device, "seconds": seconds, "losses": losses, "prompts": prompts, "answers": answers,
                   "expected": expected, "exact": {stage: result.exact(stage) for stage in answers} if expected else None,
                   "gguf": [p.name for p in gguf_paths]}
        (staging / "demo_summary.json").write_text(json.dumps(summary, indent=2))
        _replace_dir(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    trained = ("the demo base" if settings.architecture == DEMO_BASE else f"zoo '{name}' (random weights)"
               ) if settings.model is None else f"'{name}'"
    log(
        f"demo: trained {trained} with {'QLoRA (NF4 base)' if settings.load_in_4bit else 'LoRA'} "
        f"r={settings.lora_rank} for "
        f"{settings.max_steps} steps on {device} in {result.seconds:.1f}s; "
        f"loss {result.first_loss:.3f} -> {result.last_loss:.3f}; adapter saved to {out}"
    )
    log(_answer_table(result) if prompts else
        "demo: the dataset has no 'messages' column, so there are no held-back prompts to answer")
    log(f"demo: wrote {out}/merged (16-bit), {out}/gguf ({', '.join(_GGUF_METHODS)} + Modelfile)"
        + (f", {out}/loss.png" if plotted else "; install unsloth-like[plots] for loss.png")
        + ("" if "llama.cpp" in answers or not prompts
           else "; install unsloth-like[gguf-check] to run the GGUF through llama.cpp"))
    return result


def _zoo_source(settings: DemoSettings, log) -> Path:
    if settings.architecture == DEMO_BASE:
        return demo_base_dir(settings.cache_dir, log=log)
    return zoo_model_dir(settings.architecture, settings.cache_dir)


def _training_data(settings: DemoSettings):
    """The training set, the held-back prompts (user questions training never sees) and their
    right answers: the built-in chats and held-back questions (``demo_data``), or the user's
    dataset, whose last rows are held back when it has ``messages`` (their answers are not scored;
    a ``text``-only dataset trains on all rows, no prompts)."""
    from datasets import Dataset

    if settings.dataset is None:
        questions = held_back_questions()
        chats = demo_chats(settings.n_conversations, seed=settings.seed)
        return Dataset.from_dict({"messages": chats}), [q for q, _ in questions], [a for _, a in questions]
    rows = load_training_dataset(settings.dataset)
    if "messages" in rows.column_names:
        if len(rows) <= _HELD_BACK:
            raise ValueError(f"Dataset {settings.dataset} has {len(rows)} rows; the demo holds {_HELD_BACK} back "
                             "for its before/after answers and needs more to train on.")
        held = rows.select(range(len(rows) - _HELD_BACK, len(rows)))
        prompts = [next(turn["content"] for turn in chat if turn["role"] == "user") for chat in held["messages"]]
        return rows.select(range(len(rows) - _HELD_BACK)), prompts, None
    if "text" in rows.column_names:
        return rows, [], None
    raise ValueError(f"Dataset {settings.dataset} has columns {rows.column_names}; the demo trains on 'messages' "
                     "(a list of {role, content} turns) or 'text'.")


def _greedy_answers(model, tokenizer, prompts: list[str]) -> list[str]:
    """Greedy answers of ``model`` (ours, in inference mode for the call) to one-turn chats."""
    FastLanguageModel.for_inference(model)
    try:
        return [_generate(model, tokenizer, prompt) for prompt in prompts]
    finally:
        FastLanguageModel.for_training(model)


def _merged_answers(merged_dir: Path, prompts: list[str]) -> list[str]:
    """The same answers from the merged export, loaded by plain transformers (no patches of ours)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    return [_generate(model, tokenizer, prompt) for prompt in prompts]


def _chat_ids(tokenizer, prompt: str) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        tokenize=True, return_dict=True)["input_ids"]
    return list(ids)


def _generate(model, tokenizer, prompt: str) -> str:
    ids = _chat_ids(tokenizer, prompt)
    device = next(model.parameters()).device
    with torch.no_grad():
        output = model.generate(input_ids=torch.tensor([ids], device=device), do_sample=False,
                                max_new_tokens=_ANSWER_TOKENS, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(output[0, len(ids):], skip_special_tokens=True).strip()


def _llama_cpp_answers(gguf_path: Path, merged_dir: Path, prompts: list[str]) -> list[str]:
    """Greedy answers of the GGUF through llama.cpp, fed the same prompt tokens as transformers."""
    import llama_cpp
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=2048, verbose=False, seed=0)
    try:
        return [llm.create_completion(_chat_ids(tokenizer, prompt), max_tokens=_ANSWER_TOKENS,
                                      temperature=0.0)["choices"][0]["text"].strip() for prompt in prompts]
    finally:
        llm.close()


def _answer_table(result: DemoResult) -> str:
    lines = ["demo: greedy answers to questions training never saw"]
    for i, prompt in enumerate(result.prompts[:_HELD_BACK]):
        lines.append(f"  Q: {prompt}")
        lines.extend(f"    {stage + ':':<10} {texts[i]!r}" for stage, texts in result.answers.items())
    if result.expected is not None:
        scores = ", ".join(f"{stage} {result.exact(stage)}" for stage in result.answers)
        lines.append(f"demo: exact answers to all {len(result.expected)} held-back questions: {scores}")
    return "\n".join(lines)


def _plot_losses(losses: list[float], path: Path) -> bool:
    """The loss curve as a PNG; False when matplotlib is not installed."""
    if importlib.util.find_spec("matplotlib") is None:
        return False
    from matplotlib.figure import Figure  # no pyplot: no display, no global backend switch

    figure = Figure(figsize=(6, 3.5), dpi=100)
    axes = figure.add_subplot()
    axes.plot(range(1, len(losses) + 1), losses, marker="o", markersize=3)
    axes.set(xlabel="step", ylabel="training loss", title="demo: LoRA finetuning")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    return True
