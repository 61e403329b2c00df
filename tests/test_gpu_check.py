"""bench/gpu_check.py: its CPU mode runs every check's code here; the `cuda` tests run it on a GPU."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_check  # noqa: E402

def _betons(micro: Path) -> Path:
    from pipeline_src import params as params_mod

    return Path(params_mod.load(micro)["paths"]["data"]) / "betons"


def test_cpu_mode_runs_every_check(micro, tmp_path, capsys):
    out = tmp_path / "check.json"
    assert gpu_check.main(["--device", "cpu", "--betons", str(_betons(micro)), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["failed"] == [] and report["skipped"] == []
    assert set(report["checks"]) == set(gpu_check.CHECKS)
    checks = report["checks"]
    assert all(c["status"] == "ok" for c in checks.values())
    assert checks["loader"]["batches_compared"] == 3 and checks["loader"]["loader_images_per_s"] > 0
    assert checks["ddp"]["backend"] == "gloo" and checks["ddp"]["max_weight_change"] > 0
    assert checks["train_compiled"]["compile_backend"] == "eager" and report["speedup"] > 0
    assert "gpu_check: checkpoint: ok" in capsys.readouterr().err


def test_a_failing_check_exits_non_zero_naming_it(monkeypatch, tmp_path, capsys):
    def broken(ctx):
        raise RuntimeError("cuDNN said no")

    monkeypatch.setitem(gpu_check.CHECKS, "ddp", broken)
    code = gpu_check.main(["--device", "cpu", "--only", "ddp", "tricks_autocast", "--out", str(tmp_path / "r.json")])
    assert code == 1
    assert "gpu_check: FAILED: ddp: RuntimeError: cuDNN said no" in capsys.readouterr().err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["failed"] == ["ddp"] and report["checks"]["tricks_autocast"]["status"] == "ok"


def test_without_ffcv_the_loader_is_skipped_and_the_torch_twins_still_run(tmp_path):
    """A machine without ffcv: the loader check says why it is skipped; device_augment imports gpu.py alone."""
    script = ("import sys, builtins\n"
              "real = builtins.__import__\n"
              "def no_ffcv(name, *a, **k):\n"
              "    if name == 'ffcv' or name.startswith('ffcv.'):\n"
              "        raise ImportError('No module named ffcv (simulated)')\n"
              "    return real(name, *a, **k)\n"
              "builtins.__import__ = no_ffcv\n"
              f"sys.path.insert(0, {str(ROOT / 'bench')!r})\n"
              "import gpu_check\n"
              f"sys.exit(gpu_check.main(['--device', 'cpu', '--only', 'device_augment', 'loader', '--out', {str(tmp_path / 'r.json')!r}]))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["environment"]["ffcv"] is False and report["skipped"] == ["loader"]
    assert "ffcv cannot be imported here" in report["checks"]["loader"]["reason"]
    assert report["checks"]["device_augment"]["status"] == "ok"


def test_cuda_mode_without_a_gpu_fails_loudly(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--device", "cuda"]) == 1
    assert "no CUDA device is visible" in capsys.readouterr().err


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", list(gpu_check.CHECKS))
def test_check_passes_on_cuda(name, tmp_path):
    """Each check at small sizes on the GPU (bench/gpu_check.sh runs them at full size for the figures)."""
    out = tmp_path / "r.json"
    code = gpu_check.main(["--device", "cuda", "--only", name, "--steps", "5", "--warmup", "2", "--batch", "32",
                           "--out", str(out)])
    result = json.loads(out.read_text())["checks"][name]
    if result["status"] == "skipped":
        pytest.skip(result["reason"])
    assert code == 0 and result["status"] == "ok", result.get("traceback")
