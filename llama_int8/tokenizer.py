"""Tokenizers: SentencePiece `tokenizer.model` and Hugging Face `tokenizer.json`, behind one interface."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from .checkpoint_error import read_json

if TYPE_CHECKING:
    import tokenizers

log = logging.getLogger(__name__)

# Special tokens that end an assistant's turn in the common chat formats; honoured as stop tokens
# when the tokenizer marks them special.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "<|end|>",
                      "<end_of_turn>", "</s>")


class TokenizerError(ValueError):
    """A tokenizer file is missing or of a kind this project cannot read."""


class Tokenizer(Protocol):
    bos_id: int | None
    eos_id: int | None
    stop_ids: frozenset[int]
    vocab_size: int
    chat_template: str | None  # a jinja chat template; None: chat uses the Llama 2 format

    def encode(self, text: str, bos: bool, eos: bool) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...
    def token_id(self, piece: str) -> int | None: ...


class SentencePieceTokenizer:
    def __init__(self, path: Path):
        from sentencepiece import SentencePieceProcessor

        reject_tiktoken_file(path)
        try:
            self.sp = SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as e:
            raise TokenizerError(f"{path}: not a SentencePiece model ({e})") from e
        self.vocab_size = self.sp.vocab_size()
        self.bos_id = none_if_negative(self.sp.bos_id())
        self.eos_id = none_if_negative(self.sp.eos_id())
        self.stop_ids = frozenset({self.eos_id} - {None})
        self.chat_template: str | None = None  # tokenizer.model carries none: chat uses the Llama 2 format

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of text, with BOS/EOS ids (never their literal text) added on request."""
        ids = self.sp.encode(text)
        return ([self.bos_id] if bos and self.bos_id is not None else []) + ids + (
            [self.eos_id] if eos and self.eos_id is not None else [])

    def decode(self, ids: list[int]) -> str:
        check_decodable(ids, self.vocab_size)
        return self.sp.decode(ids)

    def token_id(self, piece: str) -> int | None:
        i = self.sp.piece_to_id(piece)
        return i if self.sp.id_to_piece(i) == piece else None


def none_if_negative(i: int) -> int | None:
    return None if i < 0 else i


def check_decodable(ids: list[int], vocab_size: int) -> None:
    """Refuse ids the tokenizer has no token for: `tokenizers` would drop them from the text without
    a word, and SentencePiece raises a bare IndexError. A model whose embedding is padded past its
    tokenizer has such ids; Llama.build keeps generation from producing them."""
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise TokenizerError(f"token ids {bad[:5]} cannot be decoded: the tokenizer has ids 0..{vocab_size - 1} "
                             "only (the model's embedding rows past those have no text)")


def reject_tiktoken_file(path: Path) -> None:
    """Llama 3's Meta-format tokenizer.model is a tiktoken BPE table (text lines 'base64 rank')."""
    with open(path, "rb") as f:
        head = f.read(256)
    if re.match(rb"[A-Za-z0-9+/=]+ \d+\n", head):
        raise TokenizerError(f"{path}: this is a tiktoken BPE file (Llama 3's Meta format), not SentencePiece; "
                             "use the Hugging Face tokenizer.json of the same model with --tokenizer_path")


class FastTokenizer:
    """Encoding and decoding through a `tokenizers.Tokenizer` (self.tok), with BOS/EOS ids added by
    this class rather than by the tokenizer's post-processor; subclasses set the ids."""

    tok: tokenizers.Tokenizer
    bos_id: int | None
    eos_id: int | None
    add_bos: bool

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Token ids of text; bos prepends BOS when this tokenizer uses one, eos appends EOS."""
        ids = self.tok.encode(text, add_special_tokens=False).ids
        prefix = [self.bos_id] if bos and self.add_bos and self.bos_id is not None else []
        return prefix + ids + ([self.eos_id] if eos and self.eos_id is not None else [])

    def decode(self, ids: list[int]) -> str:
        check_decodable(ids, self.vocab_size)
        return self.tok.decode(ids, skip_special_tokens=False)

    def token_id(self, piece: str) -> int | None:
        return self.tok.token_to_id(piece)


class HFTokenizer(FastTokenizer):
    """A `tokenizer.json`, with BOS/EOS and stop tokens from the configs that sit beside it."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        try:
            self.tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception subclass for parse errors
            raise TokenizerError(f"{path}: not a valid tokenizer.json ({e})") from e
        folder = path.parent
        tok_cfg = read_optional_json(folder / "tokenizer_config.json")
        gen_cfg = read_optional_json(folder / "generation_config.json")
        model_cfg = read_optional_json(folder / "config.json")
        # Ids, not tokens: added tokens may sit beyond a gap above the base vocabulary.
        self.vocab_size = max(self.tok.get_vocab_size(with_added_tokens=True),
                              max(self.tok.get_added_tokens_decoder(), default=-1) + 1)
        self.bos_id = self.special_id(tok_cfg.get("bos_token"), model_cfg.get("bos_token_id"))
        self.eos_id = self.special_id(tok_cfg.get("eos_token"), model_cfg.get("eos_token_id"))
        # Whether BOS is prepended: the config says so, or the tokenizer's own post-processor adds it.
        self.add_bos = tok_cfg.get("add_bos_token", self.post_processor_adds_bos())
        self.stop_ids = frozenset(self.collect_stop_ids(gen_cfg, model_cfg))
        self.chat_template = read_chat_template(folder, tok_cfg)
        self.special_tokens_map = named_special_tokens(tok_cfg)

    def special_id(self, token: str | dict | None, fallback: int | list | None) -> int | None:
        if isinstance(token, dict):
            token = token.get("content")
        if isinstance(token, str) and self.tok.token_to_id(token) is not None:
            return self.tok.token_to_id(token)
        if isinstance(fallback, list):
            fallback = fallback[0] if fallback else None
        return fallback

    def post_processor_adds_bos(self) -> bool:
        with_special = self.tok.encode("a", add_special_tokens=True).ids
        return self.bos_id is not None and len(with_special) > 0 and with_special[0] == self.bos_id

    def collect_stop_ids(self, gen_cfg: dict, model_cfg: dict) -> set[int]:
        stops = {self.eos_id} - {None}
        for cfg in (gen_cfg, model_cfg):
            ids = cfg.get("eos_token_id")
            stops.update(ids if isinstance(ids, list) else [ids] if isinstance(ids, int) else [])
        special = {t.content for t in self.tok.get_added_tokens_decoder().values() if t.special}
        stops.update(self.tok.token_to_id(t) for t in END_OF_TURN_TOKENS if t in special)
        return stops


def read_chat_template(folder: Path, tok_cfg: dict) -> str | None:
    """The chat template as transformers finds it: chat_template.jinja, else tokenizer_config.json's
    `chat_template` (a string, or a list of named templates of which the "default" one is used)."""
    if (folder / "chat_template.jinja").is_file():
        return read_text_file(folder / "chat_template.jinja")
    template = tok_cfg.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if "default" not in named:
            raise TokenizerError(f"{folder / 'tokenizer_config.json'}: chat_template lists {sorted(map(str, named))} "
                                 "but no 'default' template")
        template = named["default"]
    if template is not None and not isinstance(template, str):
        raise TokenizerError(f"{folder / 'tokenizer_config.json'}: chat_template must be a string or a list "
                             f"of {{name, template}}, got {type(template).__name__}")
    return template


def named_special_tokens(tok_cfg: dict) -> dict[str, str]:
    """bos_token, eos_token, ... as strings (what a chat template sees), from tokenizer_config.json."""
    names = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
    tokens = {name: tok_cfg.get(name) for name in names}
    tokens = {name: t.get("content") if isinstance(t, dict) else t for name, t in tokens.items()}
    return {name: t for name, t in tokens.items() if isinstance(t, str)}


def read_text_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TokenizerError(f"{path}: expected UTF-8 text ({e})") from e


def read_optional_json(path: Path) -> dict:
    """A JSON object beside the tokenizer, {} when the file is absent; CheckpointError naming the
    file when it is not a valid JSON object."""
    return read_json(path) if path.exists() else {}


def find_tokenizer_file(ckpt_dir: Path, tokenizer_path: str | Path | None = None) -> Path:
    """The tokenizer for a checkpoint: the given path (file or folder), else the checkpoint folder's,
    else its parent's (Meta's download puts tokenizer.model beside the size folders)."""
    candidates = [Path(tokenizer_path)] if tokenizer_path is not None else [ckpt_dir, ckpt_dir.parent]
    for place in candidates:
        if place.is_file():
            return place
        for name in ("tokenizer.json", "tokenizer.model"):
            if (place / name).is_file():
                return place / name
    where = " or ".join(str(c) for c in candidates)
    raise TokenizerError(f"no tokenizer.json or tokenizer.model found in {where}; pass --tokenizer_path")


def check_tokenizer_fits(tokenizer: Tokenizer, model_vocab_size: int, model: str | Path) -> None:
    """Refuse a tokenizer whose ids reach past the model's embedding rows (another model's, most
    likely: its ids would index past the table); one with fewer ids than rows (padded embeddings,
    common) is fine and said in one line: the rows it lacks are never generated (Llama.build)."""
    special = [i for i in (tokenizer.bos_id, tokenizer.eos_id, *tokenizer.stop_ids) if i is not None]
    ids = max(tokenizer.vocab_size, max(special, default=-1) + 1)
    if ids > model_vocab_size:
        raise TokenizerError(f"the tokenizer has ids up to {ids - 1}, but the model {model} has {model_vocab_size} "
                             "embedding rows: it is another model's tokenizer; pass the model's own with "
                             "--tokenizer_path")
    lacking = ids_beyond_tokenizer(tokenizer, model_vocab_size)
    if lacking:
        log.info("The tokenizer has %d ids and the model %s %d embedding rows (padded): %d ids of the model "
                 "(%d..%d) cannot be decoded, and are never generated", tokenizer.vocab_size, model,
                 model_vocab_size, len(lacking), lacking[0], lacking[-1])


def ids_beyond_tokenizer(tokenizer: Tokenizer, model_vocab_size: int) -> list[int]:
    """The model's ids the tokenizer has no token for, which generation must never produce; a stop id
    among them stays (a config may name an end-of-text id past the tokenizer: it ends the text
    before anything decodes it)."""
    return [i for i in range(tokenizer.vocab_size, model_vocab_size) if i not in tokenizer.stop_ids]


def load_tokenizer(path: Path) -> Tokenizer:
    if path.suffix == ".json":
        return HFTokenizer(path)
    return SentencePieceTokenizer(path)
