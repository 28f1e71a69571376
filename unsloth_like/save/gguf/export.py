"""The GGUF export entry points: ``model.save_pretrained_gguf``, ``convert`` and the CLI's.

``save_pretrained_gguf(model, save_directory, tokenizer, quantization_method="q8_0")`` (bound as
``model.save_pretrained_gguf`` to PEFT models from ``get_peft_model`` and to every model
``FastLanguageModel.from_pretrained`` returns) writes
``<save_directory>/<name>.<METHOD>.gguf`` for each method (a name or a list: several files from
one pass over the merged weights) and an Ollama ``Modelfile`` for the first one. The LoRA is
merged on the fly, tensor by tensor, exactly as ``save_pretrained_merged`` merges it (from the
local 16-bit checkpoint when the model came from one); no merged copy is written to disk and
llama.cpp is not needed: the conversion and every quantiser run in this process (on a CPU, our C
quantisers, compiled once on first use: ``native.py``).

``convert(hf_dir, out_path, quantization_method)`` does the same for a transformers checkpoint
directory (e.g. the output of ``save_pretrained_merged``). ``out_path`` is a ``.gguf`` file
(one method) or a directory (any number of methods); the Modelfile goes next to the files.

A vision-language model (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Gemma 3; pass its processor as
``tokenizer``) also gets its projector file ``<name>.<F16|BF16>-mmproj.gguf`` (``vlm.py``,
``mmproj.py``); the returned list ends with it. Llama 3.2 Vision (mllama) and unknown families are
refused with the reason before any work.

Before any tensor is read: the method names, the architecture, every tensor name, the
tokenizer, the target files (existing ones are refused unless ``overwrite=True``) and the free
disk space are checked.
"""

from __future__ import annotations

import copy
import logging
import os
import re
from pathlib import Path

from ..merge import plan_merge
from ..sources import checkpoint_entries, merged_entries, model_entries
from .methods import resolve_methods
from .tokenizer import vocabulary
from .vlm import log_ollama_note, mmproj_path, plan_vlm, vision_projector_kind
from .writer import check_disk_space, expected_file_bytes, plan_tensors, write_files, write_gguf_files

logger = logging.getLogger(__name__)

# Unsloth's save_pretrained_gguf keywords that only steer its llama.cpp build / temporary copy,
# neither of which exists here: accepted so notebooks run unchanged, and said to be unused.
_UNUSED_UNSLOTH_KEYWORDS = ("first_conversion", "maximum_memory_usage", "temporary_location", "is_main_process",
                            "max_shard_size", "safe_serialization")


def save_pretrained_gguf(model, save_directory, tokenizer=None, quantization_method="q8_0", overwrite: bool = False,
                         modelfile: bool = True, **kwargs) -> list[Path]:
    """Export ``model`` to GGUF; returns the written ``.gguf`` paths (one per method). A PEFT
    model (``get_peft_model``) has its LoRA merged on the fly; a model without adapters (a full
    finetune, a base model) is exported as it is in memory."""
    methods = resolve_methods(quantization_method)
    _check_keywords("save_pretrained_gguf", kwargs)
    base_config = model.get_base_model().config if hasattr(model, "get_base_model") else model.config
    vision = _is_vision(base_config)
    if vision:
        vision_projector_kind(base_config)  # mllama and unknown families: refused before any work
    if tokenizer is None:
        raise ValueError("save_pretrained_gguf needs the tokenizer (the processor, for a vision-language model): a "
                         "GGUF file carries its vocabulary. Pass tokenizer=tokenizer.")
    if hasattr(model, "get_base_model"):
        plan = plan_merge(model)  # refuses adapters that cannot be merged exactly, before any work
        config = model.get_base_model().config
        entries, described = merged_entries(model, plan)
        if plan.untie:  # a trained lm_head (or embedding) of a tied pair: both go in the file
            config = copy.deepcopy(config)
            config.get_text_config().tie_word_embeddings = config.tie_word_embeddings = False
    else:
        config = model.config
        entries, described = model_entries(model)
    directory = Path(save_directory).expanduser()
    stem = _file_stem(directory.name or "model")
    paths = [directory / f"{stem}.{method.upper()}.gguf" for method in methods]
    logger.info("save_pretrained_gguf: exporting %s.", described)
    model_file = directory / "Modelfile" if modelfile else None
    if vision:
        return _export_vlm(entries, config, tokenizer, methods, paths, mmproj_path(directory, stem, entries, config),
                           overwrite, stem, model_file)
    return _export(entries, config, tokenizer, methods, paths, overwrite, stem, model_file)


def convert(hf_dir, out_path, quantization_method="q8_0", tokenizer=None, overwrite: bool = False,
            modelfile: bool = True) -> list[Path]:
    """Convert the transformers checkpoint in ``hf_dir`` to GGUF; returns the written paths."""
    import transformers

    from ..merge import checkpoint_files

    methods = resolve_methods(quantization_method)
    source = Path(hf_dir).expanduser()
    files = checkpoint_files(source) if source.is_dir() else None
    if not files:
        raise FileNotFoundError(f"{source} holds no safetensors checkpoint (model.safetensors or an index); "
                                "pass a directory written by save_pretrained / save_pretrained_merged.")
    config = transformers.AutoConfig.from_pretrained(source)
    vision = _is_vision(config)
    if vision:
        vision_projector_kind(config)  # mllama and unknown families: refused before any work
    if getattr(config, "quantization_config", None):
        raise ValueError(f"{source} is a quantised (bitsandbytes/GPTQ/...) checkpoint; convert its 16-bit "
                         "original, or save_pretrained_merged(..., save_method='merged_16bit') first.")
    if tokenizer is None:
        auto = transformers.AutoProcessor if vision else transformers.AutoTokenizer
        tokenizer = auto.from_pretrained(source)
    out = Path(out_path).expanduser()
    if out.suffix == ".gguf":
        if len(methods) != 1:
            raise ValueError(f"{out} is one file but {len(methods)} methods were asked for; pass a directory.")
        paths, stem, model_file = [out], _file_stem(out.stem), out.parent / "Modelfile"
    else:
        stem = _file_stem(source.name or "model")
        paths, model_file = [out / f"{stem}.{m.upper()}.gguf" for m in methods], out / "Modelfile"
    entries = checkpoint_entries(files)
    if vision:  # the projector next to the text file: "<dir>/model.Q8_0.gguf" -> "<dir>/model.F16-mmproj.gguf"
        projector_stem = re.sub(rf"\.{re.escape(methods[0])}$", "", stem, flags=re.IGNORECASE) or stem
        return _export_vlm(entries, config, tokenizer, methods, paths,
                           mmproj_path(paths[0].parent, projector_stem, entries, config), overwrite, stem,
                           model_file if modelfile else None)
    return _export(entries, config, tokenizer, methods, paths, overwrite, stem, model_file if modelfile else None)


def _export(entries, config, tokenizer, methods, paths, overwrite, name, modelfile_path) -> list[Path]:
    from ...chat_templates import inference_template

    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    template = tokenizer.chat_template if isinstance(getattr(tokenizer, "chat_template", None), str) else None
    vocab = vocabulary(tokenizer, config.vocab_size, inference_template(template) if template else None)
    plan = plan_tensors(entries, config, methods)
    _check_targets(paths + ([modelfile_path] if modelfile_path else []), overwrite)
    check_disk_space(paths[0].parent, sum(expected_file_bytes(plan, i) for i in range(len(paths))))
    written = write_gguf_files(plan, config, vocab, methods, paths, name)
    if modelfile_path is not None:
        _write_modelfile(modelfile_path, tokenizer, paths[0])
    return written


def _export_vlm(entries, config, processor, methods, paths, projector_path, overwrite, name,
                modelfile_path) -> list[Path]:
    from ...chat_templates import inference_template

    tokenizer = getattr(processor, "tokenizer", None) or processor
    template = next((t for t in (getattr(processor, "chat_template", None), getattr(tokenizer, "chat_template", None))
                     if isinstance(t, str)), None)
    vocab = vocabulary(tokenizer, config.get_text_config().vocab_size,
                       inference_template(template) if template else None)
    outputs = plan_vlm(entries, config, processor, methods, paths, projector_path, vocab, name)
    _check_targets(paths + [projector_path] + ([modelfile_path] if modelfile_path else []), overwrite)
    check_disk_space(paths[0].parent, sum(expected_file_bytes(o.plan, o.index) for o in outputs))
    written = write_files(outputs)
    if modelfile_path is not None:
        _write_modelfile(modelfile_path, tokenizer, paths[0])
    log_ollama_note(paths[0], projector_path)
    return written


def _is_vision(config) -> bool:
    from ...models.vision import is_vision_config

    return is_vision_config(config)


def _write_modelfile(path: Path, tokenizer, gguf_path: Path) -> None:
    from ..ollama import build_modelfile, write_modelfile

    write_modelfile(path.parent, build_modelfile(tokenizer, gguf_path.name))


def _check_targets(paths: list[Path], overwrite: bool) -> None:
    for path in paths:
        if path.is_dir():
            raise IsADirectoryError(f"{path} is a directory; choose another output name.")
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it, or choose another directory.")
    parent = paths[0].parent
    parent.mkdir(parents=True, exist_ok=True)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"Cannot write into {parent}; choose a directory you can write to.")


def _check_keywords(caller: str, kwargs: dict) -> None:
    unknown = sorted(set(kwargs) - set(_UNUSED_UNSLOTH_KEYWORDS))
    if unknown:
        raise TypeError(f"{caller} got unexpected arguments {unknown}.")
    for key in kwargs:
        logger.info("%s: %s=%r is not used (the export runs in-process, with no llama.cpp build or temporary "
                    "16-bit copy).", caller, key, kwargs[key])


def _file_stem(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", name).strip("._") or "model"


__all__ = ["convert", "save_pretrained_gguf"]
