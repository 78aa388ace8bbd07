"""The examples run end to end (small settings) and write their figures."""
import runpy
import sys
from pathlib import Path

import pytest


def run_example(path, argv, monkeypatch):
    path = str(Path(__file__).resolve().parents[1] / path)
    monkeypatch.setattr(sys, "argv", [path] + argv)
    return runpy.run_path(path, run_name="not_main")


def test_theory_variance_example(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    pytest.importorskip("tqdm")
    ns = run_example("examples/theory_variance.py", [], monkeypatch)
    out = tmp_path / "t.png"
    t1, t2 = ns["main"](["--n", "256", "--m", "64", "--seeds", "40", "--out", str(out)])
    assert out.stat().st_size > 10_000
    assert {r["family"] for r in t1} == {"gaussian", "pareto", "zipf", "all-ones"}
    assert len(t2) == 10


def test_readme_cross_references_name_existing_sections():
    """'see Speed', 'see Learned allocation', ...: every capitalised 'see X'
    in the README names a section that is there (a section once went
    missing while the Status still pointed at it)."""
    import re
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    heads = [h.strip() for h in re.findall(r"^## (.*)$", text, re.M)]
    refs = set(re.findall(r"\bsee ([A-Z][\w-]*(?: [a-z][\w-]*)*)", text))
    assert refs, "the pattern no longer matches the README's references"
    missing = sorted(r for r in refs if not any(h.startswith(r) for h in heads))
    assert not missing, f"README refers to missing sections: {missing}"
