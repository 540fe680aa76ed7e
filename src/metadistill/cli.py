"""The `metadistill` command: run, reproduce, report."""

from __future__ import annotations

import argparse
import errno
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from .config import (
    DATASETS,
    DEFAULT_METHODS,
    METHOD_HELP,
    METHODS,
    ConfigError,
    ExperimentConfig,
    build_config,
    preset,
    require_device,
    setting_names,
)
from .data.vision import DataError
from .experiment import EXECUTORS, GridBusy, GridUnfinished, run_ddp, run_experiment
from .optuna_search import require_optuna
from .pbt import require_tune
from .plots import write_figures
from .processes import WorkerDied
from .records import RecordError, check_writable, finished_runs
from .report import summarize, text_table, write_report
from .results import DivergenceError
from .runtime import keep_freed_memory
from .tasks import load_vision_config, train_or_load_teacher

EXIT_USAGE = 2
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, a scheduler's stop), handled like Ctrl-C: finished work is kept."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump) and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"metadistill: error: {message} (see '{self.prog} --help')", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _int_at_least(minimum: int, name: str) -> Callable[[str], int]:
    """An argparse type: an integer >= minimum, described as `name` in errors."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {name}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {name}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1, "a positive integer")
_non_negative_int = _int_at_least(0, "an integer >= 0")


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", required=True, choices=DATASETS, help="experiment of the paper to run")
    parser.add_argument("--data-dir", help="folder with the official dataset files (Fashion-MNIST's four IDX files, "
                        "gzipped or not, directly or under FashionMNIST/raw/; CIFAR-10's cifar-10-batches-py/); "
                        "otherwise $METADISTILL_DATA, then /usr/share/datasets/fashion-mnist (Debian package "
                        "dataset-fashion-mnist) are searched")
    parser.add_argument("--download", action="store_true", help="download missing dataset files with torchvision")
    parser.add_argument("--quick", action="store_true",
                        help="the preset's quick variant: a small subset, 1-2 epochs, 2 runs (for smoke tests)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting of the dataset's preset, repeatable; e.g. --set lambda1=0.3 "
                             "--set temperature=4 (fix naive's / initialise gradient and proposed), --set "
                             "meta_lr=0.1, --set window=10 --set period=2. Settings: " + ", ".join(setting_names()))
    parser.add_argument("--device", help="shorthand for --set device=D (cpu, cuda)")


def _add_experiment_options(parser: argparse.ArgumentParser) -> None:
    _add_data_options(parser)
    parser.add_argument("--runs", type=_positive_int,
                        help="number of runs per method; run r uses seed r for every method "
                             "(default: the preset's, 10; 2 with --quick)")
    parser.add_argument("--first-seed", type=_non_negative_int, default=0,
                        help="seed of the first run (default 0): runs use seeds FIRST .. FIRST + runs - 1; pilot "
                             "runs that choose settings use seeds outside the reported ones (e.g. 100)")
    parser.add_argument("--retry-diverged", action="store_true",
                        help="train again the runs recorded as diverged (by default they are kept, listed, and the "
                             "command exits 1)")
    parser.add_argument("--out", type=Path, default=Path("runs"),
                        help="records directory: DATASET/METHOD/run_SEED/ with config.json, history.jsonl, "
                             "result.json; report.md, results.csv and runs.csv at its top (default ./runs)")
    parser.add_argument("--epochs", type=_positive_int, help="shorthand for --set epochs=N")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or per-run lines")
    parser.add_argument("--executor", choices=EXECUTORS, default="local",
                        help="local: the tasks in this process, or in --workers processes (default); ray: each task "
                             "(a method's batch of batch_runs runs) as a Ray task declaring `threads` CPUs (1 if 0) "
                             "and a GPU on cuda; needs pip install 'metadistill[ray]'")
    parser.add_argument("--workers", type=_positive_int,
                        help="local executor: train N tasks at a time, each in a worker process (default: as many "
                             "as the CPUs hold when `threads` is pinned, as the synthetic preset's 1 is: 2 on a "
                             "2-core machine; else 1, this process)")
    parser.add_argument("--ray-address", help="address of a running Ray cluster, for --executor ray and the pbt "
                                              "method (default: start a local Ray runtime)")
    parser.add_argument("--ray-num-cpus", type=_positive_int,
                        help="CPUs of the local Ray runtime (default: all); ignored with --ray-address")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="metadistill", description="Tune knowledge-distillation metaparameters (lambda1, T) "
                     "with gradient methods, and reproduce the paper's experiments.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    methods = "; ".join(f"{name}: {text}" for name, text in METHOD_HELP.items())
    run = commands.add_parser("run", help="runs of one method", description="Train --runs students with one "
                              "method and print the results table. Finished runs under --out are skipped.")
    run.add_argument("--method", required=True, choices=METHODS, help=methods)
    _add_experiment_options(run)
    run.add_argument("--ddp", action="store_true",
                     help="train each run's student data-parallel over the ranks of a torchrun launch (gloo on "
                          "CPU, nccl on cuda): torchrun --nproc-per-node 2 -m metadistill.cli run ... --ddp")
    run.set_defaults(func=_run)
    reproduce = commands.add_parser("reproduce", help="the paper's methods and ours on one dataset",
                                    description="Run the methods (default " + ", ".join(DEFAULT_METHODS) + ") --runs "
                                    "times with the dataset's preset, write report.md, results.csv and runs.csv under "
                                    "--out, print the table. Rerunning resumes: finished runs are skipped.")
    reproduce.add_argument("--methods", help="comma-separated methods (default: " + ", ".join(DEFAULT_METHODS) +
                           "; also: " + ", ".join(m for m in METHODS if m not in DEFAULT_METHODS) + ")")
    _add_experiment_options(reproduce)
    reproduce.set_defaults(func=_reproduce)
    report = commands.add_parser("report", help="rebuild report.md, results.csv and runs.csv from the records in DIR",
                                 description="Rebuild report.md, results.csv and runs.csv from the records alone.")
    report.add_argument("dir", type=Path, help="a records directory written by run or reproduce")
    report.set_defaults(func=_report)
    plot = commands.add_parser("plot", help="rebuild the figures (PNG) from the records in DIR",
                               description="Rebuild DIR/figures/*.png (trajectories of lambda1 and T, test accuracy "
                               "against epoch, accuracy against cost) and report.md from the records alone.")
    plot.add_argument("dir", type=Path, help="a records directory written by run or reproduce")
    plot.set_defaults(func=_plot)
    teacher = commands.add_parser("teacher", help="train (or load from the cache) the teacher of an image dataset",
                                  description="Train the dataset's teacher with flip + crop augmentation on the "
                                  "train split, or load it from the cache (checkpoint, train-set logits, test "
                                  "accuracy), keyed by everything that determines it.")
    _add_data_options(teacher)
    teacher.add_argument("--arch", help="teacher architecture (default: the preset's teacher_arch)")
    teacher.add_argument("--quiet", action="store_true", help="no progress bars")
    teacher.set_defaults(func=_teacher)
    return parser


def _config(args: argparse.Namespace, extra: list[str]) -> ExperimentConfig:
    overrides = list(args.overrides) + extra
    if args.device is not None:
        overrides.append(f"device={args.device}")
    if args.data_dir is not None:
        overrides.append(f"data_dir={args.data_dir}")
    if args.download:
        overrides.append("download=true")
    config = build_config(args.dataset, overrides, quick=args.quick)
    if getattr(args, "executor", "local") != "ray":  # a Ray head without a GPU may hand cuda runs to workers with one
        require_device(config.device)
    return config


def _teacher(args: argparse.Namespace) -> int:
    config = _config(args, [f"teacher_arch={args.arch}"] if args.arch else [])
    if config.dataset == "synthetic":
        raise ConfigError("the synthetic task's teacher is trained with its data; use run or reproduce")
    data = load_vision_config(config)
    teacher = train_or_load_teacher(config, data, progress=not args.quiet)
    how = f"trained in {teacher.seconds:.0f} s" if teacher.trained else "loaded from the cache"
    print(f"{config.dataset} teacher {teacher.arch}: test accuracy {teacher.test_acc:.4f} ({how}; {teacher.path})")
    return 0


def _experiment(args: argparse.Namespace, methods: list[str]) -> int:
    config = _config(args, [f"epochs={args.epochs}"] if args.epochs is not None else [])
    if not args.quiet:
        given = {item.partition("=")[0].strip().replace("-", "_") for item in args.overrides}
        for method in methods:
            unused = sorted(given & set(config.ignored(method)))
            if unused:
                print(f"note: {method} ignores {', '.join(unused)} (left out of its runs' identity)", file=sys.stderr)
    for method, require in (("optuna", require_optuna), ("pbt", require_tune)):
        if method in methods:
            try:
                require()
            except ImportError as error:
                raise ConfigError(str(error)) from None
    check_writable(args.out)
    runs = args.runs or preset(args.dataset, args.quick).get("runs", 10)
    seeds = list(range(args.first_seed, args.first_seed + runs))
    if args.executor != "local" and args.workers:
        raise ConfigError("--workers is for the local executor (Ray places the tasks of --executor ray itself)")
    if args.executor != "ray" and "pbt" not in methods and (args.ray_address or args.ray_num_cpus):
        raise ConfigError("--ray-address and --ray-num-cpus need --executor ray or the pbt method")
    unfinished: GridUnfinished | None = None
    try:
        if getattr(args, "ddp", False):
            if args.executor != "local" or args.workers:
                raise ConfigError("--ddp runs under torchrun, not with --executor ray or --workers")
            ddp_results = run_ddp(config, methods[0], seeds, args.out, quiet=args.quiet,
                                  retry_diverged=args.retry_diverged)
            if ddp_results is None:  # not rank 0: rank 0 writes the records and the report
                return 0
            results = ddp_results
        else:
            results = run_experiment(config, methods, seeds, args.out, quiet=args.quiet, executor=args.executor,
                                     ray_address=args.ray_address, ray_num_cpus=args.ray_num_cpus,
                                     retry_diverged=args.retry_diverged, workers=args.workers)
    except GridUnfinished as error:  # the other runs finished: report them, then exit 1 listing the rest
        results, unfinished = error.results, error
    write_figures(args.out)
    write_report(args.out)
    print(text_table(summarize(config.dataset, results)))
    print(f"records, report.md, results.csv, runs.csv and figures/ in {args.out}")
    if unfinished is not None:
        raise unfinished
    return 0


def _run(args: argparse.Namespace) -> int:
    return _experiment(args, [args.method])


def _reproduce(args: argparse.Namespace) -> int:
    methods = list(DEFAULT_METHODS)
    if args.methods:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = [m for m in methods if m not in METHODS]
        if unknown or not methods:
            raise ConfigError(f"unknown method(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(METHODS)}")
    return _experiment(args, methods)


def _plot(args: argparse.Namespace) -> int:
    _require_records(args.dir)
    made = write_figures(args.dir)
    write_report(args.dir)
    for paths in made.values():
        for path in paths:
            print(path)
    return 0


def _require_records(directory: Path) -> None:
    if not directory.is_dir():
        raise RecordError(f"no records directory at {directory}")
    if not finished_runs(directory, warn=lambda message: None):  # the report warns about skipped records
        raise RecordError(f"no finished runs under {directory}")


def _report(args: argparse.Namespace) -> int:
    _require_records(args.dir)
    tables = write_report(args.dir)
    for dataset, rows in tables.items():
        print(f"{dataset}\n{text_table(rows)}\n")
    print(f"report.md, results.csv and runs.csv rebuilt in {args.dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code = _main(args)
    if getattr(args, "ddp", False) and "TORCHELASTIC_RUN_ID" in os.environ:  # a rank of a torchrun launch
        from .ddp import end_rank

        end_rank(code)
    return code


def _kept(then: str = "") -> str:
    return f"finished runs are kept, {then}rerun the same command to resume"


def _main(args: argparse.Namespace) -> int:
    keep_freed_memory()
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return args.func(args)
    except (ConfigError, RecordError, DataError) as error:
        print(f"metadistill: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except DivergenceError as error:
        print(f"metadistill: error: {error}; finished runs are kept in the records directory", file=sys.stderr)
        return EXIT_FAILED
    except WorkerDied as error:
        print(f"metadistill: error: {error}; {_kept()}", file=sys.stderr)
        return EXIT_FAILED
    except GridBusy as error:
        print(f"metadistill: error: {error}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt as stop:
        print(f"metadistill: interrupted; {_kept()}", file=sys.stderr)
        return EXIT_TERMINATED if isinstance(stop, Terminated) else EXIT_INTERRUPTED
    except OSError as error:  # a full disk: records and checkpoints are written atomically (pbt skips a torn member's)
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = f" ({error.filename})" if error.filename else ""
        print(f"metadistill: error: {error.strerror}{where}; {_kept('free some space and ')}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
