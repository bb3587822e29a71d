"""The platform registry: resolution order, the op table, out-of-tree plugins, the NPU import error."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import omni_ep
import omni_ep.platforms as platforms
from omni_ep.distributed import destroy_parallel_state, get_ep_group, is_parallel_state_initialized
from omni_ep.utils import resolve_obj_by_qualname


@pytest.fixture(autouse=True)
def fresh_platform(monkeypatch):
    monkeypatch.delenv("OMNI_EP_PLATFORM", raising=False)
    platforms.reset_current_platform()
    yield
    platforms.reset_current_platform()
    destroy_parallel_state()


def test_this_machine_resolves_its_platform_and_layer_class():
    import torch

    name, cls = ("cuda", "omni_ep.layers.fused_moe.cuda.CudaFusedMoE") if torch.cuda.is_available() else \
        ("cpu", "omni_ep.layers.fused_moe.layer.FusedMoE")
    p = platforms.current_omni_platform
    assert p.name == name
    assert p.get_diffusion_model_impl_qualname("hunyuan_fused_moe") == cls
    assert platforms.current_omni_platform is p  # resolved once


def test_prepare_is_idempotent_and_makes_no_process_groups():
    p = platforms.current_omni_platform
    p.prepare_diffusion_op_runtime("hunyuan_fused_moe")
    p.prepare_diffusion_op_runtime("hunyuan_fused_moe")
    assert not is_parallel_state_initialized()  # the caller's job: init_parallel_state


def test_the_moe_block_builds_the_class_the_platform_names(monkeypatch):
    from omni_ep.config import ParallelConfig
    from omni_ep.distributed import init_parallel_state
    from omni_ep.layers.fused_moe.cuda import CudaFusedMoE
    from omni_ep.models.hunyuan_image3.make_tiny_checkpoint import tiny_config
    from omni_ep.models.hunyuan_image3.moe import HunyuanImage3MoE

    monkeypatch.setenv("OMNI_EP_PLATFORM", "cuda")  # builds on any machine; only running it needs a GPU
    init_parallel_state(ParallelConfig())
    block = HunyuanImage3MoE(tiny_config(), 0)
    assert type(block.experts) is CudaFusedMoE
    assert get_ep_group().world_size == 1


def test_unknown_op_lists_known_ones():
    with pytest.raises(ValueError, match="unknown diffusion op 'flux_attn'.*known ops: hunyuan_fused_moe"):
        platforms.current_omni_platform.prepare_diffusion_op_runtime("flux_attn")


@pytest.mark.parametrize("name, cls", [("cuda", "CudaFusedMoE"), ("npu", "AscendFusedMoE"), ("cpu", "FusedMoE")])
def test_forced_platform_names_its_class(monkeypatch, name, cls):
    monkeypatch.setenv("OMNI_EP_PLATFORM", name)
    qualname = platforms.current_omni_platform.get_diffusion_model_impl_qualname("hunyuan_fused_moe")
    assert qualname.endswith("." + cls)
    assert resolve_obj_by_qualname(qualname).__name__ == cls


def test_unknown_forced_platform_is_refused(monkeypatch):
    monkeypatch.setenv("OMNI_EP_PLATFORM", "tpu")
    with pytest.raises(ValueError, match="OMNI_EP_PLATFORM='tpu' names no platform"):
        platforms.get_current_platform()


def test_npu_without_torch_npu_raises_a_clear_import_error(monkeypatch):
    monkeypatch.setenv("OMNI_EP_PLATFORM", "npu")
    with pytest.raises(ImportError, match="torch_npu"):
        platforms.current_omni_platform.prepare_diffusion_op_runtime("hunyuan_fused_moe")
    with pytest.raises(ImportError, match="torch_npu"):
        resolve_obj_by_qualname("omni_ep.layers.fused_moe.experts.npu_experts.NpuExperts")


def test_resolve_obj_by_qualname_errors():
    with pytest.raises(ValueError, match="not a qualified name"):
        resolve_obj_by_qualname("FusedMoE")
    with pytest.raises(AttributeError, match="has no attribute 'Nope'"):
        resolve_obj_by_qualname("omni_ep.layers.fused_moe.layer.Nope")


def test_out_of_tree_plugin_through_entry_points(tmp_path):
    """A real installed-distribution entry point (a .dist-info on sys.path), resolved in a fresh process."""
    (tmp_path / "my_platform.py").write_text(textwrap.dedent("""
        from omni_ep.platforms.interface import OmniPlatform

        class MyPlatform(OmniPlatform):
            name = "mine"
            device_type = "cpu"
            diffusion_ops = {"hunyuan_fused_moe": "omni_ep.layers.fused_moe.layer.FusedMoE"}

        def register():
            return "my_platform.MyPlatform"
    """))
    dist_info = tmp_path / "my_platform-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-platform\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text("[omni_ep.platform_plugins]\nmine = my_platform:register\n")
    code = "from omni_ep.platforms import current_omni_platform as p; print(p.name)"
    out = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": f"{tmp_path}:{Path(omni_ep.__file__).parents[1]}",
                         "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=120, cwd=str(tmp_path.parent))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "mine"
