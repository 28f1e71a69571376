"""Streams tensors into one or several GGUF files in a single pass.

A GGUF file starts with every tensor's name, shape, type and offset, then the data. All of that
is known before any tensor is read (``sources.TensorEntry`` carries shapes), so the header is
written first and each tensor is then produced once, converted to the type of each output file
and appended to it: several quantisation methods cost one merge, not one per file. Tensors are
written in llama.cpp's order (by block, then by name), which is also the order its quantiser
walks them in; ``TypeChooser`` depends on that order.

Files are written under a hidden staging name next to the target (``save.staging``: it names the
host and process, so the next export removes what a killed one left) and renamed into place only
when complete, so an interrupted export never leaves a file that looks like a valid GGUF. A
vision-language model's projector file (``mmproj.py``) has a plan of its own and is written in
the same pass (``write_files``); all the files are renamed together.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import gguf
import numpy as np
import torch

from ..sources import TensorEntry
from ..staging import remove_abandoned, staging_name
from .architectures import (TensorNamer, architecture_for, check_supported, extra_tensors,
                            write_hyperparameters)
from .methods import METHODS, ModelShape, TypeChooser
from .quantize import tensor_bytes
from .tokenizer import Vocabulary, loadable_name, write_vocabulary

logger = logging.getLogger(__name__)

_BLOCK = re.compile(r"^blk\.(\d+)\.")
_HEADER_ALLOWANCE = 64 << 20  # vocabulary, merges and tensor infos: a few MiB even for 150k-token vocabularies


@dataclass
class PlannedTensor:
    name: str  # GGUF name
    entry: TensorEntry
    types: list[gguf.GGMLQuantizationType]  # one per output file


def plan_tensors(entries: list[TensorEntry], config, methods: list[str]) -> list[PlannedTensor]:
    """GGUF names and per-file types of every tensor, in llama.cpp's order; raises on tensors
    llama.cpp would not know before anything is read."""
    architecture = architecture_for(config)
    check_supported(config)
    namer = TensorNamer(architecture, config)
    named = [(name, _transformed(entry, name, namer)) for entry in entries
             if (name := namer.gguf_name(entry.key)) is not None]
    for name, tensor in extra_tensors(config).items():
        named.append((name, TensorEntry(name, tuple(tensor.shape), tensor.dtype, lambda t=tensor: t)))
    named.sort(key=lambda item: _order(item[0]))
    names = {name for name, _ in named}
    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    shape = ModelShape(n_layer=config.num_hidden_layers, n_gqa=heads // kv_heads,
                       tied_embeddings="output.weight" not in names,
                       is_70b=config.num_hidden_layers == 80)  # llama.cpp's 70B rule (Llama 2/3 70B, Qwen2 72B)
    choosers = [TypeChooser(method, shape) for method in methods]
    return [PlannedTensor(name, entry, [c.choose(name, entry.shape) for c in choosers]) for name, entry in named]


def _transformed(entry: TensorEntry, name: str, namer: TensorNamer) -> TensorEntry:
    """``entry`` with llama.cpp's layout applied on load (the rotary permutation of Llama q/k)."""
    return TensorEntry(entry.key, entry.shape, entry.dtype, lambda: namer.transform(name, entry.load()))


def _order(name: str) -> tuple[int, str]:
    """llama.cpp's tensor order: non-block tensors (layer -1) first, then by block, then by name."""
    match = _BLOCK.match(name)
    return (int(match.group(1)) if match else -1, name)


def nbytes(shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape)) // block * size


def expected_file_bytes(plan: list[PlannedTensor], index: int = 0) -> int:
    return sum(nbytes(p.entry.shape, p.types[index]) for p in plan) + _HEADER_ALLOWANCE


@dataclass
class OutputFile:
    """One GGUF file to write: its metadata (``header`` adds the key/values to a writer), and the
    plan whose tensors it holds, each in ``PlannedTensor.types[index]``."""

    path: Path
    arch: str  # general.architecture
    header: Callable[[gguf.GGUFWriter], None]
    plan: list[PlannedTensor]
    index: int = 0


def text_outputs(plan: list[PlannedTensor], config, vocab: Vocabulary, methods: list[str], paths: list[Path],
                 name: str, extra: Callable[[gguf.GGUFWriter], None] | None = None) -> list[OutputFile]:
    """The language-model files: one per method (``paths[i]`` for ``methods[i]``); ``extra`` adds
    keys the text config does not hold (e.g. Qwen3-VL's deepstack layer count)."""
    arch = gguf.MODEL_ARCH_NAMES[architecture_for(config).arch]
    name = loadable_name(name, vocab)

    def header(method: str):
        def write(writer: gguf.GGUFWriter) -> None:
            writer.add_type(gguf.GGUFType.MODEL)
            writer.add_name(name)
            writer.add_file_type(METHODS[method][0])
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            write_hyperparameters(writer, config)
            if extra is not None:
                extra(writer)
            write_vocabulary(writer, vocab)
        return write

    return [OutputFile(path, arch, header(method), plan, i) for i, (method, path) in enumerate(zip(methods, paths))]


def write_gguf_files(plan: list[PlannedTensor], config, vocab: Vocabulary, methods: list[str], paths: list[Path],
                     name: str, device: torch.device | None = None) -> list[Path]:
    """Write one GGUF file per method (``paths[i]`` for ``methods[i]``) from ``plan``."""
    return write_files(text_outputs(plan, config, vocab, methods, paths, name), device)


def write_files(outputs: list[OutputFile], device: torch.device | None = None) -> list[Path]:
    """Write every file of ``outputs``, each tensor of a plan produced once for all the files
    sharing that plan; all files are renamed into place together, only when all are complete."""
    from tqdm.auto import tqdm

    device = device or (torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    for output in outputs:
        remove_abandoned(output.path)
    partials = [output.path.with_name(staging_name(output.path, ".partial")) for output in outputs]
    writers = []
    try:
        for output, partial in zip(outputs, partials):
            writers.append(_open_writer(output, partial))
        groups: dict[int, list[int]] = {}
        for i, output in enumerate(outputs):
            groups.setdefault(id(output.plan), []).append(i)
        for members in groups.values():
            names = ", ".join(outputs[i].path.name for i in members)
            for tensor in tqdm(outputs[members[0]].plan, desc=f"Writing {names}", unit="tensor"):
                _write_tensor(tensor, [(outputs[i].index, writers[i]) for i in members], device)
        for writer in writers:
            writer.close()  # flushes: a full disk fails here, before anything is renamed
        for partial, output in zip(partials, outputs):
            os.replace(partial, output.path)
    finally:
        for writer in writers:
            writer.close()  # a no-op once closed
        for partial in partials:
            partial.unlink(missing_ok=True)
    return [output.path for output in outputs]


def _open_writer(output: OutputFile, path: Path) -> gguf.GGUFWriter:
    writer = gguf.GGUFWriter(path=None, arch=output.arch)
    output.header(writer)
    for tensor in output.plan:
        qtype = tensor.types[output.index]
        # the writer reverses numpy-order shapes into GGML order (row length first)
        writer.add_tensor_info(tensor.name, tensor.entry.shape, np.dtype(np.float32),
                               nbytes(tensor.entry.shape, qtype), raw_dtype=qtype)
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    return writer


def _write_tensor(planned: PlannedTensor, targets: list[tuple[int, gguf.GGUFWriter]], device: torch.device) -> None:
    tensor = planned.entry.load()
    done: dict[gguf.GGMLQuantizationType, np.ndarray] = {}
    for index, writer in targets:
        qtype = planned.types[index]
        if qtype not in done:
            source = tensor.to(device) if qtype.name.endswith("_K") else tensor
            done[qtype] = tensor_bytes(source, qtype)
        writer.write_tensor_data(done[qtype])


def check_disk_space(directory: Path, needed: int) -> None:
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise OSError(f"Not enough disk space in {directory}: the GGUF file(s) need about {needed / 2**30:.2f} GiB "
                      f"and {free / 2**30:.2f} GiB are free.")
