"""The chat: python_demo/pipeline.py and mllama_tpu.session / terminal, scripted and interactive, on a real engine.

Backends: the CLI tests (subprocess: exit codes, streams, stdin/pty) run on `onnx` (the reference
engine over the tiny export) and, as slow tests, on `bmodel` (the C++ engine on the simulator,
f32 tiny bmodel) - few tokens each, the simulator is slow. The in-process ChatSession tests use
the engine `make_engine(CHAT_BACKEND)` gives: onnx by default, MLLAMA_TEST_CHAT_BACKEND=bmodel
re-runs all of them on the bmodel engine.
"""
from __future__ import annotations

import io
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mllama_tpu import REPO_ROOT
from mllama_tpu.images import load_image
from mllama_tpu.session import ChatSession, LoadedModel
from mllama_tpu.terminal import run_interactive, run_scripted
from mllama_tpu.text_stream import TextStream
from mllama_tpu.token_config import open_processor
from mllama_tpu.engines import Engine, SamplingParams, open_engine
from mllama_tpu.errors import UserError
from mllama_tpu.tiny import data
from cli_runs import PIPELINE, json_turns, one_error_line, run_pipeline

QUESTION = "What shape is it?"

BACKENDS = ["onnx", pytest.param("bmodel", marks=pytest.mark.slow)]
CHAT_BACKEND = os.environ.get("MLLAMA_TEST_CHAT_BACKEND", "onnx")


# ---------------------------------------------------------------------------------------------
# fixtures: engines per backend, sessions on them
# ---------------------------------------------------------------------------------------------


def model_for(backend: str, tiny_onnx_dir: Path, tiny_bmodel) -> Path:
    """What -m takes for this backend: the tiny export dir, or the tiny model compiled in f32."""
    return tiny_onnx_dir if backend == "onnx" else tiny_bmodel("f32")


def chat_on(engine: Engine, token_config: Path, **settings) -> ChatSession:
    """A chat session on an already loaded engine (tests share engines across sessions)."""
    return ChatSession(LoadedModel.on(engine, open_processor(token_config), token_config), **settings)


def make_engine(backend: str, tiny_onnx_dir: Path, tiny_bmodel) -> Engine:
    return open_engine(backend, model_for(backend, tiny_onnx_dir, tiny_bmodel), 0)


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def model_path(backend, tiny_onnx_dir, tiny_bmodel) -> Path:
    return model_for(backend, tiny_onnx_dir, tiny_bmodel)


@pytest.fixture(scope="module")
def engine(tiny_onnx_dir, tiny_bmodel):
    """The engine of the in-process chat tests."""
    e = make_engine(CHAT_BACKEND, tiny_onnx_dir, tiny_bmodel)
    yield e
    e.close()


@pytest.fixture(scope="module")
def reference_engine(tiny_onnx_dir):
    """The ONNX reference engine: what the CLI's answers are checked against (f32 bmodel too)."""
    e = open_engine("onnx", tiny_onnx_dir)
    yield e
    e.close()


@pytest.fixture(scope="module")
def token_config(tiny_onnx_dir) -> Path:
    return tiny_onnx_dir / "token_config"


@pytest.fixture()
def session(engine, token_config):
    """A fresh greedy session (history off) on the shared engine."""
    s = chat_on(engine, token_config, max_new_tokens=16)
    s.set_sampling(SamplingParams())
    return s


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    """Toy-task images in every mode a user might have, plus broken files."""
    d = tmp_path_factory.mktemp("images")
    import random

    rgb = data.render(data.make_scene(random.Random(5), (1, 2)))
    out: dict[str, Path] = {}

    def save(name: str, im: Image.Image, fmt: str = "PNG") -> None:
        out[name] = d / f"{name}.{fmt.lower()}"
        im.save(out[name], fmt)

    save("rgb", rgb)
    save("grey", rgb.convert("L"))
    save("bilevel", rgb.convert("1"))
    save("rgba", rgb.convert("RGBA"))
    save("grey_alpha", rgb.convert("LA"))
    save("palette", rgb.convert("P", palette=Image.ADAPTIVE))
    save("cmyk", rgb.convert("CMYK"), "JPEG")
    grey16 = (np.asarray(rgb.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    save("grey16", Image.fromarray(grey16, "I;16"))
    full = out["rgb"].read_bytes()
    out["truncated"] = d / "truncated.png"
    out["truncated"].write_bytes(full[: len(full) // 2])
    out["not_an_image"] = d / "notes.png"
    out["not_an_image"].write_text("hello\n")
    return out


def long_question(session: ChatSession, prompt_tokens: int) -> str:
    """A question whose prompt (template included) has exactly `prompt_tokens` tokens."""
    words = ["red"]
    while True:
        q = " ".join(words)
        n = session.prompt_length(q)
        if n == prompt_tokens:
            return q
        if n > prompt_tokens:
            raise AssertionError(f"cannot hit exactly {prompt_tokens} prompt tokens")
        words.append("red")


# ---------------------------------------------------------------------------------------------
# the CLI
# ---------------------------------------------------------------------------------------------


def test_scripted_json(backend, model_path, images, reference_engine, token_config):
    questions = [QUESTION, "What color is the background?"]
    n = 6 if backend == "onnx" else 3
    args = ["--backend", backend, "-m", str(model_path), "-i", str(images["rgb"]), "--max_new_tokens", str(n)]
    r = run_pipeline(*args, "--enable_history", *sum([["-q", q] for q in questions], []), "--json")
    assert r.returncode == 0, r.stderr
    lines = json_turns(r.stdout)
    assert [l["question"] for l in lines] == questions
    for l in lines:
        assert set(l) == {"question", "answer", "tokens", "ftl_s", "tps"}
        assert l["ftl_s"] > 0 and l["tps"] >= 0 and l["tokens"]
    # The CLI says what the reference says for the same conversation (greedy, history on).
    s = chat_on(reference_engine, token_config, max_new_tokens=n, enable_history=True)
    s.set_sampling(SamplingParams())
    s.set_image(images["rgb"])
    for l in lines:
        turn = s.ask(l["question"])
        assert (l["answer"], l["tokens"]) == (turn.answer, turn.tokens)
        assert turn.answer == s.model.tokenizer.decode(turn.tokens, skip_special_tokens=True)


def test_cli_sampling_flags(backend, model_path, images):
    args = ["--backend", backend, "-m", str(model_path), "-i", str(images["rgb"]), "--max_new_tokens", "3",
            "--generation_mode", "penalty_sample", "--temperature", "1.5", "--top_p", "0.95", "--top_k", "20",
            "--repeat_penalty", "1.2", "--repeat_last_n", "8", "--seed", "11", "-q", QUESTION, "-q", QUESTION, "--json"]
    runs = [run_pipeline(*args) for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr
    tokens = [[l["tokens"] for l in json_turns(r.stdout)] for r in runs]
    assert len(tokens[0]) == 2
    assert tokens[0] == tokens[1]  # same seed, same answers, turn by turn
    bad = run_pipeline("--backend", backend, "-m", str(model_path), "--temperature", "-1", "-q", QUESTION)
    assert bad.returncode == 2 and bad.stderr.startswith("error: temperature must be >= 0")


def test_interactive_over_stdin(backend, model_path, images):
    script = "\n".join([
        "",  # empty question: asked again
        QUESTION,
        "clear",
        "",  # empty path keeps the image
        QUESTION,
        "new",
        str(images["rgb"].parent / "missing.png"),  # bad path keeps the image
        QUESTION,
        "new",
        str(images["grey"]),
        QUESTION,
        "quit",
        "never asked",
    ]) + "\n"
    r = run_pipeline("--backend", backend, "-m", str(model_path), "-i", str(images["rgb"]), "--max_new_tokens", "3", stdin=script)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert out.count("Question: ") == 9  # every line but the 3 image paths, up to quit
    assert out.count("FTL: ") == 4 and out.count("TPS: ") == 4
    assert "missing.png not found" in out and f"keeping {images['rgb']}" in out
    assert f"Image: {images['grey']}" in out
    assert "never asked" not in out


def test_interactive_on_a_terminal(backend, model_path, images):
    """Through a pty, as a user would: the answer streams and 'exit' ends the session."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, str(PIPELINE), "--backend", backend, "-m", str(model_path), "-i", str(images["rgb"]),
         "--max_new_tokens", "3"],
        stdin=slave, stdout=slave, stderr=slave, cwd=REPO_ROOT, close_fds=True,
    )
    os.close(slave)
    seen = b""

    def read_until(marker: bytes, timeout: float = 240 if backend == "onnx" else 2400) -> None:
        nonlocal seen
        end = time.time() + timeout
        while marker not in seen:
            if time.time() > end:
                raise AssertionError(f"no {marker!r} in {seen[-500:]!r}")
            ready, _, _ = select.select([master], [], [], 1)
            if ready:
                try:
                    seen += os.read(master, 4096)
                except OSError:
                    break

    try:
        read_until(b"Question: ")
        os.write(master, QUESTION.encode() + b"\n")
        read_until(b"TPS: ")
        os.write(master, b"exit\n")
        assert proc.wait(timeout=60 if backend == "onnx" else 600) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    assert b"Answer: " in seen


def test_bad_inputs_at_startup(backend, model_path, images, tmp_path, token_config):
    base = ["--backend", backend, "-m", str(model_path)]
    cases = {
        "truncated": (base + ["-i", str(images["truncated"]), "-q", QUESTION], "truncated"),
        "not_an_image": (base + ["-i", str(images["not_an_image"]), "-q", QUESTION], "not an image"),
        "missing_image": (base + ["-i", str(tmp_path / "nope.jpg"), "-q", QUESTION], "not found"),
        "missing_model": (["--backend", backend, "-m", str(tmp_path / "nothing"), "-q", QUESTION], "not found"),
        "missing_token_config": (base + ["-t", str(tmp_path / "tc"), "-q", QUESTION], "token_config"),
        "unknown_flag": (base + ["--temprature", "0.5", "-q", QUESTION], "unrecognized arguments"),
    }
    for name, (args, words) in cases.items():
        one_error_line(run_pipeline(*args), words)


def test_token_config_of_another_model_is_refused(engine, token_config, tmp_path):
    from mllama_tpu.inputs import load_processor

    proc = load_processor(token_config)
    proc.tokenizer.add_tokens([f"<extra_{i}>" for i in range(20)])
    proc.save_pretrained(tmp_path / "other")
    with pytest.raises(UserError, match="405 tokens but the model's vocabulary is 384"):
        chat_on(engine, tmp_path / "other")
    proc.tokenizer.save_pretrained(tmp_path / "tokenizer_only")  # no image processor
    with pytest.raises(UserError, match="tokenizer_only"):
        chat_on(engine, tmp_path / "tokenizer_only")


@pytest.mark.slow
def test_missing_device_is_one_line(tiny_bmodel):
    r = run_pipeline("--backend", "bmodel", "-m", str(tiny_bmodel("f32")), "--devid", "97", "-q", QUESTION)
    assert r.returncode == 2
    # The simulator's runtime may chatter on stderr; ours is one line and no traceback.
    errors = [l for l in r.stderr.splitlines() if l.startswith("error: ")]
    assert len(errors) == 1 and "97" in errors[0] and "Traceback" not in r.stderr, r.stderr


# ---------------------------------------------------------------------------------------------
# the session
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["grey", "bilevel", "rgba", "grey_alpha", "palette", "cmyk", "grey16"])
def test_image_modes_work(session, images, mode):
    im = load_image(images[mode])
    assert im.mode == "RGB" and im.size == Image.open(images["rgb"]).size
    if mode in ("grey", "grey16"):  # 16-bit is scaled, not clipped: same picture as 8-bit grey
        ref = np.asarray(load_image(images["grey"]), dtype=int)
        assert np.abs(np.asarray(im, dtype=int) - ref).max() <= 1
    session.set_image(images[mode])
    assert session.ask(QUESTION).tokens


def test_dark_16_bit_image_stays_dark(tmp_path):
    """A 16-bit grey PNG whose values are all small is dark, not read as 8-bit and brightened."""
    path = tmp_path / "dark16.png"
    Image.fromarray(np.full((40, 60), 200, dtype=np.uint16), "I;16").save(path)
    assert np.asarray(load_image(path)).max() <= 1


def test_prompt_longer_than_seq_is_refused(session, images):
    session.set_image(images["rgb"])
    q = " ".join(["red"] * 200)
    with pytest.raises(UserError, match=r"the prompt has \d+ tokens, the model's limit is 128"):
        session.ask(q)
    out = io.StringIO()
    assert run_interactive(session, io.StringIO(q + "\n" + QUESTION + "\nq\n"), out) == 0
    assert "limit is 128" in out.getvalue() and out.getvalue().count("FTL: ") == 1  # the session went on


def test_answer_stopped_by_seq_length_says_so(session, images):
    session.set_image(images["rgb"])
    session.max_new_tokens = 100
    session.model.eos_ids = []  # only the sequence length can stop it
    q = long_question(session, session.engine.seq_length - 1)  # room for 2 tokens
    turn = session.ask(q)
    assert turn.stop_reason == "seqlen" and len(turn.tokens) == 2
    out = io.StringIO()
    run_scripted(session, [q], as_json=False, out=out)
    assert "sequence length is full" in out.getvalue()


def test_history(engine, token_config, images):
    s = chat_on(engine, token_config, max_new_tokens=12, enable_history=True)
    s.set_sampling(SamplingParams())
    s.set_image(images["rgb"])
    first = s.ask(QUESTION)
    second = s.ask("What color is the background?")
    # The second prompt is the whole conversation: longer than the first prompt plus its answer.
    assert second.prompt_tokens > first.prompt_tokens + len(first.tokens)
    assert [m["role"] for m in s.messages] == ["user", "assistant", "user", "assistant"]
    # A conversation that outgrows SEQ starts again, with a notice, instead of failing.
    q = " ".join(["red"] * 30)
    restarted = [s.ask(q).restarted for _ in range(4)]
    assert any(restarted)
    assert [m["role"] for m in s.messages][:2] == ["user", "assistant"]
    assert s.messages[0]["content"][0] == {"type": "image"}
    out = io.StringIO()
    run_scripted(s, [q] * 4, as_json=False, out=out)
    assert "no longer fit" in out.getvalue()


def test_vision_encoder_runs_once_per_image(engine, token_config, images, monkeypatch):
    calls = []
    real = engine.encode_image
    monkeypatch.setattr(engine, "encode_image", lambda im: (calls.append(im), real(im))[1])
    s = chat_on(engine, token_config, max_new_tokens=4, enable_history=True)
    s.set_sampling(SamplingParams())
    s.set_image(images["rgb"])
    for _ in range(3):
        s.ask(QUESTION)
    assert len(calls) == 1


def test_text_only_chat(session):
    session.set_image(None)
    assert session.ask("Hello").tokens


def test_stream_keeps_utf8_characters_whole(session):
    tok = session.model.tokenizer
    text = "It is 日本 héllo ✓ red."
    ids = tok.encode(text, add_special_tokens=False)
    stream = TextStream(tok)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == tok.decode(ids)
    assert not any("\ufffd" in p for p in pieces)
    assert len(ids) > len(text.split())  # the multi-byte characters really were split into tokens


# ---------------------------------------------------------------------------------------------
# sampling
# ---------------------------------------------------------------------------------------------


def sample(session: ChatSession, q: str, **kw) -> list[int]:
    session.set_sampling(SamplingParams(mode="penalty_sample", **kw))
    return session.ask(q).tokens


def test_same_seed_same_tokens(session, images):
    session.set_image(images["rgb"])
    session.model.eos_ids = []  # long answers: more chances to differ
    a = sample(session, QUESTION, temperature=1.5, seed=3)
    b = sample(session, QUESTION, temperature=1.5, seed=3)
    c = sample(session, QUESTION, temperature=1.5, seed=4)
    assert a == b and a != c


def test_low_temperature_is_greedy(session, images):
    session.set_image(images["rgb"])
    session.set_sampling(SamplingParams())
    greedy = session.ask(QUESTION).tokens
    assert sample(session, QUESTION, temperature=1e-3, seed=1) == greedy
    assert sample(session, QUESTION, temperature=0.0, seed=1) == greedy


def test_repeat_penalty_lowers_repeats(session):
    """A prompt that invites repetition: with the penalty, fewer tokens repeat inside the window."""
    session.set_image(None)
    session.model.eos_ids = []
    q = " ".join(["red"] * 12)

    def repeats(tokens: list[int]) -> int:
        return len(tokens) - len(set(tokens))

    plain = sample(session, q, temperature=0.05, repeat_penalty=1.0, repeat_last_n=32, seed=0)
    penalised = sample(session, q, temperature=0.05, repeat_penalty=3.0, repeat_last_n=32, seed=0)
    assert repeats(penalised) < repeats(plain)
