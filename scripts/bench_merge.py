"""Peak memory of ``save_pretrained_merged``: the streaming merge holds about one shard, not the model.

    python scripts/bench_merge.py                       # ~450 MB fp32 Llama in 40 MB shards
    python scripts/bench_merge.py --layers 8 --out /tmp/merge.json

A random Llama-shaped checkpoint is written in several shards; a fresh process loads it with
``FastLanguageModel`` (16-bit), adds LoRA r=16 on every linear layer and saves ``merged_16bit``
while a thread samples the process's anonymous resident memory (``RssAnon``: heap and tensors,
not the memory-mapped checkpoint pages, which the kernel can drop at will). Reported: the peak
increase during the save against the model's size. Merging in memory the usual way (a merged
copy of every weight, then ``save_pretrained``) needs at least one extra model.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from unsloth_like.testing.memory import rss_anon_bytes


def build_checkpoint(directory: Path, layers: int, shard: str) -> int:
    import torch
    import transformers

    config = transformers.LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1536,
                                      num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(directory, max_shard_size=shard)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def measure(directory: Path, out_dir: Path, shard: str, variant: str) -> dict:
    """In this (fresh) process: load, add LoRA, save merged while sampling RssAnon. ``variant``:
    ``ours`` (save_pretrained_merged) or ``peft`` (merge_and_unload in place + save_pretrained,
    which destroys the LoRA model it merges)."""
    import torch
    import transformers

    from unsloth_like import FastLanguageModel
    from unsloth_like.models import patch_model

    # No tokenizer in this checkpoint: load with transformers, patch as from_pretrained would.
    model = transformers.AutoModelForCausalLM.from_pretrained(directory)
    patch_model(model)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, target_modules="all-linear",
                                             use_gradient_checkpointing=False)
    with torch.no_grad():  # adapters as after training (B starts at zero)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.01)
    model_bytes = sum(p.numel() * p.element_size() for p in model.get_base_model().parameters())
    baseline, peak, done = rss_anon_bytes(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_anon_bytes())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    if variant == "ours":
        model.save_pretrained_merged(out_dir, None, max_shard_size=shard)
    else:
        model.merge_and_unload().save_pretrained(out_dir, max_shard_size=shard)
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    shards = len(list(out_dir.glob("model-*.safetensors"))) or 1
    return {"variant": variant, "model_mib": model_bytes / 2**20, "peak_increase_mib": (peak[0] - baseline) / 2**20,
            "ratio_to_model": (peak[0] - baseline) / model_bytes, "output_shards": shards, "seconds": seconds,
            "max_shard_size": shard}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--shard", default="40MB")
    parser.add_argument("--out", default=None)
    parser.add_argument("--measure", nargs=3, default=None, help=argparse.SUPPRESS)  # internal: one subprocess
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(Path(args.measure[0]), Path(args.measure[1]), args.shard, args.measure[2])))
        return
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = Path(scratch) / "base"
        build_checkpoint(checkpoint, args.layers, args.shard)
        for variant in ("peft", "ours"):
            done = subprocess.run([sys.executable, __file__, "--shard", args.shard, "--measure", str(checkpoint),
                                   str(Path(scratch) / variant), variant], capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(done.stderr[-3000:])
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            row = rows[-1]
            print(f"{variant:<5} model {row['model_mib']:.0f} MiB, {row['output_shards']} shards: peak anonymous "
                  f"memory +{row['peak_increase_mib']:.0f} MiB ({row['ratio_to_model']:.2f}x the model), "
                  f"{row['seconds']:.1f} s")
    result = {"date": datetime.date.today().isoformat(), "layers": args.layers, "device": "CPU", "results": rows,
              "peak_ratio_ours_to_peft": rows[1]["peak_increase_mib"] / rows[0]["peak_increase_mib"]}
    out = Path(args.out or Path(__file__).resolve().parent.parent / "benchmarks" / "merge-memory-cpu.json")
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out)


if __name__ == "__main__":
    main()
