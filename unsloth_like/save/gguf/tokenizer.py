"""A Hugging Face (fast) tokenizer -> the ``tokenizer.ggml.*`` metadata llama.cpp tokenises with.

Two shapes cover the models we export:

* **byte-level BPE** (Llama 3, Qwen, GPT-2 style): llama.cpp's ``gpt2`` model with the token
  strings, the merges, and ``tokenizer.ggml.pre``, the name of the pre-tokeniser (the regex that
  splits text before BPE). llama.cpp refuses names it does not know and silently tokenises
  differently when the name is missing or wrong, so we determine it twice over: first as
  llama.cpp's own converter does (the SHA-256 of the token ids of a fixed probe text, for
  tokenizers it knows), then from the tokenizer's actual split regex, compared with the regex
  behind each llama.cpp name. A tokenizer matching neither is exported with ``default`` and a
  warning that says tokenisation may differ.
* **SentencePiece-style BPE** (``▁`` word marker, ``<0xNN>`` byte fallback: Llama 2, Mistral
  v0.1-v0.3 ``tokenizer.json``): llama.cpp's ``llama`` model, which merges the adjacent pair with
  the highest *score*; the score of a token is minus the rank of the merge that makes it, so it
  merges in the order HF's BPE does.

Token types follow llama.cpp's converter: added special tokens are CONTROL, other added tokens
USER_DEFINED, ``<0xNN>`` pieces BYTE, the unknown token UNKNOWN, ids past the tokenizer up to
the embedding size UNUSED (``[PADi]``). Whether BOS/EOS are added is read from what the
tokenizer actually does on encode, not from config flags that transformers may not save.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field

from gguf import GGUFWriter, TokenType

logger = logging.getLogger(__name__)

# llama.cpp's probe text for identifying pre-tokenizers (convert_hf_to_gguf.py, get_vocab_base_pre).
_PROBE = ("\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) "
          "✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
          "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
          "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL")
# SHA-256 of str(token ids of _PROBE) -> llama.cpp pre-tokenizer name, for the published
# tokenizers of the families we export (values from llama.cpp's converter).
_KNOWN_HASHES = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3 / 3.1 / 3.2
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5 / Qwen2 / 2.5
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "d30d75d9059f1aa2c19359de71047b3ae408c70875e8a3ccf8c5fba56c9d8af4": "qwen35",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral Nemo
    "0e9433cbbb161f89e264eb32e8e64bfe69e834973ffca5d41d3948a604a3e2a3": "pixtral",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e": "falcon3",
}
# The split regex of a tokenizer.json -> the llama.cpp pre-tokenizer that applies the same split.
_REGEX_NAMES = {
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen35",
}
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


@dataclass
class Vocabulary:
    """Everything written under ``tokenizer.ggml.*``."""

    model: str  # "gpt2" | "llama"
    pre: str
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] = field(default_factory=list)
    special_ids: dict[str, int] = field(default_factory=dict)  # bos / eos / unk / pad
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool | None = None
    chat_template: str | None = None


def vocabulary(tokenizer, vocab_size: int, chat_template: str | None) -> Vocabulary:
    """The GGUF vocabulary of ``tokenizer`` padded to ``vocab_size`` (the embedding rows)."""
    spec = _tokenizer_json(tokenizer)
    model = spec["model"]
    if model.get("type") != "BPE":
        raise ValueError(f"GGUF export supports BPE tokenizers (byte-level or SentencePiece-style); this one is "
                         f"{model.get('type')!r}.")
    byte_level = not model.get("byte_fallback", False) and _uses_byte_level(spec)
    if not byte_level and not model.get("byte_fallback", False):
        raise ValueError("GGUF export needs a byte-level BPE tokenizer or a SentencePiece-style one with byte "
                         "fallback; this BPE tokenizer is neither, so llama.cpp could not reproduce it.")
    tokens, types = _tokens_and_types(tokenizer, vocab_size, byte_level)
    vocab = Vocabulary(model="gpt2" if byte_level else "llama", pre="default", tokens=tokens, types=types,
                       chat_template=chat_template)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if byte_level:
        vocab.merges = merges
        vocab.pre = pre_tokenizer_name(tokenizer, spec)
    else:
        vocab.scores = _merge_scores(tokens, merges)
        vocab.add_space_prefix = _adds_space_prefix(spec)
    vocab.special_ids = _special_ids(tokenizer)
    vocab.add_bos, vocab.add_eos = _added_on_encode(tokenizer)
    return vocab


def write_vocabulary(writer: GGUFWriter, vocab: Vocabulary) -> None:
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    for kind, token_id in vocab.special_ids.items():
        getattr(writer, f"add_{kind}_token_id")(token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)


# llama.cpp's vocabulary loader treats any model whose general.name contains "phi-3" or "phi3"
# (case-insensitive) as Phi-3 and looks these tokens up by text to set their attributes; if one is
# missing the file does not load ("unordered_map::at"). Phi-3's own SentencePiece vocabulary has
# them all; Phi-4's and most others do not.
_PHI3_NAME = re.compile(r"(phi)-?3", re.IGNORECASE)
_PHI3_TOKENS = ("</s>", "<unk>", "<s>", "<|endoftext|>")


def loadable_name(name: str, vocab: Vocabulary) -> str:
    """``name`` for ``general.name``, with "phi3"/"phi-3" written "phi 3" when the vocabulary lacks the
    tokens llama.cpp's Phi-3 rule looks up (see above), so that the file loads."""
    if not _PHI3_NAME.search(name) or set(_PHI3_TOKENS) <= set(vocab.tokens):
        return name
    safe = _PHI3_NAME.sub(r"\1 3", name)
    logger.warning("GGUF export: general.name %r would make llama.cpp apply Phi-3's token rules to a vocabulary "
                   "without %s, and the file would not load; writing %r instead.", name,
                   "/".join(t for t in _PHI3_TOKENS if t not in vocab.tokens), safe)
    return safe


# --- pre-tokenizer ------------------------------------------------------------------------------


def pre_tokenizer_name(tokenizer, spec: dict | None = None) -> str:
    """llama.cpp's name for this byte-level tokenizer's pre-tokenizer (see the module docstring)."""
    spec = spec if spec is not None else _tokenizer_json(tokenizer)
    # verbose=False: the probe may be longer than the tokenizer's model_max_length (a model loaded
    # with a short max_seq_length), which transformers would report as if a sequence were too long
    digest = hashlib.sha256(str(tokenizer.encode(_PROBE, verbose=False)).encode()).hexdigest()
    if digest in _KNOWN_HASHES:
        return _KNOWN_HASHES[digest]
    patterns = _split_patterns(spec.get("pre_tokenizer"))
    if len(patterns) == 1 and patterns[0] in _REGEX_NAMES:
        return _REGEX_NAMES[patterns[0]]
    if not patterns and _is_gpt2_byte_level(spec.get("pre_tokenizer")):
        return "gpt-2"
    logger.warning("GGUF export: llama.cpp has no pre-tokenizer known to match this tokenizer (split regexes %s); "
                   "writing 'default', so llama.cpp may split some text differently from transformers.", patterns)
    return "default"


def _split_patterns(pre: dict | None) -> list[str]:
    if not pre:
        return []
    if pre.get("type") == "Sequence":
        return [p for child in pre.get("pretokenizers", []) for p in _split_patterns(child)]
    if pre.get("type") == "Split":
        pattern = pre.get("pattern", {})
        return [pattern.get("Regex") or re.escape(pattern.get("String", ""))]
    return []


def _is_gpt2_byte_level(pre: dict | None) -> bool:
    levels = [pre] if pre and pre.get("type") == "ByteLevel" else (pre or {}).get("pretokenizers", [])
    return any(p.get("type") == "ByteLevel" and p.get("use_regex", True) for p in levels)


def _uses_byte_level(spec: dict) -> bool:
    return '"ByteLevel"' in json.dumps(spec.get("pre_tokenizer")) or '"ByteLevel"' in json.dumps(spec.get("decoder"))


# --- tokens -------------------------------------------------------------------------------------


def _tokens_and_types(tokenizer, vocab_size: int, byte_level: bool) -> tuple[list[str], list[int]]:
    by_id = {token_id: token for token, token_id in tokenizer.get_vocab().items()}
    if by_id and max(by_id) >= vocab_size:
        raise ValueError(f"The tokenizer has token id {max(by_id)} but the model's embedding has {vocab_size} rows; "
                         "resize the embeddings (model.resize_token_embeddings(len(tokenizer))) before exporting.")
    added = tokenizer.added_tokens_decoder
    unk = tokenizer.unk_token_id
    tokens, types = [], []
    for token_id in range(vocab_size):
        token = by_id.get(token_id)
        if token is None:
            tokens.append(f"[PAD{token_id}]")
            types.append(TokenType.UNUSED)
        elif token_id in added:
            tokens.append(token)
            types.append(TokenType.CONTROL if added[token_id].special else TokenType.USER_DEFINED)
        elif token_id == unk:
            tokens.append(token)
            types.append(TokenType.UNKNOWN)
        elif not byte_level and _BYTE_PIECE.fullmatch(token):
            tokens.append(token)
            types.append(TokenType.BYTE)
        else:
            tokens.append(token)
            types.append(TokenType.NORMAL)
    return tokens, types


def _merge_scores(tokens: list[str], merges: list[str]) -> list[float]:
    """Score of a token = minus the rank of the merge producing it (earlier merges win)."""
    rank = {}
    for i, merge in enumerate(merges):
        left, _, right = merge.partition(" ")
        rank.setdefault(left + right, i)
    return [-float(rank[token] + 1) if token in rank else 0.0 for token in tokens]


def _adds_space_prefix(spec: dict) -> bool:
    """Whether the SentencePiece-style tokenizer puts ``▁`` in front of the text."""
    text = json.dumps([spec.get("pre_tokenizer"), spec.get("normalizer")])
    scheme = re.search(r'"prepend_scheme": "(\w+)"', text)
    if scheme:
        return scheme.group(1) != "never"
    if '"add_prefix_space": false' in text:
        return False
    return '"Prepend"' in text or '"add_prefix_space": true' in text


def _special_ids(tokenizer) -> dict[str, int]:
    ids = {}
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if token_id is not None:
            ids[kind] = int(token_id)
    return ids


def _added_on_encode(tokenizer) -> tuple[bool, bool]:
    """``(adds BOS, adds EOS)`` as observed on an encode with special tokens."""
    plain = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a", add_special_tokens=True)
    adds_bos = tokenizer.bos_token_id is not None and full[:1] == [tokenizer.bos_token_id] and plain[:1] != full[:1]
    adds_eos = tokenizer.eos_token_id is not None and full[-1:] == [tokenizer.eos_token_id] and plain[-1:] != full[-1:]
    return adds_bos, adds_eos


def _tokenizer_json(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError("GGUF export needs a fast (tokenizers-backed) tokenizer; load it with "
                         "AutoTokenizer.from_pretrained(..., use_fast=True).")
    return json.loads(backend.to_str())
