"""unsloth_like: fast, lean finetuning of language and vision-language models.

The public API follows Unsloth's names (``FastLanguageModel`` ... as they land); the objects are
plain Hugging Face ones. Importing this package changes nothing in transformers, peft or trl.
"""

from .chat_templates import apply_chat_template, get_chat_template, standardize_sharegpt, to_sharegpt
from .env import env_report, is_bfloat16_supported
from .models.loader import FastLanguageModel, FastModel, FastVisionModel
from .models.patching import patch_model, unpatch
from .models.sampling import SamplingParams
from .responses_only import train_on_responses_only
from .vision_collator import UnslothVisionDataCollator

__version__ = "0.1.0"

__all__ = ["FastLanguageModel", "FastModel", "FastVisionModel", "UnslothTrainer", "UnslothTrainingArguments",
           "SamplingParams", "UnslothVisionDataCollator", "__version__",
           "apply_chat_template", "env_report", "get_chat_template", "is_bfloat16_supported", "patch_model",
           "standardize_sharegpt", "to_sharegpt", "train_on_responses_only", "unpatch"]

_LAZY = {"UnslothTrainer": "trainer", "UnslothTrainingArguments": "trainer"}  # these import trl


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
