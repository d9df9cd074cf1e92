"""Checkpoint stacks (overrides, deltas, PEFT LoRA adapters) against checkpoints merged by hand and
against peft's own merge, on tiny random transformers models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import hf_to_meta_state, tiny_hf_model, write_hf_folder, write_meta_folder
from llama_int8 import Llama
from llama_int8.formats import CheckpointError, open_checkpoint
from llama_int8.model import ModelArgs, parameter_shapes
from llama_int8.formats.stack import CheckpointStack, resolve_name

GQA = dict(num_key_value_heads=2)  # k has fewer heads than q: its rows are un-permuted per k/v head
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(3))


def build(folders, delta=None, quant: str = "none") -> Llama:
    return Llama.build(folders, delta=delta, quant=quant, dtype="float32", device="cpu", max_seq_len=32,
                       max_batch_size=2)


def logits(llm: Llama, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return llm.model(tokens, 0)


def hf_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


def write_state(folder: Path, state: dict[str, torch.Tensor], fmt: str = "safetensors") -> Path:
    """A partial checkpoint: tensors only, no config."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous().clone() for k, v in state.items()}
    if fmt == "safetensors":
        save_file(state, folder / "model.safetensors")
    else:
        torch.save(state, folder / "consolidated.00.pth")
    return folder


def hf_with(base, replaced: dict[str, torch.Tensor], **overrides):
    """A copy of base (same seed and config) with some HF-named tensors replaced."""
    model = tiny_hf_model(seed=0, **overrides)
    model.load_state_dict(base.state_dict())
    with torch.no_grad():
        for key, value in replaced.items():
            model.get_parameter(key).copy_(value)
    return model


# --- Override ----------------------------------------------------------------------------------------

def test_partial_overlays_replace_tensors_in_order(tmp_path, sp_model, tokens):
    base, ft, other = (tiny_hf_model(seed=s, **GQA) for s in (0, 1, 2))
    base_dir = write_hf_folder(base, tmp_path / "base", tokenizer=sp_model)
    ft_meta, ft_hf, other_hf = hf_to_meta_state(ft), ft.state_dict(), other.state_dict()
    # Meta names under LLaMA2-Accessory's prefix, as a config-less consolidated shard.
    first = write_state(tmp_path / "accessory", {
        "llma.layers.0.attention.wq.weight": ft_meta["layers.0.attention.wq.weight"],
        "llma.layers.1.feed_forward.w2.weight": ft_meta["layers.1.feed_forward.w2.weight"],
        "llma.norm.weight": ft_meta["norm.weight"]}, fmt="pth")
    # HF names under a DDP prefix, config-less safetensors; its q_proj of layer 0 replaces the first's.
    second = write_state(tmp_path / "ddp", {
        "module.model.layers.0.self_attn.q_proj.weight": other_hf["model.layers.0.self_attn.q_proj.weight"],
        "module.model.layers.1.self_attn.k_proj.weight": ft_hf["model.layers.1.self_attn.k_proj.weight"],
        "module.model.embed_tokens.weight": ft_hf["model.embed_tokens.weight"]})
    merged = hf_with(base, {
        "model.layers.0.self_attn.q_proj.weight": other_hf["model.layers.0.self_attn.q_proj.weight"],
        "model.layers.1.mlp.down_proj.weight": ft_hf["model.layers.1.mlp.down_proj.weight"],
        "model.norm.weight": ft_hf["model.norm.weight"],
        "model.layers.1.self_attn.k_proj.weight": ft_hf["model.layers.1.self_attn.k_proj.weight"],
        "model.embed_tokens.weight": ft_hf["model.embed_tokens.weight"]}, **GQA)
    merged_dir = write_hf_folder(merged, tmp_path / "merged", tokenizer=sp_model)

    ours = logits(build([base_dir, first, second]), tokens)
    assert torch.equal(ours, logits(build(merged_dir), tokens))
    torch.testing.assert_close(ours, hf_logits(merged, tokens), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours, hf_logits(base, tokens), atol=1e-3)


@pytest.mark.parametrize("layout", ["meta-2-shards", "hf-with-config"])
def test_full_overlay_in_another_format_gives_the_finetune(layout, tmp_path, sp_model, tokens):
    base, ft = tiny_hf_model(seed=0, **GQA), tiny_hf_model(seed=1, **GQA)
    base_dir = write_meta_folder(base, tmp_path / "base", tokenizer=sp_model)
    if layout == "hf-with-config":
        ft_dir = write_hf_folder(ft, tmp_path / "ft")
    else:
        ft_dir = write_meta_folder(ft, tmp_path / "ft", n_shards=2)
        (ft_dir / "params.json").unlink()  # a partial folder: the base's configuration is taken
    torch.testing.assert_close(logits(build([base_dir, ft_dir]), tokens), hf_logits(ft, tokens),
                               rtol=1e-5, atol=1e-5)


# --- Delta -------------------------------------------------------------------------------------------

def test_delta_is_added_only_when_stated(tmp_path, sp_model, tokens):
    base, target = tiny_hf_model(seed=0, **GQA), tiny_hf_model(seed=1, **GQA)
    base_dir = write_hf_folder(base, tmp_path / "base", tokenizer=sp_model)
    target_state = target.state_dict()
    delta = {k: target_state[k] - v for k, v in base.state_dict().items()}
    hf_delta = write_state(tmp_path / "hf-delta", delta)
    expected = hf_logits(target, tokens)
    torch.testing.assert_close(logits(build([base_dir], delta=[hf_delta]), tokens), expected, rtol=1e-5, atol=1e-5)

    # The same delta in Meta's layout, marked by its manifest, stacked as an ordinary folder.
    meta_delta = write_state(tmp_path / "meta-delta", {
        k: v - hf_to_meta_state(base)[k] for k, v in hf_to_meta_state(target).items()}, fmt="pth")
    (meta_delta / "overlay.json").write_text(json.dumps({"kind": "delta"}))
    torch.testing.assert_close(logits(build([base_dir, meta_delta]), tokens), expected, rtol=1e-5, atol=1e-5)

    # Unmarked, a folder of differences is an override: never guessed to be a delta.
    assert not torch.allclose(logits(build([base_dir, hf_delta]), tokens), expected, atol=1e-2)


# --- LoRA --------------------------------------------------------------------------------------------

def make_peft_adapter(base, folder: Path, **lora_settings):
    """A PeftModel with random (non-zero) lora_B saved to folder; returns peft's merged model."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(base, LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ALL_LINEAR,
                                                    **lora_settings}))
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:  # zero at initialization, which would make the test vacuous
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    peft_model.save_pretrained(folder)
    return peft_model.merge_and_unload().eval()


LORA_CASES = {
    "plain": {},
    "rslora": {"use_rslora": True, "target_modules": ["q_proj", "v_proj", "o_proj", "gate_proj", "k_proj"]},
    "patterns": {"rank_pattern": {"k_proj": 2, "model.layers.1.mlp.down_proj": 3}, "alpha_pattern": {"v_proj": 3}},
}


@pytest.mark.parametrize("case", LORA_CASES)
def test_lora_merge_matches_peft(case, tmp_path, sp_model, tokens):
    base = tiny_hf_model(seed=0, **GQA)
    base_dir = write_hf_folder(base, tmp_path / "base", tokenizer=sp_model)  # before peft wraps its layers
    merged = make_peft_adapter(base, tmp_path / "adapter", **LORA_CASES[case])
    ours = logits(build([base_dir, tmp_path / "adapter"]), tokens)
    torch.testing.assert_close(ours, hf_logits(merged, tokens), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours, logits(build(base_dir), tokens), atol=1e-3)


def test_int8_quantizes_the_merged_weights(tmp_path, sp_model):
    from llama_int8.quantize import parse_quant_mode, quantize_weight

    base = tiny_hf_model(seed=0, **GQA)
    base_dir = write_hf_folder(base, tmp_path / "base", tokenizer=sp_model)
    make_peft_adapter(base, tmp_path / "adapter")
    stack = [base_dir, tmp_path / "adapter"]
    merged_weight = build(stack).model.layers[0].attention.wq.weight
    quantized = build(stack, quant="int8").model.layers[0].attention.wq.weight
    want = quantize_weight(merged_weight, parse_quant_mode("int8"))
    assert torch.equal(quantized.CB.cpu(), want["weight"])
    assert torch.equal(quantized.SCB.cpu(), want["SCB"])
    unmerged = quantize_weight(build(base_dir).model.layers[0].attention.wq.weight, parse_quant_mode("int8"))
    assert not torch.equal(quantized.CB.cpu(), unmerged["weight"])


def test_prebaked_manifest_lists_every_folder(tmp_path, sp_model):
    from llama_int8.formats.prebaked import read_json, write_prebaked
    from llama_int8.quantize import parse_quant_mode

    base = tiny_hf_model(seed=0)
    base_dir = write_hf_folder(base, tmp_path / "base", tokenizer=sp_model)
    make_peft_adapter(base, tmp_path / "adapter", target_modules=["q_proj"])
    delta = write_state(tmp_path / "delta", {"model.norm.weight": torch.full((64,), 0.5)})
    out = write_prebaked(open_checkpoint([base_dir, tmp_path / "adapter"], delta=[delta]), tmp_path / "baked",
                         parse_quant_mode("int8"))
    stack = read_json(out / "manifest.json")["source"]["stack"]
    assert [(Path(s["path"]).name, s["kind"]) for s in stack] == [("base", "base"), ("adapter", "lora"),
                                                                  ("delta", "delta")]


def test_cli_list_forms(base_dir, tmp_path):
    overlay = write_state(tmp_path / "o", {"model.norm.weight": torch.zeros(64)})
    for form in (f"[{base_dir},{overlay}]", f"{base_dir},{overlay}", (str(base_dir), str(overlay))):
        stack = open_checkpoint(form)
        assert isinstance(stack, CheckpointStack) and [o.folder for o in stack.overlays] == [overlay]
    assert not isinstance(open_checkpoint(str(base_dir)), CheckpointStack)


# --- Names -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("key, want", [
    ("layers.0.attention.wq.weight", ("layers.0.attention.wq.weight", False)),
    ("llma.layers.1.feed_forward.w3.weight", ("layers.1.feed_forward.w3.weight", False)),
    ("module.model.layers.0.attention.wk.weight", ("layers.0.attention.wk.weight", False)),
    ("model.layers.0.self_attn.q_proj.weight", ("layers.0.attention.wq.weight", True)),
    ("base_model.model.model.layers.1.mlp.up_proj.weight", ("layers.1.feed_forward.w3.weight", True)),
    ("_orig_mod.lm_head.weight", ("output.weight", True)),
    ("model.layers.2.self_attn.q_proj.weight", None),  # the model has 2 layers
    ("layers.0.attention.wq.bias", None),
])
def test_resolve_name(key, want):
    params = parameter_shapes(ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=128, hidden_dim=96))
    assert resolve_name(key, params) == want


# --- Bad inputs --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, sp_model) -> Path:
    return write_hf_folder(tiny_hf_model(seed=0, **GQA), tmp_path_factory.mktemp("stack") / "base", tokenizer=sp_model)


def write_adapter(folder: Path, tensors: dict[str, torch.Tensor], **config) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                            "target_modules": ["q_proj"], **config}))
    return folder


def q_lora(layer: int = 0) -> dict[str, torch.Tensor]:
    prefix = f"base_model.model.model.layers.{layer}.self_attn.q_proj"
    return {f"{prefix}.lora_A.weight": torch.randn(2, 64), f"{prefix}.lora_B.weight": torch.randn(64, 2)}


def test_shape_mismatch_names_the_tensor_and_both_files(base_dir, tmp_path):
    overlay = write_state(tmp_path / "bad", {"model.layers.1.self_attn.v_proj.weight": torch.zeros(64, 64)})
    stack = open_checkpoint([base_dir, overlay])
    with pytest.raises(CheckpointError, match=r"layers\.1\.attention\.wv\.weight") as err:
        for _ in stack.tensors():
            pass
    assert str(overlay / "model.safetensors") in str(err.value)
    assert str(base_dir / "model.safetensors") in str(err.value)


def test_overlay_keys_matching_nothing_are_listed(base_dir, tmp_path):
    overlay = write_state(tmp_path / "foreign", {"model.layers.0.mlp.fc1.weight": torch.zeros(2),
                                                 "vision_tower.proj.weight": torch.zeros(2),
                                                 "model.norm.weight": torch.zeros(64)})
    with pytest.raises(CheckpointError, match=r"2 tensors match no parameter.*fc1.*vision_tower"):
        open_checkpoint([base_dir, overlay])


def test_adapter_targets_that_do_not_exist(base_dir, tmp_path):
    with pytest.raises(CheckpointError, match=r"target_modules \['fc1'\]"):
        open_checkpoint([base_dir, write_adapter(tmp_path / "a", q_lora(), target_modules=["q_proj", "fc1"])])
    with pytest.raises(CheckpointError, match=r"do not exist in the base model.*layers\.5\.self_attn\.q_proj"):
        open_checkpoint([base_dir, write_adapter(tmp_path / "b", {**q_lora(0), **q_lora(5)})])


@pytest.mark.parametrize("setting", [{"use_dora": True}, {"bias": "all"}, {"peft_type": "IA3"}])
def test_unmergeable_adapters_are_refused(setting, base_dir, tmp_path):
    key = next(iter(setting))
    with pytest.raises(CheckpointError, match=key):
        open_checkpoint([base_dir, write_adapter(tmp_path / "a", q_lora(), **setting)])


def test_adapter_rank_must_match_its_config(base_dir, tmp_path):
    with pytest.raises(CheckpointError, match="rank 2.*r=8"):
        open_checkpoint([base_dir, write_adapter(tmp_path / "a", q_lora(), r=8)])


def rank_zero_q_lora() -> dict[str, torch.Tensor]:
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    return {f"{prefix}.lora_A.weight": torch.zeros(0, 64), f"{prefix}.lora_B.weight": torch.zeros(64, 0)}


@pytest.mark.parametrize("setting, message", [
    ({"r": 0}, "r must be an integer >= 1, got 0"),
    ({"r": 2.5}, "r must be an integer >= 1, got 2.5"),
    ({"r": True}, "r must be an integer >= 1, got True"),
    ({"lora_alpha": float("nan")}, "lora_alpha must be a finite number, got nan"),
    ({"lora_alpha": "4"}, "lora_alpha must be a finite number, got '4'"),
    ({"use_rslora": "false"}, "use_rslora must be true or false, got 'false'"),
    ({"rank_pattern": {"q_proj": 0}}, "rank_pattern['q_proj'] must be an integer >= 1, got 0"),
    ({"rank_pattern": ["q_proj"]}, "rank_pattern must be an object of module pattern -> value, got list"),
    ({"alpha_pattern": {"q_proj": float("inf")}}, "alpha_pattern['q_proj'] must be a finite number, got inf"),
    ({"alpha_pattern": {"(q_proj": 2}}, "alpha_pattern key '(q_proj' is not a regular expression"),
    ({"target_modules": ["q_proj", 3]}, "target_modules must list module names (strings), got ['q_proj', 3]"),
])
def test_bad_adapter_settings_name_the_config_and_key(setting, message, base_dir, tmp_path):
    # Rank-0 factors: r=0 (or a 0 in rank_pattern) agrees with them and used to divide the scale by zero.
    adapter = write_adapter(tmp_path / "a", rank_zero_q_lora(), **setting)
    with pytest.raises(CheckpointError) as err:
        open_checkpoint([base_dir, adapter])
    assert err.type is CheckpointError and f"{adapter / 'adapter_config.json'}: {message}" in str(err.value)


def test_adapter_config_without_r(base_dir, tmp_path):
    adapter = write_adapter(tmp_path / "a", q_lora())
    config = json.loads((adapter / "adapter_config.json").read_text())
    del config["r"]
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as err:
        open_checkpoint([base_dir, adapter])
    assert err.type is CheckpointError
    assert f"{adapter / 'adapter_config.json'}: missing required key 'r'" in str(err.value)


def test_delta_or_adapter_without_a_base(base_dir, tmp_path):
    delta = write_state(tmp_path / "delta", {"model.norm.weight": torch.zeros(64)})
    with pytest.raises(CheckpointError, match="without a base"):
        open_checkpoint([], delta=[delta])
    (delta / "overlay.json").write_text(json.dumps({"kind": "delta"}))
    with pytest.raises(CheckpointError, match="needs a base"):
        open_checkpoint([delta, base_dir])
    with pytest.raises(CheckpointError, match="needs a base"):
        open_checkpoint([write_adapter(tmp_path / "a", q_lora()), base_dir])


def test_bad_manifests_and_configs(base_dir, tmp_path):
    overlay = write_state(tmp_path / "o", {"model.norm.weight": torch.zeros(64)})
    (overlay / "overlay.json").write_text(json.dumps({"kind": "sum"}))
    with pytest.raises(CheckpointError, match="overlay.json"):
        open_checkpoint([base_dir, overlay])
    (overlay / "overlay.json").write_text(json.dumps({"kind": "override"}))
    with pytest.raises(CheckpointError, match="passed as a delta"):
        open_checkpoint([base_dir], delta=[overlay])
    (overlay / "overlay.json").unlink()
    (overlay / "params.json").write_text(json.dumps({"dim": 128, "n_layers": 2, "n_heads": 4, "vocab_size": 128}))
    with pytest.raises(CheckpointError, match=r"does not match the base.*dim=128"):
        open_checkpoint([base_dir, overlay])


def test_prebaked_folders_cannot_be_stacked(base_dir, tmp_path):
    baked = tmp_path / "baked"
    baked.mkdir()
    (baked / "manifest.json").write_text("{}")
    with pytest.raises(CheckpointError, match="pre-baked"):
        open_checkpoint([base_dir, baked])
