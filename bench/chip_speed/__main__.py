"""Chip-speed benchmark: our export + compile vs TPU-MLIR's llm_convert.py, by the compiler's
own BM1684X cycle estimates. One command (from the repo root):

    nice -n 19 .venv/bin/python -m bench.chip_speed            # 11B dims, everything
    nice -n 19 .venv/bin/python -m bench.chip_speed --stages decode --sides llm_convert
    nice -n 19 .venv/bin/python -m bench.chip_speed --stages scenarios --sides ours  # issue 13

Writes WORK/chip_speed_<model>.json and .md and prints the table. Every piece is cached
(checkpoint, ONNX, each net's bmodel + profile), so a second run only re-reads profiles.
See bench/README.md for what is measured and how it extrapolates.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

from mllama_tpu.compile.policy import lm_head_precision
from mllama_tpu.contract import prefill_lengths as cut_lengths
from mllama_tpu.export.flags import add_prefill_lengths, parse_prefill_lengths
from mllama_tpu.errors import UserError, cli_main

from .checkpoint import DIMS, Reduced, make_checkpoint
from .nets import net_cost
from .report import SideResult, build, table

# Nets holding a vocab x hidden table (2.1 GB in f32 ONNX at 11B dims). model_transform.py
# took 16 GB (19 GB with onnxsim, OOM-killed) on them, more than a shared 24 GB machine has, so
# by default ours are not compiled and llm_convert's estimates stand in (same work: one gather,
# or final norm + bf16 vocab matmul), flagged in the report. --big_tables compiles them. A W8
# lm_head (int4's default) is not the work of llm_convert's bf16 one, so it is always compiled.
BIG_TABLES = ("embedding", "embedding_cache", "lm_head")

STAGES = {
    "decode": ["embedding_cache", "block_cache_0", "block_cache_1", "lm_head"],
    "prefill": ["embedding", "block_0", "block_1"],
    "vit": ["vit"],
    "chunks": [],  # ours only: every prefill chunk length of both layer kinds, and cross_kv (ours_chunks)
    "scenarios": [],  # ours only: what issue 13's first-token scenarios run (scenarios.nets_needed)
}


def ours_chunks(lengths: tuple[int, ...]) -> list[str]:
    """Our step nets of every prefill length and the cross K/V net: the parts of the
    first-token scenarios (issue 13) that llm_convert has no counterpart for."""
    from mllama_tpu.contract import cross_kv_block, step_block

    return [cross_kv_block(1)] + [step_block(layer, c) for c in lengths for layer in (0, 1)]


def ours_prefill(lengths: tuple[int, ...]) -> dict[str, str]:
    """Our nets that stand for llm_convert's static SEQ prefill blocks: the largest prefill chunk
    against an empty cache (a whole 512-token prompt), renamed to its names for the report."""
    from mllama_tpu.contract import step_block

    c = lengths[-1]
    return {step_block(0, c): "block_0", step_block(1, c): "block_1"}


def lengths_at(args: argparse.Namespace, seq: int) -> tuple[int, ...]:
    """The prefill lengths the export builds at this seq (--prefill_lengths, cut to it)."""
    try:
        return cut_lengths(parse_prefill_lengths(args.prefill_lengths), seq)
    except ValueError as e:
        raise UserError(f"--prefill_lengths: {e}") from None


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _side(name: str, build_fn, ckpt: Path, work: Path, seq: int, nets: list[str],
          costs: dict, errors: dict, rename: dict[str, str] | None = None) -> None:
    """Build nets one by one (a failure costs that net only) and read their estimates."""
    for net in nets:
        key = (rename or {}).get(net, net)
        try:
            dirs = build_fn(ckpt, work, seq, [net], log=_log)
            costs[key] = net_cost(net, dirs[net])
            c = costs[key]
            _log(f"[{name}] {key}: {c.ms:.3f} ms, weights {c.weight_bytes / 1e6:.1f} MB")
        except Exception as e:  # recorded in the report: one broken net must not hide the rest
            errors[key] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300] if str(e).strip() else ''}"
            _log(f"[{name}] {key} FAILED: {errors[key]}")
            traceback.print_exc()


def run(args: argparse.Namespace) -> int:
    if args.model not in ("11b", "90b", "tiny"):
        raise UserError(f"--model {args.model!r}: use 11b, 90b or tiny")
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    lengths = lengths_at(args, args.seq_length)
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise UserError(f"--stages: unknown {', '.join(bad)}; use any of {', '.join(STAGES)}")
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    if set(sides) - {"ours", "llm_convert"}:
        raise UserError(f"--sides {args.sides!r}: use ours and/or llm_convert")
    os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"]

    dims = DIMS[args.model]
    r1 = Reduced() if args.model != "tiny" else Reduced(vision_layers=3,
                                                         intermediate_layers_indices=(1, 2))
    # The vit is also built one local and one global layer deeper, for its per-layer cost.
    r2 = replace(r1, vision_layers=r1.vision_layers + 1,
                 vision_global_layers=r1.vision_global_layers + 1)
    work = Path(args.work).resolve() / args.model
    t0 = time.time()
    _log(f"checkpoint {args.model} (cached in {work})")
    ckpt = make_checkpoint(work / "ckpt", dims, r1)  # the text nets
    vit1 = deep = None
    if "vit" in stages:  # vision-only checkpoints (small): the vit at one or two depths
        vit1 = make_checkpoint(work / "ckpt-vit", dims, r1, vision_only=True)
        if args.vit_depths == 2:
            deep = make_checkpoint(work / "ckpt-vit-deep", dims, r2, vision_only=True)

    from .llmc import build_llmc
    from .ours import build_ours

    def ours_fn(ck, w, seq, nets, log):
        return build_ours(ck, w, seq, nets, log=log, reuse=args.reuse, lm_head=args.lm_head,
                          prefill_lengths=lengths_at(args, seq))

    def llmc_fn(ck, w, seq, nets, log):
        return build_llmc(ck, w, seq, nets, log=log)

    lm_head = lm_head_precision("int4", args.lm_head)  # ours are built int4 (build_ours)
    substituted = () if args.big_tables else tuple(n for n in BIG_TABLES if (n, lm_head) != ("lm_head", "w8"))
    results = []
    for side in sides:
        fn, sub = (ours_fn, "ours") if side == "ours" else (llmc_fn, "llm_convert")
        costs, errors = {}, {}
        for stage in stages:
            if stage in ("chunks", "scenarios") and side != "ours":
                continue
            if stage == "scenarios":
                continue  # after the loop: it reads what the other stages built
            nets = list(STAGES[stage]) if stage != "chunks" else ours_chunks(lengths)
            if side == "ours" and stage == "decode":
                nets += ["greedy_head", "penalty_sample_head"]  # ours: the token heads are their own nets
            rename = None
            if side == "ours":
                nets = [n for n in nets if n not in substituted]
                if stage == "prefill":
                    rename = ours_prefill(lengths)
                    nets = [{v: k for k, v in rename.items()}.get(n, n) for n in nets]
            if stage == "vit":
                _side(side, fn, vit1, work / f"{sub}-vit", args.seq_length, nets, costs, errors)
            else:
                _side(side, fn, ckpt, work / sub, args.seq_length, nets, costs, errors, rename=rename)
            if stage == "vit" and deep is not None:
                _side(side, fn, deep, work / f"{sub}-vit-deep", args.seq_length, ["vit"],
                      costs, errors, rename={"vit": "vit_deep"})
        results.append(SideResult(side, costs, errors))

    res = build(dims, args.seq_length, results, r1, r2 if deep is not None else None,
                substituted=substituted)
    if "scenarios" in stages and "ours" in sides:
        ours = next(r for r in results if r.name == "ours")
        vit = res["sides"]["ours"]["vit_ms"] if "extrapolated" in res["sides"]["ours"]["vit_note"] else None
        run_scenarios(args, dims, ckpt, work, ours_fn, ours.costs, vit, substituted)
    res["wall_s"] = round(time.time() - t0, 1)
    md = table(res)
    out = work / f"chip_speed_{args.model}.json"
    out.write_text(json.dumps(res, indent=1))
    out.with_suffix(".md").write_text(md + "\n")
    print(md)
    _log(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


def run_scenarios(args: argparse.Namespace, dims, ckpt: Path, work: Path, ours_fn,
                  costs: dict, vit_ms: float | None, substituted: tuple[str, ...]) -> None:
    """Build (or read back) every net issue 13's scenarios run, at their seq lengths, compose
    them (scenarios.py) and write bench/results/latency_<model>.json."""
    from mllama_tpu.contract import layer_of

    from . import build_cost
    from . import scenarios as sc_mod
    from .report import SELF

    def reads_history(net: str) -> bool:
        ln = layer_of(net)
        return ln is not None and ln.layer == SELF and ln.rows is not None

    earlier = sc_mod.load_earlier()
    costs_by_seq: dict[int, dict] = {args.seq_length: costs}
    for sc in sc_mod.scenarios(args.seq_length, args.long_seq):
        seq_costs = costs_by_seq.setdefault(sc.seq, {})
        nets = sc_mod.nets_needed(sc, dims, lengths_at(args, sc.seq))
        if sc.seq == args.seq_length:  # + the decode step, and every layer net for build_cost
            nets += [n for kind in build_cost.after(lengths_at(args, sc.seq)).values() for n in kind]
            nets += list(build_cost.HEADS)
        else:  # only the self steps read the SEQ-slot history; the rest is the same net
            nets = [n for n in nets if reads_history(n)]
        nets = [n for n in dict.fromkeys(nets) if n not in seq_costs and n not in substituted]
        side_work = work / "ours" if sc.seq == args.seq_length else work / f"seq{sc.seq}" / "ours"
        errors: dict = {}
        _side("ours", ours_fn, ckpt, side_work, sc.seq, nets, seq_costs, errors)
        if sc.seq != args.seq_length:
            seq_costs.update({net: c for net, c in costs.items() if not reads_history(net)})
    lengths = lengths_at(args, args.seq_length)
    res = sc_mod.compose(dims, lengths, costs_by_seq, args.seq_length, vit_ms, earlier)
    res["command"] = "nice -n 19 .venv/bin/python -m bench.chip_speed " + " ".join(sys.argv[1:])
    results_dir = Path(__file__).resolve().parents[1] / "results"
    out = results_dir / f"latency_{args.model}.json"
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(sc_mod.table(res))
    build = build_cost.compose(dims, args.seq_length, lengths, costs, earlier["before_nets"],
                               build_cost.vision_weight_bytes(dims))
    build["command"] = res["command"]
    build_out = results_dir / f"build_{args.model}.json"
    build_out.write_text(json.dumps(build, indent=1) + "\n")
    print(build_cost.table(build))
    _log(f"wrote {out} and {build_out}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.chip_speed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="11b", help="11b | 90b | tiny (dims; default 11b)")
    p.add_argument("-s", "--seq_length", type=int, default=512)
    p.add_argument("--stages", default="decode,prefill,vit",
                   help="comma list of decode, prefill, vit, chunks, scenarios (default decode,prefill,vit)")
    add_prefill_lengths(p)
    p.add_argument("--long_seq", type=int, default=2048,
                   help="scenarios: the longer seq_length S1 is also measured at (default 2048)")
    p.add_argument("--sides", default="ours,llm_convert")
    p.add_argument("--vit_depths", type=int, default=2, choices=(1, 2),
                   help="build the vit at 2 depths to extrapolate its per-layer cost (default)")
    p.add_argument("--lm_head", default=None, metavar="w8|float",
                   help="ours: lm_head precision as compile.sh --lm_head (default: int4's, w8)")
    p.add_argument("--big_tables", action="store_true",
                   help="also compile our embedding/lm_head nets (~10 GB of RAM at 11B without onnxsim)")
    p.add_argument("--reuse", action="store_true",
                   help="keep our nets compiled before even if the export code changed since")
    p.add_argument("--work", default="build/chip_speed", help="cache dir (default build/chip_speed)")
    args = p.parse_args(argv)
    return run(args)


if __name__ == "__main__":
    cli_main(main)
