"""pipeline_src.launch: GPU slots per local job, one process per GPU, SLURM nodes; 2 nodes x 1 process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline_src import launch
from pipeline_src.checkpoint import load_model_weights

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["--", "pipeline_src.train", "--run", "baseline"]


def _plan(*argv: str, **env: str) -> tuple[list[str], int]:
    return launch.plan(launch.parse_args([*argv, *TRAIN]), env)


def test_parallel_local_jobs_take_different_gpus(tmp_path):
    devices = ["0", "1", "2"]
    with launch.claim_gpus(2, devices, tmp_path, wait_s=0) as first:
        with launch.claim_gpus(1, devices, tmp_path, wait_s=0) as second:
            assert len(first) == 2 and len(second) == 1 and not set(first) & set(second)
            with pytest.raises(launch.LaunchError, match="no 1 free GPU"):
                with launch.claim_gpus(1, devices, tmp_path, wait_s=0):
                    pass
        with launch.claim_gpus(1, devices, tmp_path, wait_s=0) as again:  # released on exit
            assert again == second
    with pytest.raises(launch.LaunchError, match="asks 4 GPU"):
        with launch.claim_gpus(4, devices, tmp_path, wait_s=0):
            pass


def test_the_stage_process_sees_only_its_gpu(tmp_path):
    """Two launches while one holds GPU 0 of a fake list: the child of the second sees GPU 1 only."""
    (tmp_path / "show_gpus.py").write_text("import os\nprint('seen', os.environ['CUDA_VISIBLE_DEVICES'])\n")
    env = {**os.environ, "PIPELINE_GPUS": "0,1", "PYTHONPATH": f"{tmp_path}:{ROOT}"}
    cmd = [sys.executable, "-m", "pipeline_src.launch", "--gpus", "1", "--lock-dir", str(tmp_path / "locks"), "--",
           "show_gpus"]
    with launch.claim_gpus(1, ["0"], tmp_path / "locks", wait_s=0):
        busy = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, check=True)
    free = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, check=True)
    assert busy.stdout.split() == ["seen", "1"] and free.stdout.split() == ["seen", "0"]


def test_local_commands_follow_the_gpu_count():
    one, claim = _plan("--gpus", "1", PIPELINE_GPUS="0,1,2,3")
    assert one == [sys.executable, "-m", "pipeline_src.train", "--run", "baseline"] and claim == 1
    two, claim = _plan("--gpus", "2", PIPELINE_GPUS="0,1,2,3")
    assert two[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] and claim == 2
    assert two[-5:] == ["-m", "pipeline_src.train", "--", "--run", "baseline"]
    cpu, claim = _plan("--gpus", "1", PIPELINE_GPUS="")  # no GPU on the machine: one CPU process
    assert cpu[1:3] == ["-m", "pipeline_src.train"] and claim == 0
    with pytest.raises(launch.LaunchError, match="no SLURM job"):
        _plan("--nodes", "2", PIPELINE_GPUS="0")


def test_a_machine_without_a_gpu_driver_has_no_gpus_and_the_launcher_skips_torch(tmp_path):
    """Without PIPELINE_GPUS / CUDA_VISIBLE_DEVICES the launcher counts GPUs; where no driver is there it
    answers none without importing torch (3 s a job); where one is, torch counts them."""
    script = ("import sys; from pipeline_src import launch; launch.GPU_DRIVER_PATHS = tuple(sys.argv[1:]); "
              "print(launch.machine_gpus({}), 'torch' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k not in ("PIPELINE_GPUS", "CUDA_VISIBLE_DEVICES")}

    def run(*driver_paths: Path) -> str:
        return subprocess.run([sys.executable, "-c", script, *map(str, driver_paths)], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=60, check=True).stdout.strip()

    assert run(tmp_path / "no-driver") == "[] False"
    counted = [str(i) for i in range(torch.cuda.device_count())]
    assert run(tmp_path) == f"{counted} True"  # a driver path that exists: torch counts


def test_a_job_that_cannot_start_is_one_line_and_exit_2(monkeypatch, capsys):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert launch.main(["--nodes", "2", *TRAIN]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("launch: error: launch.nodes is 2 but this is no SLURM job")


def test_slurm_jobs_count_the_allocation_and_start_one_task_per_node():
    single, claim = _plan("--gpus", "0", SLURM_JOB_ID="77", CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7")
    assert single[2:6] == ["torch.distributed.run", "--standalone", "--nproc_per_node", "8"] and claim == 0
    multi, _ = _plan("--gpus", "0", "--nodes", "2", SLURM_JOB_ID="77")
    assert multi[:6] == ["srun", "--nodes", "2", "--ntasks-per-node", "1", "--kill-on-bad-exit=1"]
    assert multi[6:] == [sys.executable, "-m", "pipeline_src.launch", "--node", "--nodes", "2", *TRAIN]
    node, _ = _plan("--node", "--nodes", "2", SLURM_JOB_ID="4242", SLURM_STEP_NODELIST="gpu[07-08,11]",
                    CUDA_VISIBLE_DEVICES="0,1,2,3")
    assert node[2:] == ["torch.distributed.run", "--nnodes", "2", "--rdzv_backend", "c10d", "--rdzv_id", "4242",
                        "--rdzv_endpoint", f"gpu07:{launch.rendezvous_port('4242')}", "--nproc_per_node", "4",
                        "-m", *TRAIN[1:2], "--", *TRAIN[2:]]
    assert launch.first_host("node3,node4") == "node3" and launch.first_host("a[1-4]") == "a1"


def test_slurm_submission_asks_the_plugins_gpu_resources(tmp_path):
    """The slurm profile through snakemake-executor-plugin-slurm, a fake sbatch recording its arguments."""
    import yaml

    from tests.conftest import write_micro_params

    params = write_micro_params(tmp_path, {"launch": {"nodes": 2}})
    betons = yaml.safe_load(params.read_text())["paths"]["data"] + "/betons"
    src = Path(betons)
    src.mkdir(parents=True)
    for name in ("train.beton", "val.beton", "classes.json"):
        (src / name).write_bytes(b"")
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "sbatch").write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$FAKE_SLURM_LOG"\necho "fake sbatch" >&2\nexit 1\n')
    for name in ("sacct", "squeue", "sinfo", "scontrol"):
        (fake / name).write_text("#!/bin/sh\nexit 0\n")
    for path in fake.iterdir():
        path.chmod(0o755)
    profile = tmp_path / "profile"
    profile.mkdir()
    config = yaml.safe_load((ROOT / "workflow/profiles/slurm/config.yaml").read_text())
    config.pop("use-conda")  # conda cannot build envs here; the resources are what is under test
    (profile / "config.yaml").write_text(yaml.safe_dump(config))
    log = tmp_path / "sbatch.args"
    env = {**os.environ, "PATH": f"{fake}:{Path(sys.executable).parent}:{os.environ['PATH']}", "FAKE_SLURM_LOG": str(log)}
    target = yaml.safe_load(params.read_text())["paths"]["runs"] + "/baseline/seed0/metrics.json"
    subprocess.run([sys.executable, "-m", "snakemake", target, "--workflow-profile", str(profile), "--slurm-no-account",
                    "--allowed-rules", "train", "--slurm-init-seconds-before-status-checks", "1",
                    "--config", f"params_file={params}"], cwd=ROOT, env=env,
                   capture_output=True, text=True, timeout=240)
    args = log.read_text().splitlines()
    assert {"--nodes=2", "--ntasks=2", "--gres=gpu:8", "--cpus-per-task=64", "gpu"} <= set(args)
    assert not any(a.startswith(("--gpus", "--ntasks-per-gpu")) for a in args)
    wrapped = next(a for a in args if a.startswith("--wrap="))
    assert "--target-jobs 'train:run=baseline,seed=0'" in wrapped


def test_two_nodes_of_one_process_match_one_process(micro, tmp_path):
    """Two torchrun agents (--nnodes 2, gloo, localhost) end where one process does on the same global batch,
    with the LR scaled from the global batch: the batch split, LR and distributed reader follow the world size."""
    same = ["--run", "baseline", "--set", "train.epochs=1", "--set", "train.step_milestones=[]",
            "--set", "train.batch_size=48", "--set", "train.base_batch=16", "--set", "train.linear_scaling=true",
            "--set", "train.base_lr=0.00003", "--set", "train.sync_bn=true", "--set", "loader.order=sequential",
            "--set", "augment.crop_area=[1.0, 1.0]", "--set", "augment.crop_ratio=[1.0, 1.0]",
            "--set", "augment.flip=false", "--set", "augment.brightness=0", "--set", "augment.contrast=0",
            "--set", "augment.saturation=0", "--set", "augment.lighting_std=0", "--set", "train.channels_last=false"]
    single, nodes = tmp_path / "single", tmp_path / "nodes"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    base = ["-m", "pipeline_src.train", "--", "--params", str(micro)]
    subprocess.run([sys.executable, *base[:2], *base[3:], "--out", str(single), *same], check=True,
                   capture_output=True, timeout=300, env=env)
    port = launch.rendezvous_port(str(os.getpid()))
    agents = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                                "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", str(port),
                                *base, "--out", str(nodes), *same],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outputs = [agent.communicate(timeout=300)[0] for agent in agents]
    assert [a.returncode for a in agents] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    a, _ = load_model_weights(single / "model.pt")
    b, _ = load_model_weights(nodes / "model.pt")
    for key in (k for k in a if a[k].is_floating_point() and "running" not in k):
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=2e-6, msg=key)
    h1 = json.loads((single / "history.json").read_text())
    h2 = json.loads((nodes / "history.json").read_text())
    assert h1["lr_curve"] == h2["lr_curve"] and h1["lr_curve"][0][1] == pytest.approx(0.00003 * 48 / 16)


def _launch_env(tmp_path: Path) -> dict:
    """This machine's environment without a preload of its own, on the CPU, with `tmp_path` importable."""
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD")}
    return {**env, "PIPELINE_GPUS": "", "PYTHONPATH": f"{tmp_path}:{ROOT}"}


def test_the_stage_process_runs_on_the_allocator_its_params_name(tmp_path):
    """tcmalloc (the default, which make setup installs) is mapped into the stage process; `system` keeps
    glibc's malloc. The launcher reads the stage's own --params / --set."""
    (tmp_path / "show_malloc.py").write_text(
        "import os, pathlib\nmaps = pathlib.Path('/proc/self/maps').read_text()\n"
        "print('libtcmalloc' in maps, os.environ.get('TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD'))\n")

    def run(*sets: str) -> list[str]:
        cmd = [sys.executable, "-m", "pipeline_src.launch", "--", "show_malloc", "--params", str(ROOT / "params.yaml"),
               *[arg for assignment in sets for arg in ("--set", assignment)]]
        return subprocess.run(cmd, env=_launch_env(tmp_path), cwd=tmp_path, capture_output=True, text=True,
                              timeout=60, check=True).stdout.split()

    assert run() == ["True", str(1 << 40)]
    assert run("launch.allocator=system") == ["False", "None"]


def test_an_allocator_that_is_not_installed_is_a_warning_and_the_system_one(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(launch.ALLOCATOR_LIBRARIES, "jemalloc", "libnot-installed.so.9")
    assert launch.allocator_env("jemalloc", {}) == {}
    assert "launch.allocator is jemalloc but libnot-installed.so.9 is not installed" in capsys.readouterr().err
    system = launch.find_library("libtcmalloc_minimal.so.4", {})
    assert system is not None  # make setup installs it
    env = launch.allocator_env("tcmalloc", {"LD_PRELOAD": "/opt/other.so"})
    assert env["LD_PRELOAD"] == f"{system} /opt/other.so"  # prepended to the user's own preload
    assert launch.allocator_env("tcmalloc", {"LD_PRELOAD": system, "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": "1"}) == {}
    # A conda env's library comes first; a file that is no library of this process's kind is passed over.
    conda_lib = tmp_path / "conda" / "lib"
    conda_lib.mkdir(parents=True)
    (conda_lib / "libtcmalloc_minimal.so.4").write_bytes(b"not an ELF file at all")
    assert launch.find_library("libtcmalloc_minimal.so.4", {"CONDA_PREFIX": str(tmp_path / "conda")}) == system
    (conda_lib / "libtcmalloc_minimal.so.4").write_bytes(Path(system).read_bytes())
    assert launch.find_library("libtcmalloc_minimal.so.4", {"CONDA_PREFIX": str(tmp_path / "conda")}) == \
        str(conda_lib / "libtcmalloc_minimal.so.4")


def test_the_allocator_changes_no_trained_number(micro, tmp_path):
    """The same run under tcmalloc and under glibc's malloc ends with bit-identical weights and metrics."""
    outs = {}
    for allocator in ("tcmalloc", "system"):
        outs[allocator] = tmp_path / allocator
        subprocess.run([sys.executable, "-m", "pipeline_src.launch", "--", "pipeline_src.train", "--params", str(micro),
                        "--run", "baseline", "--seed", "0", "--set", "train.epochs=1", "--set", "train.step_milestones=[]",
                        "--set", f"launch.allocator={allocator}", "--out", str(outs[allocator])],
                       env=_launch_env(tmp_path), cwd=ROOT, check=True, capture_output=True, timeout=300)
    a, _ = load_model_weights(outs["tcmalloc"] / "model.pt")
    b, _ = load_model_weights(outs["system"] / "model.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    top1 = [json.loads((out / "metrics.json").read_text())["top1"] for out in outs.values()]
    assert top1[0] == top1[1]
