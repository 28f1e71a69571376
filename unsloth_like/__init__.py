"""unsloth_like: fast, lean finetuning of language and vision-language models.

The public API follows Unsloth's names (``FastLanguageModel`` ... as they land); the objects are
plain Hugging Face ones. Importing this package changes nothing in transformers, peft or trl.
"""

from .env import env_report, is_bfloat16_supported
from .models.loader import FastLanguageModel, FastModel
from .models.patching import patch_model, unpatch

__version__ = "0.1.0"

__all__ = ["FastLanguageModel", "FastModel", "UnslothTrainer", "UnslothTrainingArguments", "__version__",
           "env_report", "is_bfloat16_supported", "patch_model", "unpatch"]

_LAZY = {"UnslothTrainer": "trainer", "UnslothTrainingArguments": "trainer"}  # these import trl


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
