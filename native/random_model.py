"""A random-weight GGUF at a real model's shapes, types and vocabulary, for speed ratios where the real file
cannot travel (the GPU check: SmolLM2-135M's 98 MB is over what one call carries).

Two steps, so that what travels is small:

    python native/random_model.py skeleton MODEL.gguf SKELETON.gguf   # here: metadata and vocabulary only
    python native/random_model.py fill SKELETON.gguf OUT.gguf          # there: random tensors added

The skeleton holds every key of the model (the tokenizer, the chat template, the hyperparameters) and the
list of its tensors (name, shape, type) as one JSON string; ``fill`` writes each tensor with random values
(norms 1, other weights normal with standard deviation 0.02) quantized to the original type with the
``gguf`` package. Good for speed and for the statistics' checks (the same graph, the same shapes); its text is
noise. Needs the ``gguf`` package (a pure-Python wheel; ``--gguf WHEEL`` imports it from the wheel file).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

TENSORS_KEY = "infokv.random_model.tensors"
# types gguf-py can quantize to in numpy; a tensor of another type is written as Q8_0 (said in the output)
QUANTIZABLE = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")


def _gguf(wheel: str | None) -> Any:
    if wheel:
        sys.path.insert(0, wheel)  # a pure-Python wheel is a zip that Python imports from
    import gguf

    return gguf


def _copy_fields(gguf: Any, reader: Any, writer: Any, skip: tuple[str, ...] = ()) -> None:
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in skip:
            continue
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(key, field.contents(), vtype, sub_type=field.types[-1])
        else:
            writer.add_key_value(key, field.contents(), vtype)


def _architecture(reader: Any) -> str:
    return reader.fields["general.architecture"].contents()


def skeleton(gguf: Any, model: Path, out: Path) -> None:
    reader = gguf.GGUFReader(str(model))
    tensors = [{"name": t.name, "shape": [int(d) for d in t.shape], "type": t.tensor_type.name}
               for t in reader.tensors]
    writer = gguf.GGUFWriter(str(out), _architecture(reader))
    _copy_fields(gguf, reader, writer)
    writer.add_string(TENSORS_KEY, json.dumps(tensors))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB): {len(tensors)} tensors of {model.name} listed")


def fill(gguf: Any, skeleton_path: Path, out: Path, seed: int = 0) -> None:
    import numpy as np

    t0 = time.perf_counter()
    reader = gguf.GGUFReader(str(skeleton_path))
    tensors = json.loads(reader.fields[TENSORS_KEY].contents())
    writer = gguf.GGUFWriter(str(out), _architecture(reader))
    _copy_fields(gguf, reader, writer, skip=(TENSORS_KEY,))
    rng = np.random.default_rng(seed)
    replaced = set()
    for t in tensors:
        shape = tuple(reversed(t["shape"]))  # GGUF lists the fastest dimension first; numpy the slowest
        if t["name"].endswith("norm.weight") or len(shape) == 1:
            data = np.ones(shape, dtype=np.float32)
        else:
            data = rng.normal(0.0, 0.02, size=shape).astype(np.float32)
        kind = t["type"] if t["type"] in QUANTIZABLE else "Q8_0"
        if kind != t["type"]:
            replaced.add(t["type"])
        qtype = gguf.GGMLQuantizationType[kind]
        if kind == "F32":
            writer.add_tensor(t["name"], data)
        else:
            writer.add_tensor(t["name"], gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    note = f" ({', '.join(sorted(replaced))} written as Q8_0)" if replaced else ""
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {len(tensors)} random tensors{note}) in "
          f"{time.perf_counter() - t0:.1f} s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", choices=["skeleton", "fill"])
    ap.add_argument("source", type=Path, help="the model (skeleton) or the skeleton (fill)")
    ap.add_argument("out", type=Path)
    ap.add_argument("--gguf", help="the gguf package's wheel, imported from the file (when it is not installed)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    gguf = _gguf(args.gguf)
    if args.step == "skeleton":
        skeleton(gguf, args.source, args.out)
    else:
        fill(gguf, args.source, args.out, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
