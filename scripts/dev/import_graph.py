"""Print the import graph of the library (rora_fast/ and kernels/src/ as rora_fast.kernels)
and of the harness (harness/rora_harness): one line per module, its imports within the two
(``*`` marks a lazy one, inside a function), then the cycles, counting lazy imports, the
lines of code per module, and the lines of the library and of the harness.

    python scripts/dev/import_graph.py
"""
import ast
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PKGS = {"rora_fast": os.path.join(ROOT, "rora_fast"),
        "rora_fast.kernels": os.path.join(ROOT, "kernels", "src"),
        "rora_harness": os.path.join(ROOT, "harness", "rora_harness")}


def modules():
    out = {}
    for pkg, d in PKGS.items():
        for dirpath, _, files in os.walk(d):
            if "datasets" in dirpath or "csrc" in dirpath:
                continue
            rel = os.path.relpath(dirpath, d)
            sub = "" if rel == "." else "." + rel.replace(os.sep, ".")
            for f in files:
                if f.endswith(".py"):
                    name = pkg + sub + ("" if f == "__init__.py" else "." + f[:-3])
                    out[name] = os.path.join(dirpath, f)
    return out


def resolve(mod, is_pkg, node):
    base = mod if is_pkg else mod.rpartition(".")[0]
    for _ in range(node.level - 1):
        base = base.rpartition(".")[0]
    if node.level:
        return base + ("." + node.module if node.module else "")
    return node.module


def edges(mods):
    out = {m: {} for m in mods}
    for m, path in mods.items():
        tree = ast.parse(open(path, encoding="utf-8").read())
        is_pkg = path.endswith("__init__.py")
        lazy_nodes = set()
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lazy_nodes.update(id(n) for n in ast.walk(fn))
        for n in ast.walk(tree):
            names = []
            if isinstance(n, ast.ImportFrom):
                tgt = resolve(m, is_pkg, n)
                names = [tgt + "." + a.name for a in n.names]
                if n.module is not None or not n.level:  # not `from . import X`, where an
                    names.append(tgt)                    # X outside mods is a C extension
            elif isinstance(n, ast.Import):
                names = [a.name for a in n.names]
            for t in names:
                while t and t not in mods and getattr(n, "module", "") is not None:
                    t = t.rpartition(".")[0]
                if t in mods and t != m:
                    lazy = id(n) in lazy_nodes
                    out[m][t] = out[m].get(t, True) and lazy
                    break
    return out


def cycles(g):
    found, seen = [], set()

    def dfs(start, node, path):
        for nxt in g[node]:
            if nxt == start and len(path) > 1:
                c = tuple(path)
                key = frozenset(c)
                if key not in seen:
                    seen.add(key)
                    found.append(c)
            elif nxt not in path and nxt > start and len(path) < 6:
                dfs(start, nxt, path + [nxt])
    for s in sorted(g):
        dfs(s, s, [s])
    return found


def main():
    mods = modules()
    g = edges(mods)
    short = lambda m: m.replace("rora_fast.", "") if m != "rora_fast" else "rora_fast"
    for m in sorted(g):
        deps = ", ".join(short(t) + ("*" if lazy else "") for t, lazy in sorted(g[m].items()))
        print(f"{short(m):28s} -> {deps}")
    print("\ncycles (with lazy imports):")
    for c in cycles(g):
        print("  " + " -> ".join(short(x) for x in c + (c[0],)))
    print("\nlines per module (largest first):")
    sizes = sorted(((sum(1 for _ in open(p, encoding="utf-8")), short(m)) for m, p in mods.items()),
                   reverse=True)
    for n, m in sizes[:12]:
        print(f"  {n:5d} {m}")
    harness = [n for n, m in sizes if m.startswith("rora_harness")]
    core = [n for n, m in sizes if not m.startswith("rora_harness")]
    print(f"\ntotal: {sum(n for n, _ in sizes)} lines; the library: {sum(core)} lines in "
          f"{len(core)} modules; the harness: {sum(harness)} lines in {len(harness)} modules")
    back = sorted(m for m in g if not m.startswith("rora_harness")
                  and any(t.startswith("rora_harness") for t in g[m]))
    print(f"library modules importing the harness: {', '.join(back) or 'none'}")


if __name__ == "__main__":
    sys.exit(main())
