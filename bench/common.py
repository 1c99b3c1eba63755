"""What every benchmark shares: the machine's description, timing with warm-up and device sync, peak
memory, child processes (one measurement per process, so peak memory and allocator state do not leak
between rows) and markdown tables.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

REPO = Path(__file__).resolve().parent.parent
RESULT_PREFIX = "BENCH_RESULT "  # a child's last stdout line carrying its JSON result


@dataclass(frozen=True)
class Machine:
    cpu: str  # model name from /proc/cpuinfo
    cores: int  # logical cores visible to this process
    torch_threads: int
    torch: str
    python: str
    device: str  # "cpu" or the CUDA device's name
    matmul_dtype: str  # the dtype the matmul rate below was measured in (the training dtype)
    matmul_tflops: float  # measured dense matmul rate on `device`, TFLOP/s

    def line(self) -> str:
        return (f"{self.device if self.device != 'cpu' else 'CPU only'}; CPU {self.cpu} ({self.cores} cores, "
                f"{self.torch_threads} torch threads); torch {self.torch}, Python {self.python}; measured "
                f"{self.matmul_dtype} matmul {self.matmul_tflops:.3g} TFLOP/s")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def matmul_tflops(device: torch.device | str, dtype: torch.dtype, n: int | None = None, iters: int = 0) -> float:
    """Measured rate of an n x n x n matmul (2 n^3 FLOP): the chip's practical ceiling for this dtype."""
    device = torch.device(device)
    n = n or (8192 if device.type == "cuda" else 1024)
    iters = iters or (20 if device.type == "cuda" else 5)
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    for _ in range(2):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    sync(device)
    return 2 * n**3 * iters / (time.perf_counter() - t0) / 1e12


def describe_machine(device: str) -> Machine:
    dev = torch.device(device)
    if dev.type == "cuda":
        name, dtype = torch.cuda.get_device_name(dev), torch.bfloat16
    else:
        name, dtype = "cpu", torch.float32  # the CPU runtime trains in fp32
    return Machine(cpu=cpu_model(), cores=os.cpu_count() or 1, torch_threads=torch.get_num_threads(),
                   torch=torch.__version__, python=platform.python_version(), device=name,
                   matmul_dtype=str(dtype).replace("torch.", ""), matmul_tflops=matmul_tflops(dev, dtype))


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench: --device cuda was asked for but CUDA is not available on this machine")
    return device


# ---------------------------------------------------------------------------------------------------
# Timing and memory


def time_repeats(fn: Callable[[], Any], device: torch.device | str, *, warmup: int, repeats: int) -> list[float]:
    """Seconds per call of `fn` after `warmup` untimed calls; the device is synchronised around each."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def median(xs: Sequence[float]) -> float:
    s = sorted(xs)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else 0.5 * (s[mid - 1] + s[mid])


def reset_peak_memory(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_memory_bytes(device: torch.device | str) -> int:
    """Peak GPU memory allocated by tensors on CUDA; the process's peak resident set size on CPU."""
    if torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated())
    return rss_peak_bytes()


def rss_peak_bytes() -> int:
    """This process's peak resident set size. Linux: VmHWM, which starts afresh at exec; getrusage's
    ru_maxrss does not (a child started by a 1 GB parent reports >= 1 GB), so it is only the fallback."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux


def memory_kind(device: str) -> str:
    return "GPU max_memory_allocated" if torch.device(device).type == "cuda" else "process peak RSS"


def mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


# ---------------------------------------------------------------------------------------------------
# Child processes


def emit(result: dict[str, Any]) -> None:
    """A child's way of handing its result back (the last line of its stdout)."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_child(module: str, spec: dict[str, Any], timeout: float = 1800) -> dict[str, Any]:
    """Run `python -m module --child <spec json>` from the repository root and return its result."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", module, "--child", json.dumps(spec)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
    raise RuntimeError(f"bench child {module} {spec} failed (exit {proc.returncode}):\n{tail}")


# ---------------------------------------------------------------------------------------------------
# Tables


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; cells are str()-ed (format numbers before)."""
    cells = [[str(c) for c in r] for r in rows]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in cells]
    return "\n".join(lines)


@dataclass
class Table:
    """One benchmark's result: a title, a markdown table, notes (what was measured and how)."""

    key: str  # "throughput", "prune_overhead", ...
    title: str
    headers: list[str]
    rows: list[list[str]]
    notes: list[str]

    def markdown(self) -> str:
        parts = [f"### {self.title}", "", markdown_table(self.headers, self.rows)]
        if self.notes:
            parts += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(parts)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Table":
        return cls(**d)


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 else "n/a"


def pct_over(a: float, base: float) -> str:
    return f"{100 * (a / base - 1):+.1f}%" if base > 0 else "n/a"
