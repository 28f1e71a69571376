"""``UnslothVisionDataCollator``: batches, masks token by token, image sources, truncation, errors."""

from __future__ import annotations

import base64
import io

import pytest
import torch
import transformers

from unsloth_like import FastVisionModel, UnslothVisionDataCollator
from unsloth_like.testing.processors import make_images
from unsloth_like.testing.zoo import zoo_model_dir
from unsloth_like.vision_collator import media_token_ids

VLMS = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "gemma3", "mllama"]
MEDIA_TOKENS = {  # what must never be a training target, per family
    "qwen2_vl": {"<|vision_start|>", "<|image_pad|>", "<|vision_end|>"},
    "qwen2_5_vl": {"<|vision_start|>", "<|image_pad|>", "<|vision_end|>"},
    "qwen3_vl": {"<|vision_start|>", "<|image_pad|>", "<|vision_end|>"},
    "gemma3": {"<start_of_image>", "<image_soft_token>", "<end_of_image>"},
    "mllama": {"<|image|>"},
}
MARKERS = {  # (instruction_part, response_part) as each family's chat template writes them
    "qwen2_vl": ("<|im_start|>user\n", "<|im_start|>assistant\n"),
    "gemma3": ("<start_of_turn>user\n", "<start_of_turn>model\n"),
    "mllama": ("<|start_header_id|>user<|end_header_id|>\n\n", "<|start_header_id|>assistant<|end_header_id|>\n\n"),
}
QUESTIONS = [("What is in the picture?", "A red square."), ("Describe it.", "Noise and an ellipse.")]


@pytest.fixture(scope="module")
def loaded(zoo_cache):
    cache = {}

    def load(name):
        if name not in cache:
            cache[name] = FastVisionModel.from_pretrained(str(zoo_model_dir(name, zoo_cache)),
                                                          load_in_4bit=False, max_seq_length=512)
        return cache[name]

    return load


def _conversation(question, answer, image):
    return {"messages": [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]}]}


def _examples(n=2, sizes=(56, 56)):
    images = make_images(n, sizes)
    return [_conversation(q, a, image) for (q, a), image in zip(QUESTIONS[:n], images)]


@pytest.mark.parametrize("name", VLMS)
def test_labels_are_the_ids_except_padding_and_every_media_token(name, loaded):
    model, processor = loaded(name)
    batch = UnslothVisionDataCollator(model, processor)(_examples())
    vocab = processor.tokenizer.get_vocab()
    expected_media = {vocab[t] for t in MEDIA_TOKENS[name]}
    assert expected_media <= media_token_ids(processor)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    for row in range(ids.shape[0]):
        for position in range(ids.shape[1]):
            token = int(ids[row, position])
            ignored = not mask[row, position] or token in media_token_ids(processor)
            assert int(labels[row, position]) == (-100 if ignored else token), (row, position, token)
        assert any(int(t) in expected_media for t in ids[row])  # every sample has its image tokens
    assert mask[:, 0].all(), "right padding: every sample starts at position 0"


@pytest.mark.parametrize("name", VLMS)
def test_the_batch_is_what_the_processor_makes_of_the_rendered_conversations(name, loaded):
    model, processor = loaded(name)
    examples = _examples()
    batch = UnslothVisionDataCollator(model, processor, resize="max")(examples)
    texts = [processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]},
         {"role": "assistant", "content": [{"type": "text", "text": a}]}], tokenize=False) for q, a in QUESTIONS]
    processor.tokenizer.padding_side = "right"
    direct = processor(text=texts, images=[[e["messages"][0]["content"][0]["image"]] for e in examples],
                       padding=True, return_tensors="pt", add_special_tokens=False)
    assert set(batch) == set(direct) | {"labels"}
    for key, value in direct.items():
        assert torch.equal(batch[key], value), key
    bos = processor.tokenizer.bos_token_id
    if bos is not None:  # the template's BOS only: one per sample
        assert (batch["input_ids"] == bos).sum(dim=1).tolist() == [1, 1]


def test_images_may_come_as_paths_bytes_dicts_data_uris_or_a_top_level_column(loaded, tmp_path):
    model, processor = loaded("qwen2_vl")
    collator = UnslothVisionDataCollator(model, processor)
    image = make_images(1, (84, 56))[0]
    path = tmp_path / "picture.png"
    image.save(path)
    png = path.read_bytes()
    sources = [image, str(path), f"file://{path}", png, {"bytes": png, "path": None}, {"path": str(path)},
               "data:image/png;base64," + base64.b64encode(png).decode()]
    reference = collator([_conversation("Q?", "A.", image)])
    for source in sources:
        batch = collator([_conversation("Q?", "A.", source)])
        assert torch.equal(batch["pixel_values"], reference["pixel_values"]), type(source)
        assert torch.equal(batch["input_ids"], reference["input_ids"])
    placeholders = {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q?"}]},
                                 {"role": "assistant", "content": "A."}], "images": [image]}
    trl_style = {"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}],
                 "image": image}
    for example in (placeholders, trl_style):
        batch = collator([example])
        assert torch.equal(batch["input_ids"], reference["input_ids"])
        assert torch.equal(batch["pixel_values"], reference["pixel_values"])


def test_string_contents_and_none_fields_from_arrow_are_normalised(loaded):
    model, processor = loaded("qwen2_vl")
    collator = UnslothVisionDataCollator(model, processor)
    image = make_images(1)[0]
    arrow_like = {"messages": [
        {"role": "user", "content": [{"type": "image", "image": image, "text": None},
                                     {"type": "text", "text": "Q?", "image": None}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A.", "image": None}]}]}
    assert torch.equal(collator([arrow_like])["input_ids"], collator([_conversation("Q?", "A.", image)])["input_ids"])
    conversations = {"conversations": arrow_like["messages"]}
    assert torch.equal(collator([conversations])["input_ids"], collator([arrow_like])["input_ids"])


@pytest.mark.parametrize("name", sorted(MARKERS))
def test_train_on_responses_only_keeps_exactly_the_answers(name, loaded):
    model, processor = loaded(name)
    instruction, response = MARKERS[name]
    collator = UnslothVisionDataCollator(model, processor, train_on_responses_only=True,
                                         instruction_part=instruction, response_part=response)
    batch = collator(_examples())
    for row, (question, answer) in enumerate(QUESTIONS):
        kept = [int(t) for t in batch["labels"][row] if t != -100]
        text = processor.tokenizer.decode(kept)
        assert text.startswith(answer) and question not in text
    derived = UnslothVisionDataCollator(model, processor, train_on_responses_only=True)(_examples())
    assert torch.equal(derived["labels"], batch["labels"])  # markers read off the processor's template


def test_prompt_completion_examples_train_on_the_completion_only(loaded):
    model, processor = loaded("qwen2_vl")
    image = make_images(1)[0]
    example = {"prompt": [{"role": "user", "content": [{"type": "image", "image": image},
                                                        {"type": "text", "text": "Q?"}]}],
               "completion": [{"role": "assistant", "content": "The answer."}]}
    batch = UnslothVisionDataCollator(model, processor)([example])
    kept = processor.tokenizer.decode([int(t) for t in batch["labels"][0] if t != -100])
    assert kept.startswith("The answer.") and "Q?" not in kept and "assistant" not in kept
    full = UnslothVisionDataCollator(model, processor, completion_only_loss=False)([example])
    assert (full["labels"] != -100).sum() > (batch["labels"] != -100).sum()


def test_truncation_keeps_image_tokens_or_says_which_sample_needs_more(loaded):
    model, processor = loaded("qwen2_vl")
    long_answer = "word " * 60
    image = make_images(1)[0]
    example = _conversation("Q?", long_answer, image)
    whole = UnslothVisionDataCollator(model, processor)([example])
    cut = UnslothVisionDataCollator(model, processor, max_seq_length=40)([example])
    assert whole["input_ids"].shape[1] > 40 and cut["input_ids"].shape[1] == 40
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "labels"):
        assert torch.equal(cut[key], whole[key][:, :40]), key
    assert torch.equal(cut["pixel_values"], whole["pixel_values"])
    late_image = {"messages": [{"role": "user", "content": [{"type": "text", "text": "word " * 20},
                                                             {"type": "image", "image": image}]},
                               {"role": "assistant", "content": "A."}]}
    with pytest.raises(ValueError, match=r"Sample 1 of this batch .* would cut image tokens.*at least \d+"):
        UnslothVisionDataCollator(model, processor, max_seq_length=12)([_conversation("Q?", "A.", image), late_image])


def test_max_seq_length_defaults_to_the_models(loaded):
    model, processor = loaded("qwen2_vl")
    assert UnslothVisionDataCollator(model, processor).max_seq_length == 512


@pytest.mark.parametrize("resize, size, expected", [
    ("min", (112, 112), (56, 56)),  # gemma3's vision config: image_size 56
    ("max", (112, 112), (112, 112)),
    (28, (112, 56), (28, 14)),
    ((40, 30), (112, 56), (40, 30)),
])
def test_resize_bounds_images_as_asked(resize, size, expected, loaded):
    model, processor = loaded("gemma3")
    collator = UnslothVisionDataCollator(model, processor, resize=resize)
    assert collator._resize(make_images(1, size)[0]).size == expected


def test_qwen_configs_without_image_size_bound_images_to_512(loaded):
    model, processor = loaded("qwen2_vl")
    collator = UnslothVisionDataCollator(model, processor)
    assert collator._resize(make_images(1, (1024, 256))[0]).size == (512, 128)


def test_pixel_values_follow_the_model_dtype(zoo_cache):
    model, processor = FastVisionModel.from_pretrained(str(zoo_model_dir("gemma3", zoo_cache)),
                                                       load_in_4bit=False, dtype=torch.bfloat16)
    batch = UnslothVisionDataCollator(model, processor)(_examples(1))
    assert batch["pixel_values"].dtype == torch.bfloat16


def test_bad_inputs_are_clear_errors(loaded, tmp_path):
    model, processor = loaded("qwen2_vl")
    with pytest.raises(TypeError, match="needs a vision-language processor"):
        UnslothVisionDataCollator(model, processor.tokenizer)
    with pytest.raises(ValueError, match="resize must be"):
        UnslothVisionDataCollator(model, processor, resize="huge")
    collator = UnslothVisionDataCollator(model, processor)
    image = make_images(1)[0]
    with pytest.raises(ValueError, match="Sample 0 has no conversation"):
        collator([{"text": "hello"}])
    mismatch = {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q"}]}],
                "images": [image, image]}
    with pytest.raises(ValueError, match="Sample 0 has 1 image placeholders in its messages but 2 images"):
        collator([mismatch])
    with pytest.raises(FileNotFoundError, match="sample 0, image 0: image file .*missing.png does not exist"):
        collator([_conversation("Q", "A", str(tmp_path / "missing.png"))])
    with pytest.raises(ValueError, match="not an image Pillow can read"):
        collator([_conversation("Q", "A", b"not a png")])
    no_image = {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q"}]}]}
    with pytest.raises(ValueError, match="image part without an image"):
        collator([no_image])


def test_a_text_only_processor_loses_nothing_silently(zoo_cache):
    tokenizer = transformers.AutoTokenizer.from_pretrained(zoo_model_dir("qwen2", zoo_cache))
    with pytest.raises(TypeError, match='pip install "unsloth_like\\[vision\\]"'):
        UnslothVisionDataCollator(None, tokenizer)


def test_image_loading_rejects_unknown_types():
    from unsloth_like.images import load_image

    with pytest.raises(TypeError, match="give a PIL image, a path, a URL, bytes"):
        load_image(42, where="sample 3, image 0")
    buffer = io.BytesIO()
    make_images(1)[0].convert("L").save(buffer, format="PNG")
    assert load_image(buffer.getvalue()).mode == "RGB"


def test_videos_as_frames_train_and_their_placeholders_are_masked(loaded, tmp_path):
    model, processor = loaded("qwen2_vl")
    frames = make_images(2, (56, 56), seed=3)
    example = {"messages": [
        {"role": "user", "content": [{"type": "video", "video": frames}, {"type": "text", "text": "What moves?"}]},
        {"role": "assistant", "content": "A square."}]}
    batch = UnslothVisionDataCollator(model, processor)([example, _conversation("Q?", "A.", make_images(1)[0])])
    vocab = processor.tokenizer.get_vocab()
    video_pad = vocab["<|video_pad|>"]
    assert batch["video_grid_thw"].tolist() == [[1, 4, 4]]  # 2 frames = one temporal patch of 4x4
    assert (batch["input_ids"][0] == video_pad).sum() == 4 and (batch["labels"][batch["input_ids"] == video_pad] == -100).all()
    assert "pixel_values" in batch and "pixel_values_videos" in batch
    model.train()
    assert torch.isfinite(model(**batch).loss)
    missing = {"messages": [{"role": "user", "content": [{"type": "video", "video": str(tmp_path / "clip.mp4")}]}]}
    with pytest.raises(FileNotFoundError, match="sample 0, video 0: video file .*clip.mp4 does not exist"):
        UnslothVisionDataCollator(model, processor)([missing])


def test_response_markers_that_match_nothing_are_an_error(loaded):
    model, processor = loaded("qwen2_vl")
    collator = UnslothVisionDataCollator(model, processor, train_on_responses_only=True,
                                         instruction_part="<|im_start|>user\n", response_part="### Answer:")
    with pytest.raises(ValueError, match=r"Sample 0 of this batch has no reply left to train on: searched "
                                         r"response_part='### Answer:'"):
        collator(_examples(1))
