"""Docstrings and comments in operator/svcproxy name only repository paths that exist."""

from __future__ import annotations

import io
import re
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "operator" / "svcproxy"
# A repository path: a top-level folder, then at least one more part (a file or a folder).
REPO_PATH = re.compile(
    r"(?<![\w./-])((?:tests|docs|operator|benchmarks|charts|crds|hack|lab)/[\w.*-]+(?:/[\w.*-]+)*)"
)


def _texts(path: Path) -> list[tuple[int, str]]:
    out = []
    for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
        if tok.type in (tokenize.STRING, tokenize.COMMENT):
            out.append((tok.start[0], tok.string))
    return out


def _exists(ref: str) -> bool:
    ref = ref.rstrip(".")
    return (ROOT / ref).exists() or any(ROOT.glob(ref))


def test_named_repository_paths_exist() -> None:
    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for line, text in _texts(path):
            for ref in REPO_PATH.findall(text):
                if not _exists(ref):
                    missing.append(f"{path.relative_to(ROOT)}:{line}: {ref}")
    assert not missing, "docstrings and comments name paths that do not exist:\n" + "\n".join(missing)
