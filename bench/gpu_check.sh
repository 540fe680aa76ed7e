#!/usr/bin/env bash
# GPU readiness check, one short script (under 8 minutes on a GPU): the tests that have a cuda variant,
# the per-step cost and throughput benchmarks on cuda, and one Fashion-MNIST epoch per method on cuda.
# Run from the repository root on a machine with a CUDA GPU and the project installed (pip install -e '.[test]').
# It prints ratios and times; nothing here runs on a machine without a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU: nothing to check')" || exit 1
python -c "import torch; print('GPU:', torch.cuda.get_device_name(0), '| torch', torch.__version__)"
echo "== tests with a cuda variant"
timeout 150 python -m pytest -q -k cuda tests/test_reference.py tests/test_online.py
echo "== bench/hypergrad_cost.py --device cuda"
timeout 120 python bench/hypergrad_cost.py --device cuda --repeats 10 --budget 60
echo "== bench/throughput.py --device cuda"
timeout 120 python bench/throughput.py --device cuda --rounds 2
echo "== one Fashion-MNIST epoch per method on cuda (needs the data: --data-dir or \$METADISTILL_DATA)"
out=$(mktemp -d)
for method in no_distillation naive random gradient proposed online proposed_online hyperopt; do
    start=$(date +%s.%N)
    timeout 90 python -m metadistill.cli run --dataset fashion-mnist --method "$method" --runs 2 --epochs 1 \
        --set hyperopt_trials=1 --set teacher_epochs=1 --device cuda --out "$out" --quiet > /dev/null
    code=$?
    echo "$method: exit $code, $(python -c "import time; print(f'{time.time() - $start:.1f}')") s for 2 runs x 1 epoch"
done
rm -rf "$out"
