"""Drive TPU-MLIR's own Llama-3.2-Vision converter (llm_convert.py's Llama3_2VConverter).

This is the competitor for our export + compile stages: it writes each net's top MLIR straight
from safetensors, then runs model_deploy.py per net. We use its classes as they are installed
and change two things from the outside, without editing the package:

1. The vision encoder. In tpu-mlir 1.30.2, `gen_vit_mlir` saves the MLIR (whose save step runs
   `tpuc-opt --shape-infer` as a sanity check) *before* it writes `vit_top_weights.npz`, so the
   check dies with "failed to find tensor multi_modal_projector.bias". We run that one save
   without the check and run the very same check ourselves once the weights exist.
2. Scheduling. llm_convert runs all model_deploy.py jobs through GNU `parallel` with
   max(cpu_count, 4) workers (and `parallel` is not installed here). We take the exact
   commands it queues, one net at a time, so each net's compiler_profile_0.txt is its own and
   the shared machine is not swamped.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
from pathlib import Path

import tpu_mlir

# llm_convert's modules import each other as top-level packages (llm.*, transform.*, ...).
_TPU_PY = str(Path(tpu_mlir.__file__).parent / "python")
if _TPU_PY not in sys.path:
    sys.path.insert(0, _TPU_PY)


def _args(ckpt: Path, out_dir: Path, seq_length: int, quantize: str, group: int,
          chip: str) -> argparse.Namespace:
    """The namespace llm_convert.py's parser would build for our command line."""
    return argparse.Namespace(
        model_path=str(ckpt), mmproj=None, seq_length=seq_length, quantize=quantize,
        q_group_size=group, chip=chip, num_device=1, distribute_strategy="tp", num_core=0,
        batch=1, lora_max_rank=0, symmetric=False, embedding_disk=False, do_sample=False,
        use_history_kv=False, max_input_length=0, chunk_length=0, max_pixels=768 * 768,
        max_shape=[768, 768], audio_length=0, dynamic=False, debug=False, gen_test_input=False,
        only_mlir=False, rvti=False, again=False, dry_run=False, out_dir=str(out_dir))


@contextlib.contextmanager
def _cwd(path: Path):
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def _shape_infer(name: str) -> None:
    """The sanity check LlmConverter.save_mlir_module runs, for a net saved without it."""
    subprocess.run(["tpuc-opt", "--shape-infer", f"{name}.mlir", "-o", f"{name}_test.mlir"],
                   cwd=name, check=True, capture_output=True, text=True)


def _gen_vit(conv) -> None:
    """gen_vit_mlir with its shape check moved after the weights are written (see module doc)."""
    from llm.LlmConverter import LlmConverter
    original = LlmConverter.__dict__["save_mlir_module"]

    def save_without_check(mlir_module, name: str):
        mlir_txt = mlir_module.print_module()
        os.makedirs(name, exist_ok=True)
        Path(name, f"{name}.mlir").write_text(mlir_txt)

    import mlir.dialects.top as top
    from mlir.ir import Location, RankedTensorType
    gather = top.GatherOp
    flats: list = []

    def gather_flat_ids(result_type, weight, indices, *a, **kw):
        # gen_vit_mlir gathers tile embeddings with the [1,1] aspect_ratio_ids input but
        # declares a rank-2 result; shape inference (rightly) makes it [1,1,N] and fails
        # the check. Feeding the ids as [1] gives exactly the declared [1,N].
        shape = list(RankedTensorType(indices.type).shape)
        out_rank = len(RankedTensorType(result_type).shape)
        if shape == [1, 1] and out_rank == 2:
            flat = RankedTensorType.get([1], RankedTensorType(indices.type).element_type)
            # every op needs a unique location name
            loc = Location.fused([Location.name(f"aspect_ratio_ids_flat_{len(flats)}")],
                                 context=kw["loc"].context)
            flats.append(loc)
            indices = top.ReshapeOp(flat, indices, shape=[1], loc=loc, ip=kw.get("ip")).output
        return gather(result_type, weight, indices, *a, **kw)

    LlmConverter.save_mlir_module = staticmethod(save_without_check)
    top.GatherOp = gather_flat_ids
    try:
        conv.gen_vit_mlir()
    finally:
        LlmConverter.save_mlir_module = original
        top.GatherOp = gather
    _shape_infer("vit")


def _run_queued(conv, log) -> None:
    """Run the model_deploy commands the converter queued, one at a time."""
    for cmd in conv.commands:
        log(f"[llm_convert] {cmd.strip()[:160]}")
        subprocess.run(["bash", "-c", cmd.strip()], check=True)
    conv.commands.clear()


def build_llmc(ckpt: Path, out_dir: Path, seq_length: int, nets: list[str],
               quantize: str = "w4bf16", group: int = 64, chip: str = "bm1684x",
               log=print) -> dict[str, Path]:
    """Generate and compile the named nets the way llm_convert.py would.

    nets: names among vit, embedding, embedding_cache, lm_head, block_N, block_cache_N.
    Returns {net: its working dir (holding NET.bmodel and compiler_profile_0.txt)}.
    Nets whose bmodel exists are not rebuilt (the converter's own resume rule).
    """
    from llm.ModelHandle import SafetensorsModelHandle
    from llm.Llama3_2VConverter import Llama3_2VConverter
    from llm.transformers_compat import load_auto_config

    ckpt, out_dir = Path(ckpt).resolve(), Path(out_dir).resolve()
    args = _args(ckpt, out_dir, seq_length, quantize, group, chip)
    config = load_auto_config(str(ckpt))
    conv = Llama3_2VConverter(args, config, loader=SafetensorsModelHandle(str(ckpt)))
    work = Path(conv.bmodel_dir)
    work.mkdir(parents=True, exist_ok=True)
    done = {n for n in nets if (work / n / f"{n}.bmodel").exists()}
    todo = [n for n in nets if n not in done]
    layers = sorted({int(n.rsplit("_", 1)[1]) for n in todo if n.startswith("block")})
    with _cwd(work):
        # --- MLIR generation (only what is missing) ---
        if "vit" in todo:
            log("[llm_convert] generate vit mlir")
            _gen_vit(conv)
        if {"embedding", "embedding_cache", "lm_head"} & set(todo):
            log("[llm_convert] generate embedding / lm_head mlir")
            conv.gen_embedding_lmhead_mlir()
        for i in layers:
            log(f"[llm_convert] generate block {i} mlir")
            conv.gen_block_mlir(i)
        # --- deploy, through the converter's own compile_* (same model_deploy flags) ---
        for n in todo:
            if n == "vit":
                conv.vit_quantize = conv._detect_vit_quantize()
                conv.compile_vit()
            elif n in ("embedding", "embedding_cache"):
                conv.compile_common(n, with_size=(n == "embedding"))
            elif n == "lm_head":
                conv.compile_lm_head()
            elif n.startswith("block_cache_"):
                conv.compile_block_cache(int(n.rsplit("_", 1)[1]))
            elif n.startswith("block_"):
                conv.compile_block(int(n.rsplit("_", 1)[1]))
            else:
                raise ValueError(f"unknown net {n!r}")
            _run_queued(conv, log)
    return {n: work / n for n in nets}
