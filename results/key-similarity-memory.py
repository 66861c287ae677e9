# Ad hoc: peak Python-heap memory (tracemalloc, which numpy reports to) and time of the key similarity functions
# on keys of an 8B-class model at budget 2,048 + 64: 32 layers, 2,112 cells, 8 KV heads x 128.
import sys, time, tracemalloc
import numpy as np
sys.path.insert(0, ".")
from infokv_local.policies import key_similarity as K
keys = np.random.default_rng(0).standard_normal((32, 2112, 8, 128), dtype=np.float32)
print(f"keys as read: {keys.nbytes / 2**20:.0f} MiB")
for name in ("redundancy", "anchor_similarity"):
    f = getattr(K, name)
    tracemalloc.start(); t = time.perf_counter(); r = f(keys); dt = time.perf_counter() - t
    peak = tracemalloc.get_traced_memory()[1]; tracemalloc.stop()
    print(f"{name}: peak {peak / 2**20:.0f} MiB beyond the keys, {dt:.2f} s, checksum {float(np.asarray(r, np.float64).sum()):.6f}")
