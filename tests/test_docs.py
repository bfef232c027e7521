"""The documentation: the README stays short, every page in mkdocs.yml exists, relative links
lead to files that exist, and `mkdocs build --strict` (what `make docs` runs) succeeds with the
network cut off."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README_MAX_LINES = 250

# mkdocs run in a child process whose sockets cannot connect or resolve names: a build that
# needed the network (a theme or plugin fetching something) fails instead of passing here.
OFFLINE_MKDOCS = """
import socket, sys

def _no_network(*args, **kwargs):
    raise OSError("network access during the docs build")

socket.socket.connect = _no_network
socket.socket.connect_ex = _no_network
socket.create_connection = _no_network
socket.getaddrinfo = _no_network
from mkdocs.__main__ import cli

sys.argv = ["mkdocs", *sys.argv[1:]]
cli()
"""


def _nav_pages(nav: list) -> list[str]:
    """Every page file named in mkdocs.yml's nav (nested sections included)."""
    pages = []
    for entry in nav:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        pages += _nav_pages(value) if isinstance(value, list) else [value]
    return pages


def _config() -> dict:
    return yaml.safe_load((ROOT / "mkdocs.yml").read_text())


def _relative_links(text: str) -> list[str]:
    """Targets of Markdown links and images that are relative paths (no URL, no bare anchor),
    outside code blocks and code spans."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:|#", t)]


def test_mkdocs_builds_strictly_and_offline(tmp_path):
    pytest.importorskip("mkdocs", reason="mkdocs is not installed (the dev extra)")
    site = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-c", OFFLINE_MKDOCS, "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for page in _nav_pages(_config()["nav"]):
        assert (site / Path(page).with_suffix(".html")).is_file(), page


def test_every_page_in_the_nav_exists():
    config = _config()
    assert config["docs_dir"] == "docs" and config.get("strict") is True
    pages = _nav_pages(config["nav"])
    assert "index.md" in pages and "ARCHITECTURE.md" in pages
    missing = [p for p in pages if not (DOCS / p).is_file()]
    assert missing == []
    unlisted = sorted(p.name for p in DOCS.glob("*.md") if p.name not in pages)
    assert unlisted == [], "pages in docs/ that mkdocs.yml's nav leaves out"


def test_the_readme_is_short():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, len(lines)


@pytest.mark.parametrize(
    "page", ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in DOCS.glob("*.md"))]
)
def test_relative_links_point_to_existing_files(page):
    path = ROOT / page
    broken = []
    for target in _relative_links(path.read_text()):
        file = target.split("#", 1)[0]
        if not (path.parent / file).exists():
            broken.append(target)
    assert broken == []


def test_the_models_page_shows_the_readme_model_table():
    """docs/models.md repeats the README's generated model table (which test_bundled.py
    checks against the bundled cards), so the two cannot drift apart."""
    from medlens.artifacts.card import TABLE_END, TABLE_START

    def table(text: str) -> str:
        return text[text.index(TABLE_START) : text.index(TABLE_END)]

    readme = (ROOT / "README.md").read_text()
    assert table((DOCS / "models.md").read_text()) == table(readme)


def test_the_link_extractor_skips_urls_anchors_and_code():
    text = "[a](docs/x.md#y) [b](https://e.org) [c](#z) `[d](no.md)` ![e](img.png)\n```\n[f](g.md)\n```"
    assert _relative_links(text) == ["docs/x.md#y", "img.png"]
