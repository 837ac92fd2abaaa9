"""The terminal front ends of the chat: they render a session's turn events, nothing more.

Scripted (`-q`, one question after another, as text or one JSON line per turn) and interactive
(q/quit/exit ends, clear/new starts over and offers a new image). A refused turn is one
`error:` line and the chat goes on.
"""
from __future__ import annotations

import json
import sys
from typing import Iterable, TextIO

from mllama_tpu.errors import UserError
from mllama_tpu.session import ChatSession, Notice, PromptAccepted, TextPiece, Turn, TurnDone

QUIT_COMMANDS = ("q", "quit", "exit")
RESET_COMMANDS = ("clear", "new")


def turn_json(turn: Turn) -> str:
    return json.dumps({"question": turn.question, "answer": turn.answer, "tokens": turn.tokens,
                       "ftl_s": round(turn.ftl_s, 6), "tps": round(turn.tps, 3)}, ensure_ascii=False)


def stats_line(done: TurnDone) -> str:
    return f"FTL: {done.ftl_s:.3f} s  TPS: {done.tps:.2f} token/s"


def render_turn(session: ChatSession, question: str, out: TextIO, answer_label: str) -> None:
    """Stream one turn as text: the answer as it comes, then notices and the stats line."""
    notices: list[str] = []
    for event in session.turn(question):
        if isinstance(event, PromptAccepted):
            print(answer_label, end="", file=out, flush=True)
        elif isinstance(event, TextPiece):
            print(event.text, end="", file=out, flush=True)
        elif isinstance(event, Notice):
            notices.append(event.text)
        elif isinstance(event, TurnDone):
            done = event
    print(file=out)
    for n in notices:
        print(n, file=out)
    print(stats_line(done), file=out, flush=True)


def run_scripted(session: ChatSession, questions: Iterable[str], as_json: bool, out: TextIO = sys.stdout) -> int:
    """Ask each question in order in one conversation. Returns 0, or 2 if a turn was refused."""
    status = 0
    for q in questions:
        try:
            if as_json:
                turn = session.ask(q)
                print(turn_json(turn), file=out, flush=True)
                for notice in turn.notices:
                    print(notice, file=sys.stderr)
            else:
                print(f"Question: {q}", file=out, flush=True)
                render_turn(session, q, out, "Answer: ")
        except UserError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            status = 2
    return status


def _read(prompt: str, inp: TextIO, out: TextIO) -> str | None:
    """One line from the user, None at end of input."""
    print(prompt, end="", file=out, flush=True)
    line = inp.readline()
    if not line:
        return None
    return line.rstrip("\r\n")


def run_interactive(session: ChatSession, inp: TextIO = sys.stdin, out: TextIO = sys.stdout) -> int:
    """The chat loop: q/quit/exit ends, clear/new starts over (and offers a new image)."""
    print("Type a question; 'clear' or 'new' starts a new conversation, 'q', 'quit' or 'exit' ends.",
          file=out, flush=True)
    while True:
        line = _read("\nQuestion: ", inp, out)
        if line is None:
            print(file=out)
            return 0
        q = line.strip()
        if not q:
            continue
        if q.lower() in QUIT_COMMANDS:
            return 0
        if q.lower() in RESET_COMMANDS:
            _new_conversation(session, inp, out)
            continue
        try:
            render_turn(session, q, out, "\nAnswer: ")
        except UserError as e:
            print(f"error: {e}", file=out, flush=True)
        except KeyboardInterrupt:
            # Ctrl-C while answering stops the answer, not the chat (at the prompt it ends it).
            print("\n(answer interrupted; it is not kept in the history)", file=out, flush=True)


def _new_conversation(session: ChatSession, inp: TextIO, out: TextIO) -> None:
    current = session.image_path or "none"
    line = _read(f"New image path (empty keeps {current}): ", inp, out)
    path = (line or "").strip()
    if path:
        try:
            session.set_image(path)
            print(f"Image: {path}", file=out, flush=True)
            return
        except UserError as e:
            print(f"error: {e}; keeping {current}", file=out, flush=True)
    session.reset()
    print("New conversation.", file=out, flush=True)
