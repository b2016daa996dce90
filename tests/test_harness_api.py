"""The harness (harness/rora_harness and its scripts, scripts/eval) uses rora_fast like any
user: only public names. Public: a name in ``rora_fast.__all__``; a module of rora_fast is
public when its name is in ``rora_fast.__all__`` (as numpy names ``linalg``), and then only
the names in its own ``__all__``. Every other module of rora_fast is internal."""
import ast
import importlib
import os

import pytest

import rora_fast

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HARNESS_DIRS = ("harness/rora_harness", "scripts/eval")


def _public(module: str, name: str) -> bool:
    """Is ``from <module> import <name>`` (or ``<module>.<name>``) public?"""
    parts = module.split(".")
    if parts[0] != "rora_fast":
        return True
    if len(parts) == 1:
        return name in rora_fast.__all__
    if len(parts) == 2 and parts[1] in rora_fast.__all__:
        mod = importlib.import_module(module)
        return name in getattr(mod, "__all__", ())
    return False


def private_uses(source: str, filename: str = "<src>"):
    """Every use of a non-public rora_fast name in ``source``: (line, what)."""
    bad = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and node.module.split(".")[0] == "rora_fast":
            for alias in node.names:
                if not _public(node.module, alias.name):
                    bad.append((node.lineno, f"from {node.module} import {alias.name}"))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "rora_fast" and len(parts) > 1 and \
                        not _public(".".join(parts[:-1]), parts[-1]):
                    bad.append((node.lineno, f"import {alias.name}"))
        elif isinstance(node, ast.Attribute):  # rora_fast.X and rora_fast.M.X
            chain, cur = [node.attr], node.value
            while isinstance(cur, ast.Attribute):
                chain.append(cur.attr)
                cur = cur.value
            if isinstance(cur, ast.Name) and cur.id == "rora_fast":
                chain.reverse()
                module = "rora_fast"
                for name in chain:
                    if not _public(module, name):
                        bad.append((node.lineno, f"{module}.{name}"))
                        break
                    if module != "rora_fast" or name not in rora_fast.__all__ or \
                            not isinstance(getattr(rora_fast, name, None), type(os)):
                        break
                    module = f"rora_fast.{name}"
    return sorted(set(bad))


def _harness_files():
    for d in HARNESS_DIRS:
        for name in sorted(os.listdir(os.path.join(ROOT, d))):
            if name.endswith(".py"):
                yield os.path.join(d, name)


def test_the_checker_catches_private_imports():
    src = ("import rora_fast\nfrom rora_fast.linalg import spectral_basis\n"
           "from rora_fast import _register_source_kernels\nimport rora_fast.bases\n"
           "from rora_fast.loop import _fingerprint\nx = rora_fast.variants.START_INITS\n"
           "y = rora_fast.loop.train\nz = rora_fast.apply_rora\nfrom rora_fast import loop\n")
    assert [what for _, what in private_uses(src)] == [
        "from rora_fast.linalg import spectral_basis",
        "from rora_fast import _register_source_kernels",
        "import rora_fast.bases",
        "from rora_fast.loop import _fingerprint",
        "rora_fast.variants",
    ]


@pytest.mark.parametrize("path", list(_harness_files()))
def test_harness_imports_only_public_names(path):
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        bad = private_uses(f.read(), path)
    assert not bad, f"{path} uses rora_fast internals: " + "; ".join(
        f"line {line}: {what}" for line, what in bad)


def test_public_modules_name_their_api():
    for name in rora_fast.__all__:
        obj = getattr(rora_fast, name)
        if isinstance(obj, type(os)):
            assert obj.__all__ and all(hasattr(obj, n) for n in obj.__all__), name


def test_core_package_holds_no_harness():
    """The library's package carries no datasets and no harness module."""
    core = os.path.join(ROOT, "rora_fast")
    assert not os.path.exists(os.path.join(core, "datasets"))
    assert not os.path.exists(os.path.join(core, "evaluation"))
    for dirpath, _, files in os.walk(core):
        for f in files:
            if f.endswith(".py"):
                with open(os.path.join(dirpath, f), encoding="utf-8") as fh:
                    tree = ast.parse(fh.read())
                for node in ast.walk(tree):
                    mods = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                            [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                    assert not any(m.split(".")[0] == "rora_harness" for m in mods), f
