"""The user docs (README.md, docs/, benchmarks/README.md): every relative link and every repository path they name
exists, links into a page land on one of its headings, and no path of a development machine or changelog wording is
left in them."""

import re

import pytest
from conftest import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks" / "README.md"]
TOP_LEVEL = (
    "accelerate_configs",
    "benchmarks",
    "configs",
    "data",
    "docs",
    "recipes",
    "scripts",
    "sftmix_trl",
    "tests",
)
# `configs/x.yaml`, `sftmix_trl/data/load.py`, ... anywhere in the text, code blocks included; a path followed by a
# placeholder (`<`, `{`, `*`) is a pattern, not a file
REPO_PATH = re.compile(r"(?<![\w./~-])((?:" + "|".join(TOP_LEVEL) + r")/[\w./-]*)(?![<{*\w./-])")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
MACHINE_PATHS = re.compile(r"\.\./shared|/work/|shared/data")
CHANGELOG = re.compile(r"\b(no longer|former|formerly|on this branch|used to)\b", re.IGNORECASE)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page) -> set[str]:
    return {slug(line.lstrip("#")) for line in page.read_text().splitlines() if line.startswith("#")}


@pytest.mark.parametrize("page", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target}: no {resolved}")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target}: no heading #{anchor} in {resolved.name}")
    assert not broken, "\n".join(broken)


@pytest.mark.parametrize("page", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_repository_path_named_exists(page):
    named = {path.rstrip(".") for path in REPO_PATH.findall(page.read_text())}  # a sentence's full stop
    missing = sorted(path for path in named if not (ROOT / path).exists())
    assert not missing, "\n".join(missing)


@pytest.mark.parametrize("page", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_path_of_a_development_machine_and_no_changelog_wording(page):
    lines = [
        f"{number}: {line.strip()}"
        for number, line in enumerate(page.read_text().splitlines(), start=1)
        if MACHINE_PATHS.search(line) or CHANGELOG.search(line)
    ]
    assert not lines, "\n".join(lines)


def test_the_checker_catches_what_it_should():
    text = (
        "see `configs/demo/sftmix_qlora.yaml`, configs/<model>/x.yaml, `benchmarks/results/*_cuda.md` and data/x.json."
    )
    assert REPO_PATH.findall(text) == ["configs/demo/sftmix_qlora.yaml", "data/x.json."]
    assert slug("What has run on a GPU") == "what-has-run-on-a-gpu"
    assert slug("Merge: `sftmix-trl merge`") == "merge-sftmix-trl-merge"


def test_the_readme_library_map_lists_every_module():
    section = (ROOT / "README.md").read_text().split("## Library", 1)[1].split("\n## ", 1)[0]
    package = ROOT / "sftmix_trl"
    modules = [p for p in package.glob("*.py") if p.name != "__init__.py"] + [
        p for p in package.iterdir() if (p / "__init__.py").is_file()
    ]
    missing = [p.name for p in modules if f"`{p.name}{'/' if p.is_dir() else ''}`" not in section]
    for sub in (p for p in modules if p.is_dir()):
        missing += [
            f"{sub.name}/{m.name}"
            for m in sub.glob("*.py")
            if m.name != "__init__.py" and f"`{m.name}`" not in section
        ]
    assert not missing, f"not in the README's library map: {missing}"
