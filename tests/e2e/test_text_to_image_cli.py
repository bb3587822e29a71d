"""examples/text_to_image/text_to_image.py as a real subprocess (python, and torchrun for several ranks).

The README's command runs the demo checkpoint (checkpoints/hunyuan-image3-demo) and must draw the training picture of
its prompt; torchrun ranks must draw the same. Bad input fails on every rank, before any weight is read.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from tests.e2e.image_quality import psnr, ssim

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = str(ROOT / "examples" / "text_to_image" / "text_to_image.py")
README_PROMPT = "a cup of coffee on the table"  # the README's command; the demo's coffee picture
MIN_PSNR, MIN_SSIM_TO_TRAINING = 45.0, 0.8
# The script imports omni_ep: this tree's, not whichever checkout is pip-installed.
TREE = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=TREE)


def run(args, nproc=1, timeout=300):
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                     f"--nproc-per-node={nproc}"]
    return subprocess.run(launcher + [SCRIPT, *args], capture_output=True, text=True, timeout=timeout, env=ENV, cwd=ROOT)


def run_ranks(args, nproc, timeout=240):
    """``nproc`` ranks as plain processes with torchrun's environment, each run to its end.

    torchrun stops the other ranks as soon as one fails, so whether a slower rank got to print its error is a race;
    here every rank's own stderr is kept.
    """
    procs = []
    for rank in range(nproc):
        env = dict(ENV, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
        procs.append(subprocess.Popen([sys.executable, SCRIPT, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, env=env, cwd=ROOT))
    try:
        outputs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return [subprocess.CompletedProcess(p.args, p.returncode, out, err) for p, (out, err) in zip(procs, outputs)]


def load(path) -> np.ndarray:
    return np.asarray(PIL.Image.open(path).convert("RGB"), dtype=np.float64) / 255.0


@pytest.fixture(scope="module")
def readme_png(tmp_path_factory):
    """The README's command as a new user types it: the demo checkpoint, every other flag at its default."""
    out = tmp_path_factory.mktemp("readme") / "coffee.png"
    proc = run(["--prompt", README_PROMPT, "--output", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stderr


@pytest.mark.slow
def test_readme_command_draws_the_training_picture_of_its_prompt(readme_png):
    from tools.train_demo_checkpoint import demo_image

    out, log = readme_png
    for line in ("INFO layout: TP=1", "INFO   rank 0: ep_rank 0, experts [0, 1, 2, 3, 4, 5, 6, 7]; read",
                 "INFO time:", f"INFO wrote {out} (64x64)"):
        assert line in log, log[-3000:]
    similarity = ssim(load(out), demo_image("coffee"))
    print(f"README command vs the coffee training picture: SSIM {similarity:.3f}")
    assert similarity >= MIN_SSIM_TO_TRAINING


@pytest.mark.slow
def test_fp8_experts_draw_the_same_picture(readme_png, tmp_path):
    """--quantization fp8: the demo's experts in FP8 still draw the coffee picture, near the exact image (36.6 dB
    measured; the quantization is not exact)."""
    from tools.train_demo_checkpoint import demo_image

    out = tmp_path / "fp8.png"
    proc = run(["--prompt", README_PROMPT, "--output", str(out), "--quantization", "fp8"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "experts in fp8" in proc.stderr
    fp8, exact = load(out), load(readme_png[0])
    print(f"FP8 experts vs exact: PSNR {psnr(fp8, exact):.1f} dB, SSIM to the training picture "
          f"{ssim(fp8, demo_image('coffee')):.3f}")
    assert 30 <= psnr(fp8, exact) < 60
    assert ssim(fp8, demo_image("coffee")) >= MIN_SSIM_TO_TRAINING


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_cli_under_torchrun_matches_single_process(readme_png, tmp_path):
    """One torchrun launch (the layout matrix runs in process in test_text_to_image_layouts.py): the demo on CFG2 +
    EP2 with the all-to-all dispatch, two prompts, -q, the expert loads recorded; the first image equals the README
    command's."""
    out, loads = tmp_path / "out.png", tmp_path / "loads.json"
    proc = run(["--prompt", README_PROMPT, "a ginger cat with big green eyes", "--output", str(out), "-q", "--cfg-parallel-size", "2",
                "--enable-expert-parallel", "--all2all-backend", "all2all", "--record-expert-loads", str(loads)], nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "INFO" not in proc.stderr  # -q: warnings and errors only
    # Every layer routed the same rows: 2 prompts x 2 CFG rows x 50 steps x the tokens of a step x top-k.
    counts = json.loads(loads.read_text())["layers"]
    assert len(counts) == 2 and all(len(c) == 8 for c in counts.values())
    assert len({sum(c) for c in counts.values()}) == 1 and sum(next(iter(counts.values()))) > 2 * 2 * 50 * 2
    a, b = load(out.with_name("out_0.png")), load(readme_png[0])
    print(f"torchrun CFG2+EP2 vs one process: PSNR {psnr(a, b):.1f} dB")
    assert psnr(a, b) >= MIN_PSNR
    assert psnr(load(out.with_name("out_1.png")), b) < 30  # the other prompt draws another picture


@pytest.mark.slow
def test_print_layout_on_two_ranks_loads_nothing(tiny_checkpoint):
    """--print-layout under torchrun, -v: the groups, each rank's experts and the bytes it would read; no load."""
    proc = run(["--model", tiny_checkpoint, "--print-layout", "-v", "--tensor-parallel-size", "2",
                "--enable-expert-parallel"], nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stderr
    assert "[rank 0/2] INFO layout: TP=2" in log and "[rank 0/2] INFO   tp groups: [[0, 1]]" in log
    assert "rank 0: ep_rank 0, experts [0, 1, 2, 3]; would read" in log
    assert "rank 1: ep_rank 1, experts [4, 5, 6, 7]; would read" in log
    assert "; read " not in log and "time:" not in log  # nothing was loaded or generated


@pytest.fixture(scope="module")
def weightless(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint without a single weight file (config, generation config, tokenizer): a run that fails
    here with the expected message did not read any weight before failing."""
    folder = tmp_path_factory.mktemp("weightless")
    for name in os.listdir(tiny_checkpoint):
        if not name.endswith(".safetensors") and name != "model.safetensors.index.json":
            shutil.copy(os.path.join(tiny_checkpoint, name), folder)
    return str(folder)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "nproc, args, message",
    [
        (1, ["--height", "250"], "positive multiples of 16"),
        (1, ["--model", "/nonexistent/hunyuan"], "no such checkpoint folder"),
        (2, ["--tensor-parallel-size", "4", "--enable-expert-parallel"], "needs 4 processes"),
        (1, ["--prompt"], "expected at least one argument"),
        (1, ["--pipeline-parallel-size", "2"], "not supported yet"),
        (1, ["--cfg-parallel-size", "2", "--guidance-scale", "1"], "needs guidance_scale > 1"),
        (1, ["--prompt", "word " * 2000], "more than the model's max_position_embeddings (2048)"),
        (1, ["--output", "{model}/config.json/out.png"], "cannot make the folder"),
        (1, ["--enable-expert-parallel", "--expert-placement", "balanced", "--expert-loads", "{model}/config.json"],
         "is not an expert-loads file"),
    ],
    ids=["height", "missing-model", "layout-vs-nproc", "empty-prompt-list", "pipeline-parallel",
         "cfg-parallel-without-guidance", "prompt-too-long", "output-folder", "expert-loads"],
)
def test_cli_bad_input_fails_on_every_rank_before_reading_weights(nproc, args, message, weightless):
    args = [a.format(model=weightless) for a in args]
    model = [] if "--model" in args else ["--model", weightless]
    for rank, proc in enumerate(run_ranks([*model, *args], nproc)):  # every rank says it
        assert proc.returncode != 0, f"rank {rank}"
        assert message in proc.stderr, f"rank {rank}: {proc.stderr[-3000:]}"
        assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_list_sizes_reads_only_the_config(weightless):
    proc = run(["--model", weightless, "--list-sizes"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    sizes = proc.stdout.split()
    assert len(sizes) == 33 and sizes[0] == "128x512" and "256x256" in sizes and sizes[-1] == "512x128"
