"""Print a pip constraints file that pins every requirement of setup.py and harness/setup.py
to its floor
(``name>=X`` -> ``name==X``), for ``scripts/test.sh --lowest``.

setup.py is read, not run: its ``REQUIRES`` and ``EXTRAS`` literals are parsed with
``ast``. torch is the exception: PyPI's Linux wheels of older torch releases are CUDA
builds of several GB, so the lowest job keeps the CPU wheel the quickstart installs
(``TORCH`` below); setup.py says where its floor is tested.

A floor is never pinned below what the *installed* torch itself requires: torch's CUDA
builds pin ``triton==X`` (2.13.0+cu130: triton 3.7.1), the CPU build requires no triton.
So a package the installed torch pins takes torch's version (``--torch-requires`` reads
them from ``importlib.metadata``; the script runs in the venv after torch is installed).
"""
import ast
import os
import re
import sys
from typing import Dict, Iterable, Optional

TORCH = "2.13.0"


def requirements(setup_py: str) -> list:
    tree = ast.parse(open(setup_py, encoding="utf-8").read(), setup_py)
    found = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 \
                and isinstance(node.targets[0], ast.Name) \
                and node.targets[0].id in ("REQUIRES", "EXTRAS"):
            found[node.targets[0].id] = ast.literal_eval(node.value)
    if set(found) != {"REQUIRES", "EXTRAS"}:
        raise SystemExit(f"{setup_py}: REQUIRES and EXTRAS literals not found")
    reqs = list(found["REQUIRES"])
    for extra in found["EXTRAS"].values():
        reqs.extend(extra)
    return reqs


def torch_pins(requires: Optional[Iterable[str]] = None) -> Dict[str, str]:
    """``{name: version}`` of the packages the installed torch pins with ``==`` (for its
    platform: markers are ignored, a pin under a marker that does not hold here is a pin
    pip will not ask for, so it cannot conflict)."""
    if requires is None:
        try:
            from importlib.metadata import PackageNotFoundError, requires as _requires
            requires = _requires("torch") or []
        except PackageNotFoundError:
            return {}
    out = {}
    for r in requires:
        spec, _, marker = r.partition(";")
        if "extra ==" in marker:
            continue
        m = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*==\s*([0-9][0-9A-Za-z.+\-]*)\s*", spec)
        if m:
            out[m.group(1).lower()] = m.group(2)
    return out


def floors(reqs, pinned_by_torch: Optional[Dict[str, str]] = None) -> dict:
    pinned_by_torch = pinned_by_torch or {}
    out = {}
    for r in reqs:
        spec, _, marker = r.partition(";")
        m = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*>=\s*([0-9][0-9A-Za-z.\-]*)\s*", spec)
        if m is None:
            raise SystemExit(f"requirement without a plain '>=' floor: {r!r}")
        name, low = m.group(1).lower(), m.group(2)
        if name == "torch":
            low = TORCH
        elif name in pinned_by_torch:
            low = pinned_by_torch[name]  # what the installed torch requires wins
        if out.get(name, low) != low:
            raise SystemExit(f"two floors for {name}: {out[name]} and {low}")
        out[name] = low + (f" ;{marker}" if marker else "")
    return out


def main() -> int:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    reqs = [r for f in ("setup.py", os.path.join("harness", "setup.py"))
            for r in requirements(os.path.join(root, f))]
    for name, pin in sorted(floors(reqs, torch_pins()).items()):
        print(f"{name}=={pin}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
