"""Post-hoc evaluations of the seed runs, beside scripts/eval/seeds.sh (issue 14, items 2-3).

Every PERIOD seconds, for each seeds folder: for every finished ``rora`` (``lora``) run with a
saved adapter, the ``rora+repair`` (``lora+rescale+repair``) variant (head-bias refit on
clean dev rows after the rescaling, no retraining) and
the bias analysis (``rora-fast bias``: prediction balance and logit margin on clean test
rows per rescaled block; LoRA runs too); then the aggregate is rewritten, the folder copied
to RESULT_TREE and committed there (only that folder). Never trains: runs still in
progress (no JSON yet) are left to seeds.sh.

    RUN_TREE=/work/seedrun RESULT_TREE=/work/main COMMIT=1 THREADS=2 \\
      nohup nice -n 19 python scripts/eval/seeds_post.py > /tmp/seeds_post.log 2>&1 &
"""
import json
import os
import shutil
import subprocess
import sys
import time

RUN_TREE = os.environ.get("RUN_TREE", os.getcwd())
RESULT_TREE = os.environ.get("RESULT_TREE", RUN_TREE)
sys.path.insert(0, RUN_TREE)
import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("THREADS", "2")))
from rora_harness.bias import _spec_from, run_bias_analysis  # noqa: E402
from rora_harness.poisoning import default_cache_dir  # noqa: E402
from rora_harness.seeds import posthoc_run_id, run_posthoc, write_aggregate  # noqa: E402

REL = "benchmarks/results/eval"
FOLDERS = [f"{REL}/seeds-sst2_sentence-badnet", f"{REL}/seeds-cr-badnet"]
PERIOD = int(os.environ.get("PERIOD", "120"))
STOP_AT = os.environ.get("STOP_AT", "09:28")  # UTC, HH:MM


def log(*a):
    print(time.strftime("%H:%M:%S", time.gmtime()), *a, flush=True)


def commit(rel):
    src, dst = os.path.join(RUN_TREE, rel), os.path.join(RESULT_TREE, rel)
    if src != dst:
        for dp, _, files in os.walk(src):
            for fn in files:
                if ".rora-tmp-" in fn:  # a rora_fast.atomic write in progress
                    continue
                s = os.path.join(dp, fn)
                d = os.path.join(dst, os.path.relpath(s, src))
                os.makedirs(os.path.dirname(d), exist_ok=True)
                shutil.copyfile(s, d)
    if os.environ.get("COMMIT") != "1":
        return
    st = subprocess.run(["git", "status", "--porcelain", "--", rel], cwd=RESULT_TREE,
                        capture_output=True, text=True).stdout
    if not st.strip():
        return
    for _ in range(20):
        if os.path.exists(os.path.join(RESULT_TREE, ".git", "index.lock")):
            time.sleep(3)
            continue
        a = subprocess.run(["git", "add", "--", rel], cwd=RESULT_TREE)
        c = subprocess.run(["git", "commit", "-q", "-m",
                            f"eval results: {os.path.basename(rel)} post-hoc repair and bias "
                            f"analysis (from saved adapters)", "--", rel], cwd=RESULT_TREE)
        if a.returncode == 0 and c.returncode == 0:
            return
        time.sleep(3)


DOCS = ["docs/results.md", "docs/backdoor-bias.md", f"{REL}/bias-balance"]


def refresh_docs():
    """Regenerate the generated tables of docs/results.md and docs/backdoor-bias.md in
    RESULT_TREE (with the library of RUN_TREE) and commit them (only those paths)."""
    env = dict(os.environ, PYTHONPATH=RUN_TREE)
    r = subprocess.run([sys.executable, os.path.join(RESULT_TREE, "scripts", "eval",
                                                     "results_md.py")],
                       cwd=RESULT_TREE, env=env, capture_output=True, text=True)
    log("results_md:", (r.stdout + r.stderr).strip()[-300:])
    if r.returncode != 0 or os.environ.get("COMMIT") != "1":
        return
    for _ in range(20):
        if os.path.exists(os.path.join(RESULT_TREE, ".git", "index.lock")):
            time.sleep(3)
            continue
        a = subprocess.run(["git", "add", "--", *DOCS], cwd=RESULT_TREE)
        st = subprocess.run(["git", "status", "--porcelain", "--", *DOCS], cwd=RESULT_TREE,
                            capture_output=True, text=True).stdout
        if not st.strip():
            return
        c = subprocess.run(["git", "commit", "-q", "-m", "docs: results tables regenerated "
                            "from the seed results (scripts/eval/results_md.py)", "--", *DOCS],
                           cwd=RESULT_TREE)
        if a.returncode == 0 and c.returncode == 0:
            return
        time.sleep(3)


def one_pass():
    cache = default_cache_dir()
    for rel in FOLDERS:
        out = os.path.join(RUN_TREE, rel)
        runs_dir = os.path.join(out, "runs")
        if not os.path.isdir(runs_dir):
            continue
        changed = False
        for fn in sorted(os.listdir(runs_dir)):
            if not fn.endswith(".json"):
                continue
            r = json.load(open(os.path.join(runs_dir, fn)))
            if r.get("kind") != "defence" or not r.get("adapter"):
                continue
            variants = {"rora": ["rora+repair", "rora+repair-acc"],
                        "lora": ["lora+rescale+repair", "lora+rescale+repair-acc"]}.get(
                r["spec"]["method"], [])
            for variant in variants:
                if os.path.exists(os.path.join(
                        runs_dir, posthoc_run_id(r["run_id"], variant) + ".json")):
                    continue
                spec = _spec_from(r["spec"])
                log(f"{variant} {rel} seed {spec.seed}")
                run_posthoc(spec, variant, out, cache, log=log)
                changed = True
        n_before = len(os.listdir(os.path.join(out, "bias", "per_run"))) \
            if os.path.isdir(os.path.join(out, "bias", "per_run")) else 0
        if any(json.load(open(os.path.join(runs_dir, f))).get("adapter")
               for f in os.listdir(runs_dir) if f.endswith(".json")):
            run_bias_analysis(out, os.path.join(out, "bias"), cache, log=log)
            n_after = len(os.listdir(os.path.join(out, "bias", "per_run")))
            changed = changed or n_after != n_before
        if changed:
            write_aggregate(out)
            commit(rel)
            log(f"committed {rel}")
            refresh_docs()


if __name__ == "__main__":
    while True:
        one_pass()
        if time.strftime("%H:%M", time.gmtime()) >= STOP_AT or os.environ.get("ONCE") == "1":
            break
        time.sleep(PERIOD)
