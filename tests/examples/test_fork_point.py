"""The fork point: the examples are a removable part. ``examples.txt`` names every path a
fork deletes (the examples' code, tests, and every file under configs/ and scripts/ that
names them), and the machinery (``src/train_template/``, the remaining configs and scripts,
the machinery's tests) names no example. ``scripts/test.sh`` runs the machinery's tests in
a copy of the checkout with these paths deleted: that run is the proof that the template
works without them."""

from __future__ import annotations

import re

from conftest import REPO

# How a file names an example: its package, its configs, its data or its scripts.
NAMES_AN_EXAMPLE = re.compile(
    r"examples\.(?!txt)|examples/|digits|configs/lm\b|\blm/|stdlib|prepare_data|prepare_lm_data"
    r"|ClassifierModule"
)


def listed() -> list[str]:
    lines = (REPO / "examples.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def is_listed(path: str, entries: list[str]) -> bool:
    return any(path == entry or path.startswith(entry + "/") for entry in entries)


def files_under(*folders: str) -> list[str]:
    return sorted(
        str(path.relative_to(REPO))
        for folder in folders
        for path in (REPO / folder).rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    )


def test_every_listed_path_exists():
    assert all((REPO / entry).exists() for entry in listed())


def test_every_config_and_script_that_names_an_example_is_listed():
    entries = listed()
    naming = [
        p
        for p in files_under("configs", "scripts")
        if NAMES_AN_EXAMPLE.search((REPO / p).read_text())
    ]
    assert naming and all(is_listed(p, entries) for p in naming), [
        p for p in naming if not is_listed(p, entries)
    ]


def test_the_machinery_and_its_tests_name_no_example():
    entries = listed()
    kept = [
        p
        for p in [*files_under("src/train_template", "tests"), "train.py", "pyproject.toml"]
        if not is_listed(p, entries) and p.endswith((".py", ".yaml", ".toml", ".sh"))
    ]
    naming = [
        p for p in kept if re.search(r"\bexamples\.[a-z]|src/examples", (REPO / p).read_text())
    ]
    assert naming == []
