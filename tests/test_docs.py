"""The docs name what the code has: every benchmark script in both benchmark lists, and the design document
that the README points to."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_benchmark_script_is_listed():
    scripts = sorted(p.name for p in (ROOT / "benchmarks").glob("*.py"))
    for doc in ("README.md", "benchmarks/README.md"):
        text = (ROOT / doc).read_text()
        assert [s for s in scripts if s not in text] == [], f"{doc} does not list them"


def test_the_readme_points_to_the_design_in_the_repository():
    readme = (ROOT / "README.md").read_text()
    assert "docs/design.md" in readme and (ROOT / "docs/design.md").exists()
    assert "../shared" not in readme.split("## ")[0]  # the introduction names no file outside the repository
