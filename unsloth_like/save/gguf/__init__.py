"""GGUF export, in-process: llama.cpp-compatible files (and an Ollama Modelfile) written from a
finetuned model or a transformers checkpoint, with no llama.cpp build.

* ``export``: ``save_pretrained_gguf`` (bound to models as ``model.save_pretrained_gguf``) and
  ``convert`` (a checkpoint directory);
* ``methods``: quantisation method names and llama.cpp's per-tensor type mixes;
* ``architectures`` / ``tokenizer``: metadata and tensor names llama.cpp reads;
* ``vlm`` / ``mmproj``: vision-language models: the language model's file plus the projector's
  ``<name>.<F16|BF16>-mmproj.gguf`` (llama.cpp's ``clip`` format, loaded by libmtmd);
* ``quantize`` / ``kquants``: tensor -> GGML bytes (K-quants in torch);
* ``writer``: the single-pass, multi-file streaming writer.
"""

from .export import convert, save_pretrained_gguf
from .methods import ALIASES, METHODS, resolve_method

__all__ = ["ALIASES", "METHODS", "convert", "resolve_method", "save_pretrained_gguf"]
