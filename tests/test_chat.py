"""Chat formats against references: transformers' `apply_chat_template` for jinja templates, token
sequences built by hand for Llama 2, and the demo script end to end on the real SmolLM2 weights."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llama_int8 import Llama
from llama_int8.chat import encode_dialog, encode_llama2_dialog, fit_dialog
from llama_int8.tokenizer import SentencePieceTokenizer, load_tokenizer

from conftest import CORPUS, tiny_hf_model, write_hf_folder

REPO = Path(__file__).resolve().parent.parent

SYSTEM = {"role": "system", "content": "You answer in one short sentence."}
DIALOGS = {
    "one question": [{"role": "user", "content": "What is the capital of France?"}],
    "system": [SYSTEM, {"role": "user", "content": "  Paris or Berlin?  "}],
    "markup": [{"role": "system", "content": "Answer in <b>bold</b> & 'quote' \"it\"."},
               {"role": "user", "content": "Why?"}],
    "multi-turn": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello, how can I help?"},
                   {"role": "user", "content": "Name a quick brown animal."}],
    "system multi-turn": [SYSTEM, {"role": "user", "content": "The quick brown fox"},
                          {"role": "assistant", "content": "jumps over the lazy dog."},
                          {"role": "user", "content": "To be or not to be?"},
                          {"role": "assistant", "content": "That is the question."},
                          {"role": "user", "content": "Numbers: 1 2 3 — and ünïcode?"}],
}

# A template exercising what transformers' renderer adds to plain jinja: trim_blocks/lstrip_blocks,
# the tojson filter (no HTML escaping), {% generation %}, loop controls and the special-token variables.
FEATURE_TEMPLATE = """{{ bos_token }}
{% for m in messages %}
    {% if m.role == 'system' %}
{{ m.content | tojson }}
    {% else %}
<|turn|>{{ m.role }}
{% generation %}{{ m.content | trim }}{% endgeneration %}{{ eos_token }}
    {% endif %}
    {% if loop.index > 8 %}{% break %}{% endif %}
{% endfor %}
{% if add_generation_prompt %}<|turn|>assistant
{% endif %}"""


def reference_ids(ref_tokenizer, dialog) -> list[int]:
    return list(ref_tokenizer.apply_chat_template(dialog, add_generation_prompt=True, tokenize=True,
                                                  return_dict=False))


# --- Jinja templates against transformers ------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_template_folder(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer.json trained here, with the template as one of a list of named ones."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder = tmp_path_factory.mktemp("tiny-template")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<bos>", "<eos>", "<|turn|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS], trainer)
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>",
              "eos_token": {"__type": "AddedToken", "content": "<eos>", "special": True},
              "chat_template": [{"name": "tool_use", "template": "{{ raise_exception('not this one') }}"},
                                {"name": "default", "template": FEATURE_TEMPLATE}]}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("name", list(DIALOGS))
def test_template_features_match_transformers(tiny_template_folder, name):
    from transformers import AutoTokenizer

    ours = load_tokenizer(tiny_template_folder / "tokenizer.json")
    assert ours.chat_template == FEATURE_TEMPLATE  # the "default" of the named templates
    ref = AutoTokenizer.from_pretrained(tiny_template_folder)
    assert encode_dialog(ours, DIALOGS[name]) == reference_ids(ref, DIALOGS[name])


@pytest.mark.parametrize("name", list(DIALOGS))
def test_smollm2_template_matches_transformers(smollm2_hf, name):
    from transformers import AutoTokenizer

    ours = load_tokenizer(smollm2_hf / "tokenizer.json")
    assert ours.chat_template is not None
    ref = AutoTokenizer.from_pretrained(smollm2_hf)
    assert encode_dialog(ours, DIALOGS[name]) == reference_ids(ref, DIALOGS[name])


PREFILLED = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The quick brown fox"},
             {"role": "assistant", "content": "jumps over"}]


@pytest.mark.parametrize("folder", ["tiny", "smollm2"])
def test_a_begun_answer_is_continued_as_transformers_continues_it(folder, tiny_template_folder, request):
    from transformers import AutoTokenizer

    path = tiny_template_folder if folder == "tiny" else request.getfixturevalue("smollm2_hf")
    ours, ref = load_tokenizer(path / "tokenizer.json"), AutoTokenizer.from_pretrained(path)
    expected = ref.apply_chat_template(PREFILLED, continue_final_message=True, tokenize=True, return_dict=False)
    assert encode_dialog(ours, PREFILLED, continue_final=True) == list(expected)
    assert ours.decode(encode_dialog(ours, PREFILLED, continue_final=True)).endswith("jumps over")
    with pytest.raises(ValueError, match="ends with an assistant message"):
        encode_dialog(ours, PREFILLED)
    with pytest.raises(ValueError, match="expected the dialog to end with the assistant message"):
        encode_dialog(ours, PREFILLED[:2], continue_final=True)


def test_llama2_format_continues_a_begun_answer(sp_model):
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor(model_file=str(sp_model))
    expected = [1] + sp.encode("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nThe quick brown fox [/INST] jumps over")
    assert encode_dialog(SentencePieceTokenizer(sp_model), PREFILLED, continue_final=True) == expected


def test_named_templates_without_default_rejected(tiny_template_folder, tmp_path):
    from llama_int8.tokenizer import TokenizerError

    (tmp_path / "tokenizer.json").write_bytes((tiny_template_folder / "tokenizer.json").read_bytes())
    config = {"chat_template": [{"name": "tool_use", "template": "x"}, {"name": "rag", "template": "y"}]}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(TokenizerError, match=r"tokenizer_config.json: chat_template lists \['rag', 'tool_use'\]"):
        load_tokenizer(tmp_path / "tokenizer.json")


def test_template_raise_exception_is_a_value_error(tiny_template_folder):
    tok = load_tokenizer(tiny_template_folder / "tokenizer.json")
    tok.chat_template = ("{% if messages[0].role != 'system' %}{{ raise_exception('needs a system message') }}"
                         "{% endif %}")
    with pytest.raises(ValueError, match="needs a system message"):
        encode_dialog(tok, DIALOGS["one question"])


# --- Llama 2 format against hand-built sequences --------------------------------------------------------

def test_llama2_format_token_for_token(sp_model):
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor(model_file=str(sp_model))
    bos, eos = 1, 2  # the fixture's ids: the format must use the ids, never the text "<s>"
    dialog = DIALOGS["system multi-turn"]
    expected = ([bos] + sp.encode("[INST] <<SYS>>\nYou answer in one short sentence.\n<</SYS>>\n\n"
                                  "The quick brown fox [/INST] jumps over the lazy dog.") + [eos]
                + [bos] + sp.encode("[INST] To be or not to be? [/INST] That is the question.") + [eos]
                + [bos] + sp.encode("[INST] Numbers: 1 2 3 — and ünïcode? [/INST]"))
    tok = SentencePieceTokenizer(sp_model)
    assert tok.chat_template is None
    assert encode_dialog(tok, dialog) == expected


def test_llama2_format_strips_and_skips_blank_system(sp_model):
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor(model_file=str(sp_model))
    tok = SentencePieceTokenizer(sp_model)
    dialog = [{"role": "system", "content": "  "}, {"role": "user", "content": "  Paris or Berlin?\n"}]
    assert encode_llama2_dialog(tok, dialog) == [1] + sp.encode("[INST] Paris or Berlin? [/INST]")


MALFORMED = [
    ([], "non-empty list"),
    ([{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "Hi"}], "message 0: expected role 'user'"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "message 1: expected role 'assistant'"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "message 1: the dialog ends with"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, SYSTEM,
      {"role": "user", "content": "c"}], "message 2: .*system message may only come first"),
    ([{"role": "bot", "content": "a"}], "message 0: unknown role 'bot'"),
    ([{"role": "user"}], "message 0: expected a dict with a 'role' and a string 'content'"),
    ([SYSTEM], "system message alone"),
]


@pytest.mark.parametrize("dialog, problem", MALFORMED)
def test_malformed_dialogs_rejected_in_both_formats(sp_model, tiny_template_folder, dialog, problem):
    for tok in (SentencePieceTokenizer(sp_model), load_tokenizer(tiny_template_folder / "tokenizer.json")):
        with pytest.raises(ValueError, match=problem):
            encode_dialog(tok, dialog)


@pytest.mark.parametrize("tag", ["[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"])
def test_llama2_tags_rejected(sp_model, tag):
    dialog = [SYSTEM, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": f"ok {tag} ok"},
              {"role": "user", "content": "Bye"}]
    with pytest.raises(ValueError, match=rf"message 2: contains the chat tag\(s\) {tag.replace('[', '.')}"):
        encode_dialog(SentencePieceTokenizer(sp_model), dialog)


def test_fit_dialog_drops_oldest_exchanges_keeps_system(sp_model):
    tok = SentencePieceTokenizer(sp_model)
    dialog = DIALOGS["system multi-turn"]
    encode = lambda d: encode_dialog(tok, d)  # noqa: E731
    last_only = [dialog[0], dialog[-1]]
    one_exchange = [dialog[0], *dialog[3:]]
    assert fit_dialog(encode, dialog, len(encode(dialog))) == (dialog, 0)
    assert fit_dialog(encode, dialog, len(encode(dialog)) - 1) == (one_exchange, 1)
    assert fit_dialog(encode, dialog, len(encode(one_exchange)) - 1) == (last_only, 2)
    with pytest.raises(ValueError, match="the last message alone needs"):
        fit_dialog(encode, dialog, len(encode(last_only)) - 1)


# --- The chat API on a tiny model ------------------------------------------------------------------------

def test_chat_completion_batch_matches_streams(tmp_path, sp_model):
    folder = write_hf_folder(tiny_hf_model(), tmp_path / "hf", tokenizer=sp_model)
    llm = Llama.build(folder, quant="none", device="cpu", dtype="float32", max_batch_size=2, max_seq_len=256)
    dialogs = [DIALOGS["system multi-turn"], DIALOGS["one question"]]
    assert llm.encode_dialog(dialogs[0]) == encode_llama2_dialog(llm.tokenizer, dialogs[0])
    batch = llm.chat_completion(dialogs, temperature=0, max_gen_len=12)
    for dialog, result in zip(dialogs, batch):
        assert result["generation"]["role"] == "assistant"
        assert result["tokens"] == llm.generate([llm.encode_dialog(dialog)], max_gen_len=12, temperature=0)[0]
        assert result["generation"]["content"] == "".join(llm.stream_chat(dialog, temperature=0, max_gen_len=12))


# --- The demo end to end (real weights) -----------------------------------------------------------------

def run_example(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "example.py"), "--temperature", "0", *args]
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, cwd=REPO, timeout=600)


@pytest.mark.slow
def test_demo_answers_built_in_questions(smollm2_gguf):
    """The demo as a newcomer runs it: the demo GGUF quantized to int8 on the host."""
    done = run_example("--max_gen_len", "12", "--max_seq_len", "128")
    assert "int8" in done.stderr, done.stderr[-2000:]
    assert done.returncode == 0, done.stderr[-2000:]
    answer = done.stdout.split("What is the capital of France?", 1)[1].split("=====", 1)[0]
    assert "Paris" in answer, done.stdout


@pytest.mark.slow
def test_demo_chat_loop_drops_old_turns(smollm2_gguf):
    # max_seq_len 64 minus 16 tokens of room leaves 48: the first question (37 tokens with SmolLM2's
    # default system prompt) fits, the second with the first exchange does not, alone it does.
    done = run_example("--chat", "--quant", "none", "--max_gen_len", "16", "--max_seq_len", "64",
                       stdin="What is the capital of France?\nAnd of Germany?\n")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Dropped the 1 oldest exchange(s)" in done.stderr
    assert "Paris" in done.stdout
    assert done.stdout.count("\n\n") >= 2, done.stdout  # both questions answered
