"""Interop with the engines that scale out, checked against their own code: bitsandbytes folders made
by transformers load as they are saved; the folders quantize_offline.py writes (hf-bnb,
compressed-tensors, hf) load in transformers and compute what it computes.

The quantizing sources are stored in bfloat16 and loaded as float32 on both sides: bitsandbytes casts
weights to float16 before its int8 quantization, which is exact for bfloat16 values and so gives
the same bytes as ours, computed in float32 (a float32 source would differ in the rounding of a few
weights and scales).

Measured here (2-core AVX-512 host, torch 2.13 CPU, transformers 5.24, bitsandbytes 0.50.2,
compressed-tensors 0.20.1), max |logit difference| / max |logit|:
- transformers' bitsandbytes folders loaded by llama_int8, against transformers' forward of the same
  quantized model, float32 activations: SmolLM2 int8 1.6e-6, nf4 2.4e-6, nf4-dq 4.2e-6; the tiny
  model int8 0, nf4 2.4e-7, nf4-dq 1.8e-7. Not exact for the real model: the same weights, but other
  kernels and summation orders (oneDNN float32 linears, int8 layers sharing an input multiplied as one
  matrix, the rotary as one complex product). The bound asserted is 2e-5, and each quantized layer
  computes transformers' numbers bit for bit. Where bitsandbytes' 4-bit layers take its AVX512-BF16
  kernel (activations rounded to bfloat16; measured on a 2-core Xeon with AMX), those rounding
  differences grow through SmolLM2's 30 layers to 1.2e-2 for nf4 (bound 3e-2), the layers still equal.
- hf-bnb folders we write: every tensor byte for byte the one transformers writes quantizing the same
  source itself, so transformers' logits from our folder equal its own exactly.
- compressed-tensors: transformers' forward of our folder against a float32 forward of our
  dequantized int8 weights: 0 on the tiny model (asserted: 1e-4).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from llama_int8 import Llama, loader, quantize
from llama_int8.formats import CheckpointError, open_checkpoint
from llama_int8.formats.common import hf_to_meta_name
from llama_int8.formats.compressed_tensors import pack_int8, write_compressed_tensors
from llama_int8.formats.hf import write_hf
from llama_int8.formats.hf_bnb import HFBnbCheckpoint, write_hf_bnb
from llama_int8.quantize import parse_quant_mode
from conftest import hf_greedy, tiny_hf_model, write_hf_folder, write_meta_folder

BNB_MODES = ("int8", "nf4", "nf4-dq")
# Shapes the CPU 4-bit kernel accepts (out % 32 == 0, in % 64 == 0), grouped-query attention, untied head.
SHAPES = dict(hidden_size=64, intermediate_size=128, num_key_value_heads=2)
TINY_TOKENS = torch.tensor([[1, 5, 17, 42, 99, 7, 3, 64, 12, 80, 33, 2, 9, 100, 45, 6]])
# "The capital of France is Paris. The largest ocean on Earth is the" in SmolLM2's vocabulary.
SMOLLM2_TOKENS = torch.tensor([[1, 504, 3458, 282, 4649, 314, 7042, 30, 378, 4043, 6952, 335, 7043, 314, 260, 29]])
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "chat_template.jinja",
                   "special_tokens_map.json")


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: one intra-op thread for many small ops


# --- Helpers ---------------------------------------------------------------------------------------

def copy_tokenizer_files(source: Path, folder: Path) -> None:
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, folder / name)


def bf16_copy(model, folder: Path, tokenizer_from: Path) -> Path:
    """model saved in bfloat16 with the tokenizer of tokenizer_from: the source the quantizers read."""
    model.to(torch.bfloat16).save_pretrained(folder)
    copy_tokenizer_files(tokenizer_from, folder)
    return folder


def transformers_quantized(source: Path, mode: str, folder: Path, dtype: torch.dtype = torch.float32):
    """transformers quantizing source itself (loaded as dtype, float32 activations by default) and saving
    it to folder; returns the model, saved before any forward (a CPU 4-bit forward repacks the weights
    in place)."""
    from transformers import AutoModelForCausalLM

    from benchmarks.reference import bnb_config

    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, device_map={"": "cpu"},
                                                 quantization_config=bnb_config(mode, dtype)).eval()
    model.save_pretrained(folder)
    copy_tokenizer_files(source, folder)
    return model


def transformers_model(folder: Path, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, device_map={"": "cpu"}, **kwargs).eval()


def file_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


def quantized_modules(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """module -> {part: tensor} of the modules a bitsandbytes folder holds quantized."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        for marker in (".weight", ".SCB"):
            if marker in key and not key.endswith("norm.weight") and "embed_tokens" not in key:
                module = key[:key.index(marker)]
                modules.setdefault(module, {})[key[len(module) + 1:]] = t
                break
    return {m: parts for m, parts in modules.items() if set(parts) != {"weight"}}


def relative_difference(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).abs().max() / ref.abs().max())


def bf16_4bit_kernel(mode: str) -> bool:
    """Whether bitsandbytes' 4-bit layers run its AVX512-BF16 CPU kernel here, which rounds their
    activations to bfloat16."""
    import bitsandbytes as bnb

    return mode != "int8" and bnb.nn.Linear4bit(64, 32).support_avx512bf16_for_cpu


def check_layers_compute_alike(llm: Llama, reference, seed: int = 0) -> None:
    """Each quantized layer of ours and the same layer of transformers' model: one output, bit for bit."""
    import bitsandbytes as bnb

    ours = dict(llm.model.named_modules())
    g = torch.Generator().manual_seed(seed)
    compared = 0
    for name, theirs in reference.named_modules():
        if not isinstance(theirs, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) or name == "lm_head":
            continue
        layer = ours[hf_to_meta_name(f"{name}.weight").removesuffix(".weight")]
        x = torch.randn(3, theirs.in_features, generator=g)
        with torch.inference_mode():
            assert torch.equal(layer(x), theirs(x)), name
        compared += 1
    assert compared > 0


def check_loads_as_saved(folder: Path, reference, tokens: torch.Tensor, monkeypatch, rtol: float) -> None:
    """llama_int8 builds every quantized layer from exactly the file's tensors, quantizes nothing, each
    layer computes what transformers' computes, and the logits agree with transformers' forward of the
    quantized model within rtol (of the largest)."""
    def refuse(*args, **kwargs):
        raise AssertionError("a bitsandbytes folder must load without quantizing")

    monkeypatch.setattr(quantize, "quantize_weight", refuse)
    built: dict[str, dict[str, torch.Tensor]] = {}
    build_layer = loader.quantized_linear

    def spy(tensors, *args):
        built[len(built)] = {k: v.clone() for k, v in tensors.items()}
        return build_layer(tensors, *args)

    monkeypatch.setattr(loader, "quantized_linear", spy)
    checkpoint = open_checkpoint(folder)
    assert isinstance(checkpoint, HFBnbCheckpoint) and checkpoint.args.rope_layout == "halves"
    llm = Llama.build(folder, max_seq_len=tokens.shape[1], max_batch_size=1, device="cpu", dtype="float32",
                      quant="none")  # informational: the folder's own mode is used
    with torch.inference_mode():
        ours = llm.model(tokens, 0)
    saved = quantized_modules(file_tensors(folder))
    assert len(built) == len(saved)
    for layer, module in zip(built.values(), saved):  # the loader builds them in file order
        want = {k: v for k, v in saved[module].items() if k != "weight_format"}
        assert set(layer) == set(want), module
        for part, tensor in want.items():
            assert layer[part].dtype == tensor.dtype and torch.equal(layer[part], tensor), f"{module}.{part}"
    with torch.inference_mode():
        ref = reference(tokens).logits
    check_layers_compute_alike(llm, reference)
    assert (ours.argmax(-1) == ref.argmax(-1)).all()
    assert relative_difference(ours, ref) < rtol, relative_difference(ours, ref)


# --- Tiny random models ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory, sp_model) -> tuple[Path, object]:
    """A tiny random LLaMA (GQA, untied head) saved in bfloat16, and its float32 transformers model."""
    folder = tmp_path_factory.mktemp("tiny") / "bf16"
    write_hf_folder(tiny_hf_model(seed=5, **SHAPES).to(torch.bfloat16), folder, tokenizer=sp_model)
    return folder, transformers_model(folder)


@pytest.fixture(scope="module")
def tiny_bnb(tiny_source, tmp_path_factory) -> dict[str, tuple[Path, object]]:
    """transformers' own bitsandbytes folders of the tiny source, and the quantized models they saved."""
    root = tmp_path_factory.mktemp("tiny-bnb")
    return {mode: (root / mode, transformers_quantized(tiny_source[0], mode, root / mode)) for mode in BNB_MODES}


@pytest.mark.parametrize("mode", BNB_MODES)
def test_transformers_bnb_folder_loads_as_saved(tiny_bnb, mode, monkeypatch):
    folder, model = tiny_bnb[mode]
    check_loads_as_saved(folder, model, TINY_TOKENS, monkeypatch, rtol=2e-5)
    assert open_checkpoint(folder).quant.name == mode


@pytest.mark.parametrize("mode", BNB_MODES)
def test_hf_bnb_writer_equals_transformers_quantizing_itself(tiny_source, tiny_bnb, mode, tmp_path):
    theirs_folder, theirs_model = tiny_bnb[mode]
    cfg = parse_quant_mode(mode, blocksize=64)  # transformers' blocksize
    out = write_hf_bnb(open_checkpoint(tiny_source[0]), tmp_path / mode, cfg, dtype="float32")
    ours, theirs = file_tensors(out), file_tensors(theirs_folder)
    assert set(ours) == set(theirs)
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), key
    with safe_open(next(out.glob("*.safetensors")), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "bitsandbytes"
    assert (out / "generation_config.json").exists() and (out / "tokenizer.model").exists()

    loaded = transformers_model(out)  # pre-quantized: transformers builds its layers from our tensors
    held = dict(loaded.state_dict())
    for module, parts in quantized_modules(ours).items():
        for part, tensor in parts.items():
            key = f"{module}.{part}"
            if key in held and part != "weight_format":
                assert torch.equal(held[key], tensor), key
    linear = loaded.model.layers[0].self_attn.q_proj
    assert type(linear).__name__ == ("Linear8bitLt" if mode == "int8" else "Linear4bit")
    with torch.inference_mode():
        assert torch.equal(loaded(TINY_TOKENS).logits, theirs_model(TINY_TOKENS).logits)


def test_permuting_rows_of_double_quantized_layers_would_change_them():
    """Why the model rotates in Hugging Face's layout for these folders. A 4-bit layer's block scales
    move with their rows when blocks do not straddle rows (576 % 64 == 0); double quantization then
    rounds the scales in groups of 256 in sequence, and moving rows across groups changes the
    rounding: the permuted layer's scales are not the layer's scales permuted."""
    from llama_int8.formats.common import permute_rotary_rows

    torch.manual_seed(0)
    w = torch.randn(576, 576) * 0.02  # SmolLM2's q_proj: 9 heads of 64 rows, 9 blocks a row
    blocks = lambda t: t.view(576, 9)  # noqa: E731  [rows, blocks of the row]
    for mode, exact in (("nf4", True), ("nf4-dq", False)):
        cfg = parse_quant_mode(mode, blocksize=64)
        moved = permute_rotary_rows(blocks(quantize.quantize_weight(w, cfg)["weight.absmax"]), 9, 64)
        permuted_first = blocks(quantize.quantize_weight(permute_rotary_rows(w, 9, 64), cfg)["weight.absmax"])
        assert torch.equal(moved, permuted_first) == exact, mode


def test_compressed_tensors_writer(tiny_source, tmp_path):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
    from compressed_tensors.quantization import QuantizationConfig

    source, _ = tiny_source
    out = write_compressed_tensors(open_checkpoint(source), tmp_path / "ct", parse_quant_mode("int8"), dtype="float32")
    config = json.loads((out / "config.json").read_text())
    QuantizationConfig.model_validate(config["quantization_config"])  # the library accepts our description
    tensors = file_tensors(out)
    reference = transformers_model(source)  # float32, weights replaced by our dequantized int8 below
    with torch.no_grad():
        for name, p in reference.named_parameters():
            module = name.removesuffix(".weight")
            if f"{module}.weight_packed" not in tensors:
                continue
            q = quantize.quantize_weight(p.detach(), parse_quant_mode("int8"))  # p: q/k rows in HF's layout
            packed = tensors[f"{module}.weight_packed"]
            assert torch.equal(packed, pack_to_int32(q["weight"], 8))  # the library's own packing
            assert torch.equal(unpack_from_int32(packed, 8, torch.Size(p.shape)), q["weight"])
            assert torch.equal(tensors[f"{module}.weight_shape"], torch.tensor(p.shape))
            p.copy_(q["weight"].float() * (q["SCB"] / 127).unsqueeze(1))
    loaded = transformers_model(out)
    with torch.inference_mode():
        got, want = loaded(TINY_TOKENS).logits, reference(TINY_TOKENS).logits
    assert relative_difference(got, want) < 1e-4, relative_difference(got, want)
    assert not torch.equal(want, tiny_source[1](TINY_TOKENS).logits)  # the reference really is quantized


def test_int8_packing_equals_the_library_s_with_a_partial_last_word():
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    torch.manual_seed(0)
    cb = torch.randint(-127, 128, (32, 70), dtype=torch.int8)  # 70 = 17 words and a half
    assert torch.equal(pack_int8(cb), pack_to_int32(cb, 8))


def test_hf_writer_from_a_lora_stack(tmp_path, sp_model):
    """A base with a PEFT adapter merged, written as a sharded Hugging Face folder: transformers
    computes what peft's own merge computes."""
    from test_stack import make_peft_adapter

    base = tiny_hf_model(seed=6, **SHAPES)
    base_dir = write_hf_folder(base, tmp_path / "base", tokenizer=sp_model)
    merged = make_peft_adapter(base, tmp_path / "adapter")
    out = write_hf(open_checkpoint([base_dir, tmp_path / "adapter"]), tmp_path / "hf", shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 2 and set(index["weight_map"].values()) == set(shards)
    with torch.inference_mode():
        got, want = transformers_model(out)(TINY_TOKENS).logits, merged(TINY_TOKENS).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_hf_writer_from_meta_shards_in_bfloat16(tmp_path, sp_model):
    model = tiny_hf_model(seed=7, **SHAPES)
    meta = write_meta_folder(model, tmp_path / "meta", n_shards=2, tokenizer=sp_model)
    out = write_hf(open_checkpoint(meta), tmp_path / "hf", dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in file_tensors(out).values())
    loaded = transformers_model(out).state_dict()
    for key, want in model.state_dict().items():  # q/k rows back in Hugging Face's layout, bfloat16-rounded
        assert torch.equal(loaded[key], want.to(torch.bfloat16).float()), key


# --- Refusals --------------------------------------------------------------------------------------

def test_writers_refuse_what_they_cannot_write(tiny_source, tiny_bnb, tmp_path):
    source = open_checkpoint(tiny_source[0])
    with pytest.raises(ValueError, match="quantize_head"):
        write_hf_bnb(source, tmp_path / "a", parse_quant_mode("int8", quantize_head=True))
    with pytest.raises(ValueError, match="int8"):
        write_compressed_tensors(source, tmp_path / "b", parse_quant_mode("nf4"))
    quantized = open_checkpoint(tiny_bnb["int8"][0])
    for write in (lambda out: write_hf(quantized, out), lambda out: write_hf_bnb(quantized, out, parse_quant_mode("int8"))):
        with pytest.raises(ValueError, match="stored quantized"):
            write(tmp_path / "c")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_writers_replace_only_their_own_folders(tiny_source, tmp_path):
    source = open_checkpoint(tiny_source[0])
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    for force in (False, True):
        with pytest.raises(FileExistsError, match="foreign"):
            write_hf(source, foreign, force=force)
    assert [p.name for p in foreign.iterdir()] == ["keep.txt"]
    out = write_hf(source, tmp_path / "out")
    with pytest.raises(FileExistsError, match="--force"):
        write_hf(source, out)
    write_hf(source, out, force=True, dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with pytest.raises(FileExistsError, match="holds a hf folder"):  # --force replaces its own kind only
        write_hf_bnb(source, out, parse_quant_mode("nf4"), force=True)
    with pytest.raises(ValueError, match="source"):
        write_hf(source, tiny_source[0], force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign", "out"]


def corrupted_copy(folder: Path, tmp_path: Path, edit) -> Path:
    copy = Path(shutil.copytree(folder, tmp_path / "copy"))
    path = copy / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    from safetensors.torch import save_file

    save_file(tensors, path, metadata={"format": "pt"})
    return copy


@pytest.mark.parametrize("mode,edit,needles", [
    ("int8", lambda t: t.pop("model.layers.1.mlp.up_proj.SCB"), ["model.layers.1.mlp.up_proj", "SCB"]),
    ("int8", lambda t: t.update({"model.layers.0.self_attn.o_proj.weight_format": torch.tensor(1, dtype=torch.uint8)}),
     ["model.layers.0.self_attn.o_proj.weight_format", "row-major"]),
    ("nf4", lambda t: t.update({"model.layers.0.mlp.down_proj.weight.absmax":
                                t["model.layers.0.mlp.down_proj.weight.absmax"][:-1].clone()}),
     ["model.layers.0.mlp.down_proj.weight.absmax"]),
    ("nf4", lambda t: t.update({"model.norm.weight.absmax": torch.ones(1)}), ["model.norm"]),
])
def test_bad_bnb_folders_are_refused_by_name(tiny_bnb, tmp_path, mode, edit, needles):
    folder = corrupted_copy(tiny_bnb[mode][0], tmp_path, edit)
    with pytest.raises(CheckpointError) as info:
        Llama.build(folder, device="cpu", max_seq_len=8)
    for needle in needles:
        assert needle in str(info.value), str(info.value)


def test_other_quantization_methods_are_refused_by_name(tiny_source, tmp_path):
    folder = Path(shutil.copytree(tiny_source[0], tmp_path / "gptq"))
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="'gptq'") as info:
        open_checkpoint(folder)
    assert str(folder / "config.json") in str(info.value)


@pytest.mark.parametrize("source_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", BNB_MODES)
def test_hf_bnb_writer_equals_transformers_for_every_source_dtype(sp_model, tmp_path, source_dtype, mode):
    """From a float32, float16 or bfloat16 source, loaded as float32 and as the source's own dtype
    (transformers' "auto"), our hf-bnb folder holds transformers' bytes: int8 of a float32 source is
    quantized through float16 as bitsandbytes does it."""
    source = write_hf_folder(tiny_hf_model(seed=7, **SHAPES).to(source_dtype), tmp_path / "source", tokenizer=sp_model)
    for dtype, ours_dtype in {torch.float32: "float32", source_dtype: None}.items():  # None: as the source holds it
        theirs = tmp_path / f"theirs-{dtype}"
        transformers_quantized(source, mode, theirs, dtype)
        ours = write_hf_bnb(open_checkpoint(source), tmp_path / f"ours-{dtype}", parse_quant_mode(mode, blocksize=64),
                            dtype=ours_dtype)
        mine, want = file_tensors(ours), file_tensors(theirs)
        assert set(mine) == set(want)
        for key in want:
            assert mine[key].dtype == want[key].dtype and torch.equal(mine[key], want[key]), f"{dtype} {key}"


# --- SmolLM2-135M ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_bf16(smollm2_hf, tmp_path_factory) -> Path:
    from transformers import AutoModelForCausalLM

    return bf16_copy(AutoModelForCausalLM.from_pretrained(smollm2_hf), tmp_path_factory.mktemp("smollm2") / "bf16",
                     smollm2_hf)


@pytest.fixture(scope="module")
def smollm2_bnb(smollm2_bf16, tmp_path_factory) -> dict[str, tuple[Path, object]]:
    """transformers' bitsandbytes folders of SmolLM2 (the slow part: about 30 s a mode here)."""
    root = tmp_path_factory.mktemp("smollm2-bnb")
    return {mode: (root / mode, transformers_quantized(smollm2_bf16, mode, root / mode)) for mode in BNB_MODES}


@pytest.mark.slow
@pytest.mark.parametrize("mode", BNB_MODES)
def test_smollm2_bnb_folder_loads_as_saved(smollm2_bnb, mode, monkeypatch):
    folder, model = smollm2_bnb[mode]
    # The bfloat16 kernel turns float32 rounding differences before a layer (other kernels for the
    # rest of the model) into bfloat16 roundings inside it, which grow over 30 layers: 1.2e-2 measured.
    check_loads_as_saved(folder, model, SMOLLM2_TOKENS, monkeypatch, rtol=3e-2 if bf16_4bit_kernel(mode) else 2e-5)


@pytest.mark.slow
@pytest.mark.parametrize("mode", BNB_MODES)
def test_smollm2_hf_bnb_writer_equals_transformers(smollm2_bf16, smollm2_bnb, mode, tmp_path):
    out = write_hf_bnb(open_checkpoint(smollm2_bf16), tmp_path / mode, parse_quant_mode(mode, blocksize=64),
                       dtype="float32")
    ours, theirs = file_tensors(out), file_tensors(smollm2_bnb[mode][0])
    assert set(ours) == set(theirs)
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), key


@pytest.mark.slow
def test_smollm2_hf_from_gguf_greedy_tokens_equal_ours(smollm2_gguf, tmp_path):
    out = write_hf(open_checkpoint(smollm2_gguf), tmp_path / "hf", dtype="float32")
    prompt = SMOLLM2_TOKENS[0, :8].tolist()
    llm = Llama.build(smollm2_gguf, quant="none", device="cpu", dtype="float32", max_seq_len=32)
    ours = llm.generate([prompt], max_gen_len=16, temperature=0, stop_ids=())[0]
    assert hf_greedy(transformers_model(out), prompt, 16) == ours


# --- The command line ------------------------------------------------------------------------------

def test_quantize_offline_writes_each_format(tiny_source, tmp_path):
    import importlib.util

    from llama_int8.formats.export import DTYPES

    spec = importlib.util.spec_from_file_location("quantize_offline", Path(__file__).parent.parent / "quantize_offline.py")
    quantize_offline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quantize_offline)
    assert set(quantize_offline.EXPORT_DTYPES) == set(DTYPES)  # the flag's choices are the writers'
    source = str(tiny_source[0])
    for fmt, flags in (("hf", ["--dtype", "float16"]), ("hf-bnb", ["--quant", "nf4-dq"]), ("compressed-tensors", [])):
        parser = quantize_offline.build_parser()
        quantize_offline.main(parser.parse_args(["--ckpt_dir", source, "--out_dir", str(tmp_path / fmt), "--format", fmt,
                                                 *flags]))
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "float16"
    quant = open_checkpoint(tmp_path / "hf-bnb").quant
    assert (quant.name, quant.blocksize) == ("nf4-dq", 64)  # transformers' blocksize by default
    config = json.loads((tmp_path / "compressed-tensors" / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized" and config["torch_dtype"] == "bfloat16"
