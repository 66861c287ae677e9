"""How OpenMP's idle threads wait, set before llama.cpp is loaded.

The CPU backend of the llama.cpp we build computes each graph on an OpenMP team (GNU libgomp) belonging to
the thread that calls ``llama_decode``. A server's requests, ``batch --parallel`` workers and chat tabs call
it from several threads, each with a team of its own, so libgomp soon manages more threads than the machine
has CPUs; it then lets a team's workers spin only 1,000 times after a graph before they sleep (its
"throttled" wait), and every decode pays for waking them. Measured on a 2-core AMD EPYC (SmolLM2-135M, one
request at a time on a thread pool): 98 tok/s before four requests had run at once on four threads, 55-69
after. ``OMP_WAIT_POLICY=ACTIVE`` with ``GOMP_SPINCOUNT=300000`` keeps the wait libgomp chooses when it is
not oversubscribed (300,000 spins, then sleep), whatever the number of teams: 111-119 tok/s in the same run,
and idle threads still sleep. Applied only where the environment sets neither, and only if llama.cpp was
not loaded before infokv-local.
"""

from __future__ import annotations

import os

WAIT = {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "300000"}


def configure(environ: os._Environ[str] | dict[str, str] = os.environ) -> bool:
    """Set :data:`WAIT` in ``environ`` unless it names either variable; whether it did."""
    if any(name in environ for name in WAIT):
        return False
    environ.update(WAIT)
    return True
