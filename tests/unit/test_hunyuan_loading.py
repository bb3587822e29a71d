"""Loading the tiny checkpoint: per-rank bytes read (EP=2, TP=2 on spawned gloo ranks), outputs equal to
one process, skipped towers, dummy weights, the VAE decoder, and clear errors for broken checkpoints."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from omni_ep.config import ParallelConfig
from omni_ep.distributed import destroy_parallel_state, init_parallel_state
from omni_ep.models.hunyuan_image3 import (
    CheckpointError,
    HunyuanImage3Transformer2DModel,
    load_transformer,
    load_vae_decoder,
)
from omni_ep.models.hunyuan_image3.loading import SafetensorsCheckpoint, plan_load
from omni_ep.models.hunyuan_image3.transformer import SKIPPED_PREFIXES
from tests.launcher import run_ranks
from tests.unit.hunyuan_reference import ensure_single_process_state, tiny_checkpoint_path, tiny_inputs

pytestmark = pytest.mark.timeout(300)

EXPERT_PATTERN = ".mlp.experts."


def _stored_bytes(path: str) -> dict[str, int]:
    return {name: entry.nbytes for name, entry in SafetensorsCheckpoint(path).entries.items()}


def _velocity(model, seed=0):
    ids, latents, t, image_slice, ts_idx = tiny_inputs(model.config.vocab_size, batch=2, h=4, w=4, seed=seed)
    with torch.no_grad():
        return model(latents, t, image_slice, ts_idx, input_ids=ids)


LAYOUTS = {"EP2": dict(data_parallel_size=2, enable_expert_parallel=True), "TP2": dict(tensor_parallel_size=2)}
UNSUPPORTED = {"PP2": dict(pipeline_parallel_size=2)}


def _load_report(path, layout, load_format="safetensors"):
    init_parallel_state(ParallelConfig(**layout))
    try:
        model = load_transformer(path, dtype=torch.float32, device="cpu", load_format=load_format)
        experts = model.model.layers[0].mlp.experts
        stats = model.load_stats
        planned = plan_load(path, dtype=torch.float32) if load_format == "safetensors" else None
        return {
            "planned": None if planned is None else (planned.bytes_read, sorted(planned.names_read)),
            "bytes_read": stats.bytes_read,
            "expert_bytes_read": stats.expert_bytes_read,
            "names_read": stats.names_read,
            "local_expert_ids": list(experts.local_expert_ids),
            "velocity": _velocity(model),
        }
    except NotImplementedError as e:
        return str(e)
    finally:
        destroy_parallel_state()


def _two_rank_worker(rank, world_size, path):
    """Every layout of this file in one spawn: each rank's report per layout name."""
    reports = {name: _load_report(path, layout) for name, layout in {**LAYOUTS, **UNSUPPORTED}.items()}
    reports |= {f"dummy {name}": _load_report(path, layout, "dummy") for name, layout in LAYOUTS.items()}
    return reports


@pytest.fixture(scope="module")
def two_ranks():
    """[rank 0's reports, rank 1's reports] from one spawn of 2 gloo ranks."""
    return run_ranks(_two_rank_worker, 2, tiny_checkpoint_path(), timeout=240)


@pytest.fixture(scope="module")
def single():
    ensure_single_process_state()
    return load_transformer(tiny_checkpoint_path(), dtype=torch.float32, device="cpu")


def test_single_process_reads_everything_but_the_skipped_towers(single):
    stored = _stored_bytes(tiny_checkpoint_path())
    needed = {n: b for n, b in stored.items() if not n.startswith(SKIPPED_PREFIXES)}
    assert single.load_stats.bytes_read == sum(needed.values())
    assert single.load_stats.stored_dtype == torch.bfloat16  # what save_pretrained writes back
    assert sorted(single.load_stats.names_read) == sorted(needed)
    assert not [n for n in single.load_stats.names_read if n.startswith(SKIPPED_PREFIXES)]
    assert any(n.startswith(p) for n in stored for p in ("vision_model.", "vision_aligner.", "vae.encoder.", "lm_head."))


@pytest.mark.slow
def test_expert_parallel_2_reads_replicated_plus_half_the_experts_and_matches_one_process(single, two_ranks):
    path = tiny_checkpoint_path()
    stored = _stored_bytes(path)
    needed = {n: b for n, b in stored.items() if not n.startswith(SKIPPED_PREFIXES)}
    expert_bytes = sum(b for n, b in needed.items() if EXPERT_PATTERN in n)
    replicated_bytes = sum(needed.values()) - expert_bytes
    reference = _velocity(single)

    vae_bytes = sum(b for n, b in stored.items() if n.startswith("vae.decoder."))
    held = []
    for rank, report in enumerate(r["EP2"] for r in two_ranks):
        assert report["bytes_read"] == replicated_bytes + expert_bytes // 2
        # plan_load (the CLI's --print-layout) counts the same reads from the headers, plus the VAE decoder
        vae_names = sorted(n for n in stored if n.startswith("vae.decoder."))
        assert report["planned"] == (report["bytes_read"] + vae_bytes, sorted(report["names_read"] + vae_names))
        assert report["expert_bytes_read"] == expert_bytes // 2
        ids = report["local_expert_ids"]
        assert ids == list(range(4 * rank, 4 * rank + 4))  # linear placement of 8 experts
        read_experts = {int(n.split(".")[5]) for n in report["names_read"] if EXPERT_PATTERN in n}
        assert read_experts == set(ids)  # other ranks' experts are never read
        held += ids
        torch.testing.assert_close(report["velocity"], reference, rtol=1e-5, atol=1e-5)
    assert sorted(held) == list(range(8))


@pytest.mark.slow
def test_tensor_parallel_2_reads_its_attention_slices_and_matches_one_process(single, two_ranks):
    path = tiny_checkpoint_path()
    stored = _stored_bytes(path)
    needed = {n: b for n, b in stored.items() if not n.startswith(SKIPPED_PREFIXES)}
    split = sum(b for n, b in needed.items() if n.endswith(("qkv_proj.weight", "o_proj.weight")))
    reference = _velocity(single)
    for report in (r["TP2"] for r in two_ranks):
        assert report["bytes_read"] == sum(needed.values()) - split // 2
        torch.testing.assert_close(report["velocity"], reference, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_dummy_weights_are_the_same_model_in_every_layout(two_ranks):
    """Each dummy tensor is a function of (seed, name): EP2 ranks draw their own experts, TP2 ranks their own
    slices, and the model they hold together is the single process's."""
    ensure_single_process_state()
    single = load_transformer(tiny_checkpoint_path(), dtype=torch.float32, device="cpu", load_format="dummy")
    reference = _velocity(single)
    for name in LAYOUTS:
        for rank, report in enumerate(r[f"dummy {name}"] for r in two_ranks):
            assert report["bytes_read"] == 0
            torch.testing.assert_close(report["velocity"], reference, rtol=1e-5, atol=1e-5, msg=f"{name} rank {rank}")


@pytest.mark.slow
def test_pipeline_parallel_is_refused(two_ranks):
    for name in UNSUPPORTED:
        messages = [r[name] for r in two_ranks]
        assert all(isinstance(m, str) and "not supported yet" in m for m in messages), (name, messages)


def test_fp8_load_quantizes_each_expert_row_and_keeps_the_rest(single):
    """quantization "fp8": the experts become e4m3 rows with their scales, read from the same bf16 bytes (the rest
    of the model as loaded without it); the model runs near the exact one and cannot be saved back as released."""
    from omni_ep.layers.fused_moe.fp8 import FP8_DTYPE, quantize_rows
    from omni_ep.models.hunyuan_image3.saving import checkpoint_tensors

    ensure_single_process_state()
    fp8 = load_transformer(tiny_checkpoint_path(), dtype=torch.float32, device="cpu", quantization="fp8")
    assert fp8.load_stats.bytes_read == single.load_stats.bytes_read
    experts, exact = fp8.model.layers[1].mlp.experts, single.model.layers[1].mlp.experts
    assert experts.w13_weight.dtype == experts.w2_weight.dtype == FP8_DTYPE
    assert experts._experts is not None  # chosen at load: a device without FP8 experts fails there
    for name in ("w13", "w2"):
        q, scale = quantize_rows(getattr(exact, f"{name}_weight"))
        assert torch.equal(getattr(experts, f"{name}_weight").view(torch.uint8), q.view(torch.uint8))
        assert torch.equal(getattr(experts, f"{name}_weight_scale"), scale)
    shared, shared_exact = fp8.model.layers[1].mlp.shared_mlp, single.model.layers[1].mlp.shared_mlp
    assert torch.equal(shared.down_proj.weight, shared_exact.down_proj.weight)
    err = ((_velocity(fp8) - _velocity(single)).norm() / _velocity(single).norm()).item()
    assert 1e-4 < err < 0.1, err
    with pytest.raises(ValueError, match="cannot be written back"):
        checkpoint_tensors(fp8)
    with pytest.raises(ValueError, match="unknown quantization"):
        load_transformer(tiny_checkpoint_path(), quantization="int4")


def test_dummy_load_reads_no_weight_file(tmp_path):
    ensure_single_process_state()
    shutil.copy(os.path.join(tiny_checkpoint_path(), "config.json"), tmp_path / "config.json")
    model = load_transformer(tmp_path, dtype=torch.float32, device="cpu", load_format="dummy", seed=3)
    assert model.load_stats.bytes_read == 0
    layer = model.model.layers[0]
    assert layer.self_attn.qkv_proj.weight.shape == (model.config.qkv_rows, model.config.hidden_size)
    assert torch.all(layer.input_layernorm.weight == 1)
    assert layer.mlp.gate.wg.weight.dtype == torch.float32
    assert layer.mlp.experts.w13_weight.std() > 0.01
    out = _velocity(model)
    assert torch.isfinite(out).all()
    again = HunyuanImage3Transformer2DModel.from_pretrained(
        tmp_path, dtype=torch.float32, device="cpu", load_format="dummy", seed=3
    )
    torch.testing.assert_close(_velocity(again), out, rtol=0, atol=0)
    with pytest.raises(ValueError, match="load_format"):
        load_transformer(tmp_path, load_format="pt")


def test_vae_decoder_loads_from_its_prefix():
    decoder = load_vae_decoder(tiny_checkpoint_path())
    stored = load_file(os.path.join(tiny_checkpoint_path(), _file_of(tiny_checkpoint_path(), "vae.decoder.conv_in.weight")))
    torch.testing.assert_close(decoder.conv_in.weight, stored["vae.decoder.conv_in.weight"].float())
    assert all(n.startswith("vae.decoder.") for n in decoder.load_stats.names_read)
    with torch.no_grad():
        frames = decoder(torch.randn(1, 32, 1, 2, 2))
    assert frames.shape == (1, 3, 4, 32, 32)


def test_dummy_vae_decoder_is_drawn_by_name(tmp_path):
    """Dummy decoder weights are a function of (seed, name), not of the process's RNG state: with seed 0 they are
    the tiny checkpoint's own (drawn the same way, stored in bf16), read from no file."""
    shutil.copy(os.path.join(tiny_checkpoint_path(), "config.json"), tmp_path / "config.json")
    stored = load_vae_decoder(tiny_checkpoint_path()).state_dict()
    torch.manual_seed(123)
    dummy = load_vae_decoder(tmp_path, load_format="dummy")
    torch.rand(1000)
    again = load_vae_decoder(tmp_path, load_format="dummy").state_dict()
    other = load_vae_decoder(tmp_path, load_format="dummy", seed=1).state_dict()
    assert dummy.load_stats.bytes_read == 0
    for name, value in dummy.state_dict().items():
        torch.testing.assert_close(value.bfloat16().float(), stored[name], rtol=0, atol=0, msg=name)
        torch.testing.assert_close(again[name], value, rtol=0, atol=0, msg=name)
    assert not torch.equal(other["conv_in.weight"], stored["conv_in.weight"])
    with pytest.raises(ValueError, match="load_format"):
        load_vae_decoder(tmp_path, load_format="pt")


# ---- broken checkpoints ---------------------------------------------------------------------------------
def _file_of(path, name):
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        return json.load(f)["weight_map"][name]


@pytest.fixture
def broken(tmp_path):
    """A private copy of the tiny checkpoint to damage."""
    ensure_single_process_state()
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint_path(), dst)
    return str(dst)


def _rewrite_shard(path, file, edit):
    tensors = load_file(os.path.join(path, file))
    edit(tensors)
    save_file(tensors, os.path.join(path, file), metadata={"format": "pt"})


def _rewrite_index(path, edit):
    index_path = os.path.join(path, "model.safetensors.index.json")
    with open(index_path) as f:
        index = json.load(f)
    edit(index["weight_map"])
    with open(index_path, "w") as f:
        json.dump(index, f)


def test_missing_index_names_the_folder(tmp_path):
    shutil.copy(os.path.join(tiny_checkpoint_path(), "config.json"), tmp_path / "config.json")
    with pytest.raises(CheckpointError, match=r"no model\.safetensors\.index\.json .* in " + str(tmp_path)):
        load_transformer(tmp_path, dtype=torch.float32)


@pytest.mark.parametrize(
    "name", ["model.layers.1.self_attn.o_proj.weight", "model.layers.0.mlp.experts.7.down_proj.weight"]
)
def test_missing_tensor_names_the_tensor(broken, name):
    file = _file_of(broken, name)
    _rewrite_shard(broken, file, lambda t: t.pop(name))
    _rewrite_index(broken, lambda m: m.pop(name))
    with pytest.raises(CheckpointError, match=f"missing .*'{name}'"):
        load_transformer(broken, dtype=torch.float32)


def test_index_pointing_to_the_wrong_shard_names_both(broken):
    name = "model.wte.weight"
    wrong = next(f for f in sorted(set(json.load(open(os.path.join(broken, "model.safetensors.index.json")))["weight_map"].values())) if f != _file_of(broken, name))
    _rewrite_index(broken, lambda m: m.__setitem__(name, wrong))
    with pytest.raises(CheckpointError, match=f"'{name}' in {wrong}"):
        load_transformer(broken, dtype=torch.float32)


def test_extra_tensor_names_file_and_tensor(broken):
    name = "model.layers.0.mlp.experts.8.down_proj.weight"  # only 8 experts (0..7)
    file = _file_of(broken, "model.wte.weight")
    _rewrite_shard(broken, file, lambda t: t.__setitem__(name, torch.zeros(64, 32, dtype=torch.bfloat16)))
    _rewrite_index(broken, lambda m: m.__setitem__(name, file))
    with pytest.raises(CheckpointError, match=f"{file}.*'{name}'"):
        load_transformer(broken, dtype=torch.float32)


def test_wrong_shape_names_file_tensor_and_shapes(broken):
    name = "model.layers.0.mlp.shared_mlp.down_proj.weight"
    file = _file_of(broken, name)
    _rewrite_shard(broken, file, lambda t: t.__setitem__(name, torch.zeros(64, 16, dtype=torch.bfloat16)))
    with pytest.raises(CheckpointError, match=rf"{file}: tensor '{name}' has shape \(64, 16\), the model expects \(64, 32\)"):
        load_transformer(broken, dtype=torch.float32)


def test_truncated_shard_names_the_file(broken):
    file = _file_of(broken, "model.layers.0.mlp.experts.0.down_proj.weight")
    full = os.path.join(broken, file)
    size = os.path.getsize(full)
    with open(full, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(CheckpointError, match=f"{file}: truncated shard"):
        load_transformer(broken, dtype=torch.float32)
