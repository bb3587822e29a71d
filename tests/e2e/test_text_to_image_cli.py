"""examples/text_to_image/text_to_image.py as a real subprocess (python, and torchrun for several ranks)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from tests.e2e.image_quality import psnr, ssim

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = str(ROOT / "examples" / "text_to_image" / "text_to_image.py")
PROMPTS = ["a cat sitting on a red chair", "an astronaut riding a horse on the moon at night"]
COMMON = ["--num-inference-steps", "3", "--seed", "1234", "--dtype", "float32"]
MIN_PSNR, MIN_SSIM = 45.0, 0.995
# The script imports omni_ep: this tree's, not whichever checkout is pip-installed.
TREE = dict(PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))


def run(args, nproc=1, timeout=300, cache=None):
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                     f"--nproc-per-node={nproc}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **TREE)
    if cache:
        env["OMNI_EP_CACHE"] = cache
    return subprocess.run(launcher + [SCRIPT, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def run_ranks(args, nproc, timeout=240):
    """``nproc`` ranks as plain processes with torchrun's environment, each run to its end.

    torchrun stops the other ranks as soon as one fails, so whether a slower rank got to print its error is a race;
    here every rank's own stderr is kept.
    """
    procs = []
    for rank in range(nproc):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **TREE, RANK=str(rank), LOCAL_RANK=str(rank),
                   WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
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
def reference_pngs(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli-ref") / "ref.png"
    proc = run(["--model", tiny_checkpoint, "--prompt", *PROMPTS, "--output", str(out), *COMMON])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "EP=1" in proc.stdout and "peak memory" in proc.stdout and "later steps" in proc.stdout
    return [out.with_name("ref_0.png"), out.with_name("ref_1.png")]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_cli_under_torchrun_matches_single_process(tiny_checkpoint, reference_pngs, tmp_path):
    """One torchrun launch (the layout matrix runs in process in test_text_to_image_layouts.py): CFG2 + EP2 with
    the all-to-all dispatch, two prompts, one PNG each."""
    out = tmp_path / "out.png"
    proc = run(["--model", tiny_checkpoint, "--prompt", *PROMPTS, "--output", str(out), *COMMON,
                "--cfg-parallel-size", "2", "--enable-expert-parallel", "--all2all-backend", "all2all"], nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "EP=2 (all2all" in proc.stdout and "experts: 8 per layer, 4 local per rank" in proc.stdout
    for produced, ref in zip([out.with_name("out_0.png"), out.with_name("out_1.png")], reference_pngs):
        a, b = load(produced), load(ref)
        p, s = psnr(a, b), ssim(a, b)
        print(f"torchrun CFG2+EP2 {produced.name}: PSNR {p:.1f} dB, SSIM {s:.5f}")
        assert p >= MIN_PSNR and s >= MIN_SSIM, f"{produced.name}: PSNR {p:.1f} dB, SSIM {s:.5f}"


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "nproc, args, message",
    [
        (1, ["--height", "250"], "positive multiples of 16"),
        (1, ["--model", "/nonexistent/hunyuan"], "no such checkpoint folder"),
        (2, ["--tensor-parallel-size", "4", "--enable-expert-parallel"], "needs 4 processes"),
        (1, ["--prompt"], "expected at least one argument"),
    ],
    ids=["height", "missing-model", "layout-vs-nproc", "empty-prompt-list"],
)
def test_cli_bad_input_fails_clearly_without_hang(nproc, args, message, tiny_checkpoint):
    model = [] if "--model" in args else ["--model", tiny_checkpoint]
    for rank, proc in enumerate(run_ranks([*model, *COMMON, *args], nproc)):  # every rank says it
        assert proc.returncode != 0, f"rank {rank}"
        assert message in proc.stderr, f"rank {rank}: {proc.stderr[-3000:]}"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_cli_default_tiny_model_is_made_on_first_use(tmp_path):
    proc = run(["--num-inference-steps", "2", "--output", str(tmp_path / "t.png")], cache=str(tmp_path / "cache"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "cache" / "tiny-hunyuan-image3" / "model.safetensors.index.json").is_file()
    assert PIL.Image.open(tmp_path / "t.png").size == (256, 256)
