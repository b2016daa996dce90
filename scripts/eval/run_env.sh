# Sourced by the background eval scripts (seeds.sh, retrain_study.sh), after they set HERE:
# run the code of RUN_TREE (a fixed worktree, default HERE) with THREADS torch threads, and
# commit DIR MESSAGE copies a finished result folder from RUN_TREE into RESULT_TREE (the
# checkout that commits, default HERE) and, with COMMIT=1, commits only that folder
# (retrying while another git command holds the index).
RUN_TREE=${RUN_TREE:-$HERE}
RESULT_TREE=${RESULT_TREE:-$HERE}
THREADS=${THREADS:-2}
REL=benchmarks/results/eval
export PYTHONPATH="$RUN_TREE:$RUN_TREE/harness${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS=$THREADS
# waiting OpenMP threads sleep instead of spinning: on the shared cores the niced run wasted
# ~3x its CPU time spinning at barriers (measured: 6.6 vs 2.1 CPU-s per MiniLM step)
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
cd "$RUN_TREE"
python -c 'import rora_fast, sys; print("rora_fast from", rora_fast.__file__, file=sys.stderr)'

commit() {  # folder message
  local dir=$1 msg=$2
  if [ "$RUN_TREE" != "$RESULT_TREE" ]; then
    mkdir -p "$RESULT_TREE/$dir"
    (cd "$RUN_TREE/$dir" && find . -type f ! -name '.*.rora-tmp-*' -print0 \
      | xargs -0 -I{} cp --parents {} "$RESULT_TREE/$dir/")
  fi
  if [ "${COMMIT:-0}" = "1" ] && [ -n "$(cd "$RESULT_TREE" && git status --porcelain -- "$dir")" ]; then
    for i in $(seq 1 20); do
      if [ -e "$RESULT_TREE/.git/index.lock" ]; then sleep 3; continue; fi
      (cd "$RESULT_TREE" && git add -- "$dir" && git commit -q -m "$msg" -- "$dir") && break
      sleep 3
    done
  fi
}
