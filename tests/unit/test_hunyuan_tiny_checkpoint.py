"""The tiny-checkpoint writer: the released file layout, deterministic from the seed, small."""

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from omni_ep.models.hunyuan_image3.make_tiny_checkpoint import split_into_shards
from omni_ep.models.hunyuan_image3.tokenization import HunyuanImage3SpecialTokens
from tests.unit.hunyuan_reference import tiny_checkpoint_path

pytestmark = pytest.mark.timeout(120)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _digests(path):
    return {
        f: hashlib.sha256(open(os.path.join(path, f), "rb").read()).hexdigest()
        for f in sorted(os.listdir(path))
        if f.endswith(".safetensors") or f.endswith(".json") and f != "tokenizer_config.json"
    }


def _index(path):
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        return json.load(f)


def test_layout_is_the_released_one():
    path = tiny_checkpoint_path()
    files = set(os.listdir(path))
    assert {"config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json"} <= files
    shards = sorted(f for f in files if f.endswith(".safetensors"))
    assert shards == [f"model-0000{k}-of-00004.safetensors" for k in range(1, 5)]
    weight_map = _index(path)["weight_map"]
    assert set(weight_map.values()) == set(shards)

    config = json.load(open(os.path.join(path, "config.json")))
    assert isinstance(config["moe_topk"], list) and isinstance(config["moe_intermediate_size"], list)  # per layer
    assert "head_dim" not in config and "attention_head_dim" in config  # the released key

    # Real names, real fused shapes: qkv (4 + 2*2) * 16 rows; experts' gate_and_up [2I, D]; router [E, D].
    for name, shape in {
        "model.layers.1.self_attn.qkv_proj.weight": [128, 64],
        "model.layers.0.mlp.experts.7.gate_and_up_proj.weight": [64, 64],
        "model.layers.0.mlp.experts.7.down_proj.weight": [64, 32],
        "model.layers.0.mlp.gate.wg.weight": [8, 64],
        "model.layers.0.mlp.shared_mlp.gate_and_up_proj.weight": [64, 64],
        "patch_embed.model.1.skip_connection.weight": [64, 32, 1, 1],
        "final_layer.model.1.2.weight": [32, 32, 3, 3],
        "time_embed_2.mlp.0.weight": [64, 256],
        "vae.decoder.conv_in.weight": [64, 32, 3, 3, 3],
    }.items():
        with safe_open(os.path.join(path, weight_map[name]), "pt") as f:
            assert f.get_slice(name).get_shape() == shape, name
            assert f.get_slice(name).get_dtype() == "BF16"  # as the released file stores every tensor
    for prefix in ("vision_model.", "vision_aligner.", "vae.encoder.", "lm_head.", "model.ln_f."):
        assert any(n.startswith(prefix) for n in weight_map), prefix
    total = sum(os.path.getsize(os.path.join(path, f)) for f in files)
    assert total < 12 * 2**20


def test_tokenizer_holds_the_template_special_tokens():
    from transformers import AutoTokenizer

    path = tiny_checkpoint_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    config = json.load(open(os.path.join(path, "config.json")))
    special = HunyuanImage3SpecialTokens.from_tokenizer(tokenizer, base_size=config["image_base_size"])
    assert len(special.image_ratios) == 33
    assert max(special.image_ratios) < config["vocab_size"] and len(tokenizer) <= config["vocab_size"]
    assert (config["bos_token_id"], config["eos_token_id"]) == (special.bos, special.eos)


@pytest.mark.slow
def test_deterministic_from_the_seed(tmp_path):
    cmd = [sys.executable, "-m", "omni_ep.models.hunyuan_image3.make_tiny_checkpoint"]
    env = {**os.environ, "PYTHONPATH": REPO}
    subprocess.run(cmd + [str(tmp_path / "a")], check=True, cwd=REPO, env=env, capture_output=True)
    subprocess.run(cmd + [str(tmp_path / "b"), "--seed", "1"], check=True, cwd=REPO, env=env, capture_output=True)
    same, other = _digests(tiny_checkpoint_path()), _digests(tmp_path / "a")
    assert same == other  # seed 0 written twice, in two processes
    changed = _digests(tmp_path / "b")
    assert all(changed[f] != same[f] for f in same if f.endswith(".safetensors"))


def test_split_into_shards_is_even_and_ordered():
    assert split_into_shards(list("abcdefg"), 3) == [["a", "b", "c"], ["d", "e"], ["f", "g"]]
    with pytest.raises(ValueError, match="num_shards"):
        split_into_shards(["a"], 2)


def test_values_are_not_degenerate():
    path = tiny_checkpoint_path()
    name = "model.layers.0.input_layernorm.weight"
    with safe_open(os.path.join(path, _index(path)["weight_map"][name]), "pt") as f:
        norm = f.get_tensor(name).float()
    assert 0.5 < norm.mean() < 1.5 and norm.std() > 0.01
    assert torch.isfinite(norm).all()
