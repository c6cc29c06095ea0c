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
