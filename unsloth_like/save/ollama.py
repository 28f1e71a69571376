"""The Ollama ``Modelfile`` written next to a GGUF export.

``build_modelfile(tokenizer, "model.Q8_0.gguf")`` gives::

    FROM ./model.Q8_0.gguf
    TEMPLATE \"\"\"<the Go template of the chat format>\"\"\"
    PARAMETER stop "<turn end>"
    SYSTEM \"\"\"<the default system message, when the format has one>\"\"\"

Which chat format: the ``CHAT_TEMPLATES`` record whose rendering equals the tokenizer's
**actual** chat template, never a guess from the model's name (a Llama checkpoint trained with
ChatML must be served with ChatML). ``ollama_template_for`` first reads the identity comment
``get_chat_template`` puts at the top of the template and checks that the template still
renders like that record; a template without the comment (a model's official template) is
identified by rendering a fixed set of conversations with it and with every record. When no
record matches, the Modelfile has no TEMPLATE (Ollama then relies on the chat template
embedded in the GGUF metadata) and a warning says so.

Ollama 0.30+ may render the Jinja template embedded in the GGUF instead of TEMPLATE when that
one looks more capable (``shouldPreferChatTemplate`` in ``server/images.go``: it mentions
tools, as ours do in their tools guard), unless ``OLLAMA_GO_TEMPLATE`` is set; so the embedded
template must render the same text in llama.cpp's Jinja engine too.

Quoting follows Ollama's parser (``parser/parser.go``): a value ends at the first line end
where its quotes are closed, so multi-line values go in ``\"\"\"...\"\"\"``; there are no
escapes, so a value containing ``\"\"\"`` cannot be written and is refused, and characters the
parser drops silently (control and format characters other than newline, carriage return and
tab) are refused rather than lost.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..chat_templates import CHAT_TEMPLATES, ChatTemplate, build_jinja, chat_template_spec

logger = logging.getLogger(__name__)

__all__ = ["build_modelfile", "ollama_template_for", "write_modelfile"]

MODELFILE_NAME = "Modelfile"

# Probe conversations: with and without a system message, one and several turns, ending with a
# user turn (rendered with the generation prompt) or an assistant turn (without). Contents have
# no surrounding whitespace: Ollama's Go templates cannot trim, so a template that trims
# (Llama 3, Gemma) renders like its Go counterpart exactly on such contents.
_S = {"role": "system", "content": "You answer briefly."}
_U1 = {"role": "user", "content": "What is 2+2?"}
_A1 = {"role": "assistant", "content": "4."}
_U2 = {"role": "user", "content": "And 3+3?\nShow the sum."}
_A2 = {"role": "assistant", "content": "3+3 = 6.\nDone."}
PROBES: tuple[tuple[tuple[dict[str, str], ...], bool], ...] = (
    ((_U1,), True),
    ((_U1, _A1), False),
    ((_S, _U1), True),
    ((_S, _U1, _A1), False),
    ((_U1, _A1, _U2), True),
    ((_S, _U1, _A1, _U2), True),
    ((_U1, _A1, _U2, _A2), False),
    ((_S, _U1, _A1, _U2, _A2), False),
)
# Stands in for the default system message when reading it off a template's rendering.
_SENTINEL = "<<unsloth_like: default system message>>"
_RAISES = object()  # the outcome of a render that raised
_PARAMETER_NAME_RE = re.compile(r"[A-Za-z0-9_]+")  # what Ollama's parser takes after PARAMETER
_ALLOWED_CONTROLS = frozenset("\n\r\t")  # non-printable characters Ollama's parser keeps


# --------------------------------------------------------------------------------------------
# Which record renders like the tokenizer's template
# --------------------------------------------------------------------------------------------

def ollama_template_for(tokenizer) -> ChatTemplate | None:
    """The ``CHAT_TEMPLATES`` record that renders exactly like ``tokenizer``'s chat template,
    with ``default_system_message`` set to the one the template inserts; ``None`` when the
    tokenizer has no chat template or no record renders like it.

    Identical renderings are interchangeable (e.g. ``chatml`` and ``qwen-3``): they share their
    Ollama template and stops, and the first record in ``CHAT_TEMPLATES`` order is returned.
    """
    if not _chat_template_text(tokenizer):
        return None
    own = [_outcome(tokenizer, messages, prompt, None) for messages, prompt in PROBES]
    header = _header_record(tokenizer)
    if header is not None:
        if _renders_like(tokenizer, build_jinja(header), own):
            return header
        logger.warning("The tokenizer's chat template names the %r format in its header but renders "
                       "differently (it was edited after get_chat_template); identifying it by its "
                       "rendering instead.", header.name)
    for record in CHAT_TEMPLATES.values():
        for system in _system_candidates(tokenizer, record, own[0]):
            if _renders_like(tokenizer, _jinja_with_system(record, system), own):
                return replace(record, default_system_message=system)
    return None


def _chat_template_text(tokenizer) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: apply_chat_template uses "default"
        template = template.get("default")
    return template if isinstance(template, str) and template.strip() else None


def _header_record(tokenizer) -> ChatTemplate | None:
    """The record named by ``get_chat_template``'s identity comment, or built from the
    ``{INPUT}``/``{OUTPUT}`` prompt it records (custom Jinja templates have no Ollama counterpart
    of their own, so they are identified by rendering like the others)."""
    try:
        spec = chat_template_spec(tokenizer)
    except ValueError:  # no identity comment
        return None
    return spec if spec.name in CHAT_TEMPLATES or spec.prompt is not None else None


def _outcome(tokenizer, messages, add_generation_prompt: bool, template: str | None) -> Any:
    """The rendered text, or ``_RAISES``: a template refusing a conversation is behaviour too."""
    try:
        return tokenizer.apply_chat_template(list(messages), chat_template=template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except Exception:  # noqa: BLE001 - any failure of a template is "this probe raises"
        return _RAISES


def _renders_like(tokenizer, template: str, own: list[Any]) -> bool:
    return all(_outcome(tokenizer, messages, prompt, template) == want
               for (messages, prompt), want in zip(PROBES, own))


def _jinja_with_system(record: ChatTemplate, system: str | None) -> str:
    # build_jinja falls back to the record's default when given None, so drop the default first.
    return build_jinja(replace(record, default_system_message=system))


def _system_candidates(tokenizer, record: ChatTemplate, own_first: Any) -> list[str | None]:
    """Default system messages worth trying: the one read off the tokenizer's rendering of the
    first probe, which has no system message (a custom default), the record's, and none."""
    candidates = [_default_system_in_use(tokenizer, record, own_first), record.default_system_message, None]
    return list(dict.fromkeys(c for c in candidates if c != ""))


def _default_system_in_use(tokenizer, record: ChatTemplate, own: Any) -> str | None:
    """Where ``record`` puts a system message (found with a sentinel), the text the tokenizer's
    template puts there (``own``: its rendering of the first probe, which has no system
    message); None when the two renderings differ elsewhere."""
    messages, prompt = PROBES[0]
    marked = _outcome(tokenizer, messages, prompt, _jinja_with_system(record, _SENTINEL))
    if _RAISES in (marked, own) or marked.count(_SENTINEL) != 1:
        return None
    before, after = marked.split(_SENTINEL)
    if len(own) < len(before) + len(after) or not (own.startswith(before) and own.endswith(after)):
        return None
    return own[len(before):len(own) - len(after)]


# --------------------------------------------------------------------------------------------
# The Modelfile
# --------------------------------------------------------------------------------------------

def build_modelfile(tokenizer, gguf_filename: str, system_message: str | None = None,
                    parameters: dict[str, Any] | None = None) -> str:
    """The Modelfile text for ``gguf_filename`` (a file in the Modelfile's directory).

    ``system_message`` replaces the chat format's default system message (Ollama's ``SYSTEM``,
    inserted as the first message of conversations that have none). ``parameters`` adds
    ``PARAMETER`` lines, e.g. ``{"temperature": 0.7, "num_ctx": 4096}``; a ``"stop"`` entry
    adds stop strings to the format's own.
    """
    parameters = dict(parameters or {})
    lines = [f"FROM ./{_checked_filename(gguf_filename)}"]  # checked first: identifying is slower
    spec = ollama_template_for(tokenizer)
    if spec is None:
        logger.warning(_no_template_warning(tokenizer))
        stops: tuple[str, ...] = (tokenizer.eos_token,) if tokenizer.eos_token else ()
    else:
        template, stops = _ollama_parts(spec, tokenizer)
        lines.append(f"TEMPLATE {_quote(template, 'The Ollama template of ' + repr(spec.name))}")
    extra_stops = [str(s) for s in _as_list(parameters.pop("stop", []))]
    for stop in dict.fromkeys([*stops, *extra_stops]):
        lines.append(f"PARAMETER stop {_quote(stop, 'The stop string ' + repr(stop))}")
    lines += _parameter_lines(parameters)
    system = system_message
    if system is None and spec is not None:
        system = spec.default_system_message
    lines += _system_lines(system)
    return "\n".join(lines) + "\n"


def _ollama_parts(spec: ChatTemplate, tokenizer) -> tuple[str, tuple[str, ...]]:
    if spec.stop_token is None and not tokenizer.eos_token:
        raise ValueError(f"The {spec.name} chat template ends turns with the tokenizer's EOS token, but the "
                         "tokenizer has none; set tokenizer.eos_token before exporting.")
    return spec.ollama(tokenizer.eos_token)


def _no_template_warning(tokenizer) -> str:
    if not _chat_template_text(tokenizer):
        return ("The tokenizer has no chat template, so the Modelfile has no TEMPLATE and Ollama will "
                "pass prompts to the model unformatted; add a TEMPLATE to the Modelfile for chat use.")
    return ("No built-in chat template renders like this tokenizer's chat template, so the Modelfile "
            "has no TEMPLATE and Ollama will use the chat template embedded in the GGUF metadata; add "
            "a TEMPLATE to the Modelfile if chats come out wrongly formatted.")


def _system_lines(system: str | None) -> list[str]:
    if system is None:
        return []
    if system == "":  # Ollama ignores an empty SYSTEM, so the template's empty system turn is lost
        logger.warning("The system message is empty, which a Modelfile cannot express (Ollama ignores an "
                       "empty SYSTEM), so Ollama will render conversations without a system message.")
        return []
    return [f"SYSTEM {_quote(system, 'The system message')}"]


def _parameter_lines(parameters: dict[str, Any]) -> list[str]:
    lines = []
    for name, value in parameters.items():
        if not isinstance(name, str) or not _PARAMETER_NAME_RE.fullmatch(name):
            raise ValueError(f"Ollama parameter names are letters, digits and underscores; got {name!r}.")
        for item in _as_list(value):
            lines.append(f"PARAMETER {name} {_parameter_value(name, item)}")
    return lines


def _parameter_value(name: str, value: Any) -> str:
    if isinstance(value, bool):  # before int: bool is an int
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return _quote(value, f"The value of parameter {name!r}")
    raise TypeError(f"Parameter {name!r} must be a string, number or boolean (or a list of them), "
                    f"got {type(value).__name__}.")


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _quote(value: str, what: str) -> str:
    """``value`` as a Modelfile value that Ollama's parser reads back unchanged."""
    dropped = sorted({c for c in value if not c.isprintable() and c not in _ALLOWED_CONTROLS})
    if dropped:
        raise ValueError(f"{what} contains the characters {dropped}, which Ollama's Modelfile parser drops "
                         "silently; remove them.")
    if '"""' in value:
        raise ValueError(f'{what} contains """, which ends a Modelfile value early and cannot be escaped; '
                         'rewrite it without three double quotes in a row.')
    single = f'"{value}"'
    # One pair of quotes suffices for one line; but '"' + value starting with '""' would read as
    # an opening '"""', and a line ending in '"' inside a multi-line value would close it.
    if "\n" not in value and "\r" not in value and not single.startswith('"""'):
        return single
    return f'"""{value}"""'


def _checked_filename(gguf_filename: str) -> str:
    """A file name that ``FROM ./name`` resolves next to the Modelfile."""
    name = os.fspath(gguf_filename)
    if name in ("", ".", "..") or os.path.basename(name) != name or "/" in name or "\\" in name:
        raise ValueError(f"gguf_filename must be a file name in the Modelfile's directory, got {name!r}.")
    if name != name.strip() or not name.isprintable():
        raise ValueError(f"gguf_filename {name!r} has surrounding whitespace or control characters, which "
                         "Ollama's Modelfile parser would change; rename the file.")
    return name


def write_modelfile(directory: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``directory/Modelfile`` atomically (a killed export never leaves half a
    Modelfile) and return its path."""
    target = Path(directory) / MODELFILE_NAME
    staging = target.with_name(f".{MODELFILE_NAME}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    # os.open with 0o666 honours the umask, as a plain open() would (mkstemp would make it private).
    fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:  # newline="": bytes as given
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(staging, target)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    return target
