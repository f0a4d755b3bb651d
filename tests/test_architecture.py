"""The house plan holds: import-linter's contract, and every public definition says what it is.

`make test` runs `lint-imports` itself; the test here shows the contract is not toothless: the
same contract on a copy of the tree with one stage-to-stage import fails.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.peers import ROOT

PACKAGES = ["airouter", "scp", "router", "inference", "encoders", "dispatch"]
STAGES = ["scp", "router", "inference", "encoders", "dispatch"]


def _lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).parent / "lint-imports"), "--no-cache"],
        cwd=root,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def _copy(tmp_path: Path) -> Path:
    root = tmp_path / "tree"
    root.mkdir()
    shutil.copy(ROOT / "pyproject.toml", root)
    for package in PACKAGES:
        shutil.copytree(
            ROOT / package,
            root / package,
            ignore=shutil.ignore_patterns("__pycache__", "model_repository"),
        )
    return root


def test_the_contract_holds_on_this_tree(tmp_path: Path) -> None:
    result = _lint_imports(_copy(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "broken" not in result.stdout.split("Contracts:")[-1].split(",")[0]


@pytest.mark.parametrize(
    ("module", "line"),
    [
        ("scp/ingest.py", "import router.rules"),  # a stage importing another
        ("encoders/common.py", "import inference.cards"),  # the old encoders -> cards import
        ("airouter/core/db.py", "import airouter.jobs.recorder"),  # the core reaching up
        ("inference/serving/torchscript.py", "import airouter.core.vocab"),  # inside Triton
    ],
)
def test_an_import_against_the_plan_breaks_the_contract(
    tmp_path: Path, module: str, line: str
) -> None:
    root = _copy(tmp_path)
    path = root / module
    text = path.read_text()
    marker = "from __future__ import annotations\n"
    path.write_text(text.replace(marker, f"{marker}\n{line}  # noqa\n", 1))
    result = _lint_imports(root)
    assert result.returncode != 0, result.stdout
    assert "BROKEN" in result.stdout and module.removesuffix(".py").replace("/", ".") in (
        result.stdout
    )


def _public_definitions(path: Path) -> list[tuple[str, ast.AST]]:
    tree = ast.parse(path.read_text())
    found: list[tuple[str, ast.AST]] = [(path.stem, tree)]
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            if node.name.startswith("_"):
                continue
            found.append((node.name, node))
            if isinstance(node, ast.ClassDef):
                for item in node.body:
                    if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef) and not (
                        item.name.startswith("_")
                    ):
                        found.append((f"{node.name}.{item.name}", item))
    return found


def _sources() -> list[Path]:
    files = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "model_repository" in path.parts:
                continue  # Triton's entry points: one line each, named by Triton
            files.append(path)
    return files


def test_every_public_definition_has_a_docstring() -> None:
    """What and why, on every public module, class and function (pynetdicom: 99 %)."""
    missing = []
    for path in _sources():
        for name, node in _public_definitions(path):
            if not ast.get_docstring(node):  # type: ignore[arg-type]
                missing.append(f"{path.relative_to(ROOT)}: {name}")
    assert missing == [], "\n".join(missing)


def test_each_package_says_what_it_owns_and_what_it_may_import() -> None:
    for package in [*STAGES, "airouter", "airouter.core", "airouter.jobs", "airouter.app"]:
        init = ROOT / package.replace(".", "/") / "__init__.py"
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert len(doc) > 120, f"{package}: {doc!r}"
        assert "import" in doc, f"{package} does not say what it may import"
