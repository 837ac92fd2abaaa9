"""What every fuzz test (tests/test_fuzz_*.py) shares: bounded, repeatable hypothesis settings and
the one property of a parser's refusal.

CI runs the same examples every time (derandomize): a failure found once is found again, and the
run time is bounded by max_examples, not by luck.
"""
from __future__ import annotations

import json

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from mllama_tpu.errors import UserError


def bounded(max_examples: int, deadline_ms: int | None = 5000) -> settings:
    # The machine is shared and slow: a deadline only catches a hang, not a slow example.
    return settings(max_examples=max_examples, deadline=deadline_ms, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


def assert_clear(error: Exception, *names: str) -> str:
    """A refusal a user can act on: one line that names what (the file or field) was wrong."""
    message = str(error)
    assert isinstance(error, UserError) or hasattr(error, "status"), f"{type(error).__name__}: {message}"
    assert message and "\n" not in message, f"not one line: {message!r}"
    assert "Traceback" not in message
    for name in names:
        assert name in message, f"{message!r} does not name {name!r}"
    return message


def floats(*args, **kw):
    """st.floats without subnormals: once a test of the run has loaded the engine, the simulator's
    libraries have switched this process to flush-to-zero, and hypothesis refuses to draw
    subnormal floats it cannot represent (FloatingPointError)."""
    return st.floats(*args, allow_subnormal=False, **kw)


# Any JSON value, small.
JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | floats(allow_nan=False)
                    | st.text(max_size=12),
                    lambda x: st.lists(x, max_size=4) | st.dictionaries(st.text(max_size=8), x, max_size=4),
                    max_leaves=8)


@st.composite
def mutated(draw, doc):
    """`doc` with one value somewhere in it replaced by any JSON value, or removed."""
    doc = json.loads(json.dumps(doc))
    parent, key = None, None
    node = doc
    while isinstance(node, (dict, list)) and node and (parent is None or draw(st.booleans())):
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        parent, key = node, draw(st.sampled_from(keys))
        node = node[key]
    if parent is None:
        return draw(JSON)
    if draw(st.integers(0, 3)) == 0:
        del parent[key]
    else:
        parent[key] = draw(JSON)
    return doc
