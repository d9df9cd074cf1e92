"""Qwen2 / Qwen2.5 (q/k/v biases, tied or untied head) and Qwen3 (per-head q/k RMS norms) against
transformers on tiny random models: from Hugging Face folders and from GGUF files written as
llama.cpp writes them (q/k rows in Hugging Face's half-split layout, which transformers' own GGUF
loader reads unpermuted too), alone and as 8 concurrent engine requests; int8 and nf4 loads; the
ChatML template and the stop tokens <|im_end|> and <|endoftext|>; Qwen's sliding-window settings.

Measured here (2-core AVX-512 host, torch 2.13 CPU, transformers 5.25, bitsandbytes 0.50.2), max
|logit difference| / max |logit| of a 16-token prompt: float32 loads (folder or GGUF) against
transformers 1.7e-7 to 4.0e-7 (bound 1e-4 of the largest logit, elementwise); int8 loads (head int8)
against the float32 load 0.008 to 0.019 (bound 0.05), nf4 0.065 to 0.19 (bound 0.25); transformers'
own int8 and nf4 folders of Qwen2 loaded here against its forward of them: 0 (bound 2e-5).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import CORPUS, assert_logits_close, gguf_writer, hf_greedy
from llama_int8 import Llama
from llama_int8.engine import Request
from llama_int8.formats import CheckpointError, open_checkpoint
from llama_int8.formats.hf import write_hf
from llama_int8.formats.prebaked import write_prebaked
from llama_int8.quantize import parse_quant_mode
from llama_int8.quantized_layers import quantize_linear_on_host
from llama_int8.sampling import SamplingParams

KINDS = ("qwen2", "qwen2-tied", "qwen3")
FORMATS = ("hf", "gguf")
# Shapes the CPU 4-bit kernel takes (out % 32 == 0, in % 64 == 0); grouped-query attention; Qwen3
# with a head_dim other than hidden_size / heads, as its released models have.
SHAPES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)
EXTRA = {"qwen2": {}, "qwen2-tied": {"tie_word_embeddings": True}, "qwen3": {"head_dim": 32}}
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
VOCAB = 320
# A ChatML template in the shape of Qwen2.5's: a default system message when the dialog has none.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if message['role'] != 'system' %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
PROMPT = [5, 17, 42, 99, 7, 3, 64, 12, 80, 33, 200, 9, 100, 45, 6, 250]
STEPS = 16
SLOTS = 8
PROMPT_LENGTHS = (3, 21, 9, 30, 2, 15, 26, 6)
ARRIVAL_STEPS = (0, 0, 1, 3, 4, 4, 9, 12)
NEW_TOKENS = (16, 8, 20, 12, 18, 6, 14, 10)
# max |logit difference| / max |logit| of int8 and nf4 loads against the float32 load (measured: see the
# module docstring), with room for other CPUs' kernels.
QUANT_BOUNDS = {"int8": 0.05, "nf4": 0.25}
GGUF_NAMES = {"embed_tokens": "token_embd", "norm": "output_norm", "lm_head": "output", "q_proj": "attn_q",
              "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output", "gate_proj": "ffn_gate",
              "down_proj": "ffn_down", "up_proj": "ffn_up", "input_layernorm": "attn_norm",
              "post_attention_layernorm": "ffn_norm", "q_norm": "attn_q_norm", "k_norm": "attn_k_norm"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: one intra-op thread for many small ops


# --- Tiny Qwen checkpoints -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def qwen_tokenizer(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer.json built as Qwen's is (transformers' Qwen2 split, then bytes), of
    VOCAB ids, <|endoftext|>, <|im_start|> and <|im_end|> special; ids 0, 1, 2."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([CORPUS], trainer)
    assert tok.get_vocab_size() == VOCAB
    path = tmp_path_factory.mktemp("qwen-tokenizer") / "tokenizer.json"
    tok.save(str(path))
    return path


def tiny_qwen(kind: str, seed: int = 0, **overrides):
    """A random float32 Qwen2ForCausalLM or Qwen3ForCausalLM, its norms and biases moved off their
    initial ones and zeros so that the comparison sees them."""
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    qwen3 = kind == "qwen3"
    config = (Qwen3Config if qwen3 else Qwen2Config)(**{**SHAPES, "vocab_size": VOCAB, **EXTRA[kind], **overrides},
                                                    bos_token_id=0, eos_token_id=2)
    torch.manual_seed(seed)
    model = (Qwen3ForCausalLM if qwen3 else Qwen2ForCausalLM)(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.generation_config.eos_token_id = [2, 0]  # <|im_end|> and <|endoftext|>, as Qwen2.5-Instruct lists them
    return model.float().eval()


def write_qwen_folder(model, folder: Path, tokenizer: Path) -> Path:
    """The model as save_pretrained writes it, with Qwen's tokenizer files beside it."""
    model.save_pretrained(folder)
    (folder / "tokenizer.json").write_bytes(tokenizer.read_bytes())
    config = {"tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>",
              "pad_token": "<|endoftext|>", "chat_template": CHAT_TEMPLATE}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def write_qwen_gguf(model, path: Path, tokenizer: Path) -> Path:
    """The model as llama.cpp's converter writes a qwen2 / qwen3 GGUF: Hugging Face's q/k rows as
    they are (llama.cpp rotates them NEOX-style), no output.weight for a tied head, the vocabulary
    with its merges and special tokens as control tokens."""
    cfg = model.config
    arch = cfg.model_type
    writer = gguf_writer(path, arch, cfg)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_vocab_size(cfg.vocab_size)
    if arch == "qwen3":
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
    add_gguf_vocabulary(writer, tokenizer)
    for key, t in model.state_dict().items():
        if key == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        *module, kind = key.split(".")
        block = f"blk.{module[2]}." if module[:2] == ["model", "layers"] else ""
        writer.add_tensor(f"{block}{GGUF_NAMES[module[-1]]}.{kind}", t.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def add_gguf_vocabulary(writer, tokenizer: Path) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer))
    merges = json.loads(tokenizer.read_text())["model"]["merges"]
    ids = {tok.token_to_id(t) for t in SPECIAL_TOKENS}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list([tok.id_to_token(i) for i in range(tok.get_vocab_size())])
    writer.add_token_types([3 if i in ids else 1 for i in range(tok.get_vocab_size())])  # 3: control
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(tok.token_to_id("<|endoftext|>"))
    writer.add_eos_token_id(tok.token_to_id("<|im_end|>"))
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, qwen_tokenizer) -> dict[str, tuple]:
    """Each kind's reference model, Hugging Face folder and GGUF file."""
    made = {}
    for seed, kind in enumerate(KINDS):
        model = tiny_qwen(kind, seed)
        root = tmp_path_factory.mktemp(kind)
        made[kind] = (model, write_qwen_folder(model, root / "hf", qwen_tokenizer),
                      write_qwen_gguf(model, root / f"{kind}.gguf", qwen_tokenizer))
    return made


@pytest.fixture(scope="module")
def loaded(checkpoints) -> dict[tuple[str, str], Llama]:
    """Each kind and format loaded in float32 with 8 cache rows."""
    return {(kind, fmt): Llama.build(checkpoints[kind][1 if fmt == "hf" else 2], quant="none", device="cpu",
                                     dtype="float32", max_seq_len=96, max_batch_size=SLOTS, prefill_chunk=8)
            for kind in KINDS for fmt in FORMATS}


def logits(llm: Llama, tokens: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return llm.model(torch.tensor([tokens]), 0)


def relative_difference(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


# --- Against transformers --------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", KINDS)
def test_logits_and_greedy_tokens_match_transformers(kind, fmt, checkpoints, loaded):
    ref, llm = checkpoints[kind][0], loaded[kind, fmt]
    attention = llm.model.layers[0].attention
    assert (attention.wq.bias is not None) == kind.startswith("qwen2")
    assert (attention.q_norm is not None) == (kind == "qwen3")
    with torch.inference_mode():
        expected = ref(torch.tensor([PROMPT])).logits
    assert_logits_close(logits(llm, PROMPT), expected)
    got = llm.generate([PROMPT], max_gen_len=STEPS, temperature=0.0, stop_ids=[])[0]
    assert got == hf_greedy(ref, PROMPT, STEPS)


@pytest.mark.parametrize("kind", KINDS)
def test_gguf_and_hf_folder_give_one_configuration(kind, checkpoints):
    _, folder, gguf_file = checkpoints[kind]
    hf, gguf = open_checkpoint(folder).args, open_checkpoint(gguf_file).args
    assert (hf.qkv_bias, hf.qk_norm, hf.tie_word_embeddings) == (kind != "qwen3", kind == "qwen3", kind == "qwen2-tied")
    assert gguf.norm_eps == pytest.approx(hf.norm_eps)  # GGUF stores it as float32
    for field in ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "vocab_size", "hidden_dim", "rope_theta",
                  "tie_word_embeddings", "sliding_window", "qkv_bias", "qk_norm"):
        assert getattr(gguf, field) == getattr(hf, field), field


# --- The engine ------------------------------------------------------------------------------------

def run_staggered(llm: Llama, requests: list[Request], arrivals: tuple[int, ...]) -> list[list[int]]:
    """Submit request i at step arrivals[i], step until all are done; each one's tokens."""
    engine = llm.engine()
    tokens: list[list[int]] = [[] for _ in requests]
    step = 0
    while step <= max(arrivals) or engine.has_work():
        for i, at in enumerate(arrivals):
            if at == step:
                engine.submit([requests[i]], lambda _, out, i=i: tokens[i].extend(out.tokens))
        engine.step()
        step += 1
    return tokens


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", KINDS)
def test_eight_concurrent_requests_each_equal_alone_and_transformers(kind, fmt, checkpoints, loaded):
    ref, llm = checkpoints[kind][0], loaded[kind, fmt]
    greedy = SamplingParams(temperature=0.0)
    requests = [Request(torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(i)).tolist(),
                        max_tokens=m, sampling=greedy) for i, (n, m) in enumerate(zip(PROMPT_LENGTHS, NEW_TOKENS))]
    together = run_staggered(llm, requests, ARRIVAL_STEPS)
    for request, tokens in zip(requests, together):
        assert tokens == run_staggered(llm, [request], (0,))[0]
        assert tokens == hf_greedy(ref, list(request.prompt), request.max_tokens)


# --- Quantized loads -------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["int8", "nf4"])
@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
def test_quantized_loads_follow_float32(kind, mode, checkpoints, loaded):
    import bitsandbytes as bnb

    llm = Llama.build(checkpoints[kind][1], quant=mode, device="cpu", dtype="float32", max_seq_len=64)
    wq = llm.model.layers[0].attention.wq
    assert isinstance(wq, bnb.nn.Linear8bitLt if mode == "int8" else bnb.nn.Linear4bit)
    if kind == "qwen2":  # the bias stays float32, added to the quantized product
        assert wq.bias.dtype == torch.float32
        torch.testing.assert_close(wq.bias, loaded[kind, "hf"].model.layers[0].attention.wq.bias)
    assert relative_difference(logits(llm, PROMPT), logits(loaded[kind, "hf"], PROMPT)) < QUANT_BOUNDS[mode]
    assert len(llm.generate([PROMPT], max_gen_len=4, temperature=0.0, stop_ids=[])[0]) == 4


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_a_biased_quantized_layer_computes_what_bitsandbytes_computes(mode):
    """The CPU forward that replaces bitsandbytes' own adds the bias as bitsandbytes does."""
    import bitsandbytes as bnb

    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(64, 128, generator=g) * 0.02, torch.randn(64, generator=g) * 0.1
    layer = quantize_linear_on_host(weight, parse_quant_mode(mode), "cpu", torch.float32)
    layer.bias = torch.nn.Parameter(bias, requires_grad=False)
    own_forward = (bnb.nn.Linear8bitLt if mode == "int8" else bnb.nn.Linear4bit).forward
    x = torch.randn(3, 5, 128, generator=g)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), own_forward(layer, x), rtol=1e-5, atol=1e-6)


def test_transformers_bnb_folders_of_qwen2_load_as_saved(checkpoints, tmp_path):
    from transformers import AutoModelForCausalLM

    from benchmarks.reference import bnb_config

    source = checkpoints["qwen2"][1]
    for mode in ("int8", "nf4"):
        reference = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, device_map={"": "cpu"},
                                                         quantization_config=bnb_config(mode, torch.float32)).eval()
        folder = tmp_path / mode
        reference.save_pretrained(folder)  # before any forward: a CPU 4-bit forward repacks the weights
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (folder / name).write_bytes((source / name).read_bytes())
        llm = Llama.build(folder, device="cpu", dtype="float32", max_seq_len=64)
        assert llm.model.layers[0].attention.wq.bias is not None
        with torch.inference_mode():
            expected = reference(torch.tensor([PROMPT])).logits
        assert relative_difference(logits(llm, PROMPT), expected) < 2e-5, mode


def test_prebaked_qwen2_equals_int8_at_load(checkpoints, tmp_path):
    source = checkpoints["qwen2"][1]
    baked = write_prebaked(open_checkpoint(source), tmp_path / "baked", parse_quant_mode("int8", quantize_head=None))
    at_load = Llama.build(source, quant="int8", device="cpu", dtype="float32", max_seq_len=64)
    from_baked = Llama.build(baked, device="cpu", dtype="float32", max_seq_len=64)
    assert torch.equal(logits(from_baked, PROMPT), logits(at_load, PROMPT))


# --- Chat template and stop tokens -----------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
def test_chat_template_and_stop_tokens(fmt, checkpoints, loaded):
    from transformers import AutoTokenizer

    llm, folder = loaded["qwen2", fmt], checkpoints["qwen2"][1]
    reference = AutoTokenizer.from_pretrained(folder)
    tok = llm.tokenizer
    im_end, end_of_text = tok.token_id("<|im_end|>"), tok.token_id("<|endoftext|>")
    assert tok.eos_id == im_end and tok.stop_ids == {im_end, end_of_text}
    assert tok.token_id("<|im_start|>") not in tok.stop_ids
    dialog = [{"role": "user", "content": "What is the capital of France?"}]
    text = reference.apply_chat_template(dialog, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    assert llm.encode_dialog(dialog) == reference(text, add_special_tokens=False).input_ids
    for sample in ["The quick brown fox, 1000 miles.", "Paris is the capital of France!\n\n  Numbers: 12345"]:
        assert tok.encode(sample, bos=True) == reference(sample, add_special_tokens=False).input_ids  # no BOS
    # A turn the model ends at once: <|im_end|> stops it, and is not part of the answer.
    forced = SamplingParams(temperature=0.0, logit_bias=((im_end, 100.0),))
    (done,) = llm.engine().run([Request(llm.encode_dialog(dialog), max_tokens=8, sampling=forced,
                                        stop_ids=tok.stop_ids)])
    assert (done.finish_reason, done.tokens, done.text) == ("stop", [], "")


# --- Sliding window settings -----------------------------------------------------------------------

def test_a_window_over_every_layer_matches_transformers(tmp_path, qwen_tokenizer):
    ref = tiny_qwen("qwen2", seed=7, use_sliding_window=True, sliding_window=8, max_window_layers=0)
    folder = write_qwen_folder(ref, tmp_path / "windowed", qwen_tokenizer)
    llm = Llama.build(folder, quant="none", device="cpu", dtype="float32", max_seq_len=64)
    assert llm.model.args.sliding_window == 8
    tokens = PROMPT + PROMPT[::-1]  # several windows long
    with torch.inference_mode():
        expected = ref(torch.tensor([tokens])).logits
    assert_logits_close(logits(llm, tokens), expected)


@pytest.mark.parametrize("settings, window", [
    (dict(use_sliding_window=False, sliding_window=4096), None),  # what Qwen2.5's configs say
    (dict(use_sliding_window=True, sliding_window=4096, max_window_layers=2), None),  # no layer from 2 on
    (dict(use_sliding_window=True, sliding_window=4096, max_window_layers=0), 4096),
])
def test_window_settings(tmp_path, settings, window):
    from transformers import Qwen2Config

    Qwen2Config(**SHAPES, vocab_size=VOCAB, **settings).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").touch()  # the configuration alone is read
    assert open_checkpoint(tmp_path).args.sliding_window == window


def test_a_window_over_some_layers_is_refused(tmp_path):
    config = {**SHAPES, "model_type": "qwen2", "vocab_size": VOCAB, "use_sliding_window": True, "sliding_window": 8,
              "max_window_layers": 1}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").touch()
    with pytest.raises(CheckpointError, match=r"config\.json: use_sliding_window=true with max_window_layers=1 "
                                              r"windows 1 of 2 layers"):
        open_checkpoint(tmp_path)


def test_a_bias_the_model_lacks_is_refused_by_name(checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "extra"
    folder.mkdir()
    source = checkpoints["qwen2"][1]
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((source / name).read_bytes())
    tensors = load_file(source / "model.safetensors")
    tensors["model.layers.1.self_attn.o_proj.bias"] = torch.zeros(SHAPES["hidden_size"])
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError,
                       match=r"model\.safetensors: unexpected tensor 'model\.layers\.1\.self_attn\.o_proj\.bias'"):
        Llama.build(folder, quant="none", device="cpu", dtype="float32", max_seq_len=64)


def test_qwen3_attention_bias_is_refused(tmp_path):
    config = {**SHAPES, "model_type": "qwen3", "vocab_size": VOCAB, "attention_bias": True}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").touch()
    with pytest.raises(CheckpointError, match="attention_bias=true"):
        open_checkpoint(tmp_path)


# --- Export ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_gguf_exported_as_hf_folder_loads_in_transformers(kind, checkpoints, tmp_path):
    from transformers import AutoModelForCausalLM

    ref, _, gguf_file = checkpoints[kind]
    folder = write_hf(open_checkpoint(gguf_file), tmp_path / "exported")
    exported = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert type(exported) is type(ref)
    tokens = torch.tensor([PROMPT])
    with torch.inference_mode():
        assert_logits_close(exported(tokens).logits, ref(tokens).logits)
