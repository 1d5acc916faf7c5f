"""Imports flow one way (STYLE.md rule 8): each layer's forbidden imports, checked by parsing the source.

Every import counts, wherever it sits (module level, inside a function, under TYPE_CHECKING), except
where a rule says otherwise.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "cirrus"


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module name, e.g. cirrus.gateway.app
    imported: str  # dotted module name, e.g. cirrus.control.store
    line: int
    type_checking_only: bool

    def __str__(self) -> str:
        only = " (under TYPE_CHECKING)" if self.type_checking_only else ""
        return f"{self.importer}:{self.line} imports {self.imported}{only}"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(path: Path) -> list[Import]:
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[Import] = []

    def visit(node: ast.AST, type_checking: bool) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, True)
            for child in node.orelse:
                visit(child, type_checking)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append(Import(name, alias.name, node.lineno, type_checking))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            found.append(Import(name, module, node.lineno, type_checking))
            # `from cirrus import gateway` imports the submodule cirrus.gateway
            for alias in node.names:
                found.append(Import(name, f"{module}.{alias.name}", node.lineno, type_checking))
        for child in ast.iter_child_nodes(node):
            visit(child, type_checking)

    visit(ast.parse(path.read_text(), str(path)), False)
    return found


def all_imports() -> list[Import]:
    return [imp for path in sorted(PACKAGE.rglob("*.py")) for imp in imports_of(path)]


def is_module(name: str) -> bool:
    """Whether `name` is a module or package of cirrus (not an attribute like cirrus.__version__)."""
    relative = Path(*name.split("."))
    return (PACKAGE.parent / relative).is_dir() or (PACKAGE.parent / relative).with_suffix(".py").is_file()


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def cirrus_imports(importer_prefix: str) -> list[Import]:
    return [
        imp
        for imp in all_imports()
        if within(imp.importer, importer_prefix) and within(imp.imported, "cirrus") and is_module(imp.imported)
    ]


def violations(importer: str, forbidden: list[str], allowed: list[str] | None = None) -> list[str]:
    bad = []
    for imp in cirrus_imports(importer):
        target = imp.imported
        if within(target, importer) or target == "cirrus":
            continue
        if allowed is not None:
            if not any(within(target, a) for a in allowed):
                bad.append(str(imp))
        elif any(within(target, f) for f in forbidden):
            bad.append(str(imp))
    return bad


# --- the parser itself ----------------------------------------------------------------------------


def test_parser_sees_every_kind_of_import(tmp_path: Path) -> None:
    imports = {(i.importer, i.imported, i.type_checking_only) for i in all_imports()}
    assert ("cirrus.gateway.routing", "cirrus.gateway.metrics", False) in imports
    assert ("cirrus", "cirrus.client", True) in imports  # under TYPE_CHECKING
    assert ("cirrus.daemon", "cirrus.control.controller", False) in imports  # inside a function
    assert is_module("cirrus.control.store") and is_module("cirrus.gateway")
    assert not is_module("cirrus.__version__")


# --- the rules ------------------------------------------------------------------------------------

RULES: dict[str, tuple[list[str], list[str] | None]] = {
    # layer: (forbidden prefixes, or None; allowed prefixes, or None)
    "cirrus.gateway": (["cirrus.control"], None),
    "cirrus.replica": (
        ["cirrus.gateway", "cirrus.control", "cirrus.runtimes", "cirrus.daemon", "cirrus.cli", "cirrus.client"],
        None,
    ),
    "cirrus.predictor": ([], ["cirrus.types", "cirrus.settings"]),
    "cirrus.spec": ([], ["cirrus.types", "cirrus.settings", "cirrus.spec_sections"]),
    "cirrus.spec_sections": ([], []),
    "cirrus.control": (["cirrus.gateway"], None),
    "cirrus.runtimes": (["cirrus.control", "cirrus.gateway"], None),
    "cirrus.wire": ([], ["cirrus.types"]),
    # The kinds are shared vocabulary of the gateway and the control plane: neither may they import.
    "cirrus.kinds": ([], ["cirrus.wire", "cirrus.types", "cirrus.spec"]),
    # Snapshots are packed by the client and stored by the daemon: plain files, nothing above them.
    "cirrus.snapshots": ([], ["cirrus.models"]),
    "cirrus.types": ([], []),
    # The standard protocols' codecs and message shapes: pure, below the gateway and the replica.
    "cirrus.protocols": ([], ["cirrus.protocols", "cirrus.types", "cirrus.spec", "cirrus.predictor"]),
}


@pytest.mark.parametrize("layer", sorted(RULES))
def test_layer_imports(layer: str) -> None:
    forbidden, allowed = RULES[layer]
    assert cirrus_imports(layer) or allowed is not None or layer == "cirrus.types", f"no modules under {layer}?"
    bad = violations(layer, forbidden, allowed)
    assert bad == [], f"{layer} imports upward:\n" + "\n".join(bad)


CLIENT_MODULES = ("cirrus.client", "cirrus.client_common", "cirrus.async_client")


def is_client(name: str) -> bool:
    return any(within(name, module) for module in CLIENT_MODULES)


def test_cli_and_client_are_imported_only_from_the_top() -> None:
    """Nothing imports the CLI or the clients, except `cirrus/__init__` (lazily), the CLI (CLI -> client)
    and the clients themselves (both share `client_common`)."""
    bad = []
    for imp in cirrus_imports("cirrus"):
        if not (within(imp.imported, "cirrus.cli") or is_client(imp.imported)):
            continue
        if imp.importer == imp.imported or (is_client(imp.importer) and is_client(imp.imported)):
            continue
        if imp.importer == "cirrus" and imp.type_checking_only:
            continue  # the package's lazy __getattr__ loads them by name at first use
        cli_module = imp.importer == "cirrus.cli" or imp.importer.startswith("cirrus.cli_")
        if cli_module and (is_client(imp.imported) or imp.imported.startswith("cirrus.cli_")):
            continue  # the CLI (its command groups too) is a front end of the client (DESIGN.md: CLI -> client)
        bad.append(str(imp))
    assert bad == [], "\n".join(bad)


def test_testing_helpers_are_not_imported_by_the_product() -> None:
    bad = [
        str(imp)
        for imp in cirrus_imports("cirrus")
        if within(imp.imported, "cirrus.testing") and not within(imp.importer, "cirrus.testing")
    ]
    assert bad == [], "\n".join(bad)


def test_import_cirrus_loads_nothing_heavy() -> None:
    """`import cirrus` at module level imports no other cirrus module (the rest loads lazily)."""
    eager = [imp for imp in imports_of(PACKAGE / "__init__.py") if imp.imported.startswith("cirrus.")]
    assert all(imp.type_checking_only for imp in eager), [str(i) for i in eager]


# --- small rooms ----------------------------------------------------------------------------------

MAX_FUNCTION_LINES = 80
SMALL_FUNCTION_ROOMS = ("control", "gateway", "runtimes", "kinds", "admin.py", "admin_openapi.py", "daemon.py")


def test_no_long_functions_where_the_control_and_data_paths_live() -> None:
    """STYLE.md 'small rooms': a function of the control plane or the gateway reads in one screen."""
    long = []
    for room in SMALL_FUNCTION_ROOMS:
        paths = [PACKAGE / room] if room.endswith(".py") else sorted((PACKAGE / room).rglob("*.py"))
        for path in paths:
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    length = (node.end_lineno or node.lineno) - node.lineno + 1
                    if length > MAX_FUNCTION_LINES:
                        long.append(f"{module_name(path)}.{node.name}: {length} lines")
    assert long == [], "\n".join(long)
