"""Trains the tiny Mllama on the toy task and saves it as an HF model directory.

Deterministic from --seed (same seed, same threads, same machine -> same weights): the model is
initialised from the seed and every batch is freshly drawn from the string-keyed stream
"train-<seed>", so it never overlaps the held-out set (evaluate.HELDOUT_SEED) nor the validation
stream "val-<seed>" used to keep the best checkpoint.

CLI: python -m mllama_tpu.tiny.train --out assets/tiny-mllama --seed 0 --steps 3000
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import MllamaForConditionalGeneration

from mllama_tpu.errors import ArgumentParser, UserError, cli_main
from mllama_tpu.tiny import aux, build, encode
from mllama_tpu.tiny import tokenizer as tok
from mllama_tpu.tiny.data import make_sample
from mllama_tpu.tiny.evaluate import teacher_forced_accuracy
from mllama_tpu.tiny.task import QUESTIONS

_KEY_OF_QUESTION = {q.text: q.key for q in QUESTIONS}
# Turns per training conversation: mostly all four questions about the image (4x the answers per
# vision pass, the expensive part), some 1- and 2-turn conversations as the task states them.
TRAIN_TURNS = (1, 2, 4, 4)


@dataclass
class TrainConfig:
    out: Path
    seed: int = 0
    steps: int = 3000
    batch_size: int = 32
    lr: float = 2e-3
    min_lr_ratio: float = 0.05  # cosine decays to lr * this
    warmup: int = 100
    weight_decay: float = 0.01
    eval_every: int = 250  # 0: no validation, save the last weights
    val_count: int = 128
    threads: int = 2
    init_from: Path | None = None  # continue from a saved model directory
    log_every: int = 25
    aux_weight: float = 1.0  # auxiliary vision supervision (see aux.py); 0 disables it
    outline_shape_weight: float = 1.0  # of aux's per-patch shape loss on the outline; 0: pooled only
    shape_patches: str = "outline"  # which patches that loss asks: "outline" or "covered" (aux.py)
    vector_lr_scale: float = 5.0  # lr multiplier of 1-D parameters (norms, gates, biases)
    position_init: int = 1  # 1: start the tile-position embedding from build.global_position_table


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)  # language-model loss (answers only)
    aux_losses: list[float] = field(default_factory=list)
    aux_parts: list[dict[str, float]] = field(default_factory=list)  # per step, by aux head
    best_val: float = -1.0
    best_step: int = 0
    val_history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _optimizer(model: MllamaForConditionalGeneration, heads: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    # Decay only matrices: norms, gates, biases and small embeddings keep their scale.
    params = list(model.parameters()) + list(heads.parameters())
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    # Norm weights and tanh gates move faster: the cross-attention's q/k RMSNorm weights bound how
    # sharply text can attend to a few patches (the shape), and at lr they grow only ~lr per step.
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay, "lr": cfg.lr},
        {"params": rest, "weight_decay": 0.0, "lr": cfg.lr * cfg.vector_lr_scale},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-8)


def _batch(
    processor, rng: random.Random, size: int, header: list[int], with_aux: bool = False
) -> tuple[dict, list[list[str]], list[aux.AuxTargets]]:
    samples = [make_sample(rng, turn_choices=TRAIN_TURNS) for _ in range(size)]
    encoded = [encode.encode(processor, s, header) for s in samples]
    keys = [[_KEY_OF_QUESTION[t.question] for t in s.turns] for s in samples]
    targets = [aux.targets(processor, s.scene) for s in samples] if with_aux else []
    return encode.collate(encoded, tok.special_id(tok.PAD)), keys, targets


def train(cfg: TrainConfig) -> TrainResult:
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    processor = build.build_processor()
    header = encode.assistant_header_ids(processor)
    if cfg.init_from is not None:
        if not (cfg.init_from / "model.safetensors").is_file():
            raise UserError(f"--init-from {cfg.init_from}: no model.safetensors there; pass a saved model directory")
        model = MllamaForConditionalGeneration.from_pretrained(str(cfg.init_from), dtype=torch.float32)
    else:
        model = build.new_model(cfg.seed, position_init=bool(cfg.position_init))
    model.train()
    heads = aux.AuxHeads(model.config.text_config.hidden_size)
    # The projector's output is what the text's cross-attention reads; the heads train on it.
    captured: list[torch.Tensor] = []
    model.model.multi_modal_projector.register_forward_hook(lambda _m, _i, out: captured.append(out))
    optimizer = _optimizer(model, heads, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))

    train_rng = random.Random(f"train-{cfg.seed}")
    val_rng = random.Random(f"val-{cfg.seed}")
    val = [_batch(processor, val_rng, 32, header)[:2] for _ in range(max(1, cfg.val_count // 32))] if cfg.eval_every else []

    result = TrainResult()
    start = time.time()

    def validate(step: int) -> None:
        scores = teacher_forced_accuracy(model, [b for b, _ in val], [k for _, k in val])
        result.val_history.append({"step": step, **scores})
        print(f"step {step} val " + " ".join(f"{k} {v:.3f}" for k, v in sorted(scores.items())), flush=True)
        if scores["all"] > result.best_val:
            result.best_val, result.best_step = scores["all"], step
            _save(model, cfg, result, time.time() - start)

    for step in range(1, cfg.steps + 1):
        batch, _, targets = _batch(processor, train_rng, cfg.batch_size, header, with_aux=cfg.aux_weight > 0)
        captured.clear()
        loss = model(**batch).loss
        total = loss
        if cfg.aux_weight > 0:
            features = captured[0].reshape(len(targets), -1, *captured[0].shape[-2:])  # [B, T, P, H]
            aux_loss, parts = heads.loss(features, targets, batch["aspect_ratio_mask"][:, 0],
                                         outline_shape_weight=cfg.outline_shape_weight,
                                         shape_patches=cfg.shape_patches)
            result.aux_parts.append(parts)
            total = loss + cfg.aux_weight * aux_loss
            result.aux_losses.append(float(aux_loss.detach()))
        total.backward()
        torch.nn.utils.clip_grad_norm_(list(model.parameters()) + list(heads.parameters()), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        result.losses.append(float(loss.detach()))
        if step % cfg.log_every == 0 or step == cfg.steps:
            recent = result.losses[-cfg.log_every :]
            recent_aux = result.aux_losses[-cfg.log_every :] or [0.0]
            recent_parts = result.aux_parts[-cfg.log_every :]
            by_head = " ".join(
                f"{k} {sum(p[k] for p in recent_parts) / len(recent_parts):.3f}" for k in (recent_parts or [{}])[0]
            )
            print(
                f"step {step} loss {sum(recent) / len(recent):.4f} aux {sum(recent_aux) / len(recent_aux):.4f} "
                f"({by_head}) "
                f"lr {scheduler.get_last_lr()[0]:.2e} "
                f"{time.time() - start:.0f}s",
                flush=True,
            )
        if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
            validate(step)
    result.seconds = time.time() - start
    if not cfg.eval_every:
        _save(model, cfg, result, result.seconds)
    return result


def _save(model: MllamaForConditionalGeneration, cfg: TrainConfig, result: TrainResult, seconds: float) -> None:
    build.save_model_dir(model, cfg.out)
    record = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items() if k != "out"},
        "saved_at_step": result.best_step or len(result.losses),
        "val_teacher_forced_exact": result.best_val,
        "train_seconds": round(seconds, 1),
    }
    (cfg.out / "training.json").write_text(json.dumps(record, indent=2) + "\n")


def main() -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="model directory to write")
    defaults = TrainConfig(out=Path("."))
    for name in ("seed", "steps", "batch_size", "warmup", "eval_every", "val_count", "threads", "log_every", "position_init"):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name))
    for name in ("lr", "min_lr_ratio", "weight_decay", "aux_weight", "vector_lr_scale", "outline_shape_weight"):
        parser.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(defaults, name))
    parser.add_argument("--init-from", type=Path, default=None)
    parser.add_argument("--shape-patches", choices=("outline", "covered"), default=defaults.shape_patches)
    args = parser.parse_args()
    if args.steps < 1 or args.batch_size < 1:
        raise UserError("--steps and --batch-size must be at least 1")
    cfg = TrainConfig(**vars(args))
    result = train(cfg)
    best = f", best val {result.best_val:.3f} at step {result.best_step}" if cfg.eval_every else ""
    print(f"done: {len(result.losses)} steps in {result.seconds:.0f}s{best}")
    return 0


if __name__ == "__main__":
    cli_main(main)
