"""Where the accuracy gap between the hypergradient methods and the searches comes from, read from records.

For every dataset and method in a records folder (DATASET/METHOD/run_SEED/result.json): the mean test accuracy, final
validation accuracy and final validation loss of its runs. For every search whose runs keep their trials in
result.json (hyperopt; optuna's completed trials), per seed: the validation accuracies of its complete trials,
their median and best; the lift of the best over the median (what choosing the best of several trainings adds
on the scored split); and, for each other method's run of the same seed, where its final validation accuracy
falls among that seed's trials (the fraction of trials it beats). A method that beats about half of a search's
trials behaves like a typical fixed point; the search's lead over it is then the selection, not a better
point found by the search's model.

Validation only: nothing here reads test accuracy except the first table's column, which the records hold.

Run: python studies/gap.py docs/fashion-mnist/records
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from metadistill.records import finished_runs


def complete_trials(record: dict) -> list[float]:
    """Validation accuracies of a search run's trials that trained to the end (pruned and failed ones left out:
    a diverged trial of hyperopt counts, with its chance-level accuracy, since it ran the whole training)."""
    return [trial["val_acc"] for trial in record.get("extra", {}).get("trials", [])
            if trial.get("val_acc") is not None and trial.get("state", "COMPLETE") == "COMPLETE"]


def compare(runs: dict[str, dict[int, dict]]) -> None:
    """Print the tables above for one dataset's {method: {seed: result.json}}."""
    mean = statistics.fmean
    print(f"{'method':16s} {'runs':>4s} {'test acc':>8s} {'val acc':>8s} {'val loss':>8s}")
    for method, by_seed in sorted(runs.items()):
        records = list(by_seed.values())
        test, val = mean(r["final_test_acc"] for r in records), mean(r["final_val_acc"] for r in records)
        loss = mean(r["evals"][-1]["val_loss"] for r in records)
        print(f"{method:16s} {len(records):4d} {test:8.4f} {val:8.4f} {loss:8.4f}")
    for search, by_seed in sorted(runs.items()):
        trials = {seed: complete_trials(record) for seed, record in sorted(by_seed.items())}
        trials = {seed: accs for seed, accs in trials.items() if len(accs) >= 2}
        if not trials:
            continue
        print(f"\n{search}: complete trials per seed (validation accuracy)")
        for seed, accs in trials.items():
            print(f"  seed {seed}: {len(accs)} trials, median {statistics.median(accs):.4f}, best {max(accs):.4f}")
        lifts = [max(accs) - statistics.median(accs) for accs in trials.values()]
        print(f"  best minus median trial: mean {mean(lifts):+.4f} over {len(lifts)} seeds")
        for method, others in sorted(runs.items()):
            common = [seed for seed in trials if seed in others and method != search]
            if not common:
                continue
            beaten = [sum(others[s]["final_val_acc"] > a for a in trials[s]) / len(trials[s]) for s in common]
            above_median = [others[s]["final_val_acc"] - statistics.median(trials[s]) for s in common]
            print(f"  {method:16s} beats {mean(beaten):.0%} of {search}'s trials of its seed (mean over "
                  f"{len(common)} seeds); its val acc minus the median trial's {mean(above_median):+.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a records folder written by metadistill run or reproduce")
    args = parser.parse_args()
    datasets = finished_runs(args.folder)
    if not datasets:
        raise SystemExit(f"no finished runs under {args.folder}")
    for dataset, by_method in sorted(datasets.items()):
        print(f"## {dataset}")
        compare({method: {r["seed"]: r for r in records} for method, records in by_method.items()})


if __name__ == "__main__":
    main()
