"""The Dask cluster ``clipscrub run --cluster local:N`` starts: N worker processes, one thread
each, on loopback; on a machine with GPUs, one GPU per worker.

A worker sees only its GPU through ``CUDA_VISIBLE_DEVICES``, set in the worker process's
environment by its nanny before the process starts (so before torch or faiss can initialise
CUDA), the way dask-cuda's ``LocalCUDACluster`` pins them. Worker i gets GPU i mod G, so more
workers than GPUs share them round-robin; a worker the nanny restarts keeps its GPU.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from distributed import LocalCluster


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` entries: those it names if set,
    else ``0 .. G-1`` for the G GPUs faiss (built with CUDA) sees; [] without GPUs."""
    named = os.environ.get("CUDA_VISIBLE_DEVICES")
    if named is not None:
        return [g.strip() for g in named.split(",") if g.strip() and g.strip() != "-1"]
    from clipscrub.neighbours import gpu_count  # faiss's count, as the index stage sees it

    return [str(i) for i in range(gpu_count())]


class PinnedLocalCluster(LocalCluster):
    """A ``distributed.LocalCluster`` whose worker i is started with ``CUDA_VISIBLE_DEVICES`` set
    to ``gpus[i % len(gpus)]`` (``gpus`` [] or None: no pinning, a plain LocalCluster)."""

    def __init__(self, *, n_workers: int, gpus: list[str] | None = None, **kwargs: Any):
        self.gpus = list(gpus or [])
        super().__init__(n_workers=0, **kwargs)
        self.scale(n_workers)
        self.sync(self._correct_state)

    def new_worker_spec(self) -> dict[Any, dict[str, Any]]:
        ((name, spec),) = super().new_worker_spec().items()
        if not self.gpus:
            return {name: spec}
        options = dict(spec["options"])
        options["env"] = {**options.get("env", {}), "CUDA_VISIBLE_DEVICES": self.gpus[int(name) % len(self.gpus)]}
        return {name: {**spec, "options": options}}


def local_cluster(*, n_workers: int, gpus: list[str] | None = None) -> PinnedLocalCluster:
    """The cluster of ``--cluster local:N``: one thread per worker (dask also sets OMP, MKL and
    OpenBLAS to 1 thread in each), loopback only, no dashboard; ``gpus`` None: those
    ``visible_gpus`` finds."""
    return PinnedLocalCluster(n_workers=n_workers, gpus=visible_gpus() if gpus is None else gpus,
                              threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None,
                              silence_logs=logging.ERROR)
