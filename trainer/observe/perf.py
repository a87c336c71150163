"""Model FLOP utilisation (MFU) and profiler traces for the training loop.

MFU = achieved FLOP/s per device / peak FLOP/s of the device, with the
achieved rate from the model's own count (HybridLM.flops_per_token: 6 x matmul
parameters + 3 x mixing FLOPs, per trained token) and the tokens per second
the loop measures, divided over the dp x cp processes that share them.

The peak is the device's theoretical one, so MFU stays in (0, 1] however the load
of a shared machine changes. In order of precedence:
    train.peak_flops                 a number given by the user (FLOP/s per device);
    CUDA                             the dense bf16 tensor-core peak of the device, from GPU_BF16_PEAKS;
    CPU                              cores x clock x fp32 FLOPs per cycle of the widest vector ISA
                                     found (cpu_theoretical_peak), or, where the clock or the ISA
                                     cannot be read, the best of a few fp32 GEMMs timed at start-up.
On CPU the GEMM rate is also measured and logged beside the peak, named as what it is
(the rate this process got at start-up, not a peak); when it exceeds the theoretical
estimate (a clock reported below the one the cores run at), the estimate is raised to it.

`train.profile_steps: [a, b, ...]` records those steps with torch.profiler and
writes a TensorBoard-readable trace (torch-tb-profiler / Perfetto) to
<run>/profile/ when each run of consecutive listed steps ends.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch

__all__ = ["GPU_BF16_PEAKS", "measure_cpu_peak", "cpu_theoretical_peak", "device_peak", "mfu", "StepProfiler"]

# Dense bf16 tensor-core peaks (FLOP/s, no sparsity) from the vendors' data sheets;
# matched as substrings of torch.cuda.get_device_name(), first match wins.
GPU_BF16_PEAKS: list[tuple[str, float]] = [
    ("GB200", 2.5e15), ("B200", 2.25e15), ("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12),
    ("H800", 989e12), ("GH200", 989e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12),
    ("L40", 181e12), ("L4", 121e12), ("A10G", 70e12), ("A10", 125e12), ("A6000", 155e12),
    ("RTX 4090", 165e12), ("RTX 3090", 71e12), ("V100", 125e12), ("T4", 65e12), ("MI300X", 1307e12),
    ("MI250X", 383e12),
]

# fp32 FLOPs one core can issue per cycle, by the widest vector ISA in /proc/cpuinfo's flags:
# two FMA pipes x lanes x 2 (an FMA is a multiply and an add) - the most any core of that ISA
# issues, so the peak is an upper bound. First match wins.
CPU_FP32_FLOPS_PER_CYCLE: list[tuple[tuple[str, ...], int, str]] = [
    (("avx512f",), 64, "AVX-512 FMA"), (("avx2", "fma"), 32, "AVX2 FMA"), (("avx",), 16, "AVX"),
    (("sve",), 32, "SVE"), (("asimd",), 16, "NEON FMA"), (("sse2",), 8, "SSE2"),
]


def _cpuinfo(path: str = "/proc/cpuinfo") -> tuple[set[str], float | None]:
    """(ISA flags, highest clock in Hz) of this machine's CPUs; empty/None where unreadable."""
    flags: set[str] = set()
    mhz: list[float] = []
    try:
        text = Path(path).read_text()
    except OSError:
        return flags, None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("flags", "features"):
            flags.update(value.split())
        elif key == "cpu mhz":
            try:
                mhz.append(float(value))
            except ValueError:
                pass
    try:  # the rated maximum (turbo) where the kernel exposes it, else the clock cpuinfo reports
        khz = float(Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text())
        mhz.append(khz / 1e3)
    except (OSError, ValueError):
        pass
    return flags, (max(mhz) * 1e6 if mhz else None)


def _cores(threads: int) -> int:
    try:
        available = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        available = os.cpu_count() or threads
    return max(1, min(threads, available))


def cpu_theoretical_peak(threads: int, cpuinfo: tuple[set[str], float | None] | None = None
                         ) -> tuple[float, str] | None:
    """(fp32 FLOP/s, how it was derived) for `threads` cores, or None where clock or ISA is unknown."""
    flags, hz = _cpuinfo() if cpuinfo is None else cpuinfo
    if not hz:
        return None
    for need, per_cycle, isa in CPU_FP32_FLOPS_PER_CYCLE:
        if all(f in flags for f in need):
            cores = _cores(threads)
            return cores * hz * per_cycle, f"{cores} core{'s' * (cores > 1)} x {hz / 1e9:.3g} GHz x {per_cycle} fp32 FLOPs/cycle ({isa})"
    return None


def measure_cpu_peak(n: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of the best of `repeats` fp32 (n x n) @ (n x n) products on this process's threads."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    torch.mm(a, b, out=out)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def device_peak(device: torch.device, override: float | None = None) -> tuple[float | None, str]:
    """(peak FLOP/s per device, where it comes from); None when a GPU is not in the table.

    On CPU the source also names the fp32 GEMM rate measured at start-up.
    """
    if override is not None:
        return float(override), "train.peak_flops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_BF16_PEAKS:
            if key in name:
                return peak, f"bf16 peak of {name}"
        return None, f"{name} is not in the bf16 peak table; set train.peak_flops"
    threads = torch.get_num_threads()
    gemm = measure_cpu_peak()
    measured = f"measured fp32 GEMM {gemm / 1e12:.3g} TFLOP/s on {threads} threads"
    theory = cpu_theoretical_peak(threads)
    if theory is None:
        return gemm, f"{measured}; the clock or vector ISA of this CPU is unknown, so MFU may exceed 1: set train.peak_flops"
    peak, how = theory
    if gemm > peak:
        return gemm, f"{how} = {peak / 1e12:.3g} TFLOP/s is below the {measured}: the cores run faster than reported"
    return peak, f"{how}; {measured}"


def mfu(tokens_per_s: float, flops_per_token: float, peak: float | None, processes: int) -> float | None:
    """Share of the peak achieved per process; tokens_per_s counts all processes' tokens."""
    if peak is None or peak <= 0:
        return None
    return tokens_per_s * flops_per_token / processes / peak


class StepProfiler:
    """torch.profiler around the listed steps; call begin(step) before and end(step) after each step."""

    def __init__(self, run_dir: Path, steps: list[int], enabled: bool = True):
        self.steps = set(steps) if enabled else set()
        self.out = Path(run_dir) / "profile"
        self._prof = None

    def begin(self, step: int) -> None:
        if step in self.steps and self._prof is None:
            from torch.profiler import ProfilerActivity, profile, tensorboard_trace_handler

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self._prof = profile(activities=acts, record_shapes=True, profile_memory=True,
                                 on_trace_ready=tensorboard_trace_handler(str(self.out), worker_name=f"step{step}"))
            self._prof.__enter__()

    def end(self, step: int) -> None:
        if self._prof is not None and step + 1 not in self.steps:
            self._prof.__exit__(None, None, None)  # writes the trace
            self._prof = None

    def close(self) -> None:
        if self._prof is not None:
            self._prof.__exit__(None, None, None)
            self._prof = None
