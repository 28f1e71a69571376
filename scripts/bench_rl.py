"""Preference / RL step benchmark: TRL's DPOTrainer and GRPOTrainer on plain transformers + PEFT
against the same trainers on our model, same weights, data and seeds.

    python scripts/bench_rl.py                    # DPO and GRPO, LoRA r=16 on all linear layers
    python scripts/bench_rl.py --trainers dpo     # one trainer
    python scripts/bench_rl.py --trainers head    # the LM head alone: TRL's log-prob kernel vs ours
    python scripts/bench_rl.py --out benchmarks/rl-cpu.json

Variants: ``hf`` is the plain model with ``peft.get_peft_model``; ``unsloth_like`` is
``FastLanguageModel.get_peft_model`` on the patched model. Both run TRL 1.x as users do, so both
use TRL's own fused LM head (``add_fused_lm_head``: per-token log-probs in vocabulary tiles,
never the (B, L, V) logits); what differs is everything under it (our decoder kernels and fused
LoRA). Each (trainer, variant) runs in a fresh subprocess: TRL builds its trainer, runs warm-up
steps, then timed optimizer steps. Reported: seconds per step, tokens/s (DPO: chosen + rejected
tokens; GRPO: prompt + completion tokens of every generation, sampling included; the median step)
and peak memory
above the loaded model (peak RSS on CPU, ``torch.cuda.max_memory_allocated`` on GPU), and the
first step's loss of each variant (the same batches: they must agree).

``head``: the LM head alone, forward + backward of per-token log-probs (and entropy) of 2,000
hidden rows (CPU) through a frozen head of the model's size: TRL's ``ChunkedLogProbFunction``
(``hf``) against our ``kernels.token_log_probs`` (``unsloth_like``), which our models run under
TRL's fused head on the CPU.

The model: on CPU a small Llama-shaped decoder with Llama 3's 128,256-token vocabulary (the size
at which the LM head dominates: where a fused head matters); on a GPU Llama-3.1-8B's dimensions.
Random weights, seeded; the tokenizer is the zoo Llama's (its ids are a subset of the vocabulary).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers

from unsloth_like.testing.memory import peak_rss_bytes, rss_bytes
from unsloth_like.testing.reports import write_report

TRAINERS = ("dpo", "grpo", "head")
VARIANTS = ("hf", "unsloth_like")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _model_config(device: str, vocab: int):
    if device == "cuda":  # Llama-3.1-8B dimensions
        return transformers.LlamaConfig(
            vocab_size=vocab, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
            num_key_value_heads=8, max_position_embeddings=8192, tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    return transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0})


def _build(spec: dict):
    """(PEFT model, tokenizer) for the variant: seeded weights, adapters seeded right before."""
    import peft

    from unsloth_like import FastLanguageModel
    from unsloth_like.models import patch_model
    from unsloth_like.testing.zoo import zoo_model_dir

    tokenizer = transformers.AutoTokenizer.from_pretrained(zoo_model_dir("llama", spec.get("zoo_cache")))
    config = _model_config(spec["device"], spec["vocab"])
    config.pad_token_id, config.bos_token_id, config.eos_token_id = (tokenizer.pad_token_id, tokenizer.bos_token_id,
                                                                     tokenizer.eos_token_id)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if spec["device"] == "cuda" else torch.float32
    with torch.device(spec["device"]):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if spec["variant"] == "unsloth_like":
        from unsloth_like.rl_handoff import install_rl_keywords

        install_rl_keywords()  # what from_pretrained installs: TRL's fused head then runs our CPU kernel
        patch_model(model)
        return FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, target_modules=TARGETS, random_state=0,
                                                use_gradient_checkpointing=False), tokenizer
    torch.manual_seed(0)
    lora = peft.LoraConfig(r=16, lora_alpha=16, target_modules=TARGETS, task_type="CAUSAL_LM")
    return peft.get_peft_model(model, lora), tokenizer


def _words(generator: torch.Generator, count: int) -> str:
    vocabulary = ("the cat sat on a mat while two dogs ran past seven red cars and one blue bird sang "
                  "about numbers letters rivers mountains").split()
    return " ".join(vocabulary[int(i)] for i in torch.randint(0, len(vocabulary), (count,), generator=generator))


def _dataset(spec: dict):
    from datasets import Dataset

    generator = torch.Generator().manual_seed(0)
    rows = spec["batch"] * (spec["warmup"] + spec["steps"])
    if spec["trainer"] == "dpo":
        return Dataset.from_list([{"prompt": _words(generator, spec["prompt_words"]),
                                   "chosen": " " + _words(generator, spec["completion_words"]),
                                   "rejected": " " + _words(generator, spec["completion_words"])}
                                  for _ in range(rows)])
    prompts = rows // spec["generations"]
    return Dataset.from_list([{"prompt": _words(generator, spec["prompt_words"])} for _ in range(prompts)])


def _reward(completion_ids, **kwargs):
    return [float(sum(ids) % 7) for ids in completion_ids]


class _StepTimer(transformers.TrainerCallback):
    """Wall time of each optimizer step."""

    def __init__(self):
        self.seconds, self._started = [], None

    def on_step_begin(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.seconds.append(time.perf_counter() - self._started)


def run_head(spec: dict) -> dict:
    """The LM head alone: per-token log-probs of ``tokens`` hidden rows through a (vocab, hidden)
    head, forward + backward (hidden needs a gradient, the head is frozen as under LoRA): TRL's
    ``ChunkedLogProbFunction`` (``hf``) or our ``token_log_probs`` (``unsloth_like``)."""
    from trl.kernels import ChunkedLogProbFunction

    from unsloth_like.kernels.token_logprobs import token_log_probs

    generator = torch.Generator().manual_seed(0)
    hidden_size = _model_config(spec["device"], spec["vocab"]).hidden_size
    weight = (torch.randn(spec["vocab"], hidden_size, generator=generator) * 0.02).to(spec["device"])
    targets = torch.randint(0, spec["vocab"], (spec["tokens"],), generator=generator).to(spec["device"])
    hidden = torch.randn(spec["tokens"], hidden_size, generator=generator).to(spec["device"])

    def step() -> float:
        h = hidden.clone().requires_grad_()
        if spec["variant"] == "hf":
            log_probs = ChunkedLogProbFunction.apply(h, weight, None, targets, 1.0, 32768, None, 1.0, ("entropy",))[0]
        else:
            log_probs = token_log_probs(h, weight, None, targets, outputs=("entropy",))[0]
        loss = -log_probs.sum()
        loss.backward()
        return loss.item()

    base = rss_bytes()
    losses, seconds = [], []
    for index in range(spec["warmup"] + spec["steps"]):
        started = time.perf_counter()
        losses.append(step())
        if index >= spec["warmup"]:
            seconds.append(time.perf_counter() - started)
    median = statistics.median(seconds)
    return {**spec, "s_per_step": median, "step_seconds": seconds, "tokens_per_step": spec["tokens"],
            "tokens_per_s": spec["tokens"] / median, "peak_mib": (peak_rss_bytes() - base) / 2**20,
            "first_loss": losses[0], "losses": losses}


def run_variant(spec: dict) -> dict:
    """One (trainer, variant) in this (fresh) process."""
    import trl

    if spec["trainer"] == "head":
        return run_head(spec)

    from unsloth_like.kernels import use_backend

    model, tokenizer = _build(spec)
    data = _dataset(spec)
    common = dict(output_dir=spec.get("output_dir", "/tmp/bench_rl"), per_device_train_batch_size=spec["batch"],
                  max_steps=spec["warmup"] + spec["steps"], learning_rate=1e-5, logging_steps=1, report_to="none",
                  use_cpu=spec["device"] == "cpu", bf16=spec["device"] == "cuda", gradient_checkpointing=False,
                  save_strategy="no", seed=0)
    timer = _StepTimer()
    if spec["trainer"] == "dpo":
        config = trl.DPOConfig(beta=0.1, max_length=4 * (spec["prompt_words"] + spec["completion_words"]), **common)
        trainer = trl.DPOTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                                 callbacks=[timer])
    else:
        config = trl.GRPOConfig(num_generations=spec["generations"], max_completion_length=spec["completion_tokens"],
                                beta=0.04, temperature=1.0, **common)
        trainer = trl.GRPOTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                                  reward_funcs=_reward, callbacks=[timer])
    if spec["device"] == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_bytes()
    with use_backend(spec["backend"]) if spec.get("backend") else contextlib.nullcontext():
        trainer.train()
    peak = (torch.cuda.max_memory_allocated() - base) if spec["device"] == "cuda" else (
        peak_rss_bytes() - base)
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    timed = timer.seconds[spec["warmup"]:]
    tokens_per_step = _tokens_per_step(logged, spec["warmup"])
    median = statistics.median(timed)  # one slow step (a page-fault storm, a long sample) does not move it
    return {**spec, "s_per_step": median, "step_seconds": timed, "tokens_per_step": tokens_per_step,
            "tokens_per_s": tokens_per_step / median, "peak_mib": peak / 2**20,
            "first_loss": logged[0]["loss"], "losses": [entry["loss"] for entry in logged]}


def _tokens_per_step(logged: list[dict], warmup: int) -> float:
    """TRL logs the cumulative token count (``num_tokens``); the mean per timed step."""
    counts = [entry["num_tokens"] for entry in logged]
    start = counts[warmup - 1] if warmup else 0
    return (counts[-1] - start) / (len(counts) - warmup)


def _run_subprocess(spec: dict) -> dict:
    done = subprocess.run([sys.executable, __file__, "--variant-spec", json.dumps(spec)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{spec['trainer']} / {spec['variant']} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trainers", nargs="+", choices=TRAINERS, default=list(TRAINERS))
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--out", default=None)
    parser.add_argument("--variant-spec", default=None, help=argparse.SUPPRESS)  # internal: one subprocess
    args = parser.parse_args()
    if args.variant_spec:
        print(json.dumps(run_variant(json.loads(args.variant_spec))))
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = {"batch": 4, "prompt_words": 48, "completion_words": 48, "generations": 4, "completion_tokens": 64,
             "tokens": 2000, "warmup": 1, "steps": 5} if device == "cpu" else \
        {"batch": 8, "prompt_words": 256, "completion_words": 256, "generations": 8, "completion_tokens": 256,
         "tokens": 16384, "warmup": 2, "steps": 5}
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    slug = "cpu" if device == "cpu" else name.split()[-1].lower()
    out = Path(args.out or Path(__file__).resolve().parent.parent / "benchmarks" / f"rl-lora-{slug}.json")
    rows = []
    for trainer in args.trainers:
        for variant in VARIANTS:
            row = _run_subprocess({"device": device, "trainer": trainer, "variant": variant, "vocab": args.vocab,
                                   **shape})
            rows.append(row)
            print(f"{trainer:<5} {variant:<13} {row['s_per_step']:7.3f} s/step {row['tokens_per_s']:9.0f} tok/s  "
                  f"peak {row['peak_mib']:9.1f} MiB  first loss {row['first_loss']:.6f}", flush=True)
            write_report(out, _report(name, rows))
    report = _report(name, rows)
    for trainer, ratios in report["ratios"].items():
        print(f"{trainer}: ours / HF step time {ratios['step_time_ratio']:.2f}x, "
              f"peak memory {ratios['peak_memory_ratio']:.2f}x")
    print(f"written to {out}")


def _report(device_name: str, rows: list[dict]) -> dict:
    import peft
    import trl

    report = {"device": device_name, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
              "transformers": transformers.__version__, "peft": peft.__version__, "trl": trl.__version__,
              "results": rows, "ratios": {}}
    for trainer in TRAINERS:
        by_variant = {row["variant"]: row for row in rows if row["trainer"] == trainer}
        if set(VARIANTS) <= by_variant.keys():
            hf, ours = by_variant["hf"], by_variant["unsloth_like"]
            report["ratios"][trainer] = {"step_time_ratio": ours["s_per_step"] / hf["s_per_step"],
                                         "tokens_per_s_ratio": ours["tokens_per_s"] / hf["tokens_per_s"],
                                         "peak_memory_ratio": ours["peak_mib"] / hf["peak_mib"],
                                         "first_loss_difference": abs(ours["first_loss"] - hf["first_loss"])}
    return report


if __name__ == "__main__":
    main()
