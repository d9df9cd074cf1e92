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
from llama_int8.tool_calls import parser_for_template

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


# --- Tools, tool calls and results against transformers -------------------------------------------------

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "The weather now in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                       "required": ["city"]}}},
    {"type": "function", "function": {"name": "get_time", "description": "The time now in a time zone.",
                                      "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}}}},
]


def openai_call(call_id: str, name: str, **arguments) -> dict:
    """A call as OpenAI's API writes it: its arguments as JSON text."""
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


ASKED = {"role": "user", "content": "What is the weather in Paris?"}
CALLED = {"role": "assistant", "content": None, "tool_calls": [openai_call("call_1", "get_weather", city="Paris")]}
RESULT = {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 18, "unit": "celsius"}'}
CALLED_TWICE = {"role": "assistant", "content": "Let me look.",
                "tool_calls": [openai_call("call_1", "get_weather", city="Paris", unit="celsius"),
                               openai_call("call_2", "get_time", zone="Europe/Paris")]}
TIME_RESULT = {"role": "tool", "tool_call_id": "call_2", "content": "14:05"}
ANSWERED = {"role": "assistant", "content": "It is 18 °C in Paris."}
TOOL_DIALOGS = {
    "tools offered": [SYSTEM, ASKED],
    "call and result": [ASKED, CALLED, RESULT],
    "text with the call": [SYSTEM, ASKED, {**CALLED, "content": "I will check."}, RESULT],
    "answered, next question": [SYSTEM, ASKED, CALLED, RESULT, ANSWERED, {"role": "user", "content": "And Berlin?"}],
    "two calls": [ASKED, CALLED_TWICE, RESULT, TIME_RESULT],
}

# A Hermes-style template (the calls as <tool_call> blocks of {"name", "arguments"}, the results in a
# user turn), written for these tests.
HERMES_STYLE_TEMPLATE = """{{ bos_token }}
{% if tools %}
<|turn|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}

{% endif %}
You may call these functions:
<tools>
{% for tool in tools %}
{{ tool | tojson }}
{% endfor %}
</tools>
Write each call as <tool_call>
{"name": <name>, "arguments": <object>}
</tool_call>{{ eos_token }}
{% elif messages[0].role == 'system' %}
<|turn|>system
{{ messages[0].content }}{{ eos_token }}
{% endif %}
{% for m in messages %}
{% if m.role == 'user' or (m.role == 'assistant' and not m.tool_calls) %}
<|turn|>{{ m.role }}
{{ m.content }}{{ eos_token }}
{% elif m.role == 'assistant' %}
<|turn|>assistant
{% if m.content %}{{ m.content }}
{% endif %}
{% for call in m.tool_calls %}
<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>
{% endfor %}
{{ eos_token }}
{% elif m.role == 'tool' %}
{% if messages[loop.index0 - 1].role != 'tool' %}<|turn|>user
{% endif %}
<tool_response>
{{ m.content }}
</tool_response>
{% if loop.last or messages[loop.index0 + 1].role != 'tool' %}
{{ eos_token }}
{% endif %}
{% endif %}
{% endfor %}
{% if add_generation_prompt %}<|turn|>assistant
{% endif %}"""

# A Llama-3.1-style template (the tools in the first user message, one call at a time as JSON with
# "parameters", the results in an ipython turn), written for these tests.
LLAMA3_STYLE_TEMPLATE = """{{ bos_token }}
{% set first_user = 1 if messages[0].role == 'system' else 0 %}
{% for m in messages %}
{% if loop.index0 == first_user and tools is not none %}
<|turn|>user
Given the following functions, answer with a JSON for a function call: {"name": function name, \
"parameters": dictionary of argument name and its value}.
{% for t in tools %}
{{ t | tojson(indent=4) }}

{% endfor %}
{{ m.content }}{{ eos_token }}
{% elif m.tool_calls is defined %}
{% if m.tool_calls | length != 1 %}
{{ raise_exception('This model only supports single tool-calls at once!') }}
{% endif %}
{% set call = m.tool_calls[0].function %}
<|turn|>assistant
<|python_tag|>{"name": "{{ call.name }}", "parameters": {{ call.arguments | tojson }}}{{ eos_token }}
{% elif m.role == 'tool' %}
<|turn|>ipython
{{ m.content }}{{ eos_token }}
{% else %}
<|turn|>{{ m.role }}
{{ m.content }}{{ eos_token }}
{% endif %}
{% endfor %}
{% if add_generation_prompt %}<|turn|>assistant
{% endif %}"""

TOOL_TEMPLATES = {"hermes": HERMES_STYLE_TEMPLATE, "llama3": LLAMA3_STYLE_TEMPLATE}


@pytest.fixture(scope="module", params=list(TOOL_TEMPLATES))
def tool_template_folder(request, tiny_template_folder, tmp_path_factory) -> Path:
    """The tiny tokenizer with one of the tool templates as its only one."""
    folder = tmp_path_factory.mktemp(f"tools-{request.param}")
    (folder / "tokenizer.json").write_bytes((tiny_template_folder / "tokenizer.json").read_bytes())
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>", "eos_token": "<eos>",
              "chat_template": TOOL_TEMPLATES[request.param]}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_tool_templates_name_their_parser():
    assert parser_for_template(HERMES_STYLE_TEMPLATE) == "hermes"
    assert parser_for_template(LLAMA3_STYLE_TEMPLATE) == "llama3_json"


def both_tokenizers(folder: Path):
    """Ours and transformers' tokenizer of a folder."""
    from transformers import AutoTokenizer

    return load_tokenizer(folder / "tokenizer.json"), AutoTokenizer.from_pretrained(folder)


def transformers_messages(dialog: list[dict]) -> list[dict]:
    """The dialog as transformers documents tool calls: their arguments as objects, not JSON text."""
    def with_object(call):
        return {**call, "function": {**call["function"], "arguments": json.loads(call["function"]["arguments"])}}
    return [{**m, "tool_calls": [with_object(c) for c in m["tool_calls"]]} if "tool_calls" in m else m for m in dialog]


@pytest.mark.parametrize("name", list(TOOL_DIALOGS))
def test_tool_dialogs_match_transformers(tool_template_folder, name):
    dialog = TOOL_DIALOGS[name]
    ours, ref = both_tokenizers(tool_template_folder)
    if ours.chat_template == LLAMA3_STYLE_TEMPLATE and name == "two calls":
        with pytest.raises(ValueError, match="chat template: This model only supports single tool-calls"):
            encode_dialog(ours, dialog, tools=TOOLS)
        return
    expected = ref.apply_chat_template(transformers_messages(dialog), tools=TOOLS, add_generation_prompt=True,
                                       tokenize=True, return_dict=False)
    assert encode_dialog(ours, dialog, tools=TOOLS) == list(expected)
    # transformers' own shape of the calls (arguments as objects) is taken as well.
    assert encode_dialog(ours, transformers_messages(dialog), tools=TOOLS) == list(expected)
    text = ours.decode(encode_dialog(ours, dialog, tools=TOOLS))
    assert "get_time" in text and '\\"' not in text  # the tools shown; arguments not quoted as a string


def test_an_answer_after_tool_results_is_continued_as_transformers_continues_it(tool_template_folder):
    dialog = [ASKED, CALLED, RESULT, {"role": "assistant", "content": "It is 18"}]
    ours, ref = both_tokenizers(tool_template_folder)
    expected = ref.apply_chat_template(transformers_messages(dialog), tools=TOOLS, continue_final_message=True,
                                       tokenize=True, return_dict=False)
    assert encode_dialog(ours, dialog, continue_final=True, tools=TOOLS) == list(expected)
    with pytest.raises(ValueError, match="message 1: expected the dialog to end with the assistant message to"):
        encode_dialog(ours, [ASKED, CALLED], continue_final=True, tools=TOOLS)


@pytest.mark.parametrize("name", list(TOOL_DIALOGS))
def test_smollm2_template_renders_tool_dialogs_as_transformers_does(smollm2_hf, name):
    """SmolLM2's template shows no tools, and writes a tool message as a turn of role "tool"."""
    # Its template joins every message's content with "+": a call's empty text must be "", not None.
    dialog = [{**m, "content": m["content"] or ""} for m in TOOL_DIALOGS[name]]
    ours, ref = both_tokenizers(smollm2_hf)
    expected = ref.apply_chat_template(transformers_messages(dialog), tools=TOOLS, add_generation_prompt=True,
                                       tokenize=True, return_dict=False)
    assert encode_dialog(ours, dialog, tools=TOOLS) == list(expected)


MALFORMED_TOOL_DIALOGS = [
    ([ASKED, RESULT], "message 1: expected role 'assistant', got 'tool'"),
    ([RESULT], "message 0: expected role 'user', got 'tool'"),
    ([ASKED, CALLED, ASKED], "message 2: expected role 'tool', got 'user'"),
    ([ASKED, CALLED, RESULT, ASKED], "message 3: expected role 'tool' or 'assistant', got 'user'"),
    ([ASKED, ANSWERED, RESULT], "message 2: expected role 'user', got 'tool'"),
    ([ASKED, CALLED], "message 1: the dialog ends with an assistant message; expected it to end with the results"),
    ([ASKED, CALLED, {**RESULT, "tool_call_id": "call_9"}], "message 2: tool_call_id 'call_9' names none of the "
                                                             "assistant's tool_calls \\('call_1'\\)"),
    ([{**ASKED, "tool_calls": CALLED["tool_calls"]}], "message 0: a user message with tool_calls"),
    ([ASKED, {**CALLED, "tool_calls": []}, RESULT], "message 1: tool_calls: expected a non-empty list"),
    ([ASKED, {**CALLED, "tool_calls": [{"name": "get_time"}]}, RESULT], r"message 1: tool_calls\[0\]: expected"),
    ([ASKED, {**CALLED, "tool_calls": [{"function": {"name": "f", "arguments": "{city: Paris}"}}]}, RESULT],
     r"message 1: tool_calls\[0\]: arguments: expected the JSON text of an object, got '\{city: Paris\}'"),
    ([ASKED, {"role": "assistant", "content": None}, ASKED], "message 1: expected a dict with a 'role' and a string"),
    ([ASKED, CALLED, {"role": "tool", "content": None}], "message 2: expected a dict with a 'role' and a string"),
]


@pytest.mark.parametrize("dialog, problem", MALFORMED_TOOL_DIALOGS)
def test_malformed_tool_dialogs_rejected(tiny_template_folder, dialog, problem):
    with pytest.raises(ValueError, match=problem):
        encode_dialog(load_tokenizer(tiny_template_folder / "tokenizer.json"), dialog, tools=TOOLS)


@pytest.mark.parametrize("tools, problem", [
    ({"get_time": {}}, "tools: expected a list"),
    ([{"name": "get_time"}], r"tools\[0\]: expected \{'type': 'function', 'function'"),
])
def test_malformed_tools_rejected(tiny_template_folder, tools, problem):
    with pytest.raises(ValueError, match=problem):
        encode_dialog(load_tokenizer(tiny_template_folder / "tokenizer.json"), [ASKED], tools=tools)


def test_llama2_format_refuses_tools(sp_model):
    tok = SentencePieceTokenizer(sp_model)
    with pytest.raises(ValueError, match="tools: the Llama 2 chat format .* has no tool calls"):
        encode_dialog(tok, [ASKED], tools=TOOLS)
    with pytest.raises(ValueError, match="message 1: the Llama 2 chat format .* has no tool calls or results"):
        encode_dialog(tok, [ASKED, CALLED, RESULT])
    assert encode_dialog(tok, [ASKED], tools=[]) == encode_dialog(tok, [ASKED])  # no tool offered


def test_fit_dialog_drops_a_whole_exchange_with_its_tool_calls(tiny_template_folder, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((tiny_template_folder / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": HERMES_STYLE_TEMPLATE}))
    tok = load_tokenizer(tmp_path / "tokenizer.json")
    encode = lambda d: encode_dialog(tok, d, tools=TOOLS)  # noqa: E731
    dialog = TOOL_DIALOGS["answered, next question"]
    assert fit_dialog(encode, dialog, len(encode(dialog)) - 1) == ([dialog[0], dialog[-1]], 1)
    with pytest.raises(ValueError, match="the last message alone needs"):
        fit_dialog(encode, TOOL_DIALOGS["call and result"], len(encode(TOOL_DIALOGS["call and result"])) - 1)


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
