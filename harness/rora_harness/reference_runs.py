"""Multi-seed results shipped with the package, so that a single run (the demo's) is
shown beside the spread of its own configuration.

``reference_runs.json`` (next to this module) is written by
``scripts/eval/reference_runs.py`` from committed ``rora-fast seeds`` folders
(``benchmarks/results/eval/seeds-*``): per configuration and method, the seeds and the mean,
95 % t-interval, minimum and maximum of CA, ASR and ASR floor. A configuration is the
run's resolved spec without its seed (:func:`setting_key`): data sizes, schedule, method
and every hyperparameter, so a result is shown only beside a run of exactly that setting.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Dict, Optional

__all__ = ["setting_key", "reference_for", "format_reference", "REFERENCE_FILE"]

REFERENCE_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference_runs.json")
METRICS = ("CA", "ASR", "ASR_floor")


def setting_key(spec: Dict) -> str:
    """Hash of a resolved run spec without its seed (``RunSpec.resolved()`` or a run
    file's ``spec``)."""
    d = {k: v for k, v in spec.items() if k != "seed"}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _load(path: str = REFERENCE_FILE) -> Dict:
    if not os.path.exists(path):
        return {"entries": []}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict) or not isinstance(data.get("entries"), list):
        raise ValueError(f"{path}: not a reference-runs file (no 'entries' list)")
    return data


def reference_for(spec: Dict, path: str = REFERENCE_FILE) -> Optional[Dict]:
    """The shipped multi-seed entry of this run's configuration, or None."""
    key = setting_key(spec)
    for e in _load(path)["entries"]:
        if e.get("setting_key") == key:
            return e
    return None


def format_reference(method: str, entry: Optional[Dict]) -> str:
    """One line for the demo: the spread of ``method``'s configuration over seeds."""
    if entry is None:
        return f"{method}: no multi-seed result of this exact configuration is shipped"
    parts = []
    for m in METRICS:
        s = entry["metrics"][m]
        label = "floor" if m == "ASR_floor" else m
        parts.append(f"{label} {s['mean']:.2f} ± {s['ci95_half']:.2f} "
                     f"(range {s['min']:.2f}–{s['max']:.2f})")
    seeds = ",".join(str(x) for x in entry["seeds"])
    return (f"{method} over {len(entry['seeds'])} seeds ({seeds}) of this configuration, "
            f"mean ± 95 % t-interval: " + "; ".join(parts) + f"  [{entry['source']}]")
