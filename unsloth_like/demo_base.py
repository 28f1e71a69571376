"""The demo base: a small Llama pretrained here, at first use, on the demo's plain-text documents.

A randomly initialised model can only learn the form of the demo's answers from a LoRA finetune
(LoRA adapts what the base computes; a random base computes nothing useful). The demo base is the
honest middle: a 3.5M-parameter Llama (untied embeddings, 4 layers, hidden 256, grouped-query
attention) with the Llama 3 tokenizer trained on the demo's vocabulary (``llama3_demo``),
pretrained from its seeded initialisation on ``demo_data.pretraining_documents`` by plain full
training (AdamW, warm-up then cosine decay, gradient clipping), about a minute and a half on two
CPU cores. It learns the animal facts and, partly, to copy from its context; it never sees a
question or a chat template, so before the demo's finetune it cannot answer one.

``demo_base_dir`` builds the checkpoint once and caches it next to the zoo models
(``~/.cache/unsloth_like/zoo/demo-base-<key>``), under a key that covers the model spec, the
tokenizer and its corpus, the recipe below, the documents and the transformers version. It is
written to a private folder and renamed into place, so a reader never sees half a checkpoint, and
builders take a lock (where ``fcntl`` exists) so that a second one waits instead of pretraining
again. ``pretraining.json`` in the folder records the recipe, the losses and the time it took.
The build is seeded and deterministic on one machine; another CPU may round differently, so the
weights (not the recipe) can differ from host to host.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import demo_data
from .testing.zoo import ZooSpec, build_cached, build_model_dir, default_cache_dir

DEMO_BASE_SPEC = ZooSpec(
    name="demo-base",
    config_class="LlamaConfig",
    config={"num_hidden_layers": 4, "hidden_size": 256, "intermediate_size": 688, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 1100, "tie_word_embeddings": False,
            "max_position_embeddings": 2048, "initializer_range": 0.02, "rms_norm_eps": 1e-5,
            "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}},
    tokenizer="llama3_demo",
    seed=0,
    notes="the demo's base before pretraining: untied, GQA 2:1, Llama 3 tokenizer with the demo's words",
)


@dataclass(frozen=True)
class PretrainingRecipe:
    steps: int = 1200
    batch_size: int = 32  # documents per step (each 10-25 tokens)
    learning_rate: float = 2e-3
    warmup_steps: int = 30
    final_lr_fraction: float = 0.1  # cosine decay to this fraction of the peak
    max_grad_norm: float = 1.0
    data_seed: int = 1
    torch_seed: int = 0


RECIPE = PretrainingRecipe()
PRETRAINING_VERSION = 1  # bump when the way the base is pretrained or written changes (_pretrain)


def demo_base_dir(cache_dir: str | Path | None = None, *, recipe: PretrainingRecipe = RECIPE,
                  log=print) -> Path:
    """The demo base's checkpoint folder (config, safetensors, tokenizer, ``pretraining.json``),
    pretrained on first use (``log`` says so, and how long it took) and cached."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / f"demo-base-{_cache_key(recipe)}"
    if (target / "config.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with _build_lock(root / f".{target.name}.lock"):  # a second builder waits, then finds it built
        return build_cached(target, lambda staging: _build(staging, target, recipe, log))


@contextlib.contextmanager
def _build_lock(path: Path):
    """An exclusive lock on ``path`` where the platform has ``fcntl`` (elsewhere two builders may
    both pretrain; the renames still keep the cache whole)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build(directory: Path, target: Path, recipe: PretrainingRecipe, log) -> None:
    log(f"demo: pretraining the demo base once ({recipe.steps} steps, about 1.5 min on 2 CPU cores); "
        f"it is cached in {target}")
    build_model_dir(DEMO_BASE_SPEC, directory)
    losses, seconds = _pretrain(directory, recipe)
    (directory / "pretraining.json").write_text(json.dumps(
        {"recipe": asdict(recipe), "seconds": seconds, "losses": losses, "torch": torch.__version__}, indent=1))
    log(f"demo: pretrained the demo base in {seconds:.0f}s (loss {losses[0]:.2f} -> "
        f"{sum(losses[-50:]) / len(losses[-50:]):.2f})")


def _cache_key(recipe: PretrainingRecipe) -> str:
    documents = "\n".join(demo_data.pretraining_documents(recipe.steps * recipe.batch_size, seed=recipe.data_seed))
    vocabulary = "\n".join(demo_data.demo_tokenizer_corpus(DEMO_BASE_SPEC.tokenizer_spec.seed))
    payload = {"format": PRETRAINING_VERSION, "spec": DEMO_BASE_SPEC.cache_key(), "recipe": asdict(recipe),
               "documents": hashlib.sha256(documents.encode()).hexdigest(),
               "tokenizer_corpus": hashlib.sha256(vocabulary.encode()).hexdigest()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _pretrain(directory: Path, recipe: PretrainingRecipe) -> tuple[list[float], float]:
    """Full training of the seeded model in ``directory`` on the demo documents, saved in place;
    returns the per-step losses and the seconds it took."""
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    model.train()
    documents = demo_data.pretraining_documents(recipe.steps * recipe.batch_size, seed=recipe.data_seed)
    # BOS + text + EOS; the tokenizer adds the BOS
    rows = [ids + [tokenizer.eos_token_id] for ids in tokenizer(documents)["input_ids"]]
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.learning_rate, weight_decay=0.0)
    losses = []
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.torch_seed)
        for step in tqdm(range(recipe.steps), desc="pretraining the demo base", unit="step"):
            for group in optimizer.param_groups:
                group["lr"] = recipe.learning_rate * _lr_factor(step, recipe)
            batch = rows[step * recipe.batch_size:(step + 1) * recipe.batch_size]
            loss = model(**_padded(batch, tokenizer.pad_token_id)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
    seconds = time.perf_counter() - started
    if not all(math.isfinite(x) for x in losses):
        raise RuntimeError(f"Pretraining the demo base diverged (losses {losses[:3]} ... {losses[-3:]}).")
    model.save_pretrained(directory)
    return losses, seconds


def _lr_factor(step: int, recipe: PretrainingRecipe) -> float:
    warmup = min(1.0, (step + 1) / recipe.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * step / recipe.steps))
    return warmup * (recipe.final_lr_fraction + (1 - recipe.final_lr_fraction) * cosine)


def _padded(rows: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ids, attention mask and labels (-100 on padding) for one batch."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}

