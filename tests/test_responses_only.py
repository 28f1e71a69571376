"""train_on_responses_only: labels only on the assistant replies, for our templates on the zoo
tokenizers, checked against the templates' own assistant-token masks."""

from __future__ import annotations

import pytest

trl = pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402

from unsloth_like.chat_templates import get_chat_template  # noqa: E402
from unsloth_like.responses_only import IGNORE_INDEX, chat_template_parts, train_on_responses_only  # noqa: E402
from unsloth_like.testing.corpus import demo_conversations  # noqa: E402
from unsloth_like.testing.zoo import load_zoo_model  # noqa: E402

CASES = [("qwen2", "chatml"), ("llama", "llama-3.1"), ("mistral", "mistral"), ("qwen2", "alpaca")]


def _chats(n=6, seed=21):
    singles = demo_conversations(2 * n, seed=seed)
    return [singles[2 * i] + singles[2 * i + 1] for i in range(n)]  # two user/assistant rounds each


def _trainer(zoo, template, zoo_cache, tmp_path, chats=None, **config):
    model, tokenizer = load_zoo_model(zoo, cache_dir=zoo_cache)
    tokenizer = get_chat_template(tokenizer, template)
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, report_to="none",
                         use_cpu=True, bf16=False, save_strategy="no", disable_tqdm=True,
                         **{"max_length": 512, **config})
    dataset = Dataset.from_dict({"messages": chats or _chats()})
    return trl.SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer), tokenizer


def _assistant_mask(tokenizer, messages):
    out = tokenizer.apply_chat_template(messages, return_assistant_tokens_mask=True, return_dict=True)
    return out["input_ids"], out["assistant_masks"]


@pytest.mark.parametrize("zoo, template", CASES)
def test_labels_cover_exactly_the_replies(zoo, template, zoo_cache, tmp_path):
    trainer, tokenizer = _trainer(zoo, template, zoo_cache, tmp_path)
    train_on_responses_only(trainer)  # markers derived from the chat template
    for row, messages in zip(trainer.train_dataset, _chats()):
        ids, mask = _assistant_mask(tokenizer, messages)
        assert row["input_ids"] == ids
        labelled = [i for i, label in enumerate(row["labels"]) if label != IGNORE_INDEX]
        assistant = [i for i, m in enumerate(mask) if m]
        assert set(assistant) <= set(labelled)
        extra = [ids[i] for i in labelled if i not in set(assistant)]
        # beyond the template's mask only the newline after a turn-end token may be trained
        assert tokenizer.decode(extra).strip() == "", tokenizer.decode(extra)
        assert all(row["labels"][i] == ids[i] for i in labelled)
    trainer.train()


@pytest.mark.parametrize("zoo, template", CASES)
def test_text_datasets_use_the_markers(zoo, template, zoo_cache, tmp_path):
    """The legacy notebook flow renders conversations to a text column first: no conversations
    left to take the template's mask from, so the markers are searched."""
    from unsloth_like.chat_templates import apply_chat_template

    model, tokenizer = load_zoo_model(zoo, cache_dir=zoo_cache)
    tokenizer = get_chat_template(tokenizer, template)
    dataset = apply_chat_template(Dataset.from_dict({"messages": _chats()}), tokenizer=tokenizer)
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=1, report_to="none", use_cpu=True, bf16=False,
                         max_length=512, dataset_text_field="text", disable_tqdm=True)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=dataset.remove_columns("messages"),
                             processing_class=tokenizer)
    train_on_responses_only(trainer)
    stop = tokenizer.eos_token
    for row, messages in zip(trainer.train_dataset, _chats()):
        labelled = tokenizer.decode([t for t in row["labels"] if t != IGNORE_INDEX])
        expected = "".join("".join(m["content"].split()) + stop for m in messages if m["role"] == "assistant")
        # TRL appends EOS to a text sample that does not end with it (ChatML ends with a newline)
        assert "".join(labelled.split()) in (expected, expected + stop)


@pytest.mark.parametrize("explicit", [True, False], ids=["markers", "template-mask"])
def test_last_response_only(explicit, zoo_cache, tmp_path):
    trainer, tokenizer = _trainer("qwen2", "chatml", zoo_cache, tmp_path)
    parts = {"instruction_part": "<|im_start|>user\n", "response_part": "<|im_start|>assistant\n"} if explicit else {}
    train_on_responses_only(trainer, last_response_only=True, **parts)
    for row, messages in zip(trainer.train_dataset, _chats()):
        labelled = tokenizer.decode([t for t in row["labels"] if t != IGNORE_INDEX])
        assert labelled.strip() == messages[-1]["content"] + "<|im_end|>"


def test_labels_from_assistant_only_loss_are_kept(zoo_cache, tmp_path):
    """The exact route: TRL builds labels from the template's assistant mask; the markers then
    find the same replies and the intersection leaves TRL's labels unchanged."""
    trainer, tokenizer = _trainer("llama", "llama-3.1", zoo_cache, tmp_path, assistant_only_loss=True)
    before = trainer.train_dataset["labels"]
    train_on_responses_only(trainer)
    assert trainer.train_dataset["labels"] == before
    assert all(any(t != IGNORE_INDEX for t in labels) for labels in before)


def test_wrong_markers_name_the_sample_and_markers(zoo_cache, tmp_path):
    trainer, _ = _trainer("qwen2", "chatml", zoo_cache, tmp_path)
    with pytest.raises(ValueError, match=r"6 of 6 samples of train_dataset .*sample 0.*'<\|assistant\|>'"):
        train_on_responses_only(trainer, instruction_part="<|user|>", response_part="<|assistant|>")


def test_truncated_replies_are_an_error_or_dropped(zoo_cache, tmp_path):
    chats = _chats()
    chats[3] = [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "a reply"}]
    trainer, _ = _trainer("qwen2", "chatml", zoo_cache, tmp_path, chats=chats, max_length=128)
    with pytest.raises(ValueError, match=r"1 of 6 samples .*sample 3.*max_length"):
        train_on_responses_only(trainer)
    train_on_responses_only(trainer, drop_fully_masked=True)
    assert len(trainer.train_dataset) == 5


def test_parts_derived_from_templates_match_unsloth_notebooks(zoo_cache):
    _, tokenizer = load_zoo_model("llama", cache_dir=zoo_cache)
    assert chat_template_parts(get_chat_template(tokenizer, "llama-3.1")) == (
        "<|start_header_id|>user<|end_header_id|>\n\n", "<|start_header_id|>assistant<|end_header_id|>\n\n")
    _, tokenizer = load_zoo_model("qwen2", cache_dir=zoo_cache)
    assert chat_template_parts(get_chat_template(tokenizer, "chatml")) == (
        "<|im_start|>user\n", "<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="both instruction_part and response_part"):
        train_on_responses_only(type("T", (), {"processing_class": tokenizer})(), instruction_part="x")
