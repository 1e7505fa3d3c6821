"""The import layers hold: the hub and the agent never import each other (nor the CLI), and
``protocol`` and ``common``, which both share, import neither.

Every module under src/outpost is parsed (not imported), so an import inside a function or
under ``if TYPE_CHECKING`` counts as much as one at the top.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = SRC / "outpost"

# A layer may not import these (``outpost.X`` and everything under it).
FORBIDDEN = {
    "hub": ("agent", "cli"),
    "agent": ("hub", "cli"),
    "protocol": ("hub", "agent", "cli"),
    "common": ("hub", "agent", "cli"),
    # outpost-restic-bridge runs on a machine beside restic, with the base dependencies.
    "backup": ("hub", "agent", "cli"),
    # The shipped extensions' programs run on machines as extension handlers, with the
    # agent's Python: they may use protocol and backup (the bridge), nothing of the daemons.
    "extensions": ("hub", "agent", "cli"),
    # The modules' client runs inside module processes, which may have nothing of Outpost's
    # dependencies: of Outpost it may import only the wire format (ALLOWED).
    "modules": ("hub", "agent", "cli", "common", "backup", "extensions"),
}
# A layer that may import nothing of Outpost but these modules (and the packages above them).
ALLOWED = {"modules": ("outpost.protocol.modwire",)}


def _module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported(path: Path, src: Path = SRC) -> list[tuple[int, list[str]]]:
    """Each import statement of ``path`` with its line and the absolute modules it may bring
    in: relative imports are resolved against the module's own package, and
    ``from outpost import hub`` may name the package outpost.hub."""
    name = _module_name(path, src)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[int, list[str]]] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, [alias.name]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            found.append((node.lineno,
                          [module] + [f"{module}.{alias.name}" for alias in node.names]))
    return found


def violations(src: Path = SRC) -> list[str]:
    """``file:line: outpost.LAYER imports MODULE`` for every import that crosses a layer."""
    root = src / "outpost"
    found = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        layer = parts[0] if len(parts) > 1 else None
        if layer not in FORBIDDEN:
            continue
        banned = tuple(f"outpost.{other}" for other in FORBIDDEN[layer])
        allowed = ALLOWED.get(layer)
        for line, modules in imported(path, src):
            crossing = [m for m in modules if m in banned or m.startswith(
                tuple(b + "." for b in banned))]
            if allowed is not None:
                crossing += [m for m in modules if _outside(m, layer, allowed)]
            if crossing:
                found.append(f"{path.relative_to(src)}:{line}: outpost.{layer} imports "
                             f"{crossing[0]}")
    return found


def _outside(module: str, layer: str, allowed: tuple[str, ...]) -> bool:
    """Whether ``module`` is of Outpost, neither ``layer`` itself nor an allowed module
    (nor a package that holds one: ``from outpost.protocol import modwire``)."""
    if module != "outpost" and not module.startswith("outpost."):
        return False
    if module == f"outpost.{layer}" or module.startswith(f"outpost.{layer}."):
        return False
    return not any(module == a or a.startswith(module + ".") for a in allowed)


def test_no_layer_imports_one_it_must_not() -> None:
    assert PACKAGE.is_dir()
    found = violations()
    assert not found, "imports across layers:\n" + "\n".join(found)


def test_every_layer_is_checked() -> None:
    layers = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert layers <= set(FORBIDDEN) | {"cli"}, sorted(layers - set(FORBIDDEN) - {"cli"})


@pytest.mark.parametrize(("layer", "source", "line", "module"), [
    ("hub", "from outpost.agent import runner\n", 1, "outpost.agent"),
    ("hub", "import os\nfrom outpost import cli\n", 2, "outpost.cli"),
    ("hub", "def f() -> None:\n    from ...agent import state\n", 2, "outpost.agent"),
    ("agent", "import outpost.hub.db\n", 1, "outpost.hub.db"),
    ("protocol", "from ...hub import jobs\n", 1, "outpost.hub"),
    ("common", "from outpost.agent.state import atomic_write\n", 1, "outpost.agent.state"),
])
def test_a_crossing_import_is_named_with_its_file_and_line(
        tmp_path: Path, layer: str, source: str, line: int, module: str) -> None:
    root = tmp_path / "outpost"
    (root / layer / "deep").mkdir(parents=True)
    for folder in (root, root / layer, root / layer / "deep"):
        (folder / "__init__.py").write_text("")
    (root / layer / "deep" / "bad.py").write_text(source)
    (root / layer / "fine.py").write_text("from outpost.protocol import models\n"
                                          "from . import deep\nimport json\n")
    assert violations(tmp_path) == [
        f"outpost/{layer}/deep/bad.py:{line}: outpost.{layer} imports {module}"]


def test_the_modules_client_may_import_only_the_wire_format(tmp_path: Path) -> None:
    root = tmp_path / "outpost"
    (root / "modules").mkdir(parents=True)
    (root / "protocol").mkdir()
    for folder in (root, root / "modules", root / "protocol"):
        (folder / "__init__.py").write_text("")
    (root / "modules" / "fine.py").write_text("from outpost.protocol import modwire\n"
                                              "from . import fine\nimport json\n")
    (root / "modules" / "bad.py").write_text("import os\nfrom ..protocol import models\n")
    assert violations(tmp_path) == [
        "outpost/modules/bad.py:2: outpost.modules imports outpost.protocol.models"]
