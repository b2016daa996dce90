# Sourced by the background eval scripts (seeds.sh, retrain_study.sh): commit DIR MESSAGE
# copies the finished result folder DIR from RUN_TREE (the fixed worktree the run imports
# its code from) into RESULT_TREE (the checkout that commits) and, with COMMIT=1, commits
# only that folder (retrying while another git command holds the index).
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
