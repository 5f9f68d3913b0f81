"""`StageClock`: wall time of a SurfPipeline call by stage (surf-generate's reports, benchmarks/bench_generate.py)."""

from __future__ import annotations

import time

import torch


class StageClock:
    """Wall time of network calls, split by the latent size they run at, and of named stages (synchronises CUDA).

    `seconds`/`calls`: the report's stages; `spans`: time around parts that contain them or glue (sampler, upsample,
    mp4), for benchmarks, never summed into a report."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device, self.seconds, self.calls, self.spans = torch.device(device), {}, {}, {}

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def wrap(self, fn, name_of):
        def timed(x, *a):
            self._sync()
            t = time.perf_counter()
            out = fn(x, *a)
            self._sync()
            k = name_of(x)
            self.seconds[k] = self.seconds.get(k, 0.0) + time.perf_counter() - t
            self.calls[k] = self.calls.get(k, 0) + 1
            return out

        return timed

    def _timed(self, into: dict, name, fn, *a):
        self._sync()
        t = time.perf_counter()
        out = fn(*a)
        self._sync()
        into[name] = into.get(name, 0.0) + time.perf_counter() - t
        return out

    def time(self, name, fn, *a):
        return self._timed(self.seconds, name, fn, *a)

    def span(self, name, fn, *a):
        return self._timed(self.spans, name, fn, *a)
