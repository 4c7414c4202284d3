"""Text files users point the toolkit at (configs, prompt lists, model JSON): read with a size cap and a strict
encoding, so a wrong path (a folder, /dev/zero, an image, a 5 GB log) is one line, never a traceback or a hang."""
from __future__ import annotations

import json
from pathlib import Path

from .errors import FlowalignError

MiB = 1 << 20
#: Caps on what is read whole into memory.
MAX_CONFIG_BYTES = 1 * MiB
MAX_PROMPT_FILE_BYTES = 16 * MiB
MAX_JSON_BYTES = 16 * MiB


def read_text(path: str | Path, what: str, max_bytes: int) -> str:
    """The UTF-8 text of a regular file of at most ``max_bytes``; a one-line FlowalignError naming ``what`` and
    the file otherwise."""
    path = Path(path)
    try:
        if path.is_dir():
            raise FlowalignError(f"{what}: '{path}' is a folder, expected a text file")
        if not path.exists():
            raise FlowalignError(f"{what}: file '{path}' not found")
        if not path.is_file():
            raise FlowalignError(f"{what}: '{path}' is not a regular file (a device or pipe), expected a text file")
        with open(path, "rb") as f:
            raw = f.read(max_bytes + 1)  # never more than the cap, whatever the file claims
    except (OSError, ValueError) as err:  # a name too long to look up, a NUL byte, no permission
        raise FlowalignError(f"{what}: cannot read '{str(path)[:200]}' ({getattr(err, 'strerror', None) or err})") \
            from None
    if len(raw) > max_bytes:
        raise FlowalignError(f"{what}: '{path}' is larger than the limit of {max_bytes // MiB} MiB")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise FlowalignError(f"{what}: '{path}' is not UTF-8 text (byte {err.start})") from None


def read_json(path: str | Path, what: str) -> dict:
    """A JSON object from a file (capped, UTF-8); one line if it is not one."""
    try:
        data = json.loads(read_text(path, what, MAX_JSON_BYTES))
    except (ValueError, RecursionError) as err:
        raise FlowalignError(f"{what}: '{path}' is not valid JSON ({str(err).splitlines()[0][:120]})") from None
    if not isinstance(data, dict):
        raise FlowalignError(f"{what}: '{path}' holds {type(data).__name__}, expected a JSON object")
    return data
