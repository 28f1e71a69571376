"""``unsloth-like chat``: talk to a model from the terminal, multi-turn, answers streamed as they
are generated.

The source is a model directory or an adapter directory (loaded as ``FastLanguageModel`` loads it,
answers from ``generate`` with the tokenizer's chat template), or a ``.gguf`` file (run by
llama.cpp through llama-cpp-python, with the chat template the file carries). Lines typed are the
user's turns; ``/reset`` starts a new conversation, ``/exit`` (or end of input) quits.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TextIO

COMMANDS = {"/exit": "quit", "/reset": "start a new conversation"}


@dataclass
class ChatSettings:
    source: Path
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    system: str | None = None
    load_in_4bit: bool = False
    history: list[dict[str, str]] = field(default_factory=list)


def check_source(source: Path) -> None:
    """One sentence when ``source`` cannot be chatted with, before anything is loaded."""
    if source.is_file():
        if source.suffix != ".gguf":
            raise ValueError(f"{source} is a file but not a .gguf; pass a GGUF file, a model directory or an "
                             "adapter directory.")
        return
    if not source.is_dir():
        raise ValueError(f"{source} does not exist; pass a GGUF file, a model directory or an adapter directory.")
    if not ((source / "config.json").is_file() or (source / "adapter_config.json").is_file()):
        raise ValueError(f"{source} has neither config.json nor adapter_config.json; it is not a model or an "
                         "adapter directory.")


def run_chat(settings: ChatSettings, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> int:
    """The read-answer loop; returns the number of answers given."""
    check_source(settings.source)
    answer = _gguf_answerer(settings) if settings.source.is_file() else _transformers_answerer(settings)
    stdout.write(f"Chatting with {settings.source} ({', '.join(f'{k}: {v}' for k, v in COMMANDS.items())}).\n")
    answers = 0
    while True:
        stdout.write(">>> ")
        stdout.flush()
        line = stdin.readline()
        if not line or line.strip() == "/exit":
            stdout.write("\n")
            return answers
        text = line.strip()
        if not text:
            continue
        if text == "/reset":
            settings.history.clear()
            stdout.write("(new conversation)\n")
            continue
        settings.history.append({"role": "user", "content": text})
        reply = answer(_messages(settings), lambda piece: (stdout.write(piece), stdout.flush()))
        stdout.write("\n")
        settings.history.append({"role": "assistant", "content": reply})
        answers += 1


def _messages(settings: ChatSettings) -> list[dict[str, str]]:
    system = [{"role": "system", "content": settings.system}] if settings.system else []
    return system + settings.history


def _transformers_answerer(settings: ChatSettings) -> Callable:
    from transformers import TextIteratorStreamer

    from .models.loader import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(str(settings.source), load_in_4bit=settings.load_in_4bit)
    FastLanguageModel.for_inference(model)

    def answer(messages, emit) -> str:
        import threading

        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                            return_dict=True, return_tensors="pt")["input_ids"]
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        sampling = ({"do_sample": True, "temperature": settings.temperature} if settings.temperature > 0
                    else {"do_sample": False})
        arguments = dict(input_ids=ids.to(next(model.parameters()).device), max_new_tokens=settings.max_new_tokens,
                         streamer=streamer, pad_token_id=tokenizer.pad_token_id, **sampling)
        failures: list[BaseException] = []
        worker = threading.Thread(target=_generate, args=(model, arguments, streamer, failures), daemon=True)
        worker.start()
        pieces = []
        for piece in streamer:  # generate runs in the worker; its text arrives here as it is made
            pieces.append(piece)
            emit(piece)
        worker.join()
        if failures:
            raise failures[0]
        return "".join(pieces).strip()

    return answer


def _generate(model, arguments: dict, streamer, failures: list) -> None:
    import torch

    try:
        with torch.no_grad():
            model.generate(**arguments)
    except BaseException as error:  # handed to the reading thread, which would otherwise wait forever
        failures.append(error)
        streamer.end()


def _gguf_answerer(settings: ChatSettings) -> Callable:
    try:
        import llama_cpp
    except ImportError as error:
        raise ImportError("Chatting with a GGUF file needs llama-cpp-python: pip install 'unsloth-like[gguf-check]'.") \
            from error
    llm = llama_cpp.Llama(model_path=str(settings.source), n_ctx=4096, verbose=False, seed=0)

    def answer(messages, emit) -> str:
        pieces = []
        for chunk in llm.create_chat_completion(messages=messages, max_tokens=settings.max_new_tokens,
                                                temperature=settings.temperature, stream=True):
            piece = chunk["choices"][0]["delta"].get("content") or ""
            pieces.append(piece)
            emit(piece)
        return "".join(pieces).strip()

    return answer
