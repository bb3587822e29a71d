"""HunyuanImage3Config reads the released config.json layout: per-layer lists, attention_head_dim, the vae block."""

import json

import pytest

from omni_ep.models.hunyuan_image3 import HunyuanImage3Config

pytestmark = pytest.mark.timeout(30)

# The released base model's config.json fields that the model reads (lists as the real file stores them).
RELEASED = {
    "architectures": ["HunyuanImage3ForCausalMM"],
    "model_type": "hunyuan_image_3_moe",
    "vocab_size": 133120,
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "attention_head_dim": 128,
    "intermediate_size": 3072,
    "moe_intermediate_size": [3072] * 32,
    "num_experts": 64,
    "moe_topk": [8] * 32,
    "num_shared_expert": [1] * 32,
    "use_mixed_mlp_moe": True,
    "norm_topk_prob": True,
    "moe_drop_tokens": False,
    "use_qk_norm": True,
    "rope_theta": 10000.0,
    "rope_scaling": {"type": "custom", "factor": 1.0, "beta_fast": 32},
    "max_position_embeddings": 22800,
    "rms_norm_eps": 1e-05,
    "hidden_act": "silu",
    "img_proj_type": "unet",
    "patch_size": 1,
    "patch_embed_hidden_dim": 1024,
    "image_base_size": 1024,
    "vae_downsample_factor": [16, 16],
    "vit": {"hidden_size": 1152},
    "vae": {
        "_class_name": "AutoencoderKLConv3D",
        "block_out_channels": [128, 256, 512, 1024, 1024],
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 32,
        "layers_per_block": 2,
        "ffactor_spatial": 16,
        "ffactor_temporal": 4,
        "sample_size": 384,
        "scaling_factor": 0.562679178327931,
        "downsample_match_channel": True,
        "upsample_match_channel": True,
    },
}


def test_reads_the_released_layout(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(RELEASED))
    config = HunyuanImage3Config.from_pretrained(tmp_path)
    assert config.attention_head_dim == 128
    assert config.qkv_rows == (32 + 2 * 8) * 128 == 6144
    assert [config.moe_topk_at(i) for i in (0, 31)] == [8, 8]
    assert config.moe_intermediate_size_at(5) == 3072
    assert config.shared_mlp_intermediate_size_at(5) == 3072
    assert config.latent_channels == 32
    assert config.vae.scaling_factor == pytest.approx(0.562679178327931)
    assert config.vae.block_out_channels == [128, 256, 512, 1024, 1024]
    assert config.extra["vit"] == {"hidden_size": 1152}  # kept, unused
    assert config.vae.extra["sample_size"] == 384


def test_round_trip_keeps_every_field(tmp_path):
    config = HunyuanImage3Config.from_dict(RELEASED)
    config.to_json_file(tmp_path / "config.json")
    again = HunyuanImage3Config.from_pretrained(tmp_path / "config.json")
    assert again == config
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["moe_topk"] == [8] * 32 and written["vae"]["_class_name"] == "AutoencoderKLConv3D"


def test_per_layer_fields_may_differ_by_layer():
    config = HunyuanImage3Config(num_hidden_layers=3, moe_topk=[1, 2, 3], num_shared_expert=[1, 2, 1])
    assert [config.moe_topk_at(i) for i in range(3)] == [1, 2, 3]
    assert config.shared_mlp_intermediate_size_at(1) == 2 * 3072


@pytest.mark.parametrize(
    "change, message",
    [
        ({"moe_topk": [8] * 31}, "per-layer list of 31 entries"),
        ({"num_key_value_heads": 5}, "multiple of num_key_value_heads"),
        ({"attention_head_dim": 126}, "divisible by 4"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"moe_topk": [65] * 32}, r"moe_topk of layer 0 is 65"),
        ({"patch_embed_hidden_dim": 48}, "multiples of 32"),
        ({"moe_drop_tokens": True}, "never drops tokens"),
    ],
)
def test_bad_configs_say_what_to_change(change, message):
    with pytest.raises(ValueError, match=message):
        HunyuanImage3Config.from_dict({**RELEASED, **change})


def test_missing_or_broken_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        HunyuanImage3Config.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        HunyuanImage3Config.from_pretrained(tmp_path)
