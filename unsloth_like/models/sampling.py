"""vLLM's sampling vocabulary on transformers' ``generate``: ``SamplingParams`` in, ``RequestOutput``
out, as Unsloth's GRPO notebooks use them through ``model.fast_generate``.

``SamplingParams`` here has vLLM's field names, defaults and checks (``max_tokens=16``;
``temperature`` below 1e-5 means greedy; ``top_k`` 0 or -1 means no top-k). A vLLM
``SamplingParams`` object is read the same way, field by field, so code written for vLLM passes
its own objects. Fields ``generate`` has no equivalent for (presence/frequency penalties, log-probs,
logit bias, structured outputs, ...) are refused when set, never dropped.

The outputs have vLLM's shape (``outputs[i].outputs[j].text``): a completion ends at the first EOS
or stop token (kept in ``token_ids``, not in ``text``) or stop string (cut from ``text`` unless
``include_stop_str_in_output``), with ``finish_reason`` "stop", else "length".
"""

from __future__ import annotations

import dataclasses

# vLLM fields this path cannot honour, with the value that means "unset"
UNSUPPORTED_FIELDS = {"presence_penalty": 0.0, "frequency_penalty": 0.0, "logprobs": None, "prompt_logprobs": None,
                      "logit_bias": None, "allowed_token_ids": None, "bad_words": None, "structured_outputs": None,
                      "guided_decoding": None, "logits_processors": None, "truncate_prompt_tokens": None}
GREEDY_BELOW = 1e-5  # vLLM's threshold


@dataclasses.dataclass
class SamplingParams:
    """vLLM's ``SamplingParams`` fields that transformers' ``generate`` can honour (same defaults)."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    detokenize: bool = True

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.seed == -1:
            self.seed = None
        check_sampling(self)


def check_sampling(params) -> None:
    """vLLM's own checks, with one sentence each."""
    if params.n < 1:
        raise ValueError(f"SamplingParams(n={params.n}) must be at least 1.")
    if params.temperature < 0:
        raise ValueError(f"SamplingParams(temperature={params.temperature}) must be non-negative.")
    if not 0 < params.top_p <= 1:
        raise ValueError(f"SamplingParams(top_p={params.top_p}) must be in (0, 1].")
    if params.top_k < -1:
        raise ValueError(f"SamplingParams(top_k={params.top_k}) must be -1 or 0 (no top-k) or a positive count.")
    if not 0 <= params.min_p <= 1:
        raise ValueError(f"SamplingParams(min_p={params.min_p}) must be in [0, 1].")
    if params.max_tokens is not None and params.max_tokens < 1:
        raise ValueError(f"SamplingParams(max_tokens={params.max_tokens}) must be at least 1.")
    if params.max_tokens is not None and params.min_tokens > params.max_tokens:
        raise ValueError(f"SamplingParams(min_tokens={params.min_tokens}) exceeds max_tokens={params.max_tokens}.")
    if any(not stop for stop in params.stop):
        raise ValueError("SamplingParams(stop=...) holds an empty string; remove it.")
    if params.temperature < GREEDY_BELOW and params.n > 1:
        raise ValueError(f"SamplingParams(temperature={params.temperature}) is greedy and gives one completion; "
                         f"n={params.n} needs a temperature above 0.")


def as_sampling_params(params) -> SamplingParams:
    """``params`` (ours, vLLM's, or None: vLLM's defaults) as our ``SamplingParams``; a vLLM field
    that ``generate`` cannot honour raises when it is set."""
    if params is None:
        return SamplingParams()
    if isinstance(params, SamplingParams):
        return params
    if isinstance(params, dict):
        return SamplingParams(**params)
    for name, unset in UNSUPPORTED_FIELDS.items():
        value = getattr(params, name, unset)
        if value is not None and value != unset:
            raise ValueError(f"SamplingParams({name}={value!r}) is not supported by the transformers generate path "
                             "(vLLM is not in use); leave it unset.")
    values = {f.name: getattr(params, f.name) for f in dataclasses.fields(SamplingParams) if hasattr(params, f.name)}
    values["top_k"] = 0 if values.get("top_k") in (None, -1) else values["top_k"]
    values["min_p"] = values.get("min_p") or 0.0
    return SamplingParams(**values)


def generation_settings(params: SamplingParams, eos_ids: list[int], pad_id: int | None) -> dict:
    """A fresh ``GenerationConfig``'s fields that sample as ``params`` asks: every sampling field
    is set, so the model's own generation defaults (top_k=50, say) do not leak in."""
    greedy = params.temperature < GREEDY_BELOW
    stop_ids = list(params.stop_token_ids) + ([] if params.ignore_eos else list(eos_ids))
    settings = {
        "do_sample": not greedy, "num_return_sequences": params.n, "max_new_tokens": params.max_tokens,
        "min_new_tokens": params.min_tokens or None, "repetition_penalty": params.repetition_penalty,
        "eos_token_id": list(dict.fromkeys(stop_ids)) or None, "pad_token_id": pad_id,
    }
    if not greedy:  # (greedy: GenerationConfig's neutral defaults, which it expects unchanged)
        settings.update(temperature=params.temperature, top_p=params.top_p, top_k=max(params.top_k, 0),
                        min_p=params.min_p or None)
    if params.stop:
        settings["stop_strings"] = list(params.stop)
    return settings


@dataclasses.dataclass
class CompletionOutput:
    """One sampled completion, as vLLM's ``CompletionOutput``."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: None = None
    finish_reason: str | None = None  # "stop" or "length"
    stop_reason: int | str | None = None  # None: EOS; int: a stop token; str: a stop string

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass
class RequestOutput:
    """The completions of one prompt, as vLLM's ``RequestOutput``."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True
    lora_request: object = None


def completion(index: int, generated: list[int], params: SamplingParams, eos_ids: set[int], tokenizer) -> CompletionOutput:
    """The ``CompletionOutput`` of the tokens ``generate`` produced after the prompt (padding after
    the end included): cut at the first EOS / stop token, else at the first stop string."""
    stop_ids, eos_ids = set(params.stop_token_ids), set() if params.ignore_eos else set(eos_ids)
    for position, token in enumerate(generated):
        if token in stop_ids or token in eos_ids:
            kept = generated[:position + 1]
            shown = kept if token in stop_ids and params.include_stop_str_in_output else kept[:-1]
            return CompletionOutput(index, _decode(tokenizer, shown, params), kept, finish_reason="stop",
                                    stop_reason=None if token in eos_ids and token not in stop_ids else token)
    text = _decode(tokenizer, generated, params)
    hit = _first_stop_string(text, params.stop)
    if hit is not None:
        start, stop = hit
        end = start + len(stop) if params.include_stop_str_in_output else start
        return CompletionOutput(index, text[:end], _tokens_through(generated, stop, tokenizer, params),
                                finish_reason="stop", stop_reason=stop)
    return CompletionOutput(index, text, list(generated), finish_reason="length")


def _decode(tokenizer, ids: list[int], params: SamplingParams) -> str:
    if not params.detokenize:
        return ""
    return tokenizer.decode(ids, skip_special_tokens=params.skip_special_tokens)


def _first_stop_string(text: str, stops: list[str]) -> tuple[int, str] | None:
    found = [(text.find(stop), stop) for stop in stops if stop in text]
    return min(found) if found else None


def _tokens_through(generated: list[int], stop: str, tokenizer, params: SamplingParams) -> list[int]:
    """The shortest prefix of ``generated`` whose text holds ``stop`` (generation stopped at the token
    that completed it; a batch neighbour may have padded past it)."""
    low, high = 1, len(generated)
    while low < high:
        middle = (low + high) // 2
        if stop in tokenizer.decode(generated[:middle], skip_special_tokens=params.skip_special_tokens):
            high = middle
        else:
            low = middle + 1
    return list(generated[:high])
