"""The tiny model's trainer still works: a few steps lower the loss and save a loadable model."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from transformers import AutoProcessor, MllamaForConditionalGeneration

from mllama_tpu.tiny.train import TrainConfig, train

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def test_few_steps_train_and_save(tmp_path: Path):
    out = tmp_path / "tiny"
    cfg = TrainConfig(out=out, seed=3, steps=10, batch_size=4, lr=3e-3, warmup=1, eval_every=0, threads=1)
    result = train(cfg)
    assert len(result.losses) == 10 and all(math.isfinite(x) for x in result.losses)
    assert sum(result.losses[-3:]) < sum(result.losses[:3])  # from ~ln(vocab) it drops fast
    assert json.loads((out / "training.json").read_text())["saved_at_step"] == 10

    processor = AutoProcessor.from_pretrained(str(out))
    model = MllamaForConditionalGeneration.from_pretrained(str(out))
    text = processor.apply_chat_template([{"role": "user", "content": "What shape is it?"}], add_generation_prompt=True)
    inputs = processor(text=text, add_special_tokens=False, return_tensors="pt")
    generated = model.generate(**inputs, do_sample=False, max_new_tokens=3)
    assert generated.shape[1] > inputs["input_ids"].shape[1]
