"""The net contract (mllama_tpu.contract) is the one list of nets: export writes exactly these,
compile builds exactly these, and both engines load exactly these, by these input names."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from mllama_tpu import contract
from mllama_tpu.sampling import SamplingParams
from mllama_tpu.session import ChatSession, LoadedModel

SAMPLE = Path(__file__).resolve().parent.parent / "assets" / "samples"


def manifest_of(onnx_dir: Path) -> dict:
    return json.loads((onnx_dir / "manifest.json").read_text())


def test_export_writes_exactly_the_contract(tiny_onnx_dir):
    m = manifest_of(tiny_onnx_dir)
    layers, chunks = m["layers"], m["prefill_lengths"]
    names = contract.net_names(layers, chunks)
    assert set(m["pieces"]) == set(names)
    # per layer: decode + one step net per prefill length, + cross_kv for a cross layer
    assert len(names) == len(set(names)) == (1 + len(chunks)) * len(layers) + layers.count("cross") + 6
    for net, entry in m["pieces"].items():
        ins, outs = contract.net_io(net, layers)
        assert [t["name"] for t in entry["inputs"]] == list(ins), net
        assert [t["name"] for t in entry["outputs"]] == list(outs), net


@pytest.mark.slow
def test_compile_builds_and_the_engine_loads_exactly_the_contract(tiny_onnx_dir, tiny_bmodel):
    from mllama_tpu.engines.bmodel import BmodelEngine

    m = manifest_of(tiny_onnx_dir)
    layers = m["layers"]
    engine = BmodelEngine(tiny_bmodel("f32"))
    try:
        assert set(engine.native.net_names()) == set(contract.net_names(layers, m["prefill_lengths"]))
        assert engine.prefill_lengths == tuple(m["prefill_lengths"])
        for net in contract.net_names(layers, m["prefill_lengths"]):
            ins, outs = contract.net_io(net, layers)
            io = engine.net_io(net)
            assert [t["name"] for t in io["inputs"]] == list(ins), net
            assert len(io["outputs"]) == len(outs), net
        assert [i for i, k in enumerate(layers) if k == "cross"] == engine.cross_layers
    finally:
        engine.close()


def test_onnx_engine_runs_exactly_the_contract(tiny_onnx_dir):
    """A turn with an image, then a sampled one, then a long one (every chunk length): every net
    of the contract is run, no other."""
    model = LoadedModel.open("onnx", tiny_onnx_dir)
    session = ChatSession(model, max_new_tokens=3)
    session.set_image(sorted(SAMPLE.glob("*.png"))[0])
    session.ask("What shape is it?")
    session.set_sampling(SamplingParams("penalty_sample", seed=1))
    session.ask("What color is it?")
    session.ask("What color is it? " * 8)
    m = manifest_of(tiny_onnx_dir)
    assert set(model.engine._sessions) == set(contract.net_names(m["layers"], m["prefill_lengths"]))


def test_combine_order_is_a_permutation_of_the_nets():
    layers, chunks = ["self", "cross", "self", "self", "cross"], (32, 128)
    assert sorted(contract.combine_order(layers, chunks)) == sorted(contract.net_names(layers, chunks))
    assert contract.layer_of("block_cache_12") == (12, 1) and contract.layer_of("block_chunk128_3") == (3, 128)
    assert contract.layer_of("cross_kv_4") == (4, None)
    assert contract.layer_of("lm_head") is None and contract.layer_of("block_x") is None
    assert contract.layer_of("block_3") is None  # the static prompt net of format 1 is gone
    with pytest.raises(KeyError):
        contract.net_io("block_cache_5", layers)
    with pytest.raises(KeyError):
        contract.net_io("cross_kv_0", layers)  # a self-attention layer has no image K/V
