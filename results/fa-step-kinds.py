import sys, statistics, time
from infokv_local.llamacpp.context import StatsContext
from infokv_local.llamacpp.model import Model
from infokv_local.models.embedded import default_model_path
from infokv_local.llamacpp import flash_attn as fa
cells = int(sys.argv[1])
with Model(str(default_model_path())) as m:
    toks = fa._filler(m, cells)
    for rnd in range(2):
      for on in (True, False):
        for attn, ld, ent in ((False, False, None), (True, True, 256)):
            with StatsContext(m, n_ctx=cells + 64, n_batch=512, attn=attn, n_last_rows=32, layer_dist=ld,
                              entropy_top_k=ent, n_threads=2, flash_attn=on, attn_all_rows=False) as ctx:
                for s in range(0, cells, 512):
                    ctx.decode(toks[s:min(s+512, cells)], s, all_outputs=False)
                pos, tok = cells, toks[-1]
                res = []
                for win in ((False, True) if attn else (False,)):
                    if attn: ctx.set_attention_active(win)
                    ts = []
                    for i in range(22):
                        t0 = time.perf_counter(); ctx.decode([tok], pos); 
                        if i >= 2: ts.append(time.perf_counter() - t0)
                        pos += 1
                    res.append(f"{'win' if win else 'plain'} {statistics.median(ts)*1e3:.2f}ms")
                print(f"r{rnd} cells {cells} FA {'on ' if on else 'off'} stats={attn!s:5s}", *res, flush=True)
