"""The items of the llama_int8_mc lm-eval task (llama_int8_mc.yaml), read from items.jsonl beside
this file: {"question", "choices" (4 texts), "answer" (the right choice's index)} per line."""

from __future__ import annotations

import json
from pathlib import Path

ITEMS = Path(__file__).with_name("items.jsonl")


def load(**_metadata):
    """The items as a datasets.DatasetDict with one split, test (lm-eval passes its metadata too)."""
    import datasets

    rows = [json.loads(line) for line in ITEMS.read_text().splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
