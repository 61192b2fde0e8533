"""One set-up for every process that runs torch: OpenMP waiting, threads, device, precision, process group.

    configure_openmp()                      # the CLI, first thing, before torch is imported
    rt = setup_runtime(threads=None)        # train and eval: threads, device, and the process group when
                                            # started by torchrun / accelerate launch
    dtype = resolve_precision("auto", rt.device)
    with autocast(rt.device, dtype): loss = model(...)

A launcher (``torchrun --nproc_per_node N -m nestling -- train ...`` or ``accelerate launch -m nestling train
...``) sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; the process group is formed from them
here (gloo on CPU, NCCL on GPU). On CPU, ``accelerate.Accelerator()`` alone forms no process group: every
process trained alone and all wrote the same directory. ``accelerate launch --multi_gpu --num_processes N``
starts N processes on CPU too; accelerate 1.15's ``--cpu --num_processes N`` starts only one.
"""

from __future__ import annotations

import atexit
import datetime
import logging
import os
import platform
import sys
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nestling.core.errors import NestlingError

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16")
# Stages that only rank 0 runs (traces, eval) keep the other ranks waiting at a barrier: long enough for a
# teacher pass over thousands of questions, instead of the 30-minute default.
BARRIER_TIMEOUT = datetime.timedelta(hours=12)


def configure_openmp() -> None:
    """OMP_WAIT_POLICY=PASSIVE for a process that trains or evaluates with torch on CPU (unless already set).

    OpenMP reads it once, when it starts, so call this before torch is imported. With other processes on the
    cores, spinning OpenMP threads made 2-thread PyTorch ~30x slower; passive waiting removed that. llama.cpp
    also uses OpenMP and is slowed by passive waiting, hence per process rather than global.
    """
    if "torch" in sys.modules:
        log.debug("torch is already imported: OMP_WAIT_POLICY set now may have no effect")
    if not _gpu_visible():
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _gpu_visible() -> bool:
    """A CUDA device exists, judged without importing torch (which would start OpenMP)."""
    return os.environ.get("CUDA_VISIBLE_DEVICES") not in ("", "-1") and Path("/dev/nvidiactl").exists()


def launched_world() -> int:
    """How many processes the launcher started (1 when run directly)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Rank 0, or not launched at all. Needs no torch: the launcher's RANK variable decides."""
    return int(os.environ.get("RANK", "0")) == 0


@dataclass(frozen=True)
class Runtime:
    device: Any  # torch.device
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def default_threads() -> int:
    """min(2, cores): more threads than free cores only adds OpenMP spinning under contention."""
    return max(1, min(2, os.cpu_count() or 1))


def set_threads(threads: int | None) -> None:
    """CPU only: `threads` torch threads; unset, default_threads(), shared among launched processes."""
    import torch

    if not torch.cuda.is_available():
        per_process = max(1, (os.cpu_count() or 1) // launched_world())
        torch.set_num_threads(threads or min(default_threads(), per_process))


def init_process_group() -> None:
    """Join the launcher's process group once per process (no-op when not launched or already joined)."""
    if launched_world() <= 1:
        return
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise NestlingError(f"WORLD_SIZE is set but {', '.join(missing)} is not; start with torchrun")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=BARRIER_TIMEOUT)
    atexit.register(_leave_process_group)
    log.info(
        "rank %d of %d joined the process group (%s)",
        dist.get_rank(),
        dist.get_world_size(),
        dist.get_backend(),
    )


def _leave_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def setup_runtime(threads: int | None = None) -> Runtime:
    """Threads, process group and device for this process."""
    import torch
    import torch.distributed as dist

    set_threads(threads)
    init_process_group()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    else:
        device = torch.device("cpu")
    return Runtime(device=device, rank=rank, world=world)


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if launched_world() <= 1:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def resolve_precision(name: str, device: Any) -> Any:
    """'fp32' | 'bf16' | 'auto' -> the autocast dtype, None for plain fp32.

    auto: bf16 on a GPU that supports it and on a CPU with AMX (bf16 tile matrix units); fp32 elsewhere. On
    AVX512-BF16 cores without AMX (2 threads, quiet), bf16 autocast trained every family at 0.52-0.84x of
    fp32's tokens/s, full or LoRA (benchmarks/results/train_families.json), a SmolLM2-135M shape at 0.60x,
    0.81x and 0.93x with rows of 32, 64 and 128 tokens (train_lengths.json), and the embedded default's own
    rows at 61 tokens/s against fp32's 92: autocast casts every weight each step, and those cores' bf16 dot
    products do not win it back at these sizes. Without bf16 instructions bf16 is emulated, so fp32.
    """
    import torch

    if name not in PRECISIONS:
        raise NestlingError(f"--precision {name!r}: use one of {', '.join(PRECISIONS)}")
    if name == "auto":
        native = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_amx_bf16()
        name = "bf16" if native else "fp32"
    return torch.bfloat16 if name == "bf16" else None


def _cpuinfo() -> str:
    """Linux's /proc/cpuinfo; empty where it cannot be read."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def _cpu_flags(text: str | None = None) -> set[str]:
    text = _cpuinfo() if text is None else text
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split()}


def cpu_info() -> dict[str, Any]:
    """What a benchmark records of the CPU it ran on: its model and the flags that change training speed
    here (machines of one kind differ: AVX-512 or not, AVX512-BF16, AMX)."""
    text = _cpuinfo()
    lines = (ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name"))
    flags = _cpu_flags(text)
    return {
        "cpu": next(lines, "") or platform.processor(),
        "cores": os.cpu_count(),
        "avx512": "avx512f" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
    }


def cpu_has_bf16() -> bool:
    """The CPU computes bf16 natively (AVX512-BF16 or AMX)."""
    return bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())


def cpu_has_amx_bf16() -> bool:
    """The CPU has AMX bf16 tiles: where auto picks bf16 autocast on a CPU."""
    return "amx_bf16" in _cpu_flags()


def autocast(device: Any, dtype: Any) -> AbstractContextManager:
    """Mixed precision for the forward pass; weights and optimizer state stay fp32."""
    import torch

    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)
