"""Mixtral (mixture of experts) against transformers' MixtralForCausalLM on tiny random configs: logits,
greedy tokens and routing decisions in float32, from Hugging Face folders and GGUF files (written here
as llama.cpp writes them), alone and among concurrent engine requests, through the server and the
batch runner; int8 and nf4 expert layers against bitsandbytes' own layers on the same weights, the
router left unquantized; pre-baked folders, hf and hf-bnb exports and overlays of expert weights."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import assert_logits_close, gguf_writer, head_dim, hf_greedy, hf_rope_theta, write_hf_folder
from llama_int8 import Llama

# Shapes the CPU 4-bit kernel accepts (out % 32 == 0, in % 64 == 0), grouped-query attention, 4 experts, top 2.
TINY_MIXTRAL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, rms_norm_eps=1e-5,
                    num_local_experts=4, num_experts_per_tok=2)
GREEDY_STEPS = 24


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: one intra-op thread for many small ops


def tiny_mixtral(seed: int = 0, **overrides):
    """A random float32 transformers MixtralForCausalLM, its norms perturbed so that their weights count,
    every weight a bfloat16 value: bitsandbytes quantizes int8 through float16, exact for those, so
    its layers made from the model's weights hold the bytes ours do (as in test_interop)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    model = MixtralForCausalLM(MixtralConfig(**{**TINY_MIXTRAL, **overrides}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            p.copy_(p.to(torch.bfloat16))
    return model.float().eval()


def random_tokens(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def reference():
    return tiny_mixtral(seed=3)


@pytest.fixture(scope="module")
def hf_folder(reference, tmp_path_factory, sp_model) -> Path:
    return write_hf_folder(reference, tmp_path_factory.mktemp("mixtral-hf"), tokenizer=sp_model)


def meta_state(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors transformers saved in folder under Meta's names, q/k rows in Meta's rotary layout
    (transformers holds the experts stacked in memory, and saves them one by one as Mixtral names them)."""
    from safetensors.torch import load_file
    from transformers import MixtralConfig

    from llama_int8.formats.common import hf_to_meta_name, unpermute_rotary_rows

    cfg = MixtralConfig.from_pretrained(folder)
    heads = {"wq": cfg.num_attention_heads, "wk": cfg.num_key_value_heads}
    state = {}
    for key, t in load_file(folder / "model.safetensors").items():
        name = hf_to_meta_name(key)
        kind = name.split(".")[-2]
        state[name] = unpermute_rotary_rows(t, heads[kind], head_dim(cfg)) if kind in heads else t
    return state


def write_mixtral_gguf(path: Path, hf_folder: Path, qtype: str = "F32") -> Path:
    """A Mixtral saved by transformers in hf_folder, as llama.cpp's converter writes it: architecture
    llama with expert counts, the routers as ffn_gate_inp, each block's experts stacked into
    ffn_{gate,up,down}_exps [experts, out, in], q/k rows in Meta's layout, ggml's reversed dimensions."""
    import gguf
    from transformers import MixtralConfig

    cfg = MixtralConfig.from_pretrained(hf_folder)
    writer = gguf_writer(path, "llama", cfg)
    writer.add_rope_freq_base(hf_rope_theta(cfg))
    writer.add_expert_count(cfg.num_local_experts)
    writer.add_expert_used_count(cfg.num_experts_per_tok)
    state = meta_state(hf_folder)
    tensors = {}
    for name, t in state.items():
        parts = name.split(".")
        if "experts" not in parts:
            tensors[f"blk.{parts[1]}.{GGUF_NAMES[parts[-2]]}.weight" if parts[0] == "layers"
                    else f"{GGUF_NAMES[parts[0]]}.weight"] = t
    for i in range(cfg.num_hidden_layers):
        for w, stack in GGUF_EXPERT_STACKS.items():
            tensors[f"blk.{i}.{stack}.weight"] = torch.stack(
                [state[f"layers.{i}.feed_forward.experts.{e}.{w}.weight"] for e in range(cfg.num_local_experts)])
    for name, t in tensors.items():
        kind = gguf.GGMLQuantizationType[qtype if t.dim() >= 2 else "F32"]
        writer.add_tensor(name, gguf.quants.quantize(t.numpy(), kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


GGUF_NAMES = {"tok_embeddings": "token_embd", "norm": "output_norm", "output": "output", "wq": "attn_q",
              "wk": "attn_k", "wv": "attn_v", "wo": "attn_output", "gate": "ffn_gate_inp",
              "attention_norm": "attn_norm", "ffn_norm": "ffn_norm"}
GGUF_EXPERT_STACKS = {"w1": "ffn_gate_exps", "w3": "ffn_up_exps", "w2": "ffn_down_exps"}


@pytest.fixture(scope="module")
def gguf_file(hf_folder, tmp_path_factory) -> Path:
    return write_mixtral_gguf(tmp_path_factory.mktemp("mixtral-gguf") / "tiny-mixtral.gguf", hf_folder)


@pytest.fixture(scope="module", params=["hf", "gguf"])
def float32_llm(request, hf_folder, gguf_file, sp_model) -> Llama:
    """The reference from a Hugging Face folder or a GGUF file, in float32, 8 slots, prefill in chunks of 8."""
    source, tokenizer = (hf_folder, None) if request.param == "hf" else (gguf_file, sp_model)
    return Llama.build(source, tokenizer_path=tokenizer, quant="none", dtype="float32", device="cpu",
                       max_seq_len=96, max_batch_size=8, prefill_chunk=8)


def test_config_reads_the_experts(float32_llm):
    args = float32_llm.model.args
    assert (args.n_experts, args.experts_per_token, args.ffn_hidden_dim) == (4, 2, 128)


def test_float32_logits_and_greedy_tokens_match_transformers(float32_llm, reference):
    tokens = random_tokens(2, 20, seed=1)
    with torch.no_grad():
        expected = reference(tokens).logits
    assert_logits_close(float32_llm.model(tokens, 0), expected)
    prompt = tokens[0, :7].tolist()
    ours = float32_llm.generate([prompt], max_gen_len=GREEDY_STEPS, temperature=0, stop_ids=())[0]
    assert ours == hf_greedy(reference, prompt, GREEDY_STEPS)


# --- Routing ---------------------------------------------------------------------------------------
# A token's experts may differ from transformers' only where its float32 router probabilities of the
# k-th and the next expert are closer than the two forwards' rounding (their hidden states differ by
# ~1e-7 relative): a tie that neither side decides better.
ROUTING_TIE = 1e-5


@contextmanager
def recorded_calls(modules: list[torch.nn.Module]) -> Iterator[list[list[tuple[torch.Tensor, Any]]]]:
    """Within the block, each module's calls as (its input, its output), one list per module."""
    calls: list[list[tuple[torch.Tensor, Any]]] = [[] for _ in modules]
    handles = [module.register_forward_hook(lambda _, args, out, records=records: records.append((args[0], out)))
               for records, module in zip(calls, modules)]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


def transformers_routing(reference, tokens: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per layer: the router's input [n, dim], transformers' chosen experts [n, k] and their weights [n, k]."""
    with recorded_calls([layer.mlp.gate for layer in reference.model.layers]) as calls, torch.no_grad():
        reference(tokens)
    return [(x, indices, scores) for ((x, (_, scores, indices)),) in calls]


def our_router_logits(model, tokens: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer: what our router was given [n, dim] and its logits [n, n_experts], over all prefill chunks."""
    with recorded_calls([layer.feed_forward.gate for layer in model.layers]) as calls, torch.no_grad():
        model(tokens, 0)
    return [(torch.cat([x for x, _ in layer]), torch.cat([y for _, y in layer])) for layer in calls]


def assert_same_experts_except_ties(chosen: torch.Tensor, weights: torch.Tensor, router_input: torch.Tensor,
                                    expected: torch.Tensor, expected_weights: torch.Tensor, reference_gate) -> int:
    """chosen [n, k] equals expected as sets of experts wherever transformers' float32 router separates
    its k-th expert from the next by more than ROUTING_TIE, with the same weights; returns how many
    tokens differ (all at ties)."""
    k = expected.shape[1]
    probs = torch.nn.functional.linear(router_input, reference_gate.weight).float().softmax(-1)
    ranked = probs.sort(dim=-1, descending=True).values
    margin = ranked[:, k - 1] - ranked[:, k]
    same = (chosen.sort(-1).values == expected.sort(-1).values).all(-1)
    assert (margin[~same] <= ROUTING_TIE).all(), margin[~same]
    order, expected_order = chosen.argsort(-1), expected.argsort(-1)
    torch.testing.assert_close(weights.gather(1, order)[same], expected_weights.gather(1, expected_order)[same],
                               rtol=1e-5, atol=1e-6)
    return int((~same).sum())


def test_float32_routing_matches_transformers(float32_llm, reference):
    from llama_int8.model import route

    tokens = random_tokens(1, 40, seed=4)  # one row: the prefill chunks' tokens follow transformers' order
    k = float32_llm.model.args.experts_per_token
    ours = our_router_logits(float32_llm.model, tokens)
    theirs = transformers_routing(reference, tokens)
    for (_, logits), (x, expected, expected_weights), layer in zip(ours, theirs, reference.model.layers):
        weights, chosen = route(logits, k)
        assert assert_same_experts_except_ties(chosen, weights, x, expected, expected_weights, layer.mlp.gate) == 0


# --- The engine ------------------------------------------------------------------------------------

def test_greedy_alone_equals_among_eight_concurrent(float32_llm, reference):
    """Each request's tokens and log-probabilities, among seven others, are those it gets alone (each
    expert runs over whichever tokens chose it), and transformers' greedy tokens."""
    from test_engine import ARRIVAL_STEPS, greedy_requests, run_alone, run_staggered, tokens_of

    from llama_int8.engine import Engine

    requests = greedy_requests(logprobs=2)
    together = run_staggered(Engine(float32_llm.model, float32_llm.tokenizer), requests, ARRIVAL_STEPS)
    for request, outs in zip(requests, together):
        alone = run_alone(float32_llm, request)
        assert tokens_of(outs) == tokens_of(alone)
        assert [lp for o in outs for lp in o.logprobs] == [lp for o in alone for lp in o.logprobs]
        assert tokens_of(outs) == hf_greedy(reference, list(request.prompt), request.max_tokens)


# --- Quantized -------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=["int8", "nf4"])
def quant_mode(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def quantized_llm(quant_mode, hf_folder) -> Llama:
    """The Hugging Face folder quantized at load, at the defaults (the head int8)."""
    return Llama.build(hf_folder, quant=quant_mode, dtype="float32", device="cpu", max_seq_len=64, max_batch_size=2)


def bitsandbytes_layer(weight: torch.Tensor, mode: str) -> torch.nn.Module:
    """bitsandbytes' own layer for weight [out, in], quantized by bitsandbytes itself (on .to())."""
    import bitsandbytes as bnb

    out_features, in_features = weight.shape
    if mode == "int8":
        layer = bnb.nn.Linear8bitLt(in_features, out_features, bias=False, has_fp16_weights=False, threshold=6.0)
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=torch.float32,
                                  compress_statistics=False, quant_type=mode)
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=False, quant_type=mode,
                                         blocksize=64)
    return layer.to("cpu").eval()


def test_every_expert_layer_is_bitsandbytes_own_on_the_same_weight(quant_mode, quantized_llm, hf_folder):
    """Each expert linear computes, bit for bit, what bitsandbytes' own layer made from the checkpoint's
    weight computes (outlier features included); the routers stay the model's own 16/32-bit Linear."""
    from safetensors.torch import load_file

    from llama_int8.formats.common import meta_to_hf_name
    from llama_int8.model import Linear
    from llama_int8.quantize import quantized_layer_names

    args = quantized_llm.model.args
    source = load_file(hf_folder / "model.safetensors")
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(5))
    x[:, 3] = 9.0  # above LLM.int8()'s threshold: its 16-bit outlier path is taken
    names = [n for n in quantized_layer_names(args.n_layers, False, args.n_experts) if ".experts." in n]
    assert len(names) == args.n_layers * args.n_experts * 3
    for name in names:
        ours = quantized_llm.model.get_submodule(name)
        theirs = bitsandbytes_layer(source[meta_to_hf_name(f"{name}.weight")], quant_mode)
        with torch.inference_mode():
            assert torch.equal(ours(x[:, :ours.in_features]), theirs(x[:, :ours.in_features])), name
    for layer in quantized_llm.model.layers:
        assert type(layer.feed_forward.gate) is Linear and layer.feed_forward.gate.weight.dtype == torch.float32


def test_quantized_router_picks_transformers_experts(quantized_llm, reference):
    """The router is not quantized: given the router inputs of transformers' float32 forward, the
    quantized model's routers choose transformers' experts, with its weights, except at float32 ties."""
    from llama_int8.model import route

    k = quantized_llm.model.args.experts_per_token
    routing = transformers_routing(reference, random_tokens(2, 40, seed=6))
    for layer, ref_layer, (x, expected, expected_weights) in zip(quantized_llm.model.layers, reference.model.layers,
                                                                  routing):
        with torch.inference_mode():
            weights, chosen = route(layer.feed_forward.gate(x), k)
        assert assert_same_experts_except_ties(chosen, weights, x, expected, expected_weights, ref_layer.mlp.gate) == 0


def test_quantized_model_computes_bitsandbytes_numbers(quantized_llm, monkeypatch):
    """The whole quantized model, prefill and decode, gives the logits it gives with bitsandbytes' own
    forwards in every layer, bit for bit; an int8 expert's w1 and w3 share one product, whose
    matrix holds their rows."""
    import bitsandbytes as bnb

    from llama_int8 import quantized_layers

    model = quantized_llm.model
    expert = model.layers[0].feed_forward.experts[1]
    if isinstance(expert.w1, bnb.nn.Linear8bitLt):
        product = expert.gate_up_product
        assert isinstance(product, quantized_layers.Int8Product)
        assert expert.w3.weight.data.data_ptr() == product.cb[expert.w1.out_features:].data_ptr()
    tokens = random_tokens(2, 12, seed=8)
    with torch.inference_mode():
        ours = [model(tokens, 0), model(tokens[:, :1], 12)]
        model.fuse_projections(lambda layers: None)  # the layers themselves, through bitsandbytes' forwards
        monkeypatch.setattr(quantized_layers.DeviceBoundLinear8bitLt, "forward", bnb.nn.Linear8bitLt.forward)
        monkeypatch.setattr(quantized_layers.DeviceBoundLinear4bit, "forward", bnb.nn.Linear4bit.forward)
        reference = [model(tokens, 0), model(tokens[:, :1], 12)]
    for got, want in zip(ours, reference):
        assert torch.equal(got, want)


# --- GGUF ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("qtype, atol", [("F32", 0.0), ("Q8_0", 5e-3)])
def test_gguf_holds_the_hf_folders_tensors(hf_folder, tmp_path, qtype, atol):
    """The stacked experts come apart into each expert's w1/w2/w3, in a quantized file too; the
    configuration equals the Hugging Face folder's."""
    from llama_int8.formats import open_checkpoint

    gguf = open_checkpoint(write_mixtral_gguf(tmp_path / "mixtral.gguf", hf_folder, qtype))
    hf = open_checkpoint(hf_folder)
    assert (gguf.args.n_experts, gguf.args.experts_per_token) == (hf.args.n_experts, hf.args.experts_per_token)
    assert gguf.args.rope_theta == hf.args.rope_theta and gguf.args.ffn_hidden_dim == hf.args.ffn_hidden_dim
    expected = meta_state(hf_folder)
    for item in gguf.tensors():
        torch.testing.assert_close(item.tensor, expected.pop(item.name), atol=atol, rtol=0)
    assert not expected


# --- Pre-baked, exported, overlaid ---------------------------------------------------------------

def quantized_logits(llm: Llama) -> torch.Tensor:
    with torch.inference_mode():
        return llm.model(random_tokens(2, 12, seed=9), 0)


def test_prebaked_folder_equals_quantizing_at_load(quant_mode, quantized_llm, hf_folder, tmp_path):
    from llama_int8.formats import open_checkpoint
    from llama_int8.formats.prebaked import read_manifest, write_prebaked
    from llama_int8.quantize import parse_quant_mode

    cfg = parse_quant_mode(quant_mode, quantize_head=None)  # what a load at the defaults quantizes
    baked = write_prebaked(open_checkpoint(hf_folder), tmp_path / "baked", cfg)
    manifest = read_manifest(baked)
    assert "layers.1.feed_forward.experts.3.w2.weight" in manifest.tensors  # stored quantized
    assert manifest.tensors["layers.1.feed_forward.gate.weight"].dtype == "float32"  # the router as it was
    llm = Llama.build(baked, dtype="float32", device="cpu", max_seq_len=64, max_batch_size=2)
    assert torch.equal(quantized_logits(llm), quantized_logits(quantized_llm))


@pytest.mark.parametrize("source", ["hf", "gguf"])
def test_hf_export_is_transformers_model(source, hf_folder, gguf_file, reference, tmp_path):
    """A Hugging Face folder written from either source is the reference itself to transformers."""
    from transformers import AutoModelForCausalLM

    from llama_int8.formats import open_checkpoint
    from llama_int8.formats.hf import write_hf

    out = write_hf(open_checkpoint(hf_folder if source == "hf" else gguf_file), tmp_path / "hf",
                   tokenizer_path=None if source == "hf" else hf_folder / "tokenizer.model")
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(exported).__name__ == "MixtralForCausalLM"
    tokens = random_tokens(2, 16, seed=10)
    with torch.no_grad():
        assert torch.equal(exported(tokens).logits, reference(tokens).logits)


def test_hf_bnb_export_equals_transformers_and_loads_its_experts_quantized(quant_mode, quantized_llm, hf_folder,
                                                                           tmp_path):
    """hf-bnb holds what transformers writes quantizing the same source itself, byte for byte: its
    attention quantized, its experts and routers 16-bit (transformers 5 quantizes nn.Linear modules
    only). llama_int8 quantizes those experts as it loads the folder, and computes what the same mode
    at load computes, but for the rounding of the rotation in Hugging Face's layout."""
    import bitsandbytes as bnb
    from test_interop import file_tensors, transformers_model, transformers_quantized

    from llama_int8.formats import open_checkpoint
    from llama_int8.formats.hf_bnb import write_hf_bnb
    from llama_int8.quantize import parse_quant_mode

    theirs_model = transformers_quantized(hf_folder, quant_mode, tmp_path / "theirs")
    out = write_hf_bnb(open_checkpoint(hf_folder), tmp_path / "ours", parse_quant_mode(quant_mode, blocksize=64))
    ours, theirs = file_tensors(out), file_tensors(tmp_path / "theirs")
    assert set(ours) == set(theirs)
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), key
    tokens = random_tokens(1, 12, seed=11)
    with torch.inference_mode():
        assert torch.equal(transformers_model(out)(tokens).logits, theirs_model(tokens).logits)

    llm = Llama.build(out, dtype="float32", device="cpu", max_seq_len=64, max_batch_size=2)
    for layer in llm.model.layers:
        assert all(isinstance(w, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit))
                   for expert in layer.feed_forward.experts for w in (expert.w1, expert.w2, expert.w3))
    at_load = Llama.build(hf_folder, quant=quant_mode, dtype="float32", device="cpu", max_seq_len=64,
                          max_batch_size=2, quantize_head=False)  # hf-bnb keeps the head 16-bit
    got, want = quantized_logits(llm), quantized_logits(at_load)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_overlay_replaces_experts_and_routers(hf_folder, reference, tmp_path):
    """A partial overlay (Hugging Face and Meta names) replaces single experts' weights and a router;
    the stack computes what transformers computes with the merged folder."""
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from llama_int8.formats.common import hf_to_meta_name

    other = load_file(write_hf_folder(tiny_mixtral(seed=4), tmp_path / "other") / "model.safetensors")
    replaced = {key: other[key] for key in ("model.layers.1.block_sparse_moe.experts.2.w1.weight",
                                            "model.layers.0.block_sparse_moe.experts.0.w2.weight",
                                            "model.layers.0.block_sparse_moe.gate.weight")}
    overlay = {hf_to_meta_name(k) if ".w2." in k else k: v for k, v in replaced.items()}  # one under Meta's name
    (tmp_path / "overlay").mkdir()
    save_file(overlay, tmp_path / "overlay" / "model.safetensors", metadata={"format": "pt"})
    merged = shutil.copytree(hf_folder, tmp_path / "merged")
    save_file({**load_file(hf_folder / "model.safetensors"), **replaced}, merged / "model.safetensors",
              metadata={"format": "pt"})

    tokens = random_tokens(2, 16, seed=12)
    stacked = Llama.build([hf_folder, tmp_path / "overlay"], quant="none", dtype="float32", device="cpu",
                          max_seq_len=64, max_batch_size=2)
    with torch.no_grad():
        ours = stacked.model(tokens, 0)
        expected = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()(tokens).logits
        assert not torch.allclose(ours, reference(tokens).logits, atol=1e-3)
    assert_logits_close(ours, expected)


# --- Serving -------------------------------------------------------------------------------------

def test_server_and_batch_runner_answer_as_the_engine_alone(float32_llm, tmp_path):
    """The OpenAI server's completion and the batch runner's results are each request's tokens alone."""
    import httpx
    from conftest import running_server, wait_ready
    from test_batch import alone, by_id, completion_request, read_results, write_lines

    from llama_int8.batch_files import read_requests
    from llama_int8.batch_runner import BatchSettings, run_batch
    from llama_int8.server import ServerSettings, create_app

    prompts = ["The quick brown fox", "Paris is the capital of", "To be or not to be", "All that glitters"]
    expected = [alone(float32_llm, completion_request(float32_llm, p, 16)) for p in prompts]
    requests = write_lines(tmp_path / "requests.jsonl", [{"id": f"r{i}", "prompt": p, "max_tokens": 16}
                                                         for i, p in enumerate(prompts)])
    run_batch(float32_llm, read_requests(requests), requests, tmp_path / "results.jsonl",
              BatchSettings(16, {"temperature": 0.0}), "tiny-mixtral")
    results = by_id(read_results(tmp_path / "results.jsonl"))
    assert [results[f"r{i}"]["text"] for i in range(len(prompts))] == [e.text for e in expected]

    app = create_app(ServerSettings(model_name="tiny-mixtral"), lambda: float32_llm)
    with running_server(app) as url:
        wait_ready(url)
        answer = httpx.post(f"{url}/v1/completions", timeout=60, json={
            "model": "tiny-mixtral", "prompt": prompts, "max_tokens": 16, "temperature": 0}).json()
    assert [choice["text"] for choice in sorted(answer["choices"], key=lambda c: c["index"])] == [
        e.text for e in expected]


@pytest.mark.parametrize("edit, message", [
    ({"num_experts_per_tok": 5}, "num_experts_per_tok=5: expected from 1 to the 4 experts of num_local_experts"),
    ({"num_local_experts": 0.5}, "num_local_experts=0.5: expected an integer"),
])
def test_bad_expert_counts_are_refused_naming_the_key(hf_folder, tmp_path, edit, message):
    import json
    import shutil

    from llama_int8.formats import CheckpointError, open_checkpoint

    folder = shutil.copytree(hf_folder, tmp_path / "bad")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **edit}))
    with pytest.raises(CheckpointError, match=f"config.json: {message}"):
        open_checkpoint(folder)
