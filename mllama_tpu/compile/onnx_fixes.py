"""Exact ONNX rewrites that steer around TPU-MLIR 1.30 bugs; applied to a copy, never to the export.

Reshaped graph input feeding several MatMuls (the cross-attention block's K/V projections of
`cross_attention_states`, [T,P,H] -> [1,T*P,H]): tpuc-opt's --op-reorder pass first moves a
Reshape of a function argument to the top of the subfunction, above the shared `top.None`
operand, then pulls the MatMuls up behind it; the result fails verification with "operand #2
does not dominate this use" and model_deploy.py aborts. When the Reshape keeps the last axis, a
MatMul with a constant 2-D right operand commutes with it, so we feed the MatMuls the graph input
itself and put the Reshape after each of them: same numbers, and no Reshape of an argument for
the pass to move. (An export that projects the [T,P,H] states directly needs no rewrite.)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

FIXES_VERSION = 1  # part of the resume stamp: a changed rewrite rebuilds the pieces it touches


def _const(graph: onnx.GraphProto, name: str) -> np.ndarray | None:
    for init in graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            for attr in node.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
    return None


def _input_dims(graph: onnx.GraphProto, name: str) -> list[int] | None:
    for v in graph.input:
        if v.name == name:
            return [d.dim_value for d in v.type.tensor_type.shape.dim]
    return None


def _hoist_input_reshapes(graph: onnx.GraphProto) -> int:
    """Returns how many Reshape nodes were moved behind their MatMul consumers."""
    moved = 0
    inputs = {v.name for v in graph.input}
    for reshape in list(graph.node):
        if reshape.op_type != "Reshape" or reshape.input[0] not in inputs:
            continue
        src = reshape.input[0]
        dims = _input_dims(graph, src)
        target = _const(graph, reshape.input[1])
        users = [n for n in graph.node if reshape.output[0] in n.input]
        if dims is None or target is None or len(users) < 2:
            continue
        target = [int(t) for t in target.reshape(-1)]
        if not target or target[-1] != dims[-1] or any(t == 0 for t in target):
            continue  # the rewrite is exact only if the contracted (last) axis is untouched
        weights = [_const(graph, u.input[1]) if u.op_type == "MatMul" else None for u in users]
        if any(w is None or w.ndim != 2 or u.input[0] != reshape.output[0] for u, w in zip(users, weights)):
            continue
        for user, w in zip(users, weights):
            out = user.output[0]
            raw = f"{out}__before_reshape"
            shape_name = f"{out}__shape"
            user.input[0] = src
            user.output[0] = raw
            graph.initializer.append(numpy_helper.from_array(
                np.array(target[:-1] + [w.shape[1]], dtype=np.int64), shape_name))
            at = list(graph.node).index(user) + 1
            graph.node.insert(at, helper.make_node("Reshape", [raw, shape_name], [out], name=f"{user.name}__reshape"))
        graph.node.remove(reshape)
        moved += 1
    return moved


def fix_for_tpu_mlir(onnx_path: Path, work_dir: Path) -> Path:
    """Path to feed model_transform.py: the export itself, or a rewritten copy in work_dir."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    if _hoist_input_reshapes(model.graph) == 0:
        return onnx_path
    work_dir.mkdir(parents=True, exist_ok=True)
    fixed = work_dir / f"{onnx_path.stem}.fixed.onnx"
    # External weight files are found relative to the model: link them beside the copy.
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            loc = next(e.value for e in init.external_data if e.key == "location")
            link = work_dir / loc
            if not link.exists():
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to((onnx_path.parent / loc).resolve())
    onnx.save(model, str(fixed))
    return fixed
