"""scripts/gpu_check.py, the GPU acceptance script, kept from rotting while no GPU runs it.

The dry run executes every check's real code on the CPU at tiny sizes (real models, optimizer steps, FSDP2 on gloo
with 1 and 2 ranks, checkpoints on disk, dynamo); the machinery test checks isolation, budgets and worker restarts
with injected faults (no torch import, a few seconds).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.py"


def _module():
    """The script as a module (its top level imports the standard library only)."""
    if "gpu_check" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
        mod = importlib.util.module_from_spec(spec)
        sys.modules["gpu_check"] = mod  # dataclasses look their module up while the class is built
        spec.loader.exec_module(mod)
    return sys.modules["gpu_check"]


def _run(out: Path, *args: str, timeout: float = 600) -> tuple[subprocess.CompletedProcess, dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--work-dir", str(out), *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout)
    assert (out / "gpu_check.json").is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads((out / "gpu_check.json").read_text())


def test_peak_table_names_each_device() -> None:
    gc = _module()
    assert gc.peak_tflops("NVIDIA H100 80GB HBM3") == ("H100 SXM", 989.0)
    assert gc.peak_tflops("NVIDIA H100 PCIe")[1] == 756.0
    assert gc.peak_tflops("NVIDIA H200")[1] == 989.0
    assert gc.peak_tflops("NVIDIA GH200 480GB")[1] == 989.0
    assert gc.peak_tflops("NVIDIA A100-SXM4-80GB")[1] == 312.0
    assert gc.peak_tflops("NVIDIA GeForce RTX 4090") is None
    assert sum(c.budget_s for c in gc.CHECKS if c.name != "fsdp2_ws2") <= gc.GPU_TIME_LIMIT_S  # one GPU: all fit


def test_a_failing_hanging_or_dying_check_does_not_stop_the_others(tmp_path: Path) -> None:
    """Each kind of failure is its own check's FAIL, with the figures it sent before; the next check still runs."""
    proc, data = _run(tmp_path, "--dry-run", "--only", "env,bf16_autocast,sdpa_backends,xformers",
                      "--inject-fault", "env=raise,bf16_autocast=exit,sdpa_backends=hang,xformers=raise",
                      "--budget", "sdpa_backends=1", timeout=120)
    checks = data["checks"]
    assert proc.returncode == 1
    assert [checks[n]["status"] for n in ("env", "bf16_autocast", "sdpa_backends", "xformers")] == ["FAIL"] * 4
    assert "injected fault" in checks["env"]["error"]
    assert "worker died (exit code 9)" in checks["bf16_autocast"]["error"]
    assert "timed out" in checks["sdpa_backends"]["error"]
    assert checks["sdpa_backends"]["figures"] == {"injected": "hang"}  # partial figures survive the kill
    assert "xformers | FAIL" in (tmp_path / "gpu_check.md").read_text()


@pytest.mark.slow  # ~45 CPU-s: two dynamo traces (~17 s) and a 2-rank FSDP2 run (~10 s) dominate
def test_dry_run_runs_every_check_on_cpu(tmp_path: Path) -> None:
    """The whole script at tiny sizes: every check reports, the JSON and Markdown are complete."""
    proc, data = _run(tmp_path, "--dry-run", "--peak-tflops", "1000")  # a peak MFU cannot reach: profile path too
    checks = data["checks"]
    log = proc.stdout[-4000:] + proc.stderr[-4000:]
    assert list(checks) == _module().CHECK_NAMES, log
    expected = {"env": "INFO", "bf16_autocast": "PASS", "fsdp2_ws1": "PASS", "fsdp2_ws2": "PASS",
                "sdpa_backends": "PASS", "checkpoint_resume": "PASS", "ssl_step": "PASS",
                "paper_vs_vanilla": "PASS", "checkpoint_stall": "PASS", "compile_blocks": "PASS"}
    assert {n: checks[n]["status"] for n in expected} == expected, {
        n: (checks[n]["status"], checks[n]["summary"], checks[n]["error"], checks[n]["notes"]) for n in expected
        if checks[n]["status"] != expected[n]}
    assert checks["xformers"]["status"] == "SKIP" and checks["xformers"]["summary"]  # no CPU kernels: a reason
    assert checks["backbone_vs_timm"]["status"] in ("PASS", "SKIP")
    # the trainer's compile may fail on drop path (then the check FAILs and measures with the workaround)
    assert checks["compile_speed"]["figures"]["compiled_ms"] > 0, checks["compile_speed"]
    step = checks["ssl_step"]["figures"]
    assert step["images_per_s"] > 0 and 0 < step["mfu"] < 0.5 and step["flops_per_image_executed"] > 0
    assert (tmp_path / step["profile_table"]).is_file() and step["profile_categories_ms"]
    assert checks["checkpoint_resume"]["figures"]["differ"] == 0
    assert checks["fsdp2_ws2"]["figures"]["checkpoint_ok"] is True
    md = (tmp_path / "gpu_check.md").read_text()
    assert "DRY RUN" in md and all(f"| {n} |" in md for n in checks)
    assert all(r["seconds"] <= r["budget_s"] + 15 for r in checks.values())


@pytest.mark.gpu
def test_gpu_acceptance_run(tmp_path: Path) -> None:
    """On a GPU machine (pytest -m gpu): the real run finishes in its time limit and reports every check."""
    torch = pytest.importorskip("torch")  # imported here: the tests above never need torch in this process
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    proc, data = _run(tmp_path, timeout=600)
    print(proc.stdout[-6000:])
    assert list(data["checks"]) == _module().CHECK_NAMES
    assert data["meta"]["wall_s"] <= data["meta"]["time_limit_s"] + 30


def test_ssl_flops_per_image_counts_each_crop_size_on_the_full_backbone() -> None:
    """The depth-1/depth-2 extrapolation, from backbones built at the global size, equals count_flops of the whole
    backbone at each crop size (the local crops counted at their own size)."""
    from dinospec.config import load_config
    from dinospec.model_info import count_flops
    from dinospec.models.vit import build_backbone

    cfg = load_config([], ["model=vit_pico", "spec=paper", "crops.global_crops_size=64", "crops.local_crops_size=32"])
    flops = _module().ssl_flops_per_image(cfg, masked_per_image=3.0)
    model = build_backbone(cfg.student, cfg.spec, img_size=64)
    assert flops["backbone_fwd_flops_global"] == count_flops(model, 64)
    assert flops["backbone_fwd_flops_local"] == count_flops(model, 32)
