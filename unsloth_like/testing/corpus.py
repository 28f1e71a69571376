"""Deterministic text for training the zoo tokenizers and for the built-in demo dataset.

No downloads: the text is generated from small word lists with a seeded RNG. It covers what a
tokenizer has to survive: mixed case, digits, punctuation, code, repeated spaces, newlines and
non-ASCII scripts (accents, CJK, emoji).
"""

from __future__ import annotations

import random

_SUBJECTS = ["the model", "a small cat", "our team", "the kernel", "every layer", "this adapter",
             "the tokenizer", "a student", "the river", "my neighbour", "the optimizer", "a robot"]
_VERBS = ["learns", "reads", "computes", "finds", "builds", "writes", "saves", "loads", "trains",
          "measures", "compares", "explains"]
_OBJECTS = ["the weights", "a long story", "seven apples", "the gradients", "a new song",
            "the shards", "a chat template", "the attention scores", "a cup of tea", "the logits"]
_ADVERBS = ["quickly", "carefully", "twice", "today", "in fp32", "on the GPU", "without errors",
            "again and again", "before lunch", "step by step"]
_EXTRA_LINES = [
    "def forward(self, x):\n    return self.w2(F.silu(self.w1(x)) * self.w3(x))",
    "for i in range(10):\n\tprint(i ** 2, end=', ')",
    "Café, naïve, façade, jalapeño — déjà vu.",
    "机器学习模型正在训练。今天的天气很好。",
    "Numbers: 3.14159, 2718, -42, 1e-6, 0x1F, 65536.",
    "Emoji test: 🙂🚀✨ and symbols like ©, ™, €, ±, ≤.",
    "Multiple   spaces,\ttabs,\nand\n\nblank lines.",
    "URL https://example.com/path?query=1&x=y and email someone@example.org.",
]


def sentence(rng: random.Random) -> str:
    text = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_ADVERBS)}"
    if rng.random() < 0.3:
        text += f" at {rng.randint(1, 12)}:{rng.randint(0, 59):02d}"
    ending = rng.choice([".", "!", "?", "."])
    return text[0].upper() + text[1:] + ending


def tokenizer_corpus(seed: int = 0, n_sentences: int = 4000) -> list[str]:
    """Lines to train a zoo tokenizer on."""
    rng = random.Random(seed)
    lines = [sentence(rng) for _ in range(n_sentences)]
    lines += _EXTRA_LINES * 20
    lines += [demo_question_answer(rng)[0] + " " + demo_question_answer(rng)[1] for _ in range(500)]
    return lines


_COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
_THINGS = ["apple", "car", "house", "bird", "book", "lamp", "kite", "shoe"]


def demo_question_answer(rng: random.Random) -> tuple[str, str]:
    """One question/answer pair with a learnable rule (arithmetic, word order, recall)."""
    kind = rng.randrange(3)
    if kind == 0:
        a, b = rng.randint(0, 50), rng.randint(0, 50)
        return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
    if kind == 1:
        words = rng.sample(_THINGS, 3)
        return f"Reverse the list: {', '.join(words)}.", f"Reversed: {', '.join(reversed(words))}."
    colour, thing = rng.choice(_COLOURS), rng.choice(_THINGS)
    return f"Describe a {colour} {thing}.", f"It is a {thing}, and its colour is {colour}."


def demo_conversations(n: int, seed: int = 3407) -> list[list[dict[str, str]]]:
    """``n`` short chats in the ``messages`` format TRL and chat templates take."""
    rng = random.Random(seed)
    chats = []
    for _ in range(n):
        question, answer = demo_question_answer(rng)
        chats.append([{"role": "user", "content": question}, {"role": "assistant", "content": answer}])
    return chats
