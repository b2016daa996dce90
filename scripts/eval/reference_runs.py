"""Write harness/rora_harness/reference_runs.json from committed `rora-fast seeds` folders.

    python scripts/eval/reference_runs.py benchmarks/results/eval/seeds-demo-sst2_sentence-badnet [...]
    python scripts/eval/reference_runs.py ... study:ep12g:0.75:repair

``study:SCHEDULE:FACTOR[:repair]``: the rescale at FACTOR x the paper's scale (+ the repair)
of the RoRA runs of an adaptive-study schedule (scripts/eval/adaptive_study.py), read from
its per-seed records: the study re-applies that rung to each committed adapter, which is what
``defend --rescale-factor FACTOR [--repair]`` does after training (its paper rung and its
repaired paper rung reproduce the committed runs' metrics to the digit), so it is entered
under that trained configuration's spec, one entry per cell.
``study:SCHEDULE:adaptive:F,F,...:TOL[:repair]``: the adaptive rescale over those factors
within TOL (judged after the repair when it follows, as the harness does), replayed on the
recorded dev accuracies (``adaptive_study.py --verify`` runs the harness's own path against
the replay).

For every trained method of each folder's seeds.json, the per-seed run files are read,
their specs must agree apart from the seed (else an error), and the entry records the seeds
and each metric's mean, 95 % t-interval (rora_harness.seeds.mean_ci), minimum and
maximum. Post-hoc variants are skipped (their run files carry the trained run's spec),
except those equal to a trained configuration (``EQUIVALENT``): ``rora+adaptive`` from a
saved adapter is exactly ``defend --rescale adaptive`` of the same run (tests/test_seeds.py),
so it is entered under that configuration's spec. The file is written atomically.
"""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


#: post-hoc variant -> the RunSpec fields of the trained configuration it equals
EQUIVALENT = {"rora+adaptive": {"rescale": "adaptive"}, "rora+repair": {"repair": True},
              "rora+adaptive+repair": {"rescale": "adaptive", "repair": True}}


def trained_spec(spec: dict, fields: dict) -> dict:
    """The resolved spec of ``spec``'s run with ``fields`` changed."""
    import dataclasses
    from rora_harness.bias import _spec_from
    return dataclasses.replace(_spec_from(spec), **fields).resolved()


def spread(rows) -> dict:
    """Per metric of ``rows`` (dicts of CA / ASR / ASR_floor, one per seed): mean, 95 %
    t-interval half-width, sd, min, max, n."""
    from rora_harness.reference_runs import METRICS
    from rora_harness.seeds import mean_ci
    metrics = {}
    for k in METRICS:
        xs = [float(r[k]) for r in rows]
        s = mean_ci(xs)
        metrics[k] = {"mean": s["mean"], "ci95_half": s["ci95_half"], "sd": s["sd"],
                      "min": min(xs), "max": max(xs), "n": s["n"]}
    return metrics


def entries_of(folder: str):
    from rora_harness.reference_runs import setting_key

    with open(os.path.join(folder, "seeds.json"), encoding="utf-8") as f:
        agg = json.load(f)
    for method, m in agg["methods"].items():
        runs = []
        for seed, row in sorted(m["per_seed"].items(), key=lambda kv: int(kv[0])):
            with open(os.path.join(folder, row["file"]), encoding="utf-8") as f:
                run = json.load(f)
            if run.get("kind") == "posthoc" or "from_run" in run:
                if method not in EQUIVALENT:
                    runs = None
                    break
                run = dict(run, spec=trained_spec(run["spec"], EQUIVALENT[method]))
            runs.append(run)
        if not runs:
            continue
        keys = {setting_key(r["spec"]) for r in runs}
        if len(keys) != 1:
            raise SystemExit(f"{folder} {method}: the seeds' specs differ beyond the seed")
        metrics = spread([r["metrics"] for r in runs])
        spec = {k: v for k, v in runs[0]["spec"].items() if k != "seed"}
        yield {"setting_key": keys.pop(), "method": method, "spec": spec,
               "seeds": [int(r["spec"]["seed"]) for r in runs], "metrics": metrics,
               "source": os.path.relpath(os.path.abspath(folder), ROOT)}


def study_entries(source: str):
    """The entries of ``study:SCHEDULE:FACTOR[:repair]`` (module docstring), per cell."""
    from rora_harness.reference_runs import setting_key
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from adaptive_study import choose
    parts = source.split(":")
    adaptive = len(parts) > 2 and parts[2] == "adaptive"
    n = 5 if adaptive else 3
    if len(parts) not in (n, n + 1) or (len(parts) == n + 1 and parts[n] != "repair"):
        raise SystemExit(f"{source}: expected study:SCHEDULE:FACTOR[:repair] or "
                         f"study:SCHEDULE:adaptive:F,F,...:TOL[:repair]")
    schedule, repaired = parts[1], len(parts) == n + 1
    if adaptive:
        factors, tol = tuple(float(x) for x in parts[3].split(",")), float(parts[4])
    else:
        factor = float(parts[2])
    runs_dir = os.path.join(ROOT, "benchmarks", "results", "eval", "adaptive-study", "runs")
    by_cell = {}
    for fn in sorted(os.listdir(runs_dir)):
        with open(os.path.join(runs_dir, fn), encoding="utf-8") as f:
            rec = json.load(f)
        if rec.get("schedule") == schedule:
            by_cell.setdefault(rec["cell"], []).append(rec)
    if not by_cell:
        raise SystemExit(f"{source}: no adaptive-study records of schedule {schedule!r}")
    for cell, recs in sorted(by_cell.items()):
        rows, specs = [], []
        for rec in sorted(recs, key=lambda r: r["seed"]):
            with open(os.path.join(ROOT, rec["from_run"]), encoding="utf-8") as f:
                run = json.load(f)
            layers = run["spec"]["rescale_layers"]
            if adaptive:
                rung = choose(rec["rungs"], [(layers, f) for f in factors], tol,
                              acc="dev_acc_repaired" if repaired else "dev_acc")
                fields = {"rescale": "adaptive", "rescale_factors": factors,
                          "rescale_tolerance": tol, "rescale_judge": None}
            else:
                rung = next(x for x in rec["rungs"] if (x["layers"], x["factor"]) ==
                            (layers, factor))
                fields = {"rescale": "paper", "rescale_factor": factor}
            rows.append(rung["test_repaired" if repaired else "test"])
            specs.append(trained_spec(run["spec"], {**fields, "repair": repaired}))
        keys = {setting_key(s) for s in specs}
        if len(keys) != 1:
            raise SystemExit(f"{source} {cell}: the seeds' specs differ beyond the seed")
        metrics = spread(rows)
        yield {"setting_key": keys.pop(), "method": "rora" + ("+repair" if repaired else ""),
               "spec": {k: v for k, v in specs[0].items() if k != "seed"},
               "seeds": [int(s["seed"]) for s in specs], "metrics": metrics,
               "source": os.path.relpath(runs_dir, ROOT),
               "rung": f"{schedule}: " + (f"adaptive {parts[3]} within {tol:g}" if adaptive
                                          else f"top {specs[0]['rescale_layers']} x{factor:g}")
                       + (" + repair" if repaired else "")}


def main(argv) -> int:
    from rora_fast.atomic import write_json
    from rora_harness.reference_runs import REFERENCE_FILE

    entries = [e for src in argv
               for e in (study_entries(src) if src.startswith("study:") else entries_of(src))]
    write_json(REFERENCE_FILE, {"written_by": "scripts/eval/reference_runs.py " + " ".join(argv),
                                "entries": entries})
    for e in entries:
        print(e["method"], e["source"], e["seeds"],
              {k: (v["mean"], v["ci95_half"]) for k, v in e["metrics"].items()})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
