"""GGUF files from ``convert`` checked by llama.cpp itself (llama-cpp-python, the gguf-check extra).

* F32 files: llama.cpp's logits equal transformers' to float32 rounding, and llama.cpp tokenises
  like the HF tokenizer (byte-level BPE with each pre-tokenizer, and SentencePiece-style BPE).
* Every quantisation method: the file is what llama.cpp's own quantiser (``llama_model_quantize``,
  i.e. ``llama-quantize``) makes from our F32 file: same tensor types, same bytes. That covers
  our K-quants, the legacy quants (gguf package) and the per-tensor type mixes at once.
* Quantised files run: F16, BF16 and Q8_0 predict like the float model, Q4_K_M's perplexity is llama.cpp's.
"""

from __future__ import annotations

import random
import re

import gguf
import numpy as np
import pytest
import torch

from unsloth_like.save.gguf import METHODS, convert
from unsloth_like.testing import llamacpp
from unsloth_like.testing.corpus import sentence
from unsloth_like.testing.zoo import load_zoo_model, zoo_model_dir

pytest.importorskip("llama_cpp", reason=f"needs llama-cpp-python: {llamacpp.INSTALL_HINT}")

ALIGNED = ["llama_k", "mistral_k", "qwen2_k", "qwen3_k"]
TEXTS = [
    "The quick brown fox jumps over the lazy dog. It's 12:45, isn't it? I'VE been told: 'no'.",
    "Ünïcödé: naïve café, Straße; 你好，世界！ こんにちは; нещо на Български; مرحبا بالعالم; हिन्दी",
    "Emoji 🚀🦙 and ZWJ 👩‍💻 sequences ✅ — “quotes” … ellipsis",
    "def f(x):\n    return {'a': [1, 2, 3], \"b\": x ** 2}  # comment\n\tif x >= 10_000: pass\r\n",
    "   leading spaces, trailing   \n\n\nnewlines, 3 33 333 3333 33333 3.14159 1,234,567 0x1F",
]
# A held-out text for next-token comparisons: a few hundred tokens of mixed prose and code.
LONG_TEXT = " ".join(TEXTS * 3)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, zoo_cache):
    """``exported(name, method)`` -> path of the converted zoo model (cached for the module)."""
    root = tmp_path_factory.mktemp("gguf")
    cache: dict = {}

    def get(name: str, method: str):
        if (name, method) not in cache:
            out = root / f"{name}-{method}"
            [cache[name, method]] = convert(zoo_model_dir(name, zoo_cache), out, method, modelfile=False)
        return cache[name, method]
    return get


@pytest.fixture(scope="module")
def hf(zoo_cache):
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            cache[name] = load_zoo_model(name, cache_dir=zoo_cache)
        return cache[name]
    return get


@pytest.fixture(scope="module")
def trained(tmp_path_factory, zoo_cache):
    """``(directory, model, tokenizer, held-out ids)``: the aligned Llama trained for 60 steps on
    the synthetic corpus. Random weights make next-token margins tiny, so that any rounding flips
    predictions; a trained model is what quantised files are compared on in practice."""
    torch.set_num_threads(1)
    model, tokenizer = load_zoo_model("llama_k", cache_dir=zoo_cache)
    rng = random.Random(0)
    ids = tokenizer(" ".join(sentence(rng) for _ in range(2000))).input_ids
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    model.train()
    for step in range(60):
        start = step * 256 % (len(ids) - 257)
        batch = torch.tensor([ids[start:start + 256]])
        model(batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    directory = tmp_path_factory.mktemp("trained")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    held_out = tokenizer(" ".join(sentence(random.Random(1)) for _ in range(40))).input_ids[:400]
    return directory, model, tokenizer, held_out


def _hf_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


@pytest.mark.parametrize("name", ALIGNED + ["gemma2_k", "gemma3_k", "phi3_k", "llama", "qwen2", "phi3", "gemma2",
                                            "gemma3_text"])
def test_f32_logits_equal_transformers(name, exported, hf):
    """F32 weights and F32 KV cache: only summation order differs, so |Δ| stays at float32
    rounding of logits of size ~5 accumulated over a few layers (1e-4); Gemma adds the GELU table's
    rounding (measured: 1.9e-3 on logits of 12.5 for gemma2_k, 3.5e-4 on 1.2 for gemma2)."""
    model, tokenizer = hf(name)
    ids = tokenizer(LONG_TEXT).input_ids[:300]
    with llamacpp.load(exported(name, "f32")) as llm:
        ours = llamacpp.logits(llm, ids)
    expected = _hf_logits(model, ids)
    gelu = getattr(model.config, "hidden_activation", None) == "gelu_pytorch_tanh"
    assert np.abs(ours - expected).max() <= llamacpp.f32_logit_bound(expected, gelu_table=gelu)
    assert (ours.argmax(-1) == expected.argmax(-1)).all()


# llama3, qwen2, spm, Gemma's SentencePiece (no "▁" prefix) and Phi-4's tokenizers
@pytest.mark.parametrize("name", ["llama_k", "qwen2_k", "mistral_k", "gemma2_k", "phi3_k"])
def test_llama_cpp_tokenises_like_transformers(name, exported, hf):
    _, tokenizer = hf(name)
    adds_bos = tokenizer.bos_token_id is not None and tokenizer("a").input_ids[0] == tokenizer.bos_token_id
    texts = TEXTS + [LONG_TEXT]
    if name == "mistral_k":
        # HF's Metaspace(prepend_scheme="first") adds no "▁" to text that already starts with a
        # space; SentencePiece, and llama.cpp after it, always add one. Real Mistral tokenizer.json
        # files have the same discrepancy with their own tokenizer.model; no GGUF key expresses it.
        texts = [text for text in texts if not text[0].isspace()]
    with llamacpp.load(exported(name, "f32")) as llm:
        for text in texts:
            assert llamacpp.tokenize(llm, text, add_bos=adds_bos) == tokenizer(text).input_ids, text


@pytest.mark.parametrize("name", ["llama_k", "qwen2_k", "gemma2_k", "phi3_k"])
def test_chat_renders_tokenise_like_transformers(name, exported, hf):
    """Special tokens inside a rendered conversation are parsed as the tokenizer parses them."""
    _, tokenizer = hf(name)
    system = [] if name == "gemma2_k" else [{"role": "system", "content": "Be brief."}]  # Gemma's has none
    chat = [*system, {"role": "user", "content": "Hi 🚀, 2+2?"},
            {"role": "assistant", "content": "4."}, {"role": "user", "content": "Thanks!"}]
    text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    with llamacpp.load(exported(name, "f32")) as llm:
        assert llamacpp.tokenize(llm, text, add_bos=False) == tokenizer(text, add_special_tokens=False).input_ids


def test_metadata_llama_cpp_reads(exported, hf):
    _, tokenizer = hf("llama_k")
    reader = gguf.GGUFReader(exported("llama_k", "f32"))
    fields = {name: field.contents() for name, field in reader.fields.items()}
    assert fields["general.architecture"] == "llama"
    assert fields["tokenizer.ggml.pre"] == "llama-bpe"
    assert fields["llama.attention.head_count_kv"] == 1
    assert fields["llama.rope.freq_base"] == 500000.0
    assert fields["tokenizer.ggml.bos_token_id"] == tokenizer.bos_token_id
    assert fields["tokenizer.ggml.add_bos_token"] is True
    assert not re.search(r"\{%-?\s*(end)?generation", fields["tokenizer.chat_template"])  # a transformers extension
    assert "rope_freqs.weight" in {t.name for t in reader.tensors}  # Llama 3.1 rope scaling
    qwen = {name: field.contents() for name, field in gguf.GGUFReader(exported("qwen2_k", "f32")).fields.items()}
    assert qwen["tokenizer.ggml.pre"] == "qwen2" and qwen["tokenizer.ggml.add_bos_token"] is False
    spm = {name: field.contents() for name, field in gguf.GGUFReader(exported("mistral_k", "f32")).fields.items()}
    assert spm["tokenizer.ggml.model"] == "llama" and spm["tokenizer.ggml.add_space_prefix"] is True


def test_longrope_past_the_original_context_matches_transformers(exported, hf):
    """A 600-token sequence in a 1024-token context: both sides use LongRoPE's long factors (the
    zoo model's original context is 512), with its attention factor. Float32 rounding as in the F32
    test, over twice the positions (measured 1.1e-4); the short factors would be off by ~1."""
    model, tokenizer = hf("phi3_k")
    ids = tokenizer(" ".join([LONG_TEXT] * 3)).input_ids[:600]
    with llamacpp.load(exported("phi3_k", "f32"), n_ctx=1024) as llm:
        ours = llamacpp.logits(llm, ids)
    assert np.abs(ours - _hf_logits(model, ids)).max() <= 2e-4


def test_gemma2_and_phi3_metadata(exported):
    gemma = {name: field.contents() for name, field in gguf.GGUFReader(exported("gemma2_k", "f32")).fields.items()}
    assert gemma["general.architecture"] == "gemma2"
    assert (gemma["gemma2.attn_logit_softcapping"], gemma["gemma2.final_logit_softcapping"]) == (50.0, 30.0)
    assert gemma["gemma2.attention.sliding_window"] == 16
    assert gemma["gemma2.attention.sliding_window_pattern"] == [True, False, True]
    reader = gguf.GGUFReader(exported("phi3_k", "f32"))
    phi = {name: field.contents() for name, field in reader.fields.items()}
    tensors = {t.name: t for t in reader.tensors}
    assert phi["general.architecture"] == "phi3" and phi["phi3.rope.dimension_count"] == 48
    assert phi["phi3.rope.scaling.original_context_length"] == 512
    assert phi["phi3.rope.scaling.attn_factor"] == pytest.approx((1 + np.log(4) / np.log(512)) ** 0.5)
    assert np.allclose(tensors["rope_factors_long.weight"].data, [1.0 + 0.25 * i for i in range(24)])
    assert "blk.0.attn_qkv.weight" in tensors and "output.weight" not in tensors  # packed, tied
    assert "phi3" not in phi["general.name"].lower()  # llama.cpp's Phi-3 vocabulary rule (see loadable_name)


QUANTISED = [m for m in METHODS if m != "f32"]


@pytest.mark.parametrize("method", QUANTISED)
@pytest.mark.parametrize("name", ["llama_k", "qwen2_k", "mistral_k", "qwen3", "gemma2_k", "gemma3_k", "phi3_k"])
def test_every_method_is_what_llama_quantize_writes(name, method, exported, tmp_path):
    """Byte-identical tensors, tensor by tensor, to llama.cpp's quantiser run on our F32 file
    (``qwen3`` has odd row lengths: every fallback type is exercised there)."""
    reference = tmp_path / "reference.gguf"
    llamacpp.quantize_file(exported(name, "f32"), reference, METHODS[method][0])
    ours = {t.name: t for t in gguf.GGUFReader(exported(name, method)).tensors}
    theirs = {t.name: t for t in gguf.GGUFReader(reference).tensors}
    assert list(ours) == list(theirs)
    for tensor_name, tensor in ours.items():
        assert tensor.tensor_type == theirs[tensor_name].tensor_type, tensor_name
        assert np.array_equal(np.asarray(tensor.data).view(np.uint8),
                              np.asarray(theirs[tensor_name].data).view(np.uint8)), tensor_name


def test_q4_k_m_uses_llama_cpp_mix(exported):
    """The mix itself, spelled out for the 3-layer aligned Llama (GQA 4:1)."""
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(exported("llama_k", "q4_k_m")).tensors}
    assert types["output.weight"] == "Q6_K" and types["token_embd.weight"] == "Q4_K"
    assert [types[f"blk.{i}.attn_v.weight"] for i in range(3)] == ["Q4_K", "Q4_K", "Q6_K"]
    assert [types[f"blk.{i}.ffn_down.weight"] for i in range(3)] == ["Q4_K", "Q4_K", "Q6_K"]
    assert types["blk.0.attn_q.weight"] == "Q4_K" and types["blk.0.attn_norm.weight"] == "F32"


# Largest |Δ logit| against the float model, for logits spanning ~25: llama.cpp multiplies F16/BF16
# weights with activations rounded to the same type (relative rounding 2^-11 / 2^-8 on both
# sides), measured 0.008 / 0.053; bounds ~2.5x that. Q8_0 is judged by its predictions only.
HALF_PRECISION_BOUND = {"f16": 0.02, "bf16": 0.15}


@pytest.mark.parametrize("method", ["f16", "bf16", "q8_0"])
def test_16_and_8_bit_files_predict_like_the_float_model(method, trained, tmp_path):
    directory, model, _, held_out = trained
    [path] = convert(directory, tmp_path / f"{method}.gguf", method, modelfile=False)
    with llamacpp.load(path) as llm:
        ours = llamacpp.logits(llm, held_out)
    expected = _hf_logits(model, held_out)
    agreement = (ours.argmax(-1) == expected.argmax(-1)).mean()
    assert len(held_out) >= 300 and agreement >= 0.99
    if method in HALF_PRECISION_BOUND:
        assert np.abs(ours - expected).max() <= HALF_PRECISION_BOUND[method]


def test_q4_k_m_perplexity_is_llama_cpps(trained, tmp_path):
    """On held-out text: within 1% of llama.cpp's own Q4_K_M of the same model (the bytes are
    identical, so in practice equal), and within 5% of the float model's."""
    directory, _, _, held_out = trained
    f32, ours = convert(directory, tmp_path, ["f32", "q4_k_m"], modelfile=False)
    reference = tmp_path / "reference.gguf"
    llamacpp.quantize_file(f32, reference, METHODS["q4_k_m"][0])
    perplexities = {}
    for label, path in (("ours", ours), ("llama.cpp", reference), ("f32", f32)):
        with llamacpp.load(path) as llm:
            perplexities[label] = llamacpp.perplexity(llm, held_out)
    assert abs(perplexities["ours"] / perplexities["llama.cpp"] - 1) <= 0.01, perplexities
    assert abs(perplexities["ours"] / perplexities["f32"] - 1) <= 0.05, perplexities


# Relative RMS error of dequantised Gaussian weights per type: the rounding error of a uniform
# step (step/sqrt(12)), the step being the block's range over the type's levels: 2^-11 for F16,
# 2^-8 for BF16, ~0.5% for 8 bits, ~3.5-4.5% for 5, ~7-9% for 4, ~15% for Q3_K and ~30% for Q2_K
# on these tensors (measured), with a 15% margin.
ROUND_TRIP_BOUND = {"F16": 3e-4, "BF16": 2e-3, "Q8_0": 0.0062, "Q6_K": 0.0205, "Q5_0": 0.05, "Q5_1": 0.044,
                    "Q5_K": 0.042, "Q4_0": 0.1, "Q4_1": 0.091, "Q4_K": 0.083, "Q3_K": 0.175, "Q2_K": 0.343}


@pytest.mark.parametrize("method", ["q8_0", "q6_k", "q5_k_m", "q5_0", "q5_1", "q4_0", "q4_1", "q4_k_m", "q3_k_l",
                                    "q2_k", "bf16", "f16"])
def test_dequantised_weights_stay_within_the_types_error(method, exported):
    """``gguf.quants.dequantize`` of every tensor against the F32 export of the same weights."""
    floats = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(exported("llama_k", "f32")).tensors}
    for tensor in gguf.GGUFReader(exported("llama_k", method)).tensors:
        if tensor.tensor_type.name == "F32":
            continue
        restored = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type).reshape(floats[tensor.name].shape)
        reference = floats[tensor.name]
        error = np.sqrt(np.mean((restored - reference) ** 2) / np.mean(reference ** 2))
        assert error <= ROUND_TRIP_BOUND[tensor.tensor_type.name], (tensor.name, tensor.tensor_type.name, error)
