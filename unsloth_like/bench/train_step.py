"""Training-step benchmark: upstream transformers + PEFT against ours, same weights and batch.

    python scripts/bench_train.py                 # LoRA r=16 all linear. CPU: zoo Llama; GPU: Llama-3.1-8B dims
    python scripts/bench_train.py --mode qlora    # the same on an NF4 (bitsandbytes) base
    python scripts/bench_train.py --mode full     # full finetuning
    python scripts/bench_train.py --max-seq       # GPU: also the longest sequence that fits at batch 1
    python scripts/bench_train.py --model qwen2_vl --mode qlora   # a vision-language model, images in the batch
    python scripts/bench_train.py --model phi3    # another text family: phi3 (Phi-4-mini), gemma3_text (Gemma 3 4B)
    python scripts/bench_train.py --model phi3 --vocab 200064   # CPU: the zoo model with the family's real vocabulary
    python scripts/bench_train.py --vocab 128256 --seq 2048 --batch 1   # any shape
    python scripts/bench_train.py --variants unsloth_like unsloth     # ours against Unsloth itself (installed)
    python scripts/bench_train.py --out benchmarks/train-cpu.json        # default: benchmarks/train-<kind>-<device>.json

Variants: ``hf`` is the plain model with ``peft.get_peft_model`` (standard gradient checkpointing
on GPU, as users run it); ``unsloth_like`` is ``FastLanguageModel.get_peft_model`` on the patched
model (fused LoRA, fused loss, ``use_gradient_checkpointing="unsloth"`` on GPU); ``hf_liger``
(``--variants``, GPU only) is ``hf`` with Liger-Kernel applied to the model first; ``unsloth``
(``--variants``, text models; on a CPU Unsloth's own CPU backend, 2026.10 and newer) is Unsloth
itself: its ``FastLanguageModel`` loads the same model from a temporary checkpoint and its adapters
start from ``hf``'s (``unsloth_variant``). Each variant runs
in a fresh subprocess on the same seeded weights and batch: a few warm-up steps, then timed
optimizer steps. Reported: tokens/s and seconds per step of the median timed step (every step's
time is kept), and peak memory above the loaded model (peak RSS on CPU,
``torch.cuda.max_memory_allocated`` on GPU). On a GPU the model has
Llama-3.1-8B's dimensions with random weights (no hub on the benchmark machines); its 4-bit form
quantises those weights with bitsandbytes (NF4, double quantisation), as a 4-bit load would.
``--model qwen2_vl``: a Qwen2-VL model (CPU: the zoo's; GPU: Qwen2-VL-7B's dimensions, random weights),
LoRA on what ``FastVisionModel.get_peft_model``'s default flags select (vision and language
attention and MLP) in both variants, batches of chats with one image each (random pixels, the
processor's patch layout); a 4-bit base quantises the decoder and the vision blocks, not the
merger, as ``FastVisionModel`` loads it.
``--model phi3`` / ``--model gemma3_text``: the same LoRA benchmark on another text family (CPU: the
zoo's model; GPU: Phi-4-mini's / Gemma-3-4B's text dimensions, random weights). ``--vocab N`` resizes
the model's embeddings (and untied head) to N rows first, seeded: the zoo's vocabularies are ~1k
tokens, where the loss is negligible; real ones are 128k-262k, where it dominates.
On a CPU whose bitsandbytes dequantises wrongly (its AVX512 path; ``unsloth_like.host``), the
``hf`` QLoRA baseline uses bitsandbytes' own pure-torch dequantisation: the report says so.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from unsloth_like.bench.unsloth_variant import PeerCheckpoints
from unsloth_like.testing.memory import peak_rss_bytes, rss_bytes
from unsloth_like.testing.reports import write_report


VARIANTS = ("hf", "unsloth_like", "hf_liger", "unsloth")
LORA = {"r": 16, "lora_alpha": 16}  # every variant's adapters


# ``--size small`` (CPU, Llama): the zoo Llama at SmolLM2-135M's width with 4 of its 30 layers, so
# that the decoder's share of a step is a small real model's, not a test model's (hidden 200).
SMALL_LLAMA = {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3,
               "head_dim": 64, "num_hidden_layers": 4}


def _cpu_zoo_spec(name: str, size: str):
    import dataclasses

    from unsloth_like.testing.zoo import get_spec

    spec = get_spec(name)
    if size == "small":
        spec = dataclasses.replace(spec, config={**spec.config, **SMALL_LLAMA})
    return spec


def _build_model(device: str, quantized: bool = False, name: str = "llama", size: str = "zoo"):
    import transformers

    from unsloth_like.testing.zoo import load_zoo_model

    if device == "cpu":
        model, _ = load_zoo_model(_cpu_zoo_spec(name, size), load_in_4bit=quantized)
        return model
    if name == "qwen2_vl":
        return _build_qwen2_vl_7b(quantized)
    config = GPU_TEXT_CONFIGS[name]()
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    if quantized:
        _quantize_decoder_linears(model)
    return model


def _llama_3_1_8b():
    import transformers

    return transformers.LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, tie_word_embeddings=False)


def _phi_4_mini():
    import transformers

    return transformers.Phi3Config(
        vocab_size=200064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
        num_attention_heads=24, num_key_value_heads=8, max_position_embeddings=8192, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75})


def _gemma_3_4b_text():
    import transformers

    return transformers.Gemma3TextConfig(
        vocab_size=262208, hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
        num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
        sliding_window=1024, max_position_embeddings=8192,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}})


# GPU benchmark models (random weights in these dimensions; no hub on the benchmark machines)
GPU_TEXT_CONFIGS = {"llama": _llama_3_1_8b, "phi3": _phi_4_mini, "gemma3_text": _gemma_3_4b_text}
TEXT_MODELS = tuple(GPU_TEXT_CONFIGS)


def _build_qwen2_vl_7b(quantized: bool):
    import transformers

    config = transformers.Qwen2VLConfig(  # Qwen2-VL-7B dimensions, random weights
        text_config={"vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                     "num_attention_heads": 28, "num_key_value_heads": 4, "max_position_embeddings": 32768,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0,
                                         "mrope_section": [16, 24, 24]}, "tie_word_embeddings": False},
        vision_config={"depth": 32, "embed_dim": 1280, "num_heads": 16, "mlp_ratio": 4, "hidden_size": 3584,
                       "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16,
                                                                     attn_implementation="sdpa")
    if quantized:
        _quantize_decoder_linears(model)
    return model


def _decoder_parents(model):
    """The attention and MLP modules whose Linear layers a 4-bit load quantises."""
    inner = model.model
    if hasattr(inner, "language_model"):  # a VLM: the decoder and the vision blocks (not the merger)
        for block in inner.visual.blocks:
            yield block.attn
            yield block.mlp
        inner = inner.language_model
    for layer in inner.layers:
        yield layer.self_attn
        yield layer.mlp


def _quantize_decoder_linears(model) -> None:
    """Replace the decoder's nn.Linear layers by bitsandbytes NF4 ones holding the same weights."""
    import bitsandbytes as bnb

    for parent in _decoder_parents(model):
        for name, child in list(parent.named_children()):
            if type(child) is not torch.nn.Linear:
                continue
            quantized = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=child.weight.dtype, compress_statistics=True,
                                          quant_type="nf4", device="meta")
            # quantised where the weight lives (Params4bit quantises on its first .to(device))
            quantized.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False,
                                                 compress_statistics=True, quant_type="nf4").to(child.weight.device)
            if child.bias is not None:
                quantized.bias = child.bias
            setattr(parent, name, quantized)
        torch.cuda.empty_cache()


def build_base(spec: dict, quantized: bool):
    """The seeded model every variant starts from, its embeddings resized to ``spec["vocab"]`` if set."""
    model = _build_model(spec["device"], quantized=quantized, name=spec.get("model", "llama"),
                         size=spec.get("size", "zoo"))
    if spec.get("vocab"):
        torch.manual_seed(0)  # the same new rows in every variant
        model.resize_token_embeddings(spec["vocab"], mean_resizing=False)
    return model


def add_adapters(model, spec: dict):
    from peft import LoraConfig, get_peft_model

    from unsloth_like import FastLanguageModel, FastVisionModel
    from unsloth_like.models import patch_model

    checkpointing = spec["gradient_checkpointing"]
    vision = spec.get("model", "llama") not in TEXT_MODELS
    targets = _vision_targets(model) if vision else "all-linear"  # the same modules in every variant
    if spec["variant"] == "unsloth_like":
        patch_model(model)
        if spec["mode"] == "full":
            if checkpointing:
                from unsloth_like.models.checkpointing import set_gradient_checkpointing

                set_gradient_checkpointing(model, "unsloth")
            return model
        loader = FastVisionModel if vision else FastLanguageModel
        return loader.get_peft_model(model, **LORA, target_modules=None if vision else targets,
                                     random_state=0, use_gradient_checkpointing="unsloth" if checkpointing else False)
    if spec["variant"] == "hf_liger":  # HF + PEFT with Liger's kernels (RMSNorm, RoPE, SwiGLU, fused loss)
        import liger_kernel.transformers as liger

        getattr(liger, f"apply_liger_kernel_to_{spec.get('model', 'llama')}")(model=model)
    if spec["mode"] != "full":
        torch.manual_seed(0)
        model = get_peft_model(model, LoraConfig(**LORA, target_modules=targets, task_type="CAUSAL_LM"))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def prepare_step(spec: dict):
    """``(step, vocab)`` for one variant in this (fresh) process: ``step()`` runs one optimizer step on
    the variant's model and batch and returns its loss. On a CPU QLoRA spec it also routes
    bitsandbytes' broken CPU dequantisation for the process (``spec["bitsandbytes_cpu"]`` says how)."""
    device = spec["device"]
    if device == "cpu" and spec["mode"] == "qlora":
        from unsloth_like.testing.bitsandbytes_cpu import correct_bitsandbytes_baselines

        routing = correct_bitsandbytes_baselines()  # for the process: it ends with the variant
        spec["bitsandbytes_cpu"] = routing.describe()
    if spec["variant"] == "unsloth":  # from the checkpoint PeerCheckpoints saved, its adapters copied in
        from .unsloth_variant import load_unsloth_model

        model = load_unsloth_model(spec)
    else:  # every variant seeds 0 right before creating adapters: identical initial adapters
        model = add_adapters(build_base(spec, quantized=spec["mode"] == "qlora"), spec)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    vocab = model.config.get_text_config().vocab_size
    batch = _batch(model.config, spec, vocab)

    def step():
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step, vocab


def run_variant(spec: dict) -> dict:
    """One variant in this (fresh) process."""
    device = spec["device"]
    spec = dict(spec)
    step, vocab = prepare_step(spec)

    # Baseline before the first step: optimizer state, gradients and activations all count.
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_bytes()
    for _ in range(spec["warmup"]):
        step()
    losses, step_seconds = [], []
    for _ in range(spec["steps"]):
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        losses.append(step())  # .item() waits for the step to finish
        step_seconds.append(time.perf_counter() - started)
    peak = (torch.cuda.max_memory_allocated() - base) if device == "cuda" else (
        peak_rss_bytes() - base)
    # The median step: a shared machine's hiccups (another process, a page-cache flush) land on
    # single steps and would otherwise move the mean; every step's time is kept.
    median = statistics.median(step_seconds)
    return {**spec, "tokens_per_s": spec["batch"] * spec["seq"] / median, "s_per_step": median,
            "step_seconds": step_seconds, "peak_mib": peak / 2**20, "losses": losses, "vocab": vocab}


def _vision_targets(model) -> str:
    from unsloth_like.models.vision_lora import lora_target

    return lora_target(model, vision=True, language=True, attention=True, mlp=True)


def _batch(config, spec: dict, vocab: int) -> dict:
    """Random token ids (and, for a VLM, one image per row at its start: ``image_grid`` patches of
    random pixels in the processor's layout, their placeholder tokens masked out of the labels)."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, min(vocab, 150000), (spec["batch"], spec["seq"]), generator=generator)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    if getattr(config, "vision_config", None) is not None:
        vision = config.vision_config
        specials = torch.tensor([config.image_token_id, config.video_token_id, config.vision_start_token_id,
                                 config.vision_end_token_id])
        ordinary = next(i for i in range(vocab) if i not in specials.tolist())
        input_ids[torch.isin(input_ids, specials)] = ordinary  # the text part holds no vision token
        grid = spec["image_grid"]
        image_tokens = grid * grid // vision.spatial_merge_size**2
        input_ids[:, 0] = config.vision_start_token_id
        input_ids[:, 1:1 + image_tokens] = config.image_token_id
        input_ids[:, 1 + image_tokens] = config.vision_end_token_id
        patch = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
        batch["pixel_values"] = torch.randn(spec["batch"] * grid * grid, patch, generator=generator)
        batch["image_grid_thw"] = torch.tensor([[1, grid, grid]] * spec["batch"])
        batch["mm_token_type_ids"] = (input_ids == config.image_token_id).long()
    batch["labels"] = input_ids.masked_fill(batch.get("mm_token_type_ids", torch.zeros_like(input_ids)) == 1, -100)
    return {k: v.to(spec["device"]) for k, v in batch.items()}


def run_subprocess(spec: dict, checkpoints: PeerCheckpoints | None = None) -> dict | None:
    """Run one variant in a fresh process; None when it ran out of device memory. The ``unsloth``
    variant needs ``checkpoints``, where its model is saved for it (``unsloth_variant``)."""
    argv, options = [sys.executable, "-m", "unsloth_like.bench.train_step"], {}
    if spec["variant"] == "unsloth":
        if checkpoints is None:
            raise ValueError("the unsloth variant loads a saved model: pass a PeerCheckpoints to run_subprocess.")
        spec = {**spec, "checkpoint": checkpoints.for_spec(spec)}
        argv, options = checkpoints.process_options()
    done = subprocess.run([*argv, "--variant-spec", json.dumps(spec)], capture_output=True, text=True, **options)
    if done.returncode != 0:
        if "out of memory" in done.stderr.lower():
            return None
        raise SystemExit(f"variant {spec['variant']} failed:\n{done.stderr[-3000:]}")
    row = json.loads(done.stdout.strip().splitlines()[-1])
    row.pop("checkpoint", None)  # a temporary folder, gone after the run
    return row


def longest_sequence(base_spec: dict, start: int = 2048, limit: int = 262144,
                     checkpoints: PeerCheckpoints | None = None) -> int | None:
    """The longest power-of-two sequence (from ``start``) whose batch-1 step fits in memory."""
    fitted = None
    seq = start
    while seq <= limit:
        if run_subprocess({**base_spec, "batch": 1, "seq": seq, "warmup": 0, "steps": 1}, checkpoints) is None:
            break
        fitted, seq = seq, seq * 2
    return fitted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("lora", "qlora", "full"), default="lora")
    parser.add_argument("--model", choices=(*TEXT_MODELS, "qwen2_vl"), default="llama",
                        help="phi3, gemma3_text: other text families; qwen2_vl: a vision-language model with an "
                             "image in every row")
    parser.add_argument("--vocab", type=int, default=None, help="resize the embeddings to this many rows first")
    parser.add_argument("--size", choices=("zoo", "small"), default="zoo",
                        help="CPU, llama: small = SmolLM2-135M's width, 4 layers (default: the zoo's test model)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per row (default: 256 on CPU, 2048 on GPU)")
    parser.add_argument("--batch", type=int, default=None, help="rows per step (default: 8 on CPU, 2 on GPU)")
    parser.add_argument("--max-seq", action="store_true", help="GPU: also find the longest batch-1 sequence that fits")
    parser.add_argument("--out", default=None)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=["hf", "unsloth_like"],
                        help="hf_liger: HF + PEFT with Liger-Kernel's kernels (GPU, liger-kernel installed); "
                             "unsloth: Unsloth itself (unsloth installed, text models)")
    parser.add_argument("--variant-spec", default=None, help=argparse.SUPPRESS)  # internal: one subprocess
    args = parser.parse_args()
    if args.variant_spec:
        print(json.dumps(run_variant(json.loads(args.variant_spec))))
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = {"batch": 8, "seq": 256, "warmup": 2, "steps": 5} if device == "cpu" else \
        {"batch": 2, "seq": 2048, "warmup": 3, "steps": 10}
    shape.update({key: value for key, value in (("batch", args.batch), ("seq", args.seq)) if value})
    if args.model not in TEXT_MODELS:  # one image per row: 16 tokens on CPU (8x8 patches), 256 on GPU (32x32)
        shape["image_grid"] = 8 if device == "cpu" else 32
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    slug = "cpu" if device == "cpu" else name.split()[-1].lower()
    kind = args.mode if args.model == "llama" else f"{args.mode}-{args.model}"
    kind += "-small" if args.size == "small" else ""
    kind += f"-vocab{args.vocab}" if args.vocab else ""
    kind += f"-seq{args.seq}" if args.seq else ""
    out = Path(args.out or Path("benchmarks") / f"train-{kind}-{slug}.json")
    if args.size == "small" and (device != "cpu" or args.model != "llama"):
        raise SystemExit("--size small is the CPU Llama's (on a GPU the model already has a real model's dimensions); "
                         "drop --size or use --model llama on a CPU.")
    if "hf_liger" in args.variants and (device != "cuda" or importlib.util.find_spec("liger_kernel") is None):
        raise SystemExit("--variants hf_liger needs a CUDA device and liger-kernel (pip install liger-kernel).")
    if "unsloth" in args.variants:
        refuse_unsloth(args.model)
    rows = []
    with PeerCheckpoints() as checkpoints:
        for variant in args.variants:
            spec = {"device": device, "variant": variant, "mode": args.mode, "model": args.model,
                    "gradient_checkpointing": device == "cuda", "vocab": args.vocab, "size": args.size}
            row = run_subprocess({**spec, **shape}, checkpoints)
            if row is None:
                raise SystemExit(f"variant {variant} ran out of memory at batch {shape['batch']} x {shape['seq']}.")
            if args.max_seq and device == "cuda":
                row["max_seq_batch1"] = longest_sequence(spec, checkpoints=checkpoints)
            rows.append(row)
            print(f"{variant:<13} {row['tokens_per_s']:10.0f} tok/s  {row['s_per_step']:7.3f} s/step  "
                  f"peak {row['peak_mib']:9.1f} MiB  loss {row['losses'][0]:.4f} -> {row['losses'][-1]:.4f}"
                  + (f"  max seq {row['max_seq_batch1']}" if "max_seq_batch1" in row else ""), flush=True)
            report = _report(name, args.mode, rows, complete=len(rows) == len(args.variants))
            write_report(out, report)  # after each variant: a run stopped midway keeps the first
    for baseline, ratios in (("HF", report), ("Unsloth", report.get("vs_unsloth", {}))):
        if "tokens_per_s_ratio" in ratios:
            print(f"\nours / {baseline}: tokens/s {ratios['tokens_per_s_ratio']:.2f}x, "
                  f"step time {ratios['step_time_ratio']:.2f}x, peak memory {ratios['peak_memory_ratio']:.2f}x")
    print(f"written to {out}")


def refuse_unsloth(model: str) -> None:
    """Stop, in one sentence, where the ``unsloth`` variant cannot run."""
    if importlib.util.find_spec("unsloth") is None:
        raise SystemExit("--variants unsloth needs Unsloth installed next to unsloth_like (pip install unsloth; "
                         "on a CPU, Unsloth 2026.10 or newer).")
    if model not in TEXT_MODELS:
        raise SystemExit(f"--variants unsloth covers the text models ({', '.join(TEXT_MODELS)}), not {model}.")


def _report(device_name: str, mode: str, rows: list[dict], complete: bool) -> dict:
    """The rows, and ours / HF ratios when both ran (the headline numbers of the issue's targets)."""
    report = {"device": device_name, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
              "mode": mode, "results": rows, "complete": complete}
    by_variant = {row["variant"]: row for row in rows}
    if "hf" in by_variant and "unsloth_like" in by_variant:
        report.update(ours_over(by_variant["unsloth_like"], by_variant["hf"]))
    if "unsloth" in by_variant and "unsloth_like" in by_variant:
        report["vs_unsloth"] = ours_over(by_variant["unsloth_like"], by_variant["unsloth"])
    return report


def ours_over(ours: dict, other: dict) -> dict:
    """Ours / another variant of the same run: throughput, step time, peak memory."""
    return {"tokens_per_s_ratio": ours["tokens_per_s"] / other["tokens_per_s"],
            "step_time_ratio": ours["s_per_step"] / other["s_per_step"],
            "peak_memory_ratio": ours["peak_mib"] / other["peak_mib"]}


if __name__ == "__main__":
    main()
