"""A markdown table of pilot runs by VALIDATION accuracy only, for choosing settings (the test split stays unread).

Each subdirectory of PILOT_DIR is one variant's records directory (what `metadistill reproduce --out
PILOT_DIR/NAME ...` wrote); per variant and method it prints the number of runs (and diverged ones), the
mean final validation accuracy and each run's, the final (lambda1, T) of each run, and the wall time per
run. Test accuracy is deliberately not read.

Run: python studies/pilots.py PILOT_DIR [PILOT_DIR ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def rows(root: Path) -> list[str]:
    out = []
    for variant in sorted(p for p in root.iterdir() if p.is_dir()):
        for method_dir in sorted(variant.glob("*/*")):
            results = [json.loads(p.read_text()) for p in sorted(method_dir.glob("run_*/result.json"))]
            diverged = len(list(method_dir.glob("run_*/diverged.json")))
            if not results and not diverged:
                continue
            val = [r["final_val_acc"] for r in results]
            lams = ", ".join(f"({r['final_lambda1']:.2f}, {r['final_temperature']:.2f})" for r in results)
            mean = f"{statistics.mean(val):.4f}" if val else "-"
            # the validation loss at the last evaluation: what the hypergradient methods descend (at t_val)
            loss = f"{statistics.mean(r['evals'][-1]['val_loss'] for r in results):.4f}" if results else "-"
            wall = f"{statistics.mean(r['wall_s'] for r in results):.0f}" if results else "-"
            out.append(f"| {variant.name} | {method_dir.name} | {len(results)} ({diverged}) | {mean} | "
                       f"{' '.join(f'{v:.4f}' for v in val)} | {loss} | {lams} | {wall} |")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", type=Path)
    args = parser.parse_args(argv)
    print("| variant | method | runs (diverged) | final val acc, mean | per run | final val loss, mean "
          "| final (lambda1, T) | wall s / run |")
    print("|---|---|---|---|---|---|---|---|")
    for root in args.dirs:
        print("\n".join(rows(root)))


if __name__ == "__main__":
    main()
