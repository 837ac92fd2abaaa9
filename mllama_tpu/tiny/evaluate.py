"""Accuracy of a model directory on held-out toy-task questions.

`evaluate_generate` is the gate: greedy `generate` through transformers, exact sentence match,
one result per (image, question) pair, second turns asked with the first answer in the history.
`teacher_forced_accuracy` is the trainer's cheap check during training: under greedy decoding an
answer comes out exactly iff every answer token is the argmax given the true prefix, so one
batched forward pass gives the same verdicts (up to float rounding) without generating.

CLI: python -m mllama_tpu.tiny.evaluate --model assets/tiny-mllama --seed 20261125 --count 200
"""
from __future__ import annotations

import random
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoProcessor, MllamaForConditionalGeneration, MllamaProcessor

from mllama_tpu.errors import ArgumentParser, UserError, cli_main
from mllama_tpu.tiny import encode
from mllama_tpu.tiny.data import LAYOUTS, Sample, make_sample, messages_for, render
from mllama_tpu.tiny.task import QUESTIONS

# Seed of the held-out set the gate uses; the trainer draws from string-keyed streams
# ("train-<seed>", "val-<seed>") so it never sees these samples.
HELDOUT_SEED = 20261125
_KEY_OF_QUESTION = {q.text: q.key for q in QUESTIONS}


@dataclass(frozen=True)
class PairResult:
    index: int
    turn: int  # 1 = first turn, 2 = second turn (the first answer is in the history)
    question: str
    expected: str
    answer: str
    layout: tuple[int, int]  # (rows, cols) the image size was drawn from
    aspect_ratio_id: int  # the tile arrangement the processor chose (1..8)

    @property
    def correct(self) -> bool:
        return self.answer == self.expected


def heldout_pairs(seed: int, count: int) -> list[tuple[Sample, int]]:
    """`count` (sample, turn) pairs; layouts go round-robin and every second pair is a 2nd turn."""
    rng = random.Random(seed)
    pairs = []
    for i in range(count):
        turns = 1 + (i // len(LAYOUTS)) % 2  # each layout gets first and second turns alike
        sample = make_sample(rng, LAYOUTS[i % len(LAYOUTS)], turns=turns)
        pairs.append((sample, turns))
    return pairs


def load(model_dir: Path) -> tuple[MllamaProcessor, MllamaForConditionalGeneration]:
    if not (model_dir / "config.json").is_file():
        raise UserError(f"{model_dir} has no config.json: pass the tiny model's directory (assets/tiny-mllama)")
    processor = AutoProcessor.from_pretrained(str(model_dir))
    model = MllamaForConditionalGeneration.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    return processor, model


@torch.no_grad()
def evaluate_generate(model_dir: Path, seed: int = HELDOUT_SEED, count: int = 200) -> list[PairResult]:
    """Greedy generate on each held-out pair, as a user would run it (Meta's model-card recipe)."""
    processor, model = load(model_dir)
    results = []
    for index, (sample, turn) in enumerate(heldout_pairs(seed, count)):
        messages = messages_for(sample, upto=turn, with_last_answer=False)
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(images=render(sample.scene), text=text, add_special_tokens=False, return_tensors="pt")
        out = model.generate(**inputs, do_sample=False, max_new_tokens=24)
        answer = processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        results.append(
            PairResult(
                index=index,
                turn=turn,
                question=sample.turns[turn - 1].question,
                expected=sample.turns[turn - 1].answer,
                answer=answer,
                layout=sample.scene.layout,
                aspect_ratio_id=int(inputs["aspect_ratio_ids"][0, 0]),
            )
        )
    return results


@torch.no_grad()
def teacher_forced_accuracy(
    model: MllamaForConditionalGeneration, batches: list[dict[str, torch.Tensor]], keys: list[list[str]]
) -> dict[str, float]:
    """Fraction of answers whose every token is the argmax, overall and per question key.

    keys[b][i] lists the question keys of batch b's sample i, in turn order.
    """
    was_training = model.training
    model.eval()
    hits: Counter = Counter()
    totals: Counter = Counter()
    for batch, batch_keys in zip(batches, keys):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = model(**inputs).logits
        predicted = logits[:, :-1].argmax(-1)
        target = batch["labels"][:, 1:]
        for i, sample_keys in enumerate(batch_keys):
            positions = (target[i] != encode.IGNORE).nonzero().flatten().tolist()
            # Split the labelled positions into answers: consecutive runs.
            runs: list[list[int]] = []
            for p in positions:
                if runs and p == runs[-1][-1] + 1:
                    runs[-1].append(p)
                else:
                    runs.append([p])
            for key, run in zip(sample_keys, runs):
                ok = bool((predicted[i, run] == target[i, run]).all())
                hits[key] += ok
                totals[key] += 1
    model.train(was_training)
    scores = {k: hits[k] / totals[k] for k in totals}
    scores["all"] = sum(hits.values()) / max(1, sum(totals.values()))
    return scores


def summary(results: list[PairResult]) -> str:
    by_key: dict[str, list[bool]] = defaultdict(list)
    for r in results:
        by_key[_KEY_OF_QUESTION[r.question]].append(r.correct)
        by_key[f"turn{r.turn}"].append(r.correct)
    parts = [f"{k} {sum(v)}/{len(v)}" for k, v in sorted(by_key.items())]
    correct = sum(r.correct for r in results)
    return f"{correct}/{len(results)} exact ({100 * correct / max(1, len(results)):.1f} %): " + ", ".join(parts)


def main() -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("assets/tiny-mllama"))
    parser.add_argument("--seed", type=int, default=HELDOUT_SEED)
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--show-wrong", action="store_true", help="print every wrong answer")
    args = parser.parse_args()
    torch.set_num_threads(2)
    results = evaluate_generate(args.model, args.seed, args.count)
    if args.show_wrong:
        for r in results:
            if not r.correct:
                print(f"#{r.index} turn {r.turn} {r.layout}: {r.question!r} -> {r.answer!r} (want {r.expected!r})")
    print(summary(results))
    return 0


if __name__ == "__main__":
    cli_main(main)
