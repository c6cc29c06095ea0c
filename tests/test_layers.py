"""The package's import rules (DESIGN.md "Layers"), checked on the source."""

import ast
from pathlib import Path

from minitron_megatron.cli.registry import COMMANDS

PACKAGE = Path(__file__).resolve().parents[1] / "minitron_megatron"


def _imports(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module


def _is_entry_shim(tree: ast.Module) -> bool:
    """A docstring and one `if __name__ == "__main__":` block: a program entry, not library code."""
    body = [n for n in tree.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
    return len(body) == 1 and isinstance(body[0], ast.If) and "__main__" in ast.unparse(body[0].test)


def test_no_library_module_imports_the_cli():
    """Catches library code reaching up into cli/ (Hydra, exit statuses): only the
    `python -m minitron_megatron.<command>` entry shims may, and only under __main__."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if "cli" in path.relative_to(PACKAGE).parts:
            continue
        tree = ast.parse(path.read_text())
        if any(name.startswith("minitron_megatron.cli") for name in _imports(tree)) and not _is_entry_shim(tree):
            offenders.append(str(path.relative_to(PACKAGE)))
    assert not offenders, offenders


def test_only_cli_and_config_import_hydra():
    offenders = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                 if p.relative_to(PACKAGE).parts[0] not in ("cli", "config")
                 and any(n.split(".")[0] in ("hydra", "omegaconf") for n in _imports(ast.parse(p.read_text())))]
    assert not offenders, offenders


def test_every_command_has_a_module_entry_and_a_console_script():
    """Catches a command added to the registry that `python -m` or the console scripts miss."""
    setup_text = (PACKAGE.parent / "setup.py").read_text()
    for name in COMMANDS:
        shim = PACKAGE / f"{name}.py"
        shim = shim if shim.is_file() else PACKAGE / name / "__main__.py"
        assert shim.is_file() and f'main("{name}")' in shim.read_text(), name
        assert f'"minitron-{name}=minitron_megatron.cli:{name}"' in setup_text, name


def _megatron_names(tree: ast.AST) -> set:
    """Local names bound to Megatron objects or modules by this file's imports."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("megatron"):
            names.update(alias.asname or alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.asname for alias in node.names if alias.name.startswith("megatron") and alias.asname)
    return names


def _callee_root(func: ast.expr):
    while isinstance(func, (ast.Attribute, ast.Call)):
        func = func.value if isinstance(func, ast.Attribute) else func.func
    return func.id if isinstance(func, ast.Name) else None


def test_every_call_into_megatron_passes_keywords():
    """Catches a positional call into megatron-core: between 0.16 and 0.19 parameters were
    inserted and removed mid-signature (get_gpt_layer_local_spec lost moe_use_legacy_grouped_gemm,
    initialize_model_parallel gained positional ones), which shifts positional arguments silently."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        megatron = _megatron_names(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and node.args and _callee_root(node.func) in megatron:
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: {ast.unparse(node)[:80]}")
    assert not offenders, "\n".join(offenders)


VERSION_PROBES = ("__version__", "package_info", "metadata.version", "get_megatron_core_version",
                  "is_megatron_core_version", "is_te_min_version")


def test_megatron_core_versions_are_told_apart_in_one_module():
    """Catches a megatron-core version check (a version string, or an import tried and caught)
    outside minitron_megatron/megatron_compat.py, where every version difference lives."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        rel = str(path.relative_to(PACKAGE))
        if rel == "megatron_compat.py":
            continue
        text = path.read_text()
        offenders += [f"{rel}:{number}: {line.strip()}" for number, line in enumerate(text.splitlines(), 1)
                      if "megatron" in line and any(probe in line for probe in VERSION_PROBES)]
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Try) and node.handlers and any(
                    isinstance(n, (ast.Import, ast.ImportFrom)) and any(name.startswith("megatron")
                                                                         for name in _imports(n))
                    for stmt in node.body for n in ast.walk(stmt)):
                offenders.append(f"{rel}:{node.lineno}: a megatron import inside try")
    assert not offenders, "\n".join(offenders)
