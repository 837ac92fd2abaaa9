"""Quantize policy: which precision each piece gets in each mode, and which I/O casts are stripped.

The decoder blocks carry almost all weights, so they take the mode's precision (int4 = W4BF16
with per-group scales, int8 = W8BF16). Everything that is small but sensitive keeps a float
precision: the vision encoder and the embeddings at the mode's activation type (BF16, or F16 in
f16 mode), lm_head at the activation type too (its logits decide every token), and the two
sampling heads in F32 (top-k and softmax over the vocabulary need the range). The one exception:
in int4/int8, lm_head is W8BF16 with per-group scales by default (`lm_head="w8"`): it is the
largest single read of a decode step, so halving its bytes takes the 11B decode step under the
110 ms goal, at a small cost in logit accuracy (docs/benchmarks.md); `lm_head="float"` keeps it
at the activation type.

Tensors that only travel from one net to another on the device (hidden states, KV cache, cross
states) are stored in the activation type: stripping their casts (`--quant_input_list` /
`--quant_output_list`) saves a conversion on each side and halves KV memory. Tensors the host
writes or reads (token ids, positions, masks, pixel values, logits, sampled tokens) keep the
ONNX dtype, so the engine never converts on the host.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from mllama_tpu import contract
from mllama_tpu.errors import UserError

MODES = ("int4", "int8", "bf16", "f16", "f32")
CHIPS = ("bm1684x", "bm1688")

# mode -> (quantize of the decoder blocks, float type of activations and float-only pieces)
_BLOCK_QUANT = {"int4": "W4BF16", "int8": "W8BF16", "bf16": "BF16", "f16": "F16", "f32": "F32"}
_ACT_QUANT = {"int4": "BF16", "int8": "BF16", "bf16": "BF16", "f16": "F16", "f32": "F32"}
ACT_DTYPE = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}



@dataclass(frozen=True)
class PiecePolicy:
    quantize: str  # model_deploy.py --quantize
    q_group_size: int | None  # only for W4/W8 per-group modes
    quant_inputs: list[int] = field(default_factory=list)  # 1-based, as model_deploy.py counts
    quant_outputs: list[int] = field(default_factory=list)

    def deploy_args(self) -> list[str]:
        args = ["--quantize", self.quantize]
        if self.q_group_size:
            args += ["--q_group_size", str(self.q_group_size)]
        # The *_list flags only act together with the switch they refine.
        if self.quant_inputs:
            args += ["--quant_input", "--quant_input_list", ",".join(map(str, self.quant_inputs))]
        if self.quant_outputs:
            args += ["--quant_output", "--quant_output_list", ",".join(map(str, self.quant_outputs))]
        return args

    def to_dict(self) -> dict:
        return {"quantize": self.quantize, "q_group_size": self.q_group_size,
                "quant_inputs": list(self.quant_inputs), "quant_outputs": list(self.quant_outputs)}


# onnxsim holds ~8 copies of a graph's weights: on the 2 GB tables of an 11B model (embedding,
# lm_head: f32 in ONNX, weights in an external data file) model_transform.py went past 24 GB and
# was OOM-killed. Those graphs are a Gather, or a norm + MatMul: nothing to simplify.
SKIP_ONNX_SIM_ABOVE = 1_500_000_000


def transform_args(net: str, file_bytes: int) -> list[str]:
    """Extra model_transform.py flags for a piece whose .onnx + external data are `file_bytes`."""
    # Our per-layer graphs come from torch's exporter with static shapes and constants folded:
    # onnxsim finds nothing there (same nets, same cycle estimates) and took 3/4 of an 11B
    # layer net's model_transform (ARCHITECTURE.md, "Prefill in chunks").
    skip = file_bytes > SKIP_ONNX_SIM_ABOVE or contract.layer_of(net) is not None
    # --do_onnx_sim is parsed with type=bool: only an empty string turns it off.
    return ["--do_onnx_sim", ""] if skip else []


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise UserError(f"unknown mode {mode!r}; use one of: {', '.join(MODES)}")
    return mode


def check_chip(chip: str) -> str:
    if chip not in CHIPS:
        raise UserError(f"unknown chip {chip!r}; use one of: {', '.join(CHIPS)}")
    return chip


def check_group_size(group_size: int) -> int:
    if group_size <= 0 or group_size % 8:
        raise UserError(f"--group_size {group_size} is invalid; use a positive multiple of 8 (64 is usual)")
    return group_size


def activation_dtype(mode: str) -> str:
    """dtype of the tensors that stay on the device (hidden states, KV, cross states) in this mode."""
    return ACT_DTYPE[_ACT_QUANT[check_mode(mode)]]


def is_block(net: str) -> bool:
    return contract.layer_of(net) is not None


LM_HEAD_CHOICES = ("w8", "float")


def lm_head_precision(mode: str, lm_head: str | None = None) -> str:
    """The lm_head precision for `mode`: "w8" or "float"; None asks for the mode's default."""
    weight_quantized = check_mode(mode) in ("int4", "int8")
    if lm_head is None:
        return "w8" if weight_quantized else "float"
    if lm_head not in LM_HEAD_CHOICES:
        raise UserError(f"--lm_head {lm_head!r} is unknown; use one of: {', '.join(LM_HEAD_CHOICES)}")
    if lm_head == "w8" and not weight_quantized:
        raise UserError(f"--lm_head w8 goes with --mode int4 or int8, not {mode}")
    return lm_head


def piece_policy(net: str, mode: str, group_size: int, input_names: list[str],
                 output_names: list[str], lm_head: str | None = None) -> PiecePolicy:
    lm_head = lm_head_precision(mode, lm_head)
    if net in ("greedy_head", "penalty_sample_head"):
        return PiecePolicy("F32", None)
    if net == "lm_head" and lm_head == "w8":
        quantize = "W8BF16"
    else:
        quantize = _BLOCK_QUANT[mode] if is_block(net) else _ACT_QUANT[mode]
    if quantize == "F32":
        # Nothing to strip: every tensor already is f32 on both sides.
        return PiecePolicy("F32", None)
    group = group_size if quantize.startswith("W") else None
    dev_in = contract.DEVICE_TENSORS | contract.DEVICE_TENSORS_BY_NET.get(net, frozenset())
    quant_inputs = [i + 1 for i, name in enumerate(input_names) if name in dev_in]
    # All outputs of these nets are consumed by other nets on the device.
    device_outputs = net in ("vit", "embedding", "embedding_cache") or is_block(net)
    quant_outputs = list(range(1, len(output_names) + 1)) if device_outputs else []
    return PiecePolicy(quantize, group, quant_inputs, quant_outputs)
