"""The Gemma 3 RPC test's first failure explained: the local run without llama.cpp's CPU weight repacking gives the
RPC server's text (run: python results/repack-check.py gemma-3-270m-q4_k_m.gguf; 6 Dec 2026 it printed " the new one. ...",
the RPC text, where the default local run gave " the new lighthouse keeper ...")."""
import json, sys
import numpy as np
import llama_cpp as llama
orig = llama.llama_model_default_params
def patched():
    p = orig(); p.use_extra_bufts = False; return p
llama.llama_model_default_params = patched
from infokv_local import InfoKVLlama
with InfoKVLlama(sys.argv[1], budget=48, buffer=16, n_recent=8, flash_attn=False, n_threads=1) as llm:
    out = llm.create_completion("The old lighthouse keeper climbed the stairs and", max_tokens=60, temperature=0)
    print(json.dumps(out["choices"][0]["text"]))
