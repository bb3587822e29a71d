"""benchmarks/gpu_clocks.py: nvidia-smi samples cut by the runs' wall-clock spans, on a written CSV and run files."""

import datetime
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import gpu_clocks  # noqa: E402

T0 = datetime.datetime(2026, 11, 30, 4, 22, 1)


def stamp(seconds: float) -> str:
    return (T0 + datetime.timedelta(seconds=seconds)).strftime("%Y/%m/%d %H:%M:%S.%f")[:-3]


def test_clocks_per_run(tmp_path):
    lines = ["timestamp, index, power.draw [W], clocks.sm [MHz], clocks_event_reasons.active"]  # a header: skipped
    for i in range(10):  # one sample a second per GPU; GPU 1 capped (0x4) from second 5
        lines.append(f"{stamp(i)}, 0, {400 + i}.00, 1980, 0x0000000000000000")
        lines.append(f"{stamp(i)}, 1, 690.00, {1980 if i < 5 else 1500}, {'0x0000000000000004' if i >= 5 else '0x1'}")
    lines.append(f"{stamp(3)}, 0, [N/A], 1980, 0x0")  # not a sample
    (tmp_path / "clocks.csv").write_text("\n".join(lines) + "\n")
    t0 = T0.timestamp()
    run = lambda a, b: dict(timing=dict(wall_clock_unix=[t0 + a, t0 + b]))  # noqa: E731
    (tmp_path / "one.json").write_text(json.dumps(run(0, 4.5)))
    (tmp_path / "merged.json").write_text(json.dumps({"late": run(5, 9), "untimed": dict(timing=None)}))
    table = gpu_clocks.per_run(gpu_clocks.read_samples(tmp_path / "clocks.csv"),
                               gpu_clocks.read_runs([str(tmp_path / "one.json"), str(tmp_path / "merged.json")]))
    assert set(table) == {str(tmp_path / "one.json"), "late"}
    early = table[str(tmp_path / "one.json")]
    assert early[0] == dict(sm_mhz=1980, power_w=pytest.approx(402), power_capped=0, samples=5)
    assert early[1]["power_capped"] == 0 and early[1]["sm_mhz"] == 1980
    assert table["late"][1] == dict(sm_mhz=1500, power_w=690, power_capped=1, samples=5)
