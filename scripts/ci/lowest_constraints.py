"""Print a pip constraints file that pins every requirement of setup.py to its floor
(``name>=X`` -> ``name==X``), for ``scripts/test.sh --lowest``.

setup.py is read, not run: its ``REQUIRES`` and ``EXTRAS`` literals are parsed with
``ast``. torch is the exception: PyPI's Linux wheels of older torch releases are CUDA
builds of several GB, so the lowest job keeps the CPU wheel the quickstart installs
(``TORCH`` below); setup.py says where its floor is tested.
"""
import ast
import os
import re
import sys

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


def floors(reqs) -> dict:
    out = {}
    for r in reqs:
        spec, _, marker = r.partition(";")
        m = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)\s*>=\s*([0-9][0-9A-Za-z.\-]*)\s*", spec)
        if m is None:
            raise SystemExit(f"requirement without a plain '>=' floor: {r!r}")
        name, low = m.group(1).lower(), m.group(2)
        if name == "torch":
            low = TORCH
        if out.get(name, low) != low:
            raise SystemExit(f"two floors for {name}: {out[name]} and {low}")
        out[name] = low + (f" ;{marker}" if marker else "")
    return out


def main() -> int:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for name, pin in sorted(floors(requirements(os.path.join(root, "setup.py"))).items()):
        print(f"{name}=={pin}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
