"""gpu_check.sh's CPU dry run: the same stages in the same order at tiny shapes, the CUDA-only steps
reported as skipped, so that a broken script is caught here and not on the rare occasion a GPU is at hand."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

import adam_ext

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["env", "build", "smoke", "train", "test", "adam", "candidates", "sanitize", "bench", "sweep"]
STEPS = {"nvidia-smi": "env", "train_bench": "train", "loader": "train", "train_adam": "adam"}  # step -> stage


@pytest.mark.slow
@pytest.mark.skipif(not adam_ext.is_built(), reason="adam_ext not built")
def test_dry_run_runs_every_stage_in_order(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path / "out"), WORK=str(tmp_path / "work"), PYTHON=sys.executable)
    r = subprocess.run(["bash", str(ROOT / "gpu_check.sh"), "--dry-run"], env=env, capture_output=True,
                       text=True, timeout=600)
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = [ln for ln in summary.splitlines() if ln.startswith("== ")]
    assert "DRY RUN on CPU" in lines[0] and lines[-1].startswith("== done in")
    # every stage reports, in the documented order
    first = {}
    for i, ln in enumerate(lines):
        name = ln[3:].split(":")[0]
        key = "candidates" if name.startswith("candidate_") else STEPS.get(name, name)
        first.setdefault(key, i)
    order = [s for s in STAGES if s in first]
    assert order == STAGES, f"stages reported {sorted(first, key=first.get)}"
    for stage in ("build", "smoke", "bench", "train_bench", "loader", "train_adam", "candidate_fused_sgd",
                  "candidate_contiguous"):
        assert f"== {stage}: rc=0" in summary, summary
    for stage in ("test", "sanitize", "sweep", "candidate_compile"):
        assert f"== {stage}: skipped (dry run" in summary
    # the train stage's table: the three rows of the paper preset's measurement (here at tiny shapes on the CPU)
    table = (tmp_path / "out" / "train_table.md").read_text()
    for row in ("step alone (synthetic views on the device)", "step fed by device views (BatchViews)",
                "step fed by the CPU loader (views in workers)"):
        assert f"| {row} | " in table and f"   | {row} | " in summary
    # the smoke step compared the op with the reference and wrote its table
    assert "cases match adam.info_nce on CPU" in summary
    assert "| case | ran |" in (tmp_path / "out" / "selfcheck.md").read_text()
    assert (tmp_path / "out" / "logs.tar.gz").stat().st_size > 0
    assert "self-check on cpu" in (tmp_path / "work" / "train_adam.txt").read_text()


def test_a_step_past_the_deadline_is_skipped_not_run(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path / "out"), WORK=str(tmp_path / "work"), PYTHON=sys.executable,
               BUDGET="10")  # less than MIN_STEP (15 s) for every step
    r = subprocess.run(["bash", str(ROOT / "gpu_check.sh"), "--dry-run", "smoke", "bench"], env=env,
                       capture_output=True, text=True, timeout=120)
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert r.returncode == 0
    assert "== smoke: skipped (out of time" in summary and "== bench: skipped (out of time" in summary
    assert not (tmp_path / "work" / "smoke.txt").exists()
