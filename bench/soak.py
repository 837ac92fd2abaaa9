"""A bounded soak: many chat turns in-process, many requests through the server, and what the
process holds at the start and at the end.

(a) turns: one ChatSession on the bmodel engine (on the simulator here) with history kept,
    image changes over the sample images, resets, text-only conversations, greedy and seeded
    penalty sampling; kept conversations outgrow SEQ and restart.
(b) requests: python_demo/server.py started as a subprocess, through the official `openai`
    client: whole and streamed, images as data URLs, greedy and sampled, multi-turn messages,
    streams the client abandons, and bad requests that must get a 4xx error body.

Each part warms up first (every net has run, so the engine has allocated all it ever will),
then reads the RSS of the process that runs the engine and the engine's device bytes
(`engine_bytes`, what the engine allocated; the server reports it on /health), asks a probe
question (fresh conversation, greedy), runs its script, asks the probe again and reads both
again. It prints the figures and an RSS trace, and exits 1 when RSS grew by more than
--max_growth, the engine's bytes changed, the probe's answer changed, or a request of the
script got an answer it should not have.

    .venv/bin/python -m bench.soak                                  # 300 turns, then 500 requests
    .venv/bin/python -m bench.soak --turns 30 --requests 40 -m NAME.bmodel
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from mllama_tpu import REPO_ROOT
from mllama_tpu.serve.child import data_url, server_child, user_message

SAMPLES = REPO_ROOT / "assets" / "samples"
# The bmodels tried in turn when -m is not given: the tests' f32 one, then the demo's int4 one.
DEFAULT_MODELS = (REPO_ROOT / "build" / "test-cache" / "bmodel-f32", REPO_ROOT / "build" / "demo" / "bmodel-int4")
PROBE_IMAGE = SAMPLES / "white_triangle_left_on_yellow_1x1.png"
PROBE_QUESTION = "What shape is it?"
MAX_NEW_TOKENS = 24  # the toy task's answers are a few tokens; sampled ones are cut here
KEY = "soak-key"


def sample_images() -> list[Path]:
    return sorted(SAMPLES.glob("*.png"))


def questions() -> list[str]:
    """The toy task's questions (every sample image takes the same four)."""
    truth = json.loads((SAMPLES / "truth.json").read_text())
    return sorted({q for item in truth.values() for q in item["questions"]})


def rss_bytes(pid: int) -> int:
    import psutil

    return psutil.Process(pid).memory_info().rss


@dataclass
class Soak:
    """What one part measured."""

    name: str
    count: int = 0
    seconds: float = 0.0
    rss_start: int = 0
    rss_end: int = 0
    engine_bytes_start: int = 0
    engine_bytes_end: int = 0
    probe_start: str = ""
    probe_end: str = ""
    trace: list[tuple[int, int, int]] = field(default_factory=list)  # (done, RSS, engine bytes)
    kinds: dict[str, int] = field(default_factory=dict)  # what the script did, by kind
    wrong: list[str] = field(default_factory=list)  # requests answered not as they should be
    _answers: dict = field(default_factory=dict, repr=False)

    @property
    def growth(self) -> float:
        return self.rss_end / self.rss_start - 1

    @property
    def per_s(self) -> float:
        return self.count / self.seconds if self.seconds else 0.0

    def failures(self, max_growth: float) -> list[str]:
        out = []
        if self.growth > max_growth:
            out.append(f"{self.name}: RSS grew {self.growth:.1%} (> {max_growth:.0%})")
        engine_bytes = {b for _, _, b in self.trace} | {self.engine_bytes_start, self.engine_bytes_end}
        if len(engine_bytes) != 1:
            out.append(f"{self.name}: engine bytes changed: {sorted(engine_bytes)}")
        if self.probe_start != self.probe_end:
            out.append(f"{self.name}: the probe's answer changed: {self.probe_start!r} -> {self.probe_end!r}")
        out += [f"{self.name}: {w}" for w in self.wrong]
        return out

    def count_kind(self, kind: str) -> None:
        self.kinds[kind] = self.kinds.get(kind, 0) + 1

    def same_answer(self, key, answer: str, where: str) -> None:
        """Greedy answers to the same input must repeat through the whole run."""
        if key not in self._answers:
            self._answers[key] = answer
        elif answer != self._answers[key]:
            self.wrong.append(f"{where}: greedy answer {answer} differs from the earlier "
                              f"{self._answers[key]} for {key}")
        else:
            self.count_kind("greedy answer repeated")


# ---------------------------------------------------------------------------------------------
# (a) turns through ChatSession, in this process
# ---------------------------------------------------------------------------------------------


TURN_CYCLE = 12


def _random_sampling(rng: random.Random, seed: int):
    from mllama_tpu.sampling import SamplingParams

    return SamplingParams("penalty_sample", temperature=rng.choice([0.7, 1.0, 1.3]), top_p=rng.choice([0.8, 1.0]),
                          top_k=rng.choice([5, 50]), repeat_penalty=rng.choice([1.0, 1.2]), seed=seed)


def _probe_turn(session) -> str:
    from mllama_tpu.images import load_image
    from mllama_tpu.sampling import SamplingParams

    session.set_image(PROBE_IMAGE, load_image(PROBE_IMAGE))  # a fresh conversation on the probe's image
    session.set_sampling(SamplingParams())
    turn = session.ask(PROBE_QUESTION)
    return f"{turn.answer!r} {turn.tokens}"


def _script_turn(session, rng: random.Random, images: list[Path], loaded: dict, i: int, soak: Soak | None) -> None:
    """Turn i of the script, greedy or sampled. In every TURN_CYCLE turns: a new conversation on
    the next image (every third one text-only instead), and every other cycle a reset halfway;
    in between the conversation keeps its history until it outgrows SEQ and restarts."""
    cycle, at = divmod(i, TURN_CYCLE)
    if at == 0 and cycle % 3 == 2:
        session.set_image(None)
        kind = "text-only conversation"
    elif at == 0:
        path = images[cycle % len(images)]
        session.set_image(path, loaded[path])
        kind = "image change"
    elif at == TURN_CYCLE * 2 // 3 and cycle % 2 == 1:
        session.reset()
        kind = "reset"
    else:
        kind = "next turn"
    sampled = i % 2 == 1
    session.set_sampling(_random_sampling(rng, seed=i) if sampled else _greedy())
    question = rng.choice(questions())
    had_history = bool(session.messages)
    turn = session.ask(question)
    fresh = not had_history or turn.restarted
    if soak is None:
        return
    soak.count_kind(kind)
    soak.count_kind("sampled" if sampled else "greedy")
    soak.count_kind("fresh conversation" if fresh else "on history")
    if turn.restarted:
        soak.count_kind("restarted (SEQ full)")
    if fresh and not sampled:  # the same image and question, greedy, no history: the same answer every time
        soak.same_answer((session.image_path, question), f"{turn.answer!r} {turn.tokens}", f"turn {i}")


def _greedy():
    from mllama_tpu.sampling import SamplingParams

    return SamplingParams()


def _engine_bytes(model) -> int:
    return int(model.engine.memory.get("engine_bytes", 0))


def _measure_now(pid: int) -> int:
    gc.collect()
    return rss_bytes(pid)


def run_turns(model_path: Path, turns: int, trace_every: int = 50, seed: int = 0,
              progress: Callable[[str], None] | None = None) -> Soak:
    """Soak (a): `turns` scripted turns on one ChatSession in this process."""
    from mllama_tpu.images import load_image
    from mllama_tpu.session import ChatSession, LoadedModel

    images = sample_images()
    loaded = {p: load_image(p) for p in images}
    model = LoadedModel.open("bmodel", model_path)
    try:
        session = ChatSession(model, max_new_tokens=MAX_NEW_TOKENS, enable_history=True)
        # Warm-up: every net and both heads run (image and text-only, greedy and sampled, a
        # second turn on history), so the engine's staging buffers all exist before the start.
        _probe_turn(session)
        warm = random.Random(seed + 1)
        for i in range(4):
            _script_turn(session, warm, images, loaded, i, None)
        for image in (images[0], None):
            session.set_image(image, loaded.get(image))
            for sampling in (_greedy(), _random_sampling(warm, seed=1)):
                session.set_sampling(sampling)
                session.ask(questions()[0])
        soak = Soak("turns", count=turns)
        pid = os.getpid()
        soak.rss_start, soak.engine_bytes_start = _measure_now(pid), _engine_bytes(model)
        soak.trace.append((0, soak.rss_start, soak.engine_bytes_start))
        start = time.perf_counter()
        soak.probe_start = _probe_turn(session)
        rng = random.Random(seed)
        for i in range(turns):
            _script_turn(session, rng, images, loaded, i, soak)
            if (i + 1) % trace_every == 0:
                soak.trace.append((i + 1, _measure_now(pid), _engine_bytes(model)))
                if progress:
                    progress(f"turns: {i + 1}/{turns}, RSS {soak.trace[-1][1] / 2**20:.1f} MB, "
                             f"engine bytes {soak.trace[-1][2]}, {time.perf_counter() - start:.0f} s")
        soak.probe_end = _probe_turn(session)
        soak.seconds = time.perf_counter() - start
        soak.rss_end, soak.engine_bytes_end = _measure_now(pid), _engine_bytes(model)
        if soak.trace[-1][0] != turns:
            soak.trace.append((turns, soak.rss_end, soak.engine_bytes_end))
        return soak
    finally:
        model.close()


# ---------------------------------------------------------------------------------------------
# (b) requests through the server, a subprocess
# ---------------------------------------------------------------------------------------------


@dataclass
class ServerProcess:
    url: str
    proc: subprocess.Popen
    log_path: Path

    def health(self) -> dict:
        import httpx

        return httpx.get(self.url + "/health", timeout=30).json()

    def idle_health(self, timeout: float = 120) -> dict:
        """/health once no request runs or waits (the worker has read the engine's memory)."""
        end = time.time() + timeout
        while True:
            h = self.health()
            if (h["busy"] == 0 and h["queued"] == 0) or time.time() > end:
                return h
            time.sleep(0.05)

    def engine_bytes(self) -> int:
        return int(self.idle_health()["memory"][0].get("engine_bytes", 0))


@contextlib.contextmanager
def server_process(model_path: Path, log_dir: Path, timeout: float = 600) -> Iterator[ServerProcess]:
    """python_demo/server.py on a free loopback port, with an API key, until the block ends."""
    env = {**os.environ, "MLLAMA_API_KEY": KEY}
    env.setdefault("MLLAMA_SIMULATOR_LOG", os.devnull)
    log_path = Path(log_dir) / f"soak-server-{os.getpid()}.log"
    with server_child(["-m", str(model_path), "--log_level", "warning"], log_path, env, timeout) as (url, proc):
        yield ServerProcess(url, proc, log_path)


BAD_EVERY = 12  # request j is a bad one when j % BAD_EVERY == BAD_EVERY - 1
ABANDON_EVERY = 25  # and a stream the client leaves after its first chunk once in this many


def _text_of(message: dict) -> str:
    """A user message's text, with its image (if any) as a marker."""
    content = message["content"]
    if isinstance(content, str):
        return content
    return " ".join(p["text"] if p["type"] == "text" else "<image>" for p in content)


def _bad_requests(model: str, url: str) -> list[tuple[str, dict, set[int]]]:
    """(what, create() arguments, the statuses it may get): each must be refused with an error body."""
    q = PROBE_QUESTION
    return [
        ("remote image URL", {"messages": [user_message(q, "https://example.com/cat.png")]}, {400}),
        ("two images", {"messages": [user_message(q, url), {"role": "assistant", "content": "It is."}, user_message(q, url)]}, {400}),
        ("max_tokens past SEQ", {"messages": [user_message(q, url)], "max_tokens": 100000}, {400}),
        ("unknown model", {"messages": [user_message(q)], "model": model + "-nope"}, {404}),
        ("temperature not a number", {"messages": [user_message(q)], "temperature": "hot"}, {422}),
        ("broken base64 image", {"messages": [user_message(q, "data:image/png;base64,@@@")]}, {400}),
        ("empty messages", {"messages": []}, {422}),
        ("n > 1", {"messages": [user_message(q)], "n": 2}, {400, 422}),
        ("last message the assistant's", {"messages": [user_message(q), {"role": "assistant", "content": "x"}]}, {400}),
    ]


def _probe_request(client, model: str) -> str:
    r = client.chat.completions.create(model=model, messages=[user_message(PROBE_QUESTION, data_url(PROBE_IMAGE))],
                                       max_tokens=MAX_NEW_TOKENS)
    return f"{r.choices[0].message.content!r} {r.usage.completion_tokens} tokens"


def _script_request(server: ServerProcess, client, model: str, rng: random.Random, urls: dict[Path, str],
                    truth: dict, j: int, soak: Soak | None) -> None:
    """One scripted request; a wrong outcome is recorded in soak.wrong (or raised in warm-up)."""
    import httpx
    import openai

    def wrong(what: str) -> None:
        if soak is None:
            raise RuntimeError(what)
        soak.wrong.append(f"request {j}: {what}")

    image = rng.choice(sorted(urls))
    questions_of = list(truth[image.name]["questions"].items())
    question, _ = rng.choice(questions_of)
    sampled = rng.random() < 0.5
    args: dict = {"model": model, "max_tokens": MAX_NEW_TOKENS}
    if sampled:
        args.update(temperature=rng.choice([0.7, 1.0, 1.3]), top_p=rng.choice([0.8, 1.0]), seed=j,
                    frequency_penalty=rng.choice([0.0, 0.5]), extra_body={"top_k": rng.choice([5, 50])})
    bad = _bad_requests(model, urls[image])
    if j % BAD_EVERY == BAD_EVERY - 1:  # the bad kinds in turn, then the malformed body and the wrong key
        kind, which = "bad request", (j // BAD_EVERY) % (len(bad) + 2)
        if which < len(bad):
            what, body, statuses = bad[which]
            try:
                client.chat.completions.create(**{**args, **body})
                wrong(f"{what}: answered 200")
            except openai.APIStatusError as e:
                error = e.response.json()
                if e.status_code not in statuses or not error.get("error", {}).get("message"):
                    wrong(f"{what}: {e.status_code} {error}")
        elif which == len(bad):
            resp = httpx.post(server.url + "/v1/chat/completions", content=b'{"model": "x", "messages": [',
                              headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
                              timeout=60)
            if resp.status_code != 400 or not resp.json().get("error", {}).get("message"):
                wrong(f"malformed JSON: {resp.status_code} {resp.text[:200]}")
        else:
            try:
                client.with_options(api_key="wrong-key").models.list()
                wrong("wrong key: answered 200")
            except openai.APIStatusError as e:
                if e.status_code != 401 or not e.response.json().get("error", {}).get("message"):
                    wrong(f"wrong key: {e.status_code}")
    elif j % ABANDON_EVERY == ABANDON_EVERY // 3:
        kind = "abandoned stream"
        with client.chat.completions.create(stream=True, messages=[user_message(question, urls[image])], **args) as stream:
            next(iter(stream))  # the first chunk, then the client goes away mid-answer
    else:
        r = rng.random()
        if r < 0.35:
            kind, messages = "single turn, image", [user_message(question, urls[image])]
        elif r < 0.55:
            kind, messages = "text only", [user_message(question)]
        else:
            # A conversation resent with its history: image first, an earlier answer, a follow-up.
            (q1, a1), (q2, _) = rng.sample(questions_of, 2)
            messages = [user_message(q1, urls[image]), {"role": "assistant", "content": a1}, user_message(q2)]
            if rng.random() < 0.3:
                messages.insert(0, {"role": "system", "content": "Answer briefly."})
            kind = "multi-turn"
        if rng.random() < 0.5:
            chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True},
                                                         messages=messages, **args))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            usage = chunks[-1].usage if chunks else None
            kind += ", streamed"
        else:
            resp = client.chat.completions.create(messages=messages, **args)
            text, usage = resp.choices[0].message.content or "", resp.usage
        if usage is None or usage.completion_tokens < 1:
            wrong(f"{kind}: no answer tokens ({text!r})")
        elif soak is not None and not sampled:  # streamed or whole, the same messages: the same answer
            key = (image.name, json.dumps([m for m in messages if m["role"] != "user"]),
                   json.dumps([_text_of(m) for m in messages if m["role"] == "user"]))
            soak.same_answer(key, f"{text!r} {usage.completion_tokens} tokens", f"request {j}")
    if soak is not None:
        soak.count_kind(kind)
        if not kind.startswith("bad"):
            soak.count_kind("sampled" if sampled else "greedy")


def run_requests(model_path: Path, requests: int, log_dir: Path, trace_every: int = 50, seed: int = 0,
                 progress: Callable[[str], None] | None = None) -> Soak:
    """Soak (b): `requests` scripted requests through a server subprocess on `model_path`."""
    from openai import OpenAI

    truth = json.loads((SAMPLES / "truth.json").read_text())
    urls = {p: data_url(p) for p in sample_images()}
    with server_process(model_path, log_dir) as server:
        client = OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=600)
        model = client.models.list().data[0].id
        # Warm-up: image and text-only, greedy and sampled, whole and streamed, then a few of the script.
        _probe_request(client, model)
        for messages in ([user_message(PROBE_QUESTION, data_url(PROBE_IMAGE))], [user_message(PROBE_QUESTION)]):
            for sampling in ({}, {"temperature": 1.0, "seed": 1}):
                list(client.chat.completions.create(model=model, messages=messages, max_tokens=MAX_NEW_TOKENS,
                                                    stream=True, **sampling))
        warm = random.Random(seed + 1)
        for j in range(4):
            _script_request(server, client, model, warm, urls, truth, j, None)
        soak = Soak("requests", count=requests)
        pid = server.proc.pid  # server.py re-execs itself with the preload: the same process
        soak.engine_bytes_start = server.engine_bytes()
        soak.rss_start = rss_bytes(pid)
        soak.trace.append((0, soak.rss_start, soak.engine_bytes_start))
        start = time.perf_counter()
        soak.probe_start = _probe_request(client, model)
        rng = random.Random(seed)
        for j in range(requests):
            _script_request(server, client, model, rng, urls, truth, j, soak)
            if (j + 1) % trace_every == 0:
                engine_bytes = server.engine_bytes()
                soak.trace.append((j + 1, rss_bytes(pid), engine_bytes))
                if progress:
                    progress(f"requests: {j + 1}/{requests}, server RSS {soak.trace[-1][1] / 2**20:.1f} MB, "
                             f"engine bytes {engine_bytes}, {time.perf_counter() - start:.0f} s")
        soak.probe_end = _probe_request(client, model)
        soak.seconds = time.perf_counter() - start
        soak.engine_bytes_end = server.engine_bytes()
        soak.rss_end = rss_bytes(pid)
        if soak.trace[-1][0] != requests:
            soak.trace.append((requests, soak.rss_end, soak.engine_bytes_end))
        if server.proc.poll() is not None:
            soak.wrong.append(f"the server exited with {server.proc.returncode}")
        return soak


# ---------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------


def default_model() -> Path | None:
    for d in DEFAULT_MODELS:
        found = sorted(d.glob("*.bmodel"))
        if found:
            return found[0]
    return None


def report(soaks: list[Soak]) -> None:
    mb = 2**20
    print("| soak | count | s | per s | RSS start MB | RSS end MB | growth | engine bytes start | end | probe same |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for s in soaks:
        print(f"| {s.name} | {s.count} | {s.seconds:.0f} | {s.per_s:.2f} | {s.rss_start / mb:.1f} | "
              f"{s.rss_end / mb:.1f} | {s.growth:+.2%} | {s.engine_bytes_start} | {s.engine_bytes_end} | "
              f"{'yes' if s.probe_start == s.probe_end else 'NO'} |")
    for s in soaks:
        print(f"\n{s.name}: probe {PROBE_QUESTION!r} on {PROBE_IMAGE.name}: start {s.probe_start}, end {s.probe_end}")
        print(f"{s.name}: " + ", ".join(f"{k} {v}" for k, v in sorted(s.kinds.items())))
        print(f"{s.name}: RSS MB after " + ", ".join(f"{n}: {rss / mb:.1f}" for n, rss, _ in s.trace))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", type=Path, default=None,
                   help="bmodel (default: the tests' f32 tiny bmodel, else the demo's int4 one)")
    p.add_argument("--turns", type=int, default=300, help="scripted ChatSession turns (0: skip)")
    p.add_argument("--requests", type=int, default=500, help="scripted server requests (0: skip)")
    p.add_argument("--trace_every", type=int, default=50, help="read RSS every this many turns / requests")
    p.add_argument("--max_growth", type=float, default=0.05, help="RSS growth allowed from start to end")
    p.add_argument("--seed", type=int, default=0, help="seed of the script (what is asked, how, when)")
    p.add_argument("--log_dir", type=Path, default=REPO_ROOT / "build" / "soak", help="the server's log goes here")
    args = p.parse_args(argv)
    model = args.model or default_model()
    if model is None or not model.is_file():
        sys.exit(f"no bmodel {'at ' + str(model) if model else 'found'}: pass -m NAME.bmodel, or run "
                 "./run_demo.sh once (or the tests) to build the tiny one")
    os.environ.setdefault("MLLAMA_SIMULATOR_LOG", os.devnull)  # the simulator firmware's chatter
    args.log_dir.mkdir(parents=True, exist_ok=True)
    progress = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731

    soaks = []
    if args.turns > 0:
        soaks.append(run_turns(model, args.turns, args.trace_every, args.seed, progress))
    if args.requests > 0:
        soaks.append(run_requests(model, args.requests, args.log_dir, args.trace_every, args.seed, progress))
    print(f"{model.name}, {os.cpu_count()} CPUs, max growth {args.max_growth:.0%}")
    report(soaks)
    failures = [f for s in soaks for f in s.failures(args.max_growth)]
    for f in failures:
        print(f"FAIL {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    # In-process turns run the simulator: restart once with its yield preload (as pipeline.py).
    from mllama_tpu.cmodel_yield import exec_with_preload

    exec_with_preload(["-m", "bench.soak", *sys.argv[1:]])
    raise SystemExit(main())
