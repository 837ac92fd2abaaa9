"""compile_model: an export dir (manifest + ONNX pieces) -> one bmodel, resumably.

Output layout under out_dir:
  NAME-vision_MODE_{SEQ}seq.bmodel   the combined model (the only file the engine needs)
  token_config/                      copied from the export (tokenizer, processor, template)
  compile_report.json                per-net quantize policy, I/O dtypes, TPU-MLIR cycle estimate
  pieces/NET.bmodel(.stamp.json)     one compiled net each; the stamp makes a rerun skip it
  logs/NET.log, logs/combine.log     full tool output per piece
  work/NET/                          scratch of a running piece (removed when it succeeds)
"""
from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from mllama_tpu import bmodel_file
from mllama_tpu.compile import cache, combine, policy, report, space
from mllama_tpu.compile.jobs import Job, JobResult, JobRunner, Launcher, Step
from mllama_tpu.compile.pieces import Export, Piece, load_export
from mllama_tpu.compile.tpu_mlir import Toolchain, find_toolchain
from mllama_tpu.compile.zygote import DISABLE_ENV, ZygoteClient
from mllama_tpu.dir_lock import exclusive
from mllama_tpu.errors import UserError


def bmodel_name(name: str, mode: str, seq_length: int) -> str:
    return f"{name}-vision_{mode}_{seq_length}seq.bmodel"


@dataclass(frozen=True)
class _Plan:
    piece: Piece
    policy: policy.PiecePolicy
    key: cache.StampKey
    bmodel: Path
    work: Path
    log: Path


def _shapes_arg(piece: Piece) -> str:
    return "[" + ",".join("[" + ",".join(map(str, t.shape)) + "]" for t in piece.inputs) + "]"


def _job(plan: _Plan, tc: Toolchain, chip: str, env: dict[str, str], transform_via: Launcher | None) -> Job:
    p = plan.piece
    mlir = f"{p.net}.mlir"
    transform = tc.cmd("model_transform.py", "--model_name", p.net, "--model_def", str(p.onnx.resolve()),
                       "--input_shapes", _shapes_arg(p), "--input_types", ",".join(t.dtype for t in p.inputs),
                       "--mlir", mlir, *policy.transform_args(p.net, p.total_size))
    deploy = tc.cmd("model_deploy.py", "--mlir", mlir, "--chip", chip, *plan.policy.deploy_args(),
                    "--model", f"{p.net}.bmodel")

    def finish(res: JobResult) -> None:
        est = report.net_estimate(plan.work)
        plan.bmodel.parent.mkdir(parents=True, exist_ok=True)
        os.replace(plan.work / f"{p.net}.bmodel", plan.bmodel)
        cache.write_stamp(plan.bmodel, plan.key, {
            "estimate": est, "seconds": round(res.seconds, 2), "peak_rss": res.peak_rss})
        shutil.rmtree(plan.work, ignore_errors=True)

    return Job(p.net, [Step(transform, transform_via), Step(deploy)], plan.work, plan.log, env, p.total_size,
               finish)


def _plan(export: Export, out_dir: Path, mode: str, group_size: int, chip: str, version: str,
          lm_head: str) -> list[_Plan]:
    plans = []
    for p in export.pieces:
        pol = policy.piece_policy(p.net, mode, group_size, [t.name for t in p.inputs], [t.name for t in p.outputs],
                                  lm_head)
        flags = {**pol.to_dict(), "transform_args": policy.transform_args(p.net, p.total_size)}
        key = cache.StampKey(p.digest, mode, group_size, chip, flags, version)
        plans.append(_Plan(p, pol, key, out_dir / "pieces" / f"{p.net}.bmodel", out_dir / "work" / p.net,
                           out_dir / "logs" / f"{p.net}.log"))
    return plans


def _combine_fresh(out: Path, key: dict[str, Any]) -> bool:
    stamp = cache.read_stamp(out)
    if not (stamp is not None and stamp.get("key") == key and out.is_file()
            and out.stat().st_size == stamp.get("bmodel_size")):
        return False
    try:  # a damaged head (or a stamp from before the digest) is combined again
        return stamp.get(bmodel_file.DIGEST_KEY) == bmodel_file.head_sha256(out)
    except UserError:
        return False


def compile_model(onnx_dir: str | Path, mode: str, name: str, seq_length: int, out_dir: str | Path,
                  jobs: int | None = None, group_size: int = 64, chip: str = "bm1684x",
                  tpu_mlir_path: str | Path | None = None, progress: bool = True, lm_head: str | None = None
                  ) -> Path:
    """Compile an export into out_dir/NAME-vision_MODE_{seq}seq.bmodel; returns its path."""
    policy.check_mode(mode)
    lm_head = policy.lm_head_precision(mode, lm_head)
    policy.check_chip(chip)
    policy.check_group_size(group_size)
    if jobs is not None and jobs < 1:
        raise UserError(f"--jobs {jobs} is invalid; pass a positive number (or leave it out: one per core)")
    out_dir = Path(out_dir).resolve()
    export = load_export(onnx_dir, seq_length)
    tc = find_toolchain(tpu_mlir_path)
    with exclusive(out_dir, "compile"):
        return _compile(export, tc, mode, name, seq_length, out_dir, jobs, group_size, chip, progress, lm_head)


def _compile(export: Export, tc: Toolchain, mode: str, name: str, seq_length: int, out_dir: Path,
             jobs: int | None, group_size: int, chip: str, progress: bool, lm_head: str) -> Path:
    cores = os.cpu_count() or 1
    max_jobs = max(1, min(jobs or cores, cores))

    plans = _plan(export, out_dir, mode, group_size, chip, tc.version, lm_head)
    todo = [pl for pl in plans if not cache.is_fresh(pl.bmodel, pl.key)]
    space.check_space(out_dir, space.estimate_bytes(mode, [pl.piece.total_size for pl in todo],
                                                    [p.total_size for p in export.pieces], max_jobs))

    env = dict(tc.env)
    # Each job gets its share of the cores; TPU-MLIR's default (4 threads) would oversubscribe.
    env.setdefault("OMP_NUM_THREADS", str(max(1, cores // max_jobs)))
    for pl in todo:
        cache.stamp_path(pl.bmodel).unlink(missing_ok=True)
        shutil.rmtree(pl.work, ignore_errors=True)
    # Largest first: the long jobs start early and the small ones fill the gaps.
    todo.sort(key=lambda pl: pl.piece.total_size, reverse=True)
    bar = tqdm(total=len(plans), initial=len(plans) - len(todo), desc=f"compile {mode}", unit="piece",
               disable=not progress)

    def done(res: JobResult) -> None:
        bar.update(1)
        bar.set_postfix_str(f"{res.name} {'ok' if res.ok else 'FAILED'} {res.seconds:.0f}s")

    # model_transform.py mostly imports (torch, transformers): one pre-imported, forked process.
    zygote = None
    if todo and os.environ.get(DISABLE_ENV) != "1":
        zygote = ZygoteClient("wheel" if tc.wheel else tc.paths["model_transform.py"], env, tc.python)
    try:
        via = zygote.submit if zygote else None
        JobRunner(max_jobs, progress=done).run([_job(pl, tc, chip, env, via) for pl in todo])
    except BaseException:
        if zygote:
            zygote.kill()
        raise
    finally:
        bar.close()
        if zygote:
            zygote.close()
    if (out_dir / "work").is_dir() and not any((out_dir / "work").iterdir()):
        (out_dir / "work").rmdir()

    out = out_dir / bmodel_name(name, mode, seq_length)
    piece_bmodels = [pl.bmodel for pl in plans]
    stamps = {pl.piece.net: cache.read_stamp(pl.bmodel) or {} for pl in plans}
    combine_key = {"pieces": [[pl.piece.net, stamps[pl.piece.net].get("bmodel_sha256")] for pl in plans]}
    if not _combine_fresh(out, combine_key):
        cache.stamp_path(out).unlink(missing_ok=True)
        combine.combine(tc, piece_bmodels, out, out_dir / "logs" / "combine.log")
        # The engine compares the head digest at open (mllama_tpu.bmodel_file).
        cache.write_json_atomic(cache.stamp_path(out), {"key": combine_key, "bmodel_size": out.stat().st_size,
                                                        bmodel_file.DIGEST_KEY: bmodel_file.head_sha256(out)})
    io = combine.verify(tc, out, export.pieces)

    if export.token_config.is_dir():
        shutil.copytree(export.token_config, out_dir / "token_config", dirs_exist_ok=True)
    info = {}
    for pl in plans:
        st = stamps[pl.piece.net]
        info[pl.piece.net] = {**pl.policy.to_dict(), "estimate": st.get("estimate"),
                              "compile_seconds": st.get("seconds"), "peak_rss": st.get("peak_rss"),
                              "onnx_sha256": pl.piece.digest,
                              "weight_bytes": (combine.device_memory(tc, pl.bmodel) or {}).get("weight")}
    rep = report.build_report(name=name, mode=mode, chip=chip, group_size=group_size, seq_length=seq_length,
                              activation_dtype=policy.activation_dtype(mode), tpu_mlir=tc.version,
                              bmodel=out, piece_info=info, io=io, device_memory=combine.device_memory(tc, out))
    cache.write_json_atomic(out_dir / "compile_report.json", rep)
    for m in rep["device_dtype_mismatches"]:
        print(f"warning: {m}, not {rep['activation_dtype']}: the engine converts it through the host",
              file=sys.stderr)
    return out
