"""One Fashion-MNIST epoch per method through loaders (random-crop + flip augmentation, the live cnn-small
teacher run on every augmented batch) against the same epoch in memory (precomputed teacher logits, no
augmentation): does every method run from loaders, and what does the live teacher cost per epoch?

Needs the Fashion-MNIST files (as the CLI finds them) and the preset's cached teacher (`metadistill teacher
--dataset fashion-mnist` trains it once). Prints, per method, seconds per epoch both ways and their ratio,
and the final test accuracy of each (one epoch, seed 0: a smoke check, not a result). Every method but pbt
(pbt_search refuses loaders: its exploits copy members' states, and a loader's position cannot be saved).

Run: python studies/loaders_epoch.py [--methods naive,gradient,...] [--threads N]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.data import DataLoader, TensorDataset

from metadistill.config import METHODS, build_config
from metadistill.engine import fit
from metadistill.optuna_search import optuna_search
from metadistill.problem import Loaders
from metadistill.search import hyperopt_search
from metadistill.tasks import load_problem, load_vision_config, train_or_load_teacher
from metadistill.teacher import augment_batch, crop_padding, load_teacher_model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # every method but pbt, which copies members' states at its exploits: runs from loaders cannot checkpoint
    parser.add_argument("--methods", default=",".join(method for method in METHODS if method != "pbt"))
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = build_config("fashion-mnist", ["epochs=1", "hyperopt_trials=2", "optuna_budget=3"])
    train_config = config.train_config()
    data = load_vision_config(config)
    problem, _ = load_problem(config, progress=False, data=data)
    teacher = load_teacher_model(train_or_load_teacher(config, data, progress=False).path)
    generator = torch.Generator().manual_seed(0)
    fill = data.x_train.amin(dim=(0, 2, 3))

    def augment(samples: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = (torch.stack(parts) for parts in zip(*samples))
        return augment_batch(x, crop_padding(x.shape[-1]), fill, generator).contiguous(), y

    loaders = Loaders(
        DataLoader(TensorDataset(data.x_train, data.y_train), batch_size=config.batch_size, shuffle=True,
                   generator=torch.Generator().manual_seed(1), collate_fn=augment),
        DataLoader(TensorDataset(data.x_val, data.y_val), batch_size=config.batch_size, shuffle=True,
                   generator=torch.Generator().manual_seed(2)),
        DataLoader(TensorDataset(data.x_test, data.y_test), batch_size=1000), teacher, problem.make_student)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; 1 epoch "
          f"({len(loaders.train)} steps), seed 0; hyperopt: 2 trials + 1 final, so 3 epochs; "
          "optuna: a budget of 3 epochs")
    print(f"{'method':<16} {'memory s':>9} {'loaders s':>10} {'ratio':>6} {'memory acc':>11} {'loaders acc':>12}")
    for method in args.methods.split(","):
        row = []
        for source in (problem, loaders):
            started = time.perf_counter()
            if method == "hyperopt":
                result = hyperopt_search(source, train_config, 0, config.hyperopt_trials)
            elif method == "optuna":
                result = optuna_search(source, train_config, 0, config.optuna_budget, config.optuna_pruner)
            else:
                result = fit(source, config.strategy(method), train_config, 0)
            row.append((time.perf_counter() - started, result.final_test_acc))
        (memory, memory_acc), (streamed, streamed_acc) = row
        print(f"{method:<16} {memory:>9.1f} {streamed:>10.1f} {streamed / memory:>6.2f} {memory_acc:>11.4f} "
              f"{streamed_acc:>12.4f}")


if __name__ == "__main__":
    main()
