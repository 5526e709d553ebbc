"""README.md and docs/*.md: every relative link points at a file that exists and, with a #fragment,
at a heading of that file (GitHub's anchors); every repository path written as code (`tests/...`,
`benchmarks/...`) exists. Files move while the docs stay put; this says which doc to update."""
import re
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
# Top-level folders whose paths the docs name in code spans.
TREE = ("benchmarks/", "csrc/", "docs/", "examples/", "fastlstm/", "tests/", ".ci/")

LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(([^)\s]+)\)")
CODE_SPAN = re.compile(r"`([^`\n]+)`")
FENCE = re.compile(r"^\s*(```|~~~)")


def prose_lines(text: str):
    """(line number, line) outside fenced code blocks."""
    fenced = False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield number, line


def github_anchor(heading: str) -> str:
    """The id GitHub gives a Markdown heading: lower case, punctuation and symbols dropped (letters,
    digits, '-', '_' and spaces kept), spaces turned into '-'."""
    text = heading.strip().lower()
    kept = "".join(ch for ch in text
                   if ch in " -_" or unicodedata.category(ch)[0] in "LN")
    return kept.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = github_anchor(m.group(1))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_anchor_rule():
    assert github_anchor("torch.export, torch.jit.trace and inference graphs") == \
        "torchexport-torchjittrace-and-inference-graphs"
    assert github_anchor("C++ without Python") == "c-without-python"
    assert github_anchor("Page faults and glibc's malloc") == "page-faults-and-glibcs-malloc"
    assert github_anchor("A Zen 3-like host (AVX2 only)") == "a-zen-3-like-host-avx2-only"


def test_the_docs_exist():
    assert (ROOT / "README.md").is_file()
    assert len(DOCS) > 1, "docs/ has no Markdown files"


def broken_links(path: Path) -> list[str]:
    broken = []
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        for target in LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            file_part, _, fragment = target.partition("#")
            dest = (path.parent / file_part).resolve() if file_part else path
            where = f"{path.relative_to(ROOT)}:{number}: {target}"
            if not dest.exists():
                broken.append(f"{where} (no such file)")
            elif fragment and (dest.suffix != ".md" or fragment not in anchors(dest)):
                broken.append(f"{where} (no heading with anchor #{fragment} in {dest.name})")
    return broken


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    assert broken_links(path) == []


def missing_paths(path: Path) -> list[str]:
    missing = []
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        for span in CODE_SPAN.findall(line):
            name = span.split("::")[0]  # tests/test_x.py::test_name
            if " " in name or not name.startswith(TREE):
                continue
            # Placeholders (<isa>, {txt,json}, *) and build outputs are not in the tree.
            if any(ch in name for ch in "<{*") or name.endswith(".so"):
                continue
            if not (ROOT / name).exists():
                missing.append(f"{path.relative_to(ROOT)}:{number}: {span}")
    return missing


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_named_repository_paths_exist(path):
    assert missing_paths(path) == []


def test_the_checks_catch_a_broken_link_and_a_missing_path(tmp_path):
    doc = tmp_path / "doc.md"
    (tmp_path / "other.md").write_text("# A heading\n", encoding="utf-8")
    doc.write_text("# Title\n\n[ok](other.md#a-heading) [ok](#title) [bad](missing.md) "
                   "[bad](other.md#no-such-heading)\n\n```\n[in code](ignored.md)\n```\n",
                   encoding="utf-8")
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        found = broken_links(doc)
        doc.write_text("`tests/no_such_file.py` and `tests/` and `fastlstm/_C.abi3.so`\n",
                       encoding="utf-8")
        (tmp_path / "tests").mkdir()
        paths = missing_paths(doc)
    finally:
        ROOT = saved
    assert found == ["doc.md:3: missing.md (no such file)",
                     "doc.md:3: other.md#no-such-heading (no heading with anchor #no-such-heading in other.md)"]
    assert paths == ["doc.md:1: tests/no_such_file.py"]
