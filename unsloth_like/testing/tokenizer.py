"""Small real tokenizers, trained on the fly with ``tokenizers``, in the shapes we meet.

* ``llama3``: byte-level BPE with Llama-3's pre-tokenizer regex (digits in groups of up to 3),
  ``<|begin_of_text|>`` added in front, Llama-3 header/eot chat template, dedicated pad token.
* ``qwen2``: byte-level BPE with Qwen2's regex (single digits), no BOS, ChatML template, the
  Qwen vision tokens, pad ``<|endoftext|>`` distinct from EOS ``<|im_end|>``.
* ``spm``: SentencePiece-style BPE (``▁`` word marker, ``<0x..>`` byte fallback pieces,
  ``<unk>/<s>/</s>``) as in Mistral/Llama-2 ``tokenizer.json`` files, ``[INST]`` chat template and
  deliberately **no pad token**, as shipped by Mistral (the loader must give it one).
* ``gemma3``: SentencePiece-style BPE as in Gemma 3's ``tokenizer.json`` (ids 0..3
  ``<pad>/<eos>/<bos>/<unk>``, byte fallback, no dummy prefix), ``<bos>`` added, Gemma turn
  template (assistant rendered as ``model``) whose image parts are ``<start_of_image>``, which
  ``Gemma3Processor`` expands; ``boi_token``/``eoi_token``/``image_token`` saved as named tokens in
  ``tokenizer_config.json`` as Gemma 3 ships them (the processor reads them from the tokenizer).
* ``llama3_vision``: the ``llama3`` tokenizer plus ``<|python_tag|>`` and ``<|image|>`` (Llama 3.2
  Vision), with a header/eot template that renders image parts as ``<|image|>``.

The chat templates accept a message content that is a string or a list of
``{"type": "text"|"image"[|"video"]}`` parts, as processors' ``apply_chat_template`` passes them.
All are saved with ``save_pretrained`` and load back with ``AutoTokenizer``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .corpus import tokenizer_corpus

if TYPE_CHECKING:
    from tokenizers import Tokenizer

LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# ChatML; a message's content may be a string or a list of {"type": "text"|"image"|"video"} parts.
CHATML_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'video' %}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Llama 3.2 Vision: the Llama-3 template with image parts rendered as <|image|>.
LLAMA3_VISION_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<|image|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] | trim }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Gemma 3 (simplified from the official template): a system message is folded into the first user
# turn, the assistant role is rendered as "model", image parts as <start_of_image>.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% if messages[0]['content'] is string %}{% set first_user_prefix = messages[0]['content'] + '\n\n' %}"
    "{% else %}{% set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' %}{% endif %}"
    "{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<start_of_image>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] | trim }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

PHI4_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '<|im_sep|>' + message['content'] + '<|im_end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant<|im_sep|>' }}{% endif %}"
)

MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported.') }}{% endif %}"
    "{% endfor %}"
)


@dataclass(frozen=True)
class TokenizerSpec:
    """Everything that determines a zoo tokenizer; its ``key`` names the cache entry."""

    style: str  # "llama3" | "qwen2" | "spm" | "gemma3" (the split/normalisation; "phi4" is a "llama3")
    vocab_size: int
    special_tokens: tuple[str, ...]
    bos_token: str | None
    eos_token: str
    pad_token: str | None
    unk_token: str | None
    chat_template: str
    add_bos: bool
    seed: int = 0
    # Model-specific named special tokens saved in tokenizer_config.json, e.g. Gemma 3's
    # (("boi_token", "<start_of_image>"), ...): they become tokenizer attributes (``tokenizer.boi_token``,
    # ``tokenizer.boi_token_id``) that processors read.
    named_tokens: tuple[tuple[str, str], ...] = ()
    # The text it is trained on: "zoo" (testing.corpus.tokenizer_corpus) or "demo" (that plus the
    # demo's documents and chats, demo_data.demo_tokenizer_corpus: the demo base's tokenizer).
    corpus: str = "zoo"


TOKENIZERS: dict[str, TokenizerSpec] = {
    "llama3": TokenizerSpec(
        style="llama3",
        vocab_size=1100,
        special_tokens=("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                        "<|end_header_id|>", "<|eot_id|>", "<|finetune_right_pad_id|>"),
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        pad_token="<|finetune_right_pad_id|>",
        unk_token=None,
        chat_template=LLAMA3_CHAT_TEMPLATE,
        add_bos=True,
    ),
    "qwen2": TokenizerSpec(
        style="qwen2",
        vocab_size=1000,
        special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                        "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"),
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        chat_template=CHATML_CHAT_TEMPLATE,
        add_bos=False,
    ),
    "spm": TokenizerSpec(
        style="spm",
        vocab_size=900,
        special_tokens=("<unk>", "<s>", "</s>", "[INST]", "[/INST]"),
        bos_token="<s>",
        eos_token="</s>",
        pad_token=None,
        unk_token="<unk>",
        chat_template=MISTRAL_CHAT_TEMPLATE,
        add_bos=True,
    ),
    "gemma3": TokenizerSpec(
        style="gemma3",
        vocab_size=1000,
        special_tokens=("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>",
                        "<start_of_image>", "<end_of_image>", "<image_soft_token>"),
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        chat_template=GEMMA3_CHAT_TEMPLATE,
        add_bos=True,
        named_tokens=(("boi_token", "<start_of_image>"), ("eoi_token", "<end_of_image>"),
                      ("image_token", "<image_soft_token>")),
    ),
    # Phi-4's shape: a cl100k-style byte-level BPE (Llama 3's split regex), no BOS, and its own
    # chat template (<|im_start|>role<|im_sep|>content<|im_end|>).
    "phi4": TokenizerSpec(
        style="llama3",
        vocab_size=1000,
        special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_sep|>", "<|im_end|>", "<|dummy_85|>"),
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|dummy_85|>",
        unk_token=None,
        chat_template=PHI4_CHAT_TEMPLATE,
        add_bos=False,
    ),
    "llama3_vision": TokenizerSpec(
        style="llama3",
        vocab_size=1102,
        special_tokens=("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                        "<|end_header_id|>", "<|eot_id|>", "<|finetune_right_pad_id|>", "<|python_tag|>",
                        "<|image|>"),
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        pad_token="<|finetune_right_pad_id|>",
        unk_token=None,
        chat_template=LLAMA3_VISION_CHAT_TEMPLATE,
        add_bos=True,
    ),
}
# The demo base's: Llama 3's, trained with the demo's animals, homes and foods in its corpus.
TOKENIZERS["llama3_demo"] = dataclasses.replace(TOKENIZERS["llama3"], corpus="demo")

# SentencePiece-style tokenizers: how many leading special tokens take ids 0.. before the byte
# pieces, and whether a "▁" is prepended to the first word (Llama-2/Mistral) or not (Gemma).
_SPM_CORE = {"spm": 3, "gemma3": 4}
_SPM_PREPEND = {"spm": "first", "gemma3": "never"}


def train_tokenizer(spec: TokenizerSpec) -> "Tokenizer":
    """Train the raw ``tokenizers.Tokenizer`` described by ``spec`` (deterministic)."""
    from tokenizers import processors

    corpus = _corpus(spec)
    if spec.style in _SPM_CORE:
        tokenizer = _train_spm(spec, corpus)
    elif spec.style in ("llama3", "qwen2"):
        tokenizer = _train_byte_level(spec, corpus)
    else:
        raise ValueError(f"Unknown tokenizer style {spec.style!r}; use one of {sorted(TOKENIZERS)}.")
    if spec.add_bos:
        bos_id = tokenizer.token_to_id(spec.bos_token)
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{spec.bos_token}:0 $A:0",
            pair=f"{spec.bos_token}:0 $A:0 {spec.bos_token}:1 $B:1",
            special_tokens=[(spec.bos_token, bos_id)],
        )
    return tokenizer


def _corpus(spec: TokenizerSpec) -> list[str]:
    if spec.corpus == "zoo":
        return tokenizer_corpus(seed=spec.seed)
    if spec.corpus == "demo":
        from ..demo_data import demo_tokenizer_corpus

        return demo_tokenizer_corpus(seed=spec.seed)
    raise ValueError(f"Unknown tokenizer corpus {spec.corpus!r}; use 'zoo' or 'demo'.")


def _train_byte_level(spec: TokenizerSpec, corpus: list[str]) -> "Tokenizer":
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    pattern = LLAMA3_SPLIT if spec.style == "llama3" else QWEN2_SPLIT
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size - len(spec.special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no unknowns
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    # Real byte-level tokenizers put their special tokens after the learned vocabulary.
    tokenizer.add_special_tokens(list(spec.special_tokens))
    return tokenizer


def _train_spm(spec: TokenizerSpec, corpus: list[str]) -> "Tokenizer":
    """SentencePiece-shaped BPE: the core special tokens first (``spm``: ids 0..2 unk/bos/eos;
    ``gemma3``: ids 0..3 pad/eos/bos/unk), then the 256 ``<0xNN>`` byte pieces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    n_core = _SPM_CORE[spec.style]
    prepend = _SPM_PREPEND[spec.style]
    metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend, split=False)
    draft = Tokenizer(models.BPE(unk_token=spec.unk_token))
    draft.pre_tokenizer = metaspace
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size - 256 - n_core, special_tokens=[], show_progress=False
    )
    draft.train_from_iterator(corpus, trainer=trainer)
    learned = json.loads(draft.to_str())["model"]
    core = list(spec.special_tokens[:n_core])
    byte_pieces = [f"<0x{b:02X}>" for b in range(256)]
    ordered = core + byte_pieces + [t for t, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1])]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(ordered))}
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tokenizer = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token=spec.unk_token, byte_fallback=True, fuse_unk=True)
    )
    tokenizer.pre_tokenizer = metaspace
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prepend != "never":  # drop the prepended "▁" of the first word again
        steps.append(decoders.Strip(" ", 1, 0))
    tokenizer.decoder = decoders.Sequence(steps)
    tokenizer.add_special_tokens(list(spec.special_tokens))  # core ones already have ids 0..2
    return tokenizer


def save_tokenizer(spec: TokenizerSpec, directory: Path, model_max_length: int) -> None:
    """Train, wrap in a transformers fast tokenizer and ``save_pretrained`` into ``directory``."""
    from transformers import PreTrainedTokenizerFast

    raw = train_tokenizer(spec)
    named = {"bos_token": spec.bos_token, "eos_token": spec.eos_token, "pad_token": spec.pad_token,
             "unk_token": spec.unk_token}
    named = {k: v for k, v in named.items() if v is not None}
    extra = [t for t in spec.special_tokens if t not in named.values()]
    model_specific = dict(spec.named_tokens)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        model_max_length=model_max_length,
        padding_side="right",
        chat_template=spec.chat_template,
        additional_special_tokens=extra,
        **named,
        **model_specific,
    )
    tokenizer.save_pretrained(directory)
