"""End to end on the tiny checkpoints: every parallel layout (x both dispatch backends) against one process, for
the base model and for Instruct-Distil (one row per prompt, guidance and MeanFlow r fed every step).

Final latents within 1e-4 relative error; decoded images PSNR >= 45 dB and SSIM >= 0.995. fp32, gloo.
Decoding is the slow part (0.9 s an image on 2 threads, the generation 0.05 s): every run's latents are compared, and
images are decoded for one dispatch backend per layout (the last one listed: the backends give the same latents),
for one SP run per kind (ulysses, ring, both) and not for the balanced expert placement's run (CFG2 + EP's twin).
"""

import numpy as np
import pytest
import torch

from omni_ep.config import ParallelConfig
from omni_ep.distributed import destroy_parallel_state, init_parallel_state
from omni_ep.layers.fused_moe.expert_loads import write_expert_loads
from omni_ep.models.hunyuan_image3 import HunyuanImage3Config
from omni_ep.pipelines import HunyuanImage3Pipeline
from tests.e2e.image_quality import psnr, ssim
from tests.launcher import run_ranks

# Three prompts: with DP2 one rank gets two and the other one (and repeats it, dropping the result).
PROMPTS = ["a cat sitting on a red chair", "an astronaut riding a horse on the moon at night", "a bowl of fruit"]
CALL = dict(height=256, width=256, num_inference_steps=3, guidance_scale=5.0, seed=1234)
# A text prefix (275 tokens) longer than one rank's share of step 0 under SP2 (266 of 532) and an odd image token
# count (15 x 17 = 255): the prefix spans ranks (and ring blocks), and shares are padded on step 0.
LONG_PROMPT = 3 * ("a long winding description of a quiet harbour town at dawn, with fishing boats, gulls, wet "
                   "cobblestones and warm light in every window. ")
LONG_CALL = CALL | dict(height=240, width=272)
LATENT_RTOL, MIN_PSNR, MIN_SSIM = 1e-4, 45.0, 0.995

BACKENDS = ("allgather_reducescatter", "all2all")
NO_EP = dict(enable_expert_parallel=False)

# name -> (checkpoint, layout, dispatch backends). Expert parallel is on unless the layout turns it off (then the
# run has no backend). Names with "DP" run every prompt of their checkpoint, the others the first. Distil has no
# CFG parallel (nothing to split); one backend each keeps its added time small. Names with "2 images" run
# num_images_per_prompt=2 (2n rows a step under the MoE token bound, one per image on Distil, per SP share under
# SP); image 0 has the reference's seed and is compared.
LAYOUTS = {
    2: {"CFG2+EP": ("base", dict(cfg_parallel_size=2), BACKENDS),
        "TP2+EP 2 images": ("base", dict(tensor_parallel_size=2), BACKENDS),
        "DP2+EP": ("base", dict(data_parallel_size=2), BACKENDS),
        "U2+EP": ("base", dict(ulysses_degree=2), BACKENDS),
        "R2+EP": ("base", dict(ring_degree=2), BACKENDS),
        "U2": ("base", dict(ulysses_degree=2, **NO_EP), ()),
        "CFG2+EP balanced": ("base", dict(cfg_parallel_size=2, expert_placement="balanced"), ("all2all",)),
        "Distil TP2+EP": ("distil", dict(tensor_parallel_size=2), ("all2all",)),
        "Distil DP2+EP": ("distil", dict(data_parallel_size=2), ("allgather_reducescatter",)),
        "Distil U2+EP 2 images": ("distil", dict(ulysses_degree=2), ("all2all",))},
    4: {"TP2xCFG2+EP": ("base", dict(tensor_parallel_size=2, cfg_parallel_size=2), BACKENDS),
        "U2xR2+EP": ("base", dict(ulysses_degree=2, ring_degree=2), BACKENDS),
        "U2xCFG2+EP": ("base", dict(ulysses_degree=2, cfg_parallel_size=2), BACKENDS),
        "U2xTP2+EP": ("base", dict(ulysses_degree=2, tensor_parallel_size=2), BACKENDS)},
}
# Distil: two prompts (DP2 gives each rank one); the base checkpoint's three cover DP's uneven split.
PROMPTS_OF = {"base": PROMPTS, "distil": PROMPTS[:2]}
LONG_PROMPT_LAYOUTS = {"R2+EP", "U2xR2+EP"}  # these run LONG_PROMPT at LONG_CALL's size
# Sequence-parallel runs whose images are decoded: one per SP kind and checkpoint; the other SP runs compare
# latents only.
DECODED_SP_RUNS = {"U2+EP all2all", "R2+EP all2all", "U2xR2+EP all2all", "Distil U2+EP 2 images all2all"}


def runs_of(world_size) -> list[tuple[str, str, dict, str | None]]:
    """(run name, checkpoint, layout, backend) of every run on this world size."""
    return [(f"{name} {backend}" if backend else name, checkpoint, kw, backend)
            for name, (checkpoint, kw, backends) in LAYOUTS[world_size].items() for backend in backends or (None,)]


def generate(path, config, prompts, call=CALL, decode=True, images_per_prompt=1):
    """(final latents [N, 32, h, w], images [N, H, W, 3] or None without decode) of the first image of each of the
    N prompts on rank 0; (None, None) elsewhere. The images are the pipeline's own decode of those latents."""
    init_parallel_state(config)
    try:
        pipe = HunyuanImage3Pipeline.from_pretrained(path, torch_dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        out = pipe(prompts, output_type="latent", num_images_per_prompt=images_per_prompt, **call)
        if out is None:
            return None, None
        latents = out.images[::images_per_prompt]
        if not decode:
            return latents, None
        threads = torch.get_num_threads()
        torch.set_num_threads(2)  # rank 0 decodes while the others wait: both cores, the same bits (checked)
        try:
            images = np.concatenate([pipe.decode(z[None], "np") for z in latents])
        finally:
            torch.set_num_threads(threads)
    finally:
        destroy_parallel_state()
    return latents, images


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    torch.set_num_threads(1)  # the same arithmetic as the spawned ranks
    return generate(tiny_checkpoint, ParallelConfig(), PROMPTS)


@pytest.fixture(scope="module")
def distil_reference(tiny_distil_checkpoint):
    torch.set_num_threads(1)
    return generate(tiny_distil_checkpoint, ParallelConfig(), PROMPTS_OF["distil"])


@pytest.fixture(scope="module")
def long_prompt_reference(tiny_checkpoint):
    torch.set_num_threads(1)
    return generate(tiny_checkpoint, ParallelConfig(), [LONG_PROMPT], LONG_CALL)


def layout_worker(rank, world_size, paths):
    results = {}
    for run, checkpoint, kw, backend in runs_of(world_size):
        name = run.rsplit(" ", 1)[0] if backend else run
        prompts, call = ([LONG_PROMPT], LONG_CALL) if name in LONG_PROMPT_LAYOUTS else (PROMPTS_OF[checkpoint][:1], CALL)
        prompts = PROMPTS_OF[checkpoint] if "DP" in name else prompts
        kw = dict(enable_expert_parallel=True) | kw
        if kw.get("expert_placement") == "balanced":
            kw["expert_loads"] = paths["expert_loads"]
        sequence_parallel = kw.get("ulysses_degree", 1) * kw.get("ring_degree", 1) > 1
        decode = (not sequence_parallel or run in DECODED_SP_RUNS) and "balanced" not in name
        decode &= backend is None or backend == LAYOUTS[world_size][name][2][-1]
        config = ParallelConfig(**kw) if backend is None else ParallelConfig(all2all_backend=backend, **kw)
        results[run] = generate(paths[checkpoint], config, prompts, call, decode, 2 if "2 images" in name else 1)
    return results if rank == 0 else None


def compare(name, latents, images, reference):
    ref_latents, ref_images = reference
    n = latents.shape[0]
    err = ((latents - ref_latents[:n]).norm() / ref_latents[:n].norm()).item()
    quality = [] if images is None else [(psnr(images[i], ref_images[i]), ssim(images[i], ref_images[i]))
                                         for i in range(n)]
    print(f"{name:40s} latents rel err {err:.2e}  " + "  ".join(f"PSNR {p:.1f} dB SSIM {s:.5f}" for p, s in quality))
    assert err <= LATENT_RTOL, f"{name}: latents rel err {err:.2e}"
    for p, s in quality:
        assert p >= MIN_PSNR and s >= MIN_SSIM, f"{name}: PSNR {p:.1f} dB, SSIM {s:.5f}"


@pytest.mark.slow
def test_reference_is_deterministic_and_not_trivial(reference, tiny_checkpoint):
    latents, images = reference
    assert latents.shape == (3, 32, 16, 16) and images.shape == (3, 256, 256, 3)
    assert np.isfinite(images).all() and images.std() > 0.01
    assert (latents[0] - latents[1]).abs().max() > 0.1  # two prompts, two seeds: two different results


@pytest.mark.slow
def test_distil_reference_is_not_trivial(distil_reference, reference):
    latents, images = distil_reference
    assert latents.shape == (2, 32, 16, 16) and np.isfinite(images).all() and images.std() > 0.01
    assert (latents[0] - reference[0][0]).abs().max() > 0.1  # not the base model's result


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("world_size", [2, 4])
def test_parallel_layouts_match_single_process(world_size, tiny_checkpoint, tiny_distil_checkpoint, reference,
                                               distil_reference, long_prompt_reference, tmp_path):
    paths = {"base": tiny_checkpoint, "distil": tiny_distil_checkpoint, "expert_loads": str(tmp_path / "loads.json")}
    # Loads that place each layer's experts differently (layer 0: [0, 3, 6, 7] / [1, 2, 4, 5], layer 1 reversed).
    loads = [900, 10, 20, 30, 800, 700, 40, 50]
    num_layers = HunyuanImage3Config.from_pretrained(tiny_checkpoint).num_hidden_layers
    write_expert_loads(paths["expert_loads"],
                       {f"model.layers.{i}.mlp.experts": loads[::(-1) ** i] for i in range(num_layers)})
    (results,) = [r for r in run_ranks(layout_worker, world_size, paths, timeout=800) if r is not None]
    assert sorted(results) == sorted(run for run, *_ in runs_of(world_size))
    for run, checkpoint, _, backend in runs_of(world_size):
        name = run.rsplit(" ", 1)[0] if backend else run
        ref = long_prompt_reference if name in LONG_PROMPT_LAYOUTS else {"base": reference, "distil": distil_reference}[checkpoint]
        compare(run, *results[run], ref)


@pytest.mark.slow
def test_save_pretrained_round_trip(tiny_checkpoint, tmp_path, reference):
    init_parallel_state(ParallelConfig())
    try:
        pipe = HunyuanImage3Pipeline.from_pretrained(tiny_checkpoint, torch_dtype=torch.float32)
        pipe.save_pretrained(tmp_path / "saved", max_shard_size="1MiB")
    finally:
        destroy_parallel_state()
    assert len(list((tmp_path / "saved").glob("model-*-of-*.safetensors"))) > 1
    torch.set_num_threads(1)
    latents, _ = generate(str(tmp_path / "saved"), ParallelConfig(), PROMPTS[:1])
    assert torch.equal(latents, reference[0][:1])
