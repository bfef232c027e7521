"""What the figures were measured on, and how busy the machine was meanwhile (via psutil).

:func:`machine_info` describes the machine (CPU model, usable cores, memory, library versions,
load average); :class:`CpuMeter` measures, over an interval, the CPU time of the whole machine,
of this process and of one child process (the server under test), so that a figure taken while
another process (say a training run) used the cores can say so.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass

import psutil

from medlens.machine import cpu_info, usable_cores

__all__ = [
    "CpuMeter",
    "CpuUsage",
    "cpu_model",
    "load_average",
    "machine_info",
    "memory_gb",
    "process_cpu_seconds",
    "usable_cores",
]

# Instruction-set extensions that change what ONNX Runtime and torch can run fast.
_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what :mod:`platform` knows."""
    return cpu_info().get("model name") or platform.processor() or "unknown CPU"


def _cpu_flags() -> list[str]:
    have = set(cpu_info().get("flags", "").split())
    return [f for f in _FLAGS if f in have]


def memory_gb() -> float:
    """The machine's total memory in GiB, to 0.1."""
    return round(psutil.virtual_memory().total / 2**30, 1)


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages, or None where the platform has none."""
    try:
        return [round(x, 2) for x in psutil.getloadavg()]
    except (OSError, AttributeError):
        return None


def machine_info() -> dict:
    """What the figures were measured on: CPU model, cores, memory, library versions.

    Returns:
        ``cpu_model``, ``cores`` (usable ones), ``logical_cpus``, ``cpu_flags``, ``memory_gb``,
        ``platform``, ``python``, ``torch``, ``onnxruntime`` and ``load_average_start``.
    """
    import onnxruntime
    import torch

    return {
        "cpu_model": cpu_model(),
        "cores": usable_cores(),
        "logical_cpus": psutil.cpu_count(),
        "cpu_flags": _cpu_flags(),
        "memory_gb": memory_gb(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "load_average_start": load_average(),
    }


def process_cpu_seconds(proc: psutil.Process) -> float | None:
    """User + system CPU seconds a process (all its threads) has used, or None once it is gone."""
    try:
        t = proc.cpu_times()
    except psutil.Error:
        return None
    return t.user + t.system


def _machine_seconds() -> tuple[float, float]:
    """``(busy, total)`` CPU seconds of all cores since boot (idle and iowait are not busy;
    guest time is already counted in user time)."""
    t = psutil.cpu_times()
    idle = t.idle + getattr(t, "iowait", 0.0)
    total = t.user + t.system + t.idle
    for extra in ("nice", "iowait", "irq", "softirq", "steal"):
        total += getattr(t, extra, 0.0)
    return total - idle, total


@dataclass(frozen=True)
class CpuUsage:
    """CPU seconds used during one interval (see :class:`CpuMeter`)."""

    busy_s: float  # every process on every core
    total_s: float  # every core's time, busy or idle
    own_s: float  # this process
    child_s: float | None = None  # the watched child process; None without one or once gone

    @property
    def busy_share(self) -> float | None:
        """Share of the machine's CPU time that was busy."""
        return round(self.busy_s / self.total_s, 3) if self.total_s > 0 else None

    @property
    def other_share(self) -> float | None:
        """Share of the machine's CPU time used by processes other than this one and the
        watched child (e.g. a training run beside the benchmark)."""
        if self.total_s <= 0:
            return None
        ours = self.own_s + (self.child_s or 0.0)
        return round(max(0.0, self.busy_s - ours) / self.total_s, 3)


class CpuMeter:
    """CPU time of the machine, this process and (optionally) a child process from construction
    until :meth:`stop`.

    Args:
        pid: a process to watch beside this one (the server under test), or None.
    """

    def __init__(self, pid: int | None = None):
        self._own = psutil.Process()
        try:
            self._child = psutil.Process(pid) if pid is not None else None
        except psutil.Error:
            self._child = None
        self._machine0 = _machine_seconds()
        self._own0 = process_cpu_seconds(self._own) or 0.0
        self._child0 = process_cpu_seconds(self._child) if self._child else None

    def stop(self) -> CpuUsage:
        """The CPU seconds used since construction."""
        busy, total = _machine_seconds()
        own = (process_cpu_seconds(self._own) or 0.0) - self._own0
        child = None
        if self._child is not None and self._child0 is not None:
            end = process_cpu_seconds(self._child)
            child = None if end is None else end - self._child0
        return CpuUsage(busy - self._machine0[0], total - self._machine0[1], own, child)
