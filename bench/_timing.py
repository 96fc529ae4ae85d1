"""GPU timing for the pytest-benchmark suites: a CUDA-event clock, an L2 flush, graph replay.

Why not the host clock with a sync per call: a fused loss on an H100/H200 takes microseconds,
about what one host launch + ``torch.cuda.synchronize()`` costs, so a host-timed single call
measures the launch path. Here instead:

- ``CudaEventClock`` is handed to pytest-benchmark as its timer (``pytest.mark.benchmark(timer=...)``).
  pytest-benchmark's pedantic mode calls the timer once before and once after each round of
  ``iterations`` target calls. On the first call the clock synchronizes (nothing queued before
  is timed), overwrites a buffer of 2x the L2 size (the round starts with a cold L2), queues a
  ~50 us spin kernel so that the GPU is still busy while the host queues the round (no launch
  gap at the start), and records a CUDA event. On the second call it records another event,
  waits for it, and returns the running sum of event-timed rounds. So ``end - start`` is the GPU
  time of the round, and pytest-benchmark's statistics (median, IQR, ...; per iteration, since
  it divides by ``iterations``) are CUDA-event times.
- ``graphed(fn)`` captures one call of ``fn`` in a CUDA graph: a round then replays it
  ``iterations`` times back to back, one launch each, so host launch overhead (~100-200 us for
  an autograd forward + backward) does not starve the GPU. If capture fails, the eager function
  is timed and the result says so.
- ``iterations_for`` picks ``iterations`` so that a round lasts about ``round_s`` seconds.

Within a round the iterations run back to back with no flush in between: a working set well
above the L2 size, streamed in the same order every iteration, misses L2 anyway (LRU thrash),
while a working set that fits in L2 is served from it after the first iteration, as it is in
training where the UNet has just written the loss inputs. ``l2_note`` labels which case a
result is.
"""

from __future__ import annotations

import math
import os
import time

import torch

SPIN_CYCLES = 100_000  # ~50-70 us at 1.5-2 GHz: covers the host queueing the first replays of a round
MIN_FLUSH_BYTES = 64 << 20


def quick() -> bool:
    """True when $SFD_BENCH_QUICK=1: reduced rounds and sizes (what bench/gpu_check.sh runs)."""
    return os.environ.get("SFD_BENCH_QUICK") == "1"


def l2_bytes(device: torch.device | None = None) -> int | None:
    if not torch.cuda.is_available():
        return None
    return getattr(torch.cuda.get_device_properties(device), "L2_cache_size", None) or None


def l2_note(working_set: int, device: torch.device | None = None) -> str:
    l2 = l2_bytes(device)
    if l2 is None:
        return "CPU: host timer; caches not flushed"
    if working_set >= 4 * l2:
        return f"streaming: working set {working_set / 2**20:.0f} MiB >= 4x L2 ({l2 / 2**20:.0f} MiB), served from HBM"
    return (f"L2-resident: working set {working_set / 2**20:.1f} MiB < 4x L2 ({l2 / 2**20:.0f} MiB); after the first "
            "iteration of a round bytes may come from L2 (as in training, right after the UNet wrote them)")


class CudaEventClock:
    """pytest-benchmark timer whose intervals are CUDA-event times; see the module docstring.

    Only for ``benchmark.pedantic`` (strictly alternating start/end calls); ``benchmark(fn)``
    calibrates its timer with many back-to-back calls, which this clock does not model.
    """

    def __init__(self, flush_l2: bool = True):
        self.flush_l2 = flush_l2
        self._total = 0.0
        self._start: torch.cuda.Event | None = None
        self._buffer: torch.Tensor | None = None

    def flush(self) -> None:
        if self._buffer is None:
            size = max(2 * (l2_bytes() or 0), MIN_FLUSH_BYTES)
            self._buffer = torch.empty(size // 4, dtype=torch.int32, device="cuda")
        self._buffer.zero_()

    def __call__(self) -> float:
        if self._start is None:  # start of a round
            torch.cuda.synchronize()
            if self.flush_l2:
                self.flush()
            sleep = getattr(torch.cuda, "_sleep", None)
            if sleep is not None:
                sleep(SPIN_CYCLES)
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
            return self._total
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        end.synchronize()
        self._total += self._start.elapsed_time(end) / 1e3  # ms -> s, summed in float64
        self._start = None
        return self._total

    __name__ = "CudaEventClock"  # pytest-benchmark stores the timer's name with each result


TIMER = CudaEventClock() if torch.cuda.is_available() else time.perf_counter


def graphed(fn, warmup: int = 3):
    """(callable, how): a replay of ``fn()`` captured in a CUDA graph, or ``fn`` itself if capture fails.

    ``fn`` runs ``warmup`` times on a side stream first (allocator, autotuning, lazy init), as
    capture requires. The graph keeps its outputs and memory pool alive as long as the callable.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except Exception as exc:  # e.g. a host sync inside fn
        torch.cuda.synchronize()
        first = str(exc).splitlines()[0] if str(exc) else ""
        return fn, f"eager launches (CUDA-graph capture failed: {type(exc).__name__}: {first})"
    return graph.replay, "CUDA-graph replays"


def iterations_for(run, round_s: float, cap: int = 2000) -> int:
    """Iterations of ``run`` that take about ``round_s`` seconds of GPU time (at least 1)."""
    run()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        run()
    end.record()
    end.synchronize()
    per_call = max(start.elapsed_time(end) / 3e3, 1e-7)
    return max(1, min(cap, math.ceil(round_s / per_call)))


def interleaved(calls: dict, rounds: int, warmup: int = 1, sync=None) -> dict[str, dict]:
    """Time each of ``calls`` (name -> no-argument callable) round-robin: one call of each per round.

    Ratios between providers measured one after the other drift with the machine's load (a busy
    neighbour, a thermal step, the allocator's state); interleaving puts every provider under the
    same conditions, so their ratio is what this run can claim. The order rotates each round, so no
    provider always runs right after the same one. Host perf_counter around each call (followed by
    ``sync`` when given, e.g. ``torch.cuda.synchronize``). Returns per name: median, q1, q3 (s),
    rounds, and ``ratio_to_<first name>`` = first's median / this median.
    """
    names = list(calls)
    sync = sync or (lambda: None)
    for _ in range(warmup):
        for name in names:
            calls[name]()
            sync()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            calls[name]()
            sync()
            times[name].append(time.perf_counter() - start)

    def quantile(xs, q):
        xs = sorted(xs)
        k = (len(xs) - 1) * q
        lo, hi = math.floor(k), math.ceil(k)
        return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)

    out = {name: {"median_s": quantile(ts, 0.5), "q1_s": quantile(ts, 0.25), "q3_s": quantile(ts, 0.75),
                  "rounds": len(ts)} for name, ts in times.items()}
    base = out[names[0]]["median_s"]
    for name in names:
        out[name][f"ratio_to_{names[0]}"] = base / out[name]["median_s"]
    return out


def print_interleaved(title: str, result: dict[str, dict], threads: int) -> None:
    """The table ``interleaved`` returned, with the thread count it was measured at."""
    first = next(iter(result))
    print(f"\n{title} (interleaved, {threads} torch thread(s)); ratio = {first} median / provider median")
    for name, r in result.items():
        print(f"  {name:28s} median {r['median_s'] * 1e3:9.2f} ms  IQR {r['q1_s'] * 1e3:8.2f}-{r['q3_s'] * 1e3:8.2f} ms"
              f"  ratio {r[f'ratio_to_{first}']:.2f}x")


def peak_memory_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"peak_memory_bytes": torch.cuda.max_memory_allocated()}
    import resource

    return {"peak_rss_bytes_process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
