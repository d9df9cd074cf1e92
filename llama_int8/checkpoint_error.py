"""What a bad checkpoint file raises, and the JSON reader that raises it: shared by formats/ and the
tokenizer (which reads the JSON files beside a tokenizer), kept apart so neither imports the other."""

from __future__ import annotations

import json
from pathlib import Path


class CheckpointError(ValueError):
    """A checkpoint is missing, malformed or does not match the model it describes."""


def read_json(path: Path) -> dict:
    """A checkpoint's JSON file, which must hold an object."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data
