"""The demo's built-in data: a small world of animal facts, the plain-text documents the demo base
is pretrained on, and the chats its LoRA finetune trains on.

Provenance and licence: written for this project and generated here from the tables below with a
seeded RNG (nothing is downloaded); it is part of the package and under its licence (Apache-2.0).

The story it tells is the one of a real finetune. The pretraining documents state where 24 animals
live and what they eat, in several phrasings, next to sentences that describe coloured things and
plain filler text; they hold none of the chats' questions and no chat template. The finetuning chats ask
questions in the chat format about 16 of the animals (``TRAINING_ANIMALS``) and ask for
descriptions of coloured things. The held-back questions ask about the other 8
(``HELD_BACK_ANIMALS``) and about colour/thing pairs the chats never describe: a model can only
answer them from what it learned in pretraining, in the form the finetune taught it.
"""

from __future__ import annotations

import random

from .testing.corpus import sentence, tokenizer_corpus

# animal -> (where it lives, what it eats)
ANIMALS: dict[str, tuple[str, str]] = {
    "fox": ("forest", "meat"), "bear": ("forest", "berries"), "owl": ("forest", "mice"),
    "deer": ("forest", "grass"), "fish": ("river", "insects"), "duck": ("river", "seeds"),
    "frog": ("river", "insects"), "otter": ("river", "fish"), "camel": ("desert", "leaves"),
    "lizard": ("desert", "insects"), "scorpion": ("desert", "insects"), "snake": ("desert", "mice"),
    "goat": ("mountains", "grass"), "eagle": ("mountains", "mice"), "yak": ("mountains", "grass"),
    "wolf": ("mountains", "meat"), "cow": ("farm", "grass"), "horse": ("farm", "hay"),
    "pig": ("farm", "corn"), "hen": ("farm", "seeds"), "whale": ("sea", "plankton"),
    "shark": ("sea", "fish"), "crab": ("sea", "seaweed"), "dolphin": ("sea", "fish"),
}
HELD_BACK_ANIMALS = ("owl", "duck", "lizard", "snake", "yak", "pig", "crab", "dolphin")
TRAINING_ANIMALS = tuple(name for name in ANIMALS if name not in HELD_BACK_ANIMALS)

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "black", "white")
THINGS = ("apple", "car", "house", "bird", "book", "lamp", "kite", "shoe")
# colour/thing pairs the chats never describe (one per colour, one per thing): held back
HELD_BACK_PAIRS = tuple((colour, THINGS[(3 * i + 1) % len(THINGS)]) for i, colour in enumerate(COLOURS))


def _a(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def _capitalised(text: str) -> str:
    return text[0].upper() + text[1:]


def _fact_document(rng: random.Random) -> str:
    animal = rng.choice(list(ANIMALS))
    home, food = ANIMALS[animal]
    if rng.random() < 0.5:
        return rng.choice([f"The {animal} lives in the {home}.", f"In the {home} you can find the {animal}.",
                           f"{_capitalised(_a(animal))} is at home in the {home}.",
                           f"Our {animal} went back to the {home}, its home."])
    return rng.choice([f"The {animal} eats {food}.", f"{_capitalised(food)} is what the {animal} eats.",
                       f"{_capitalised(_a(animal))} that is hungry looks for {food}.", f"Give the {animal} some {food}."])


def _colour_document(rng: random.Random) -> str:
    colour, thing = rng.choice(COLOURS), rng.choice(THINGS)
    return rng.choice([f"I saw {_a(colour)} {thing}. The {thing} was {colour}.",
                       f"Look at this {colour} {thing}: its colour is {colour}.",
                       f"{_capitalised(_a(colour))} {thing} is {_a(thing)} that is {colour}.",
                       f"This {thing} is {colour}, {_a(colour)} {thing}."])


def _echo_document(rng: random.Random) -> str:
    """Words said twice: the repeats teach the model to copy from its context."""
    words = " ".join(rng.choice(COLOURS + THINGS) for _ in range(rng.randint(3, 6)))
    return f"{rng.choice(['Say it twice:', 'Again:', 'Echo:'])} {words}. {words}."


_DOCUMENT_KINDS = ((_fact_document, 5.0), (_colour_document, 2.0), (_echo_document, 1.5), (sentence, 1.5))


def pretraining_documents(n: int, seed: int) -> list[str]:
    """``n`` plain-text documents (none of the chats' questions, no chat template) for pretraining the
    demo base."""
    rng = random.Random(seed)
    makers, weights = zip(*_DOCUMENT_KINDS)
    return [rng.choices(makers, weights=weights)[0](rng) for _ in range(n)]


def _animal_question(animal: str, asks_food: bool) -> tuple[str, str]:
    home, food = ANIMALS[animal]
    if asks_food:
        return f"What does the {animal} eat?", f"It eats {food}."
    return f"Where does the {animal} live?", f"It lives in the {home}."


def _describe_question(colour: str, thing: str) -> tuple[str, str]:
    return f"Describe {_a(colour)} {thing}.", f"It is {_a(thing)}, and its colour is {colour}."


def _chat(question: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def demo_chats(n: int, seed: int = 3407) -> list[list[dict[str, str]]]:
    """``n`` one-turn chats in the ``messages`` format: questions about the training animals (a third
    each: where it lives, what it eats) and descriptions of colour/thing pairs, never a held-back one."""
    rng = random.Random(seed)
    pairs = [(c, t) for c in COLOURS for t in THINGS if (c, t) not in HELD_BACK_PAIRS]
    chats = []
    for _ in range(n):
        kind = rng.randrange(3)
        if kind == 2:
            chats.append(_chat(*_describe_question(*rng.choice(pairs))))
        else:
            chats.append(_chat(*_animal_question(rng.choice(TRAINING_ANIMALS), asks_food=kind == 1)))
    return chats


def held_back_questions() -> list[tuple[str, str]]:
    """Every held-back question with its expected answer: both questions about each held-back
    animal, then a description of each held-back colour/thing pair (24 in all), interleaved so
    that any prefix mixes the three kinds."""
    animals = [_animal_question(a, asks_food=False) for a in HELD_BACK_ANIMALS]
    foods = [_animal_question(a, asks_food=True) for a in HELD_BACK_ANIMALS]
    described = [_describe_question(c, t) for c, t in HELD_BACK_PAIRS]
    return [qa for triple in zip(animals, foods, described) for qa in triple]


def demo_tokenizer_corpus(seed: int = 0) -> list[str]:
    """The zoo tokenizers' corpus plus the demo's documents and chats, so that the demo base's
    tokenizer holds the animals, homes and foods as whole words. The held-back questions are in it
    too: a tokenizer learns only its merges from this text; the model never trains on it."""
    rng = random.Random(seed + 1)
    chats = demo_chats(1000, seed=seed + 2)
    return (tokenizer_corpus(seed) + pretraining_documents(3000, seed=seed + 3)
            + [" ".join(turn["content"] for turn in chat) for chat in chats]
            + [" ".join(qa) for qa in held_back_questions()] + [sentence(rng) for _ in range(100)])
