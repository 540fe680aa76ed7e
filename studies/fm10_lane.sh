#!/usr/bin/env bash
# One lane of the 10-run Fashion-MNIST rows in docs/fashion-mnist/records: each METHOD's runs 0-9, one at a time on
# one thread, by the pinned commit's code (a worktree of it), resuming finished runs and checkpoints already there.
#
#   studies/fm10_lane.sh hyperopt optuna &            # lane 1
#   studies/fm10_lane.sh gradient proposed online &   # lane 2
#   studies/fm10_lane.sh proposed_online:--set=hessian=identity
#
# A METHOD may carry extra `run` arguments after a colon, '=' standing for the space inside each argument pair.
# Environment: CODE (default 7544a68), WORKTREE (default /work/code-$CODE), METADISTILL_CACHE (default the records
# folder, whose teachers/ holds the rows' teacher, so that a new machine does not train it again).
set -u
REPO=$(cd "$(dirname "$0")/.." && pwd)
CODE=${CODE:-7544a68}
WORKTREE=${WORKTREE:-/work/code-$CODE}
OUT="$REPO/docs/fashion-mnist/records"
[ -d "$WORKTREE" ] || git -C "$REPO" worktree add "$WORKTREE" "$CODE" >/dev/null || exit 1
export PYTHONPATH="$WORKTREE/src"
export METADISTILL_CACHE=${METADISTILL_CACHE:-$OUT}
for spec in "$@"; do
    method=${spec%%:*}
    extra=()
    if [[ "$spec" == *:* ]]; then
        for arg in ${spec#*:}; do extra+=("${arg%%=*}" "${arg#*=}"); done
    fi
    echo "=== $(date -u +%FT%TZ) start $method ${extra[*]}"
    python -m metadistill.cli run --method "$method" --dataset fashion-mnist --runs 10 --set threads=1 \
        --set batch_runs=1 "${extra[@]}" --out "$OUT" --quiet
    echo "=== $(date -u +%FT%TZ) end $method rc=$?"
done
