"""The evicting engine: sequences generated under a fixed KV-cache budget, one context or several sharing one.

Where each part lives:

- :mod:`.engine`: :class:`Engine`, one sequence: reading prompts in chunks, generating, truncating,
  snapshots, a prompt read once and forked to other policies; the decode step that makes room first and
  takes the step's signals after.
- :mod:`.sizing`: the budget (tokens, or MiB over both parts of a sliding-window or hybrid memory),
  the capacity and batch sizes, and the checks on them.
- :mod:`.cells`: the sequence's per-cell records (its tokens and the signals the policies score with).
- :mod:`.compression`: when to evict, the observation window (on demand, the prompt probe), scoring
  with the policy and removing cells.
- :mod:`.scheduler`: several engines' sequences in one llama.cpp context, their steps decoded together;
  :mod:`.workers`: the threads that run them, one per sequence, taking items from one queue.
- :mod:`.snapshot`: a parked sequence; :mod:`.checkpoints`: saved states of a memory's bounded part (a
  sliding-window cache, a recurrent state) to go back to an earlier turn; :mod:`.steps`: what each step did.

The design (memories, sequences, what the patch adds) is in docs/memory.md and docs/engine.md.
"""

from ..llamacpp import require_installed

require_installed()  # before anything imports llama_cpp


from ..errors import BudgetError, ContextFullError  # where they were raised first (errors.py declares them)
from .engine import Engine, policy_reading
from .scheduler import FairRLock, SequenceView, SharedContext
from .sizing import CachePlan, bounded_kv_bytes, kv_bytes_per_token, plan_cache
from .snapshot import EngineSnapshot
from .steps import HISTORY_STEPS, EngineTotals, StepStats
from .workers import run_workers

__all__ = ["HISTORY_STEPS", "BudgetError", "CachePlan", "ContextFullError", "Engine", "EngineSnapshot",
           "EngineTotals", "FairRLock", "SequenceView", "SharedContext", "StepStats", "bounded_kv_bytes",
           "kv_bytes_per_token", "plan_cache", "policy_reading", "run_workers"]
