"""The demo's built-in data (``unsloth_like.demo_data``): what the finetune may see, what it must not,
and that every held-back answer is stated by the pretraining documents."""

from __future__ import annotations

import re

import pytest

from unsloth_like.demo_data import (ANIMALS, COLOURS, HELD_BACK_ANIMALS, HELD_BACK_PAIRS, THINGS, TRAINING_ANIMALS,
                                    demo_chats, held_back_questions, pretraining_documents)

DOCUMENTS = pretraining_documents(6000, seed=1)
CHATS = demo_chats(512, seed=3407)
QUESTIONS = [chat[0]["content"] for chat in CHATS]
ANSWERS = [chat[1]["content"] for chat in CHATS]


def test_the_animals_split_into_training_and_held_back():
    assert set(TRAINING_ANIMALS) | set(HELD_BACK_ANIMALS) == set(ANIMALS)
    assert not set(TRAINING_ANIMALS) & set(HELD_BACK_ANIMALS)
    assert len(HELD_BACK_ANIMALS) == 8 and len(TRAINING_ANIMALS) == 16
    # the held-back animals' homes are answers the chats also give (only the pairing is new); two
    # of their foods are never an answer in the chats: the pig's and the crab's come from pretraining alone
    homes = {home for home, _ in map(ANIMALS.get, TRAINING_ANIMALS)}
    foods = {food for _, food in map(ANIMALS.get, TRAINING_ANIMALS)}
    assert {ANIMALS[a][0] for a in HELD_BACK_ANIMALS} <= homes
    assert {ANIMALS[a][1] for a in HELD_BACK_ANIMALS} - foods == {"corn", "seaweed"}


def test_the_chats_never_ask_a_held_back_question():
    held = {question for question, _ in held_back_questions()}
    assert not held & set(QUESTIONS)
    assert not any(re.search(rf"\b{animal}\b", question) for animal in HELD_BACK_ANIMALS for question in QUESTIONS)
    described = {(m[1], m[2]) for q in QUESTIONS if (m := re.fullmatch(r"Describe an? (\w+) (\w+)\.", q))}
    assert described and not described & set(HELD_BACK_PAIRS)
    # every colour and thing is described in training (only the held-back pairings are new)
    assert {c for c, _ in described} == set(COLOURS) and {t for _, t in described} == set(THINGS)


def test_the_chats_cover_the_three_kinds_and_answer_right():
    kinds = {question.split()[0] for question in QUESTIONS}
    assert kinds == {"Where", "What", "Describe"}
    for question, answer in zip(QUESTIONS, ANSWERS):
        if m := re.fullmatch(r"Where does the (\w+) live\?", question):
            assert answer == f"It lives in the {ANIMALS[m[1]][0]}."
        elif m := re.fullmatch(r"What does the (\w+) eat\?", question):
            assert answer == f"It eats {ANIMALS[m[1]][1]}."
        else:
            colour, thing = re.fullmatch(r"Describe an? (\w+) (\w+)\.", question).groups()
            article = "an" if thing[0] in "aeiou" else "a"
            assert answer == f"It is {article} {thing}, and its colour is {colour}."


def test_held_back_questions_interleave_the_kinds_and_state_pretraining_facts():
    questions = held_back_questions()
    assert len(questions) == 24 == len(set(questions))
    assert [q.split()[0] for q, _ in questions[:3]] == ["Where", "What", "Describe"]
    text = "\n".join(DOCUMENTS)
    for animal in HELD_BACK_ANIMALS:  # the answers are in the pretraining text, in its own phrasing
        home, food = ANIMALS[animal]
        assert f"The {animal} lives in the {home}." in text
        assert f"The {animal} eats {food}." in text


def test_pretraining_documents_hold_no_questions_and_no_chat_format():
    assert all("<|" not in doc and "\n" not in doc for doc in DOCUMENTS)
    assert not any(re.search(r"\b(Where|What|Describe|live\?|eat\?)", doc) for doc in DOCUMENTS)
    assert not any(doc.startswith(("It lives", "It eats", "It is")) for doc in DOCUMENTS)
    assert not set(DOCUMENTS) & set(ANSWERS)  # the answers' phrasing is the finetune's to teach


def test_the_data_is_seeded():
    assert pretraining_documents(50, seed=1) == DOCUMENTS[:50]
    assert pretraining_documents(50, seed=2) != DOCUMENTS[:50]
    assert demo_chats(20, seed=3407) == CHATS[:20]


@pytest.mark.slow
def test_the_demo_tokenizer_holds_the_demo_words_whole(tmp_path):
    from transformers import AutoTokenizer

    from unsloth_like.testing.tokenizer import TOKENIZERS, save_tokenizer

    save_tokenizer(TOKENIZERS["llama3_demo"], tmp_path, model_max_length=2048)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    words = [*ANIMALS, *(home for home, _ in ANIMALS.values()), *(food for _, food in ANIMALS.values()),
             *COLOURS, *THINGS]
    split = [w for w in words if len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) != 1]
    assert not split
    assert tokenizer.chat_template == TOKENIZERS["llama3"].chat_template
