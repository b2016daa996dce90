"""Wall time of one MiniLM defence run, before and after a harness change (issue 29).

Each repetition runs ``rora-fast defend`` once per variant, in a fresh process and a fresh
output folder, the variants interleaved (A B C, B C A, C A B, ...) so that they see the
same machine load. A variant is a source tree and extra options:

* ``before``: the tree given by ``--before-tree`` (a worktree of the commit before the
  change), random batches;
* ``random``: this tree, random batches (the same input tensors as before: its metrics
  must equal ``before``'s bit for bit);
* ``grouped``: this tree, ``--group-by-length`` (length-grouped batches);
* ``micro4``: this tree, random batches each computed in 4 forwards of rows of similar
  length (``--micro-batches 4``: the same batches and loss, less padding);
* ``default``: this tree with no option: the preset's own configuration (since issue 29's
  pick: length-grouped batches, the adaptive rescale judged after the repair, the repair).

``--epochs`` overrides the preset's schedule in every variant (the same for all).

Per run it records the whole run's wall time (process start to exit: imports, loading the
cached poisoned model, SVD bases, training with its dev evaluations, the test evaluations
before and after rescaling), the training loop's seconds, steps and steps/s, and the
metrics. The poisoned model must be cached already (the first run of a cell poisons it;
run one ``rora-fast defend`` of the same cell first): its time is the attacker's, not the
defence's. Writes ``--out``.json/.md/.png with the median wall time per variant and each
variant's speed-up over ``before``, per repetition and overall.

    python -m benchmarks.harness_speed --before-tree /work/run29 --reps 2 \\
        --out benchmarks/results/2026-12-07-cpu-2core-harness-speed
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_once(tree: str, extra, args) -> dict:
    out = tempfile.mkdtemp(prefix="harness-speed-")
    cmd = [sys.executable, "-m", "rora_fast.cli", "defend", "--task", args.task,
           "--methods", args.method, "--preset", args.preset, "--seed", str(args.seed),
           "--threads", str(args.threads), "--out", out] + list(extra)
    # the tree's own harness too (a separate distribution under harness/ since the split;
    # without it the installed harness of another checkout would run against this tree)
    path = [tree] + ([os.path.join(tree, "harness")]
                     if os.path.isdir(os.path.join(tree, "harness", "rora_harness")) else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path), TQDM_DISABLE="1")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed in {tree}:\n{proc.stderr[-3000:]}")
    runs = [p for p in glob.glob(os.path.join(out, "runs", "*.json"))
            if not os.path.basename(p).startswith("poisoned-")]
    if len(runs) != 1:
        raise RuntimeError(f"expected one run JSON in {out}, found {runs}")
    with open(runs[0]) as f:
        r = json.load(f)
    steps = r["train_log"]["steps"]
    return {"wall_s": round(wall, 1), "train_s": r["train_seconds"], "steps": steps,
            "steps_per_s": round(steps / r["train_seconds"], 3), "metrics": r["metrics"],
            "before_rescale": r.get("before_rescale"), "run_id": r["run_id"]}


def git_commit(tree: str) -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tree,
                              capture_output=True, text=True).stdout.strip()
    except OSError:
        return "?"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before-tree", required=True, help="worktree of the commit before")
    ap.add_argument("--variants", default="before,random,grouped")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--task", default="sst2_sentence")
    ap.add_argument("--method", default="rora")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--epochs", type=float, default=None, help="default: the preset's")
    ap.add_argument("--out", required=True, help="path prefix of .json/.md/.png")
    args = ap.parse_args(argv)
    variants = {"before": (os.path.abspath(args.before_tree), []),
                "random": (HERE, ["--no-group-by-length"]),
                "grouped": (HERE, ["--group-by-length"]),
                "micro4": (HERE, ["--no-group-by-length", "--micro-batches", "4"]),
                "default": (HERE, [])}
    if args.epochs is not None:
        variants = {k: (t, extra + ["--epochs", str(args.epochs)])
                    for k, (t, extra) in variants.items()}
    from rora_harness.poisoning import default_cache_dir, poison_key
    from rora_harness.runner import RunSpec, poison_config_for
    cached = os.path.join(default_cache_dir(), poison_key(poison_config_for(RunSpec(
        task=args.task, preset=args.preset, seed=args.seed))))
    if not os.path.isdir(cached):
        ap.error(f"the poisoned model of this cell is not cached ({cached}): run one "
                 f"`rora-fast defend` of it first, so that no variant pays for poisoning")
    names = args.variants.split(",")
    unknown = set(names) - set(variants)
    if unknown:
        ap.error(f"unknown variant(s) {sorted(unknown)}; choose from {', '.join(variants)}")
    rows = []
    for rep in range(args.reps):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            tree, extra = variants[name]
            r = run_once(tree, extra, args)
            r.update(variant=name, rep=rep)
            rows.append(r)
            print(f"rep {rep} {name}: wall {r['wall_s']} s, train {r['train_s']} s, "
                  f"{r['steps_per_s']} steps/s, CA {r['metrics']['CA']} ASR {r['metrics']['ASR']}",
                  flush=True)
    med = {n: statistics.median(r["wall_s"] for r in rows if r["variant"] == n) for n in names}
    sps = {n: statistics.median(r["steps_per_s"] for r in rows if r["variant"] == n) for n in names}
    result = {"setting": vars(args), "commits": {"before": git_commit(args.before_tree),
                                                  "after": git_commit(HERE)},
              "cpu": _cpu(), "rows": rows, "median_wall_s": med, "median_steps_per_s": sps}
    if "before" in names:
        result["speedup_wall"] = {n: round(med["before"] / med[n], 3) for n in names}
        result["speedup_wall_per_rep"] = {
            n: [round(b["wall_s"] / r["wall_s"], 3) for b, r in
                zip([x for x in rows if x["variant"] == "before"],
                    [x for x in rows if x["variant"] == n])] for n in names}
        result["speedup_steps_per_s"] = {n: round(sps[n] / sps["before"], 3) for n in names}
        befores = {json.dumps(r["metrics"], sort_keys=True) for r in rows if r["variant"] == "before"}
        result["random_metrics_equal_before"] = (
            None if "random" not in names else
            {json.dumps(r["metrics"], sort_keys=True) for r in rows if r["variant"] == "random"}
            == befores)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    _write_md(result, args)
    _plot(result, args.out + ".png")
    print(json.dumps({k: result.get(k) for k in ("median_wall_s", "speedup_wall",
                                                 "speedup_steps_per_s",
                                                 "random_metrics_equal_before")}))
    return 0


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            model = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        model = "?"
    return f"{model}, {os.cpu_count()} cores"


def _write_md(res, args) -> None:
    s = res["setting"]
    lines = [f"# Harness speed: one defence run ({s['method']}, {s['task']}, preset "
             f"{s['preset']}, seed {s['seed']}, {s['threads']} threads)", "",
             f"CPU: {res['cpu']}. Commits: before {res['commits']['before']}, after "
             f"{res['commits']['after']}. Command: `python -m benchmarks.harness_speed "
             f"--before-tree <worktree of before> --reps {s['reps']} --variants {s['variants']}`.",
             "", "| variant | rep | wall s | train s | steps | steps/s | CA | ASR |",
             "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['variant']} | {r['rep']} | {r['wall_s']} | {r['train_s']} | "
                     f"{r['steps']} | {r['steps_per_s']} | {r['metrics']['CA']} | "
                     f"{r['metrics']['ASR']} |")
    lines += ["", f"Median wall time: {res['median_wall_s']}."]
    if "speedup_wall" in res:
        lines += [f"Speed-up over before (median wall): {res['speedup_wall']}; per repetition "
                  f"{res['speedup_wall_per_rep']}; steps/s: {res['speedup_steps_per_s']}.",
                  f"Random batches give before's metrics exactly: "
                  f"{res['random_metrics_equal_before']}."]
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")


def _plot(res, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(res["median_wall_s"])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for i, n in enumerate(names):
        ws = [r["wall_s"] for r in res["rows"] if r["variant"] == n]
        ax.scatter([i] * len(ws), ws, color="k", s=12, zorder=3)
        ax.bar(i, res["median_wall_s"][n], color="C%d" % i, alpha=0.7)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names)
    ax.set_ylabel("wall s per defence run")
    s = res["setting"]
    ax.set_title(f"{s['method']} {s['task']} preset {s['preset']}: median bar, runs as dots",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
