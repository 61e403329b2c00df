"""Start a training stage with one process per GPU it was given, on this machine or on SLURM nodes.

    python -m pipeline_src.launch --gpus 1 --nodes 1 -- pipeline_src.train --run baseline --seed 0

Local (no SLURM job): the job takes `--gpus` free GPUs of this machine (one lock file per GPU under
--lock-dir, held while the job runs, released by the kernel even when it is killed) and sees only those
(CUDA_VISIBLE_DEVICES), so jobs that Snakemake runs side by side never share cuda:0. The pool is
$PIPELINE_GPUS (a comma list, also the fake device list of the tests), else the GPUs CUDA_VISIBLE_DEVICES
names, else all that torch counts; with no GPU the job runs on the CPU.
SLURM: the allocation already isolates GPUs. On one node the GPUs SLURM gave are counted; several nodes
(`--nodes`, the train rule's `nodes` resource from launch.nodes) get one `srun` task per node, and each
runs `torchrun` with one process per GPU of its node, the rendezvous on the first node of the step.
One GPU or none: the stage runs as one plain process (no torchrun).
Every process of the job preloads the memory allocator the stage's params name (`launch.allocator`).
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

from pipeline_src.errors import InputError, run_main

LOCK_DIR = Path(os.environ.get("XDG_RUNTIME_DIR", "/tmp")) / "pipeline-gpu-slots"
POLL_S = 2.0
# What a machine with a GPU that torch.cuda can use has: NVIDIA's driver, or ROCm's kernel driver.
GPU_DRIVER_PATHS = ("/proc/driver/nvidia/gpus", "/dev/kfd")
# `launch.allocator`: the library preloaded instead of glibc's malloc, and where it comes from. A CPU
# training step allocates many small tensors; tcmalloc makes the CPU profile's step about 1.2x
# faster (bench/allocator.py).
ALLOCATOR_LIBRARIES = {"tcmalloc": "libtcmalloc_minimal.so.4", "jemalloc": "libjemalloc.so.2"}
ALLOCATOR_PACKAGES = {"tcmalloc": "apt: libtcmalloc-minimal4, conda: gperftools",
                      "jemalloc": "apt: libjemalloc2, conda: jemalloc"}


class LaunchError(InputError, RuntimeError):
    """The job cannot be started as asked; the message says what to change."""


def machine_gpus(env: dict) -> list[str]:
    """The GPU ids jobs on this machine share: $PIPELINE_GPUS, else CUDA_VISIBLE_DEVICES, else all."""
    for key in ("PIPELINE_GPUS", "CUDA_VISIBLE_DEVICES"):
        if key in env:
            return [d.strip() for d in env[key].split(",") if d.strip()]
    if not any(Path(path).exists() for path in GPU_DRIVER_PATHS):
        return []  # no GPU driver: a CPU machine, told without importing torch (3 s per job)
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


@contextlib.contextmanager
def claim_gpus(count: int, devices: list[str], lock_dir: Path, wait_s: float) -> Iterator[list[str]]:
    """Hold `count` of `devices` for the duration (flock: a crashed job's slots free themselves)."""
    if count > len(devices):
        raise LaunchError(f"the job asks {count} GPU(s) but this machine has {len(devices)} ({devices}); "
                          "lower the rule's gpu resource or set PIPELINE_GPUS")
    lock_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait_s
    while True:
        held: list[tuple[str, int]] = []
        for device in devices:
            fd = os.open(lock_dir / f"gpu-{device}.lock", os.O_CREAT | os.O_RDWR, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            held.append((device, fd))
            if len(held) == count:
                break
        if len(held) == count:
            break
        for _, fd in held:
            os.close(fd)
        if time.monotonic() >= deadline:
            raise LaunchError(f"no {count} free GPU(s) among {devices} after {wait_s:.0f} s (lock files in "
                              f"{lock_dir}); run fewer GPU jobs at once (snakemake --resources gpu=N)")
        time.sleep(POLL_S)
    try:
        yield [device for device, _ in held]
    finally:
        for _, fd in held:
            os.close(fd)


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'gpu[07-09,12],cpu1' -> 'gpu07'."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise LaunchError(f"cannot read the SLURM node list {nodelist!r}")
    prefix, ranges = match.groups()
    return prefix + (re.split(r"[-,]", ranges)[0] if ranges else "")


def rendezvous_port(job_id: str) -> int:
    """A port per SLURM job, so two jobs sharing a first node do not collide."""
    return 29500 + int(job_id) % 20000


def stage_command(module: str, args: list[str], nproc: int, torchrun_args: list[str]) -> list[str]:
    """`python -m module args`, or torchrun with `nproc` processes (the `--` as train.py's docstring says)."""
    if nproc <= 1 and not torchrun_args:
        return [sys.executable, "-m", module, *args]
    return [sys.executable, "-m", "torch.distributed.run", *torchrun_args, "--nproc_per_node", str(max(nproc, 1)),
            "-m", module, "--", *args]


def node_torchrun_args(env: dict, nodes: int) -> list[str]:
    """torchrun's multi-node arguments inside one srun task per node."""
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if not nodelist or "SLURM_JOB_ID" not in env:
        raise LaunchError("--node runs inside `srun` (SLURM_JOB_ID and SLURM_STEP_NODELIST unset)")
    host = first_host(nodelist)
    return ["--nnodes", str(nodes), "--rdzv_backend", "c10d", "--rdzv_id", env["SLURM_JOB_ID"],
            "--rdzv_endpoint", f"{host}:{rendezvous_port(env['SLURM_JOB_ID'])}"]


def plan(opts: argparse.Namespace, env: dict) -> tuple[list[str], int]:
    """(command, GPUs to claim locally) for this job; nothing is started here."""
    module, args = opts.command[0], opts.command[1:]
    in_slurm = "SLURM_JOB_ID" in env
    if opts.node:
        return stage_command(module, args, len(machine_gpus(env)), node_torchrun_args(env, opts.nodes)), 0
    if opts.nodes > 1:
        if not in_slurm:
            raise LaunchError(f"launch.nodes is {opts.nodes} but this is no SLURM job; several nodes need "
                              "SLURM (snakemake --workflow-profile workflow/profiles/slurm), else set launch.nodes=1")
        srun = ["srun", "--nodes", str(opts.nodes), "--ntasks-per-node", "1", "--kill-on-bad-exit=1"]
        return [*srun, sys.executable, "-m", "pipeline_src.launch", "--node", "--nodes", str(opts.nodes), "--",
                module, *args], 0
    if in_slurm:
        return stage_command(module, args, len(machine_gpus(env)), ["--standalone"]
                             if len(machine_gpus(env)) > 1 else []), 0
    gpus = opts.gpus if machine_gpus(env) else 0  # a machine without GPUs trains on the CPU
    return stage_command(module, args, gpus, ["--standalone"] if gpus > 1 else []), gpus


def stage_params(stage_args: list[str]) -> dict:
    """The params the stage will run with (its --params and --set), for what the launcher sets up."""
    from pipeline_src import params as params_mod

    parser = argparse.ArgumentParser(add_help=False)
    params_mod.add_arguments(parser)
    return params_mod.from_args(parser.parse_known_args(stage_args)[0])


def _elf_kind(path: str) -> bytes:
    """ELF class, byte order and machine: a library preloads only into processes of its own kind."""
    with open(path, "rb") as f:
        head = f.read(20)
    return head[4:6] + head[18:20]


def find_library(soname: str, env: dict) -> str | None:
    """`soname` in the active conda env, else where the dynamic linker's cache (`ldconfig -p`) has it."""
    candidates = [str(Path(env["CONDA_PREFIX"]) / "lib" / soname)] if env.get("CONDA_PREFIX") else []
    for ldconfig in ("ldconfig", "/sbin/ldconfig"):
        try:
            listing = subprocess.run([ldconfig, "-p"], capture_output=True, text=True, timeout=60, check=False).stdout
        except OSError:
            continue
        candidates += [line.partition(" => ")[2] for line in listing.splitlines()
                       if line.split(maxsplit=1)[:1] == [soname]]
        break
    ours = _elf_kind(sys.executable)
    return next((c for c in candidates if Path(c).is_file() and _elf_kind(c) == ours), None)


def allocator_env(name: str, env: dict) -> dict:
    """The variables that make the job's processes use allocator `name` ({} for the system's). Not
    installed: a warning, and the system allocator (the numbers are the same, only slower)."""
    if name == "system":
        return {}
    soname = ALLOCATOR_LIBRARIES[name]
    path = find_library(soname, env)
    if path is None:
        print(f"launch: warning: launch.allocator is {name} but {soname} is not installed "
              f"({ALLOCATOR_PACKAGES[name]}; make setup installs tcmalloc); using the system allocator",
              file=sys.stderr, flush=True)
        return {}
    preload = env.get("LD_PRELOAD", "").split()
    out = {} if path in preload else {"LD_PRELOAD": " ".join([path, *preload])}
    if name == "tcmalloc" and "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD" not in env:
        out["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"] = str(1 << 40)  # no "large alloc" line per big buffer
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=1, help="GPUs this job takes on a local machine")
    parser.add_argument("--nodes", type=int, default=1, help="nodes of the SLURM job (launch.nodes)")
    parser.add_argument("--node", action="store_true", help="internal: one srun task per node")
    parser.add_argument("--lock-dir", type=Path, default=LOCK_DIR, help=f"GPU slot locks (default {LOCK_DIR})")
    parser.add_argument("--wait", type=float, default=3600.0, help="seconds to wait for free GPUs")
    parser.add_argument("--dry-run", action="store_true", help="print the command and CUDA_VISIBLE_DEVICES only")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- MODULE ARGS...")
    opts = parser.parse_args(argv)
    if opts.command[:1] == ["--"]:
        opts.command = opts.command[1:]
    if not opts.command:
        parser.error("give the stage after --, e.g. -- pipeline_src.train --run baseline")
    if opts.gpus < 0 or opts.nodes < 1:
        parser.error("--gpus must be >= 0 and --nodes >= 1")
    return opts


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    env = dict(os.environ)

    def body() -> int:
        command, claim = plan(opts, env)
        env.update(allocator_env(stage_params(opts.command[1:])["launch"]["allocator"], env))
        with claim_gpus(claim, machine_gpus(env), opts.lock_dir, opts.wait) if claim else \
                contextlib.nullcontext([]) as slots:
            if "SLURM_JOB_ID" not in env:  # locally the job sees its slots only (none: the CPU)
                env["CUDA_VISIBLE_DEVICES"] = ",".join(slots)
            if opts.dry_run:
                print(f"CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES', '')}")
                print(f"LD_PRELOAD={env.get('LD_PRELOAD', '')}")
                print(" ".join(command))
                return 0
            return subprocess.run(command, env=env).returncode

    return run_main("launch", body)


if __name__ == "__main__":
    sys.exit(main())
