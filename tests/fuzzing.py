"""Fuzz scripts run in a fresh Python process: a memory error there kills
that interpreter and fails the test, instead of taking pytest down with it
(and scripts/asan runs the same processes with AddressSanitizer).

A script's body calls ``attempt(lambda: ...)`` for each call it makes: a
result or TypeError / ValueError / IndexError is fine, any other exception
is counted and fails the test."""
import os
import subprocess
import sys
import textwrap

_PRELUDE = """
ok = err = 0
other = {}


def attempt(call):
    global ok, err
    try:
        call()
        ok += 1
    except (TypeError, ValueError, IndexError):
        err += 1
    except Exception as e:
        key = type(e).__name__ + ": " + str(e)[:120]
        other[key] = other.get(key, 0) + 1
"""

_EPILOGUE = """
print(ok, err, len(other))
for key, count in other.items():
    print(key, count)
"""


def run(body):
    """Run ``body`` (indented as in a test: it is dedented) after the
    prelude; fail on a crash, on any other exception, or when the inputs
    gave only results or only errors (a fuzz that tests nothing)."""
    code = _PRELUDE + textwrap.dedent(body) + _EPILOGUE
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ))
    assert res.returncode == 0, res.stderr[-3000:]
    ok, err, other = map(int, res.stdout.split("\n")[0].split())
    assert other == 0, res.stdout
    assert ok > 0 and err > 0, res.stdout


def outputs_by_threads(code, counts=("1", "2", "3"), **env_extra):
    """{thread count: what ``code`` prints} with OMP_NUM_THREADS at each count,
    each in a fresh process (the thread count is fixed at start-up): tests
    that a result is the same bits on any thread count compare these.
    ``env_extra``: more of the environment (OMP_THREAD_LIMIT=...)."""
    outs = {}
    for n in counts:
        env = dict(os.environ, OMP_NUM_THREADS=n, **env_extra)
        outs[n] = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                                 text=True, check=True).stdout
    return outs
