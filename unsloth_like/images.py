"""Images as datasets hold them, turned into RGB PIL images, and resized as the collator asks.

``load_image`` accepts what vision datasets and chat messages carry: a PIL image, a local path
(or ``file://`` URL), an ``http(s)`` URL, a ``data:image/...;base64,`` URI, raw bytes, or the
dict a Hugging Face ``Image`` feature stores undecoded (``{"bytes": ..., "path": ...}``). A file
that is not there, or bytes that are not an image, are an error naming what was given; nothing
is silently replaced by a blank image.

``resize_image`` follows Unsloth's ``resize=`` semantics: an int bounds one side (``dimension``:
0 width, 1 height, ``"max"``/``"min"`` the longer/shorter side) and only ever shrinks, keeping the
aspect ratio; a ``(width, height)`` pair resizes to exactly that size.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

_URL_TIMEOUT_S = 30


def load_image(source, *, where: str = "an image"):
    """``source`` as an RGB ``PIL.Image`` (see the module docstring); ``where`` names it in errors."""
    from PIL import Image

    if isinstance(source, Image.Image):
        return source if source.mode == "RGB" else source.convert("RGB")
    if isinstance(source, dict):
        if source.get("bytes") is not None:
            return load_image(source["bytes"], where=where)
        for key in ("path", "url", "image"):
            if source.get(key) is not None:
                return load_image(source[key], where=where)
        raise ValueError(f"{where} is a dict without 'bytes', 'path', 'url' or 'image' (keys: {sorted(source)}).")
    if isinstance(source, (bytes, bytearray)):
        return _open(io.BytesIO(source), where)
    if isinstance(source, (str, Path)):
        text = str(source)
        if text.startswith("data:image"):
            return _open(io.BytesIO(base64.b64decode(text.split(",", 1)[1])), where)
        if text.startswith(("http://", "https://")):
            return _open(io.BytesIO(_download(text, where)), where)
        path = Path(text[len("file://"):] if text.startswith("file://") else text).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{where}: image file {path} does not exist.")
        return _open(path, where)
    raise TypeError(f"{where} is a {type(source).__name__}; give a PIL image, a path, a URL, bytes or "
                    "{'bytes': ..., 'path': ...}.")


def _open(file, where: str):
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(file)
        image.load()
    except UnidentifiedImageError as error:
        raise ValueError(f"{where} is not an image Pillow can read ({error}).") from None
    return image.convert("RGB")


def _download(url: str, where: str) -> bytes:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=_URL_TIMEOUT_S) as response:
            return response.read()
    except OSError as error:
        raise OSError(f"{where}: could not download {url} ({error}); download the images first and pass "
                      "local paths or PIL images.") from error


def resize_image(image, size, dimension=0):
    """``image`` resized per ``size`` (None, an int bound, or an exact ``(width, height)``)."""
    if size is None:
        return image
    if isinstance(size, (tuple, list)):
        width, height = (int(v) for v in size)
        return image if image.size == (width, height) else image.resize((width, height))
    width, height = image.size
    side = {0: width, 1: height, "max": max(width, height), "min": min(width, height)}[dimension]
    if side <= size:
        return image
    scale = size / side
    return image.resize((max(1, round(width * scale)), max(1, round(height * scale))))


def check_resize(resize, dimension) -> None:
    """Raise on a ``resize`` / ``resize_dimension`` the collator cannot use."""
    valid = (resize in ("min", "max") or (isinstance(resize, int) and not isinstance(resize, bool) and resize > 0)
             or (isinstance(resize, (tuple, list)) and len(resize) == 2
                 and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in resize)))
    if not valid:
        raise ValueError(f"resize must be 'min', 'max', a positive int or a (width, height) pair, got {resize!r}.")
    if dimension not in (0, 1, "max", "min"):
        raise ValueError(f"resize_dimension must be 0 (width), 1 (height), 'max' or 'min', got {dimension!r}.")
