"""Run a module as ``__main__`` in a process that ends when the process that started it is gone.

    python -m clipscrub.flows.tether <parent pid> <module> [args...]

``clipscrub run``'s temporary Prefect server (uvicorn) runs this way, in a session of its own:
a Ctrl-C at the terminal reaches only the run, which reports its last states to the live server
and then stops it; and a run that dies without stopping it (SIGKILL, say) leaves no server
listening, since this one stops when its parent's pid is no longer its parent.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
import threading
import time


def watch_parent(parent: int, *, interval: float = 0.5, grace: float = 10.0) -> None:
    """Wait until this process's parent is not ``parent`` (it died: the orphan was adopted), then
    SIGTERM this process (uvicorn shuts down on it) and exit hard if it is still here after ``grace``."""
    while os.getppid() == parent:
        time.sleep(interval)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(grace)
    os._exit(1)


def main() -> None:
    if len(sys.argv) < 3 or not sys.argv[1].isdigit():
        sys.exit("usage: python -m clipscrub.flows.tether <parent pid> <module> [args...]")
    parent, module = int(sys.argv[1]), sys.argv[2]
    sys.argv = [module, *sys.argv[3:]]
    threading.Thread(target=watch_parent, args=(parent,), name="watch-parent", daemon=True).start()
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
