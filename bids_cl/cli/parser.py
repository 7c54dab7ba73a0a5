"""The BIDS-Apps command line: parse and validate into a :class:`~bids_cl.config.RunConfig`.

Parsing only: nothing here touches the dataset beyond checking that paths exist.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

from bids_cl import __version__
from bids_cl.config import (
    ANALYSIS_LEVELS,
    CONNECTIVITY_CHOICES,
    DEFAULT_OUTPUT_SPACES,
    DEVICE_CHOICES,
    IN_PROCESS_PLUGINS,
    LONGITUDINAL_CHOICES,
    SEGMENT_WORKER_CHOICES,
    SKULL_STRIP_CHOICES,
    RunConfig,
    coerce_field,
    is_local_plugin,
)
from bids_cl.errors import EXIT_UNKNOWN_LEVEL, EXIT_USAGE, BidsClError
from bids_cl.utils.cli import UsageParser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must lie strictly between 0 and 1, got {value}")
    return value


def _min_size(text: str) -> str:
    from bids_cl.utils.units import parse_min_lesion_size

    parse_min_lesion_size(text)  # validates; the config keeps the user's text
    return text


def _change_rule_names() -> list[str]:
    import dataclasses

    from bids_cl.longitudinal.change import ChangeRules

    return [f.name for f in dataclasses.fields(ChangeRules)]


def _change_rule(text: str) -> tuple[str, float]:
    key, sep, value = text.partition("=")
    if not sep or key not in _change_rule_names():
        raise argparse.ArgumentTypeError(f"{text!r} is not RULE=VALUE with RULE one of "
                                         + ", ".join(_change_rule_names()))
    try:
        return key, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{key} needs a number, not {value!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = UsageParser(
        prog="bids_cl",
        description=(
            "bids_cl: cortical lesion segmentation for multiple sclerosis on T1-weighted MRI "
            "(MP2RAGE UNI, MPRAGE; 3T and 7T) with nnU-Net v2, as a BIDS-App."
        ),
        epilog=(
            "Exit codes: 0 ok; 1 failure; 16 BIDS validation failed; 17 unknown analysis level; "
            "18 labels/filters selected no data; 64 usage error; 65 input data unusable; "
            "66 required input missing; 73 cannot create output."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("bids_dir", type=Path, help="the input BIDS dataset (never modified)")
    parser.add_argument("output_dir", type=Path, help="where derivatives are written")
    parser.add_argument(
        "analysis_level",
        help="'participant' segments each participant; 'group' summarises participant outputs",
    )
    parser.add_argument("--version", action="version", version=f"bids_cl {__version__}")

    g = parser.add_argument_group("Selecting data")
    g.add_argument("--participant-label", "--participant_label", nargs="+", metavar="LABEL",
                   help="participants to process (space separated; a leading 'sub-' is stripped)")
    g.add_argument("--session-label", "--session_label", nargs="+", metavar="LABEL",
                   help="sessions to process (a leading 'ses-' is stripped); default: all, each "
                   "processed separately")
    g.add_argument("--bids-filter-file", "--bids_filter_file", type=Path, metavar="FILE",
                   help="JSON {query: {entity: value}} overriding the queries uni, t1w, inv1, "
                   "inv2, t1map; null = entity absent, \"*\" = any value")
    g.add_argument("--bids-database-dir", type=Path, metavar="DIR",
                   help="keep (or reuse) the pybids index here: fast start on large datasets")
    g.add_argument("--skip-bids-validation", "--skip_bids_validation", action="store_true",
                   help="do not run the BIDS validator (built-in minimum checks still run)")

    g = parser.add_argument_group("Execution")
    g.add_argument("-w", "--work-dir", type=Path, metavar="DIR",
                   help="Nipype work directory (reruns resume from it); default ./work")
    g.add_argument("--nprocs", "--nthreads", "--n-cpus", type=_positive_int, metavar="N",
                   help="processes run at once (default: the Slurm allocation or all CPUs "
                   "this process may use)")
    g.add_argument("--omp-nthreads", type=_positive_int, metavar="N",
                   help="threads per process (torch, ANTs; default: --nprocs, and on a GPU run "
                   "--nprocs minus the 2 the segmentation node holds)")
    g.add_argument("--mem-mb", "--mem_mb", "--mem", type=_positive_int, metavar="MB",
                   help="memory budget for the scheduler")
    g.add_argument("--use-plugin", "--nipype-plugin-file", type=Path, metavar="YAML",
                   help="Nipype plugin settings (plugin: and plugin_args:), e.g. SLURM; the *Graph "
                        "plugins, which return before the jobs run, are refused")
    g.add_argument("--dry-run", action="store_true",
                   help="discover and validate, print the plan as JSON lines, write nothing")
    g.add_argument("--reports-only", action="store_true",
                   help="regenerate the HTML reports from existing derivatives")
    g.add_argument("--config-file", type=Path, metavar="TOML",
                   help="reload a previous run's bids_cl.toml (command-line options override)")
    g.add_argument("--random-seed", type=int, default=20250716, help="seed for ANTs and torch")
    g.add_argument("--sloppy", action="store_true",
                   help="testing only: coarse, fast registration (never for real analyses)")
    g.add_argument("-v", "--verbose", action="count", default=0,
                   help="more output (-v: the discovery record; -vv: debug)")

    g = parser.add_argument_group("Segmentation")
    g.add_argument("--device", choices=DEVICE_CHOICES, default="auto",
                   help="auto uses CUDA when present, else the CPU (with a warning)")
    g.add_argument("--model", default="auto", metavar="NAME|PATH",
                   help="registry name ('published', 'demo'), an nnU-Net model folder or export "
                   "zip; 'auto' = the published model when installed, else refuse")
    g.add_argument("--folds", nargs="+", type=int, metavar="K",
                   help="folds to ensemble (default: all in the model)")
    g.add_argument("--disable-tta", action="store_true",
                   help="no mirroring test-time augmentation (default: on for GPU, off for CPU)")
    g.add_argument("--threshold", type=_probability,
                   help="ensemble probability above which a voxel is lesion (default: the model's own, "
                   "chosen on its validation split by bids_cl-train, else 0.5)")
    g.add_argument("--min-lesion-size", type=_min_size, metavar="SIZE",
                   help="drop lesions smaller than SIZE voxels, or µL with a unit ('3uL'); "
                   "default: the model's tuned size (bids_cl-train's tune step), else keep all; 0 keeps all")
    g.add_argument("--connectivity", type=int, choices=CONNECTIVITY_CHOICES, default=26,
                   help="voxel neighbourhood that joins lesion voxels into one lesion")
    g.add_argument("--segment-worker", choices=SEGMENT_WORKER_CHOICES, default="auto",
                   help="shared: one process loads the model once for the whole run and segments the "
                   "images one after the other, reading the next while the GPU works; node: each "
                   "segmentation node loads the model itself (runs several at once on a CPU); auto: "
                   "shared on a GPU with a local plugin (MultiProc, Linear), else node")

    g = parser.add_argument_group("Preprocessing")
    g.add_argument("--skull-strip", choices=SKULL_STRIP_CHOICES, default="auto",
                   help="auto: SynthStrip when its weights are present; else for MP2RAGE with "
                   "INV2 a mask from INV2; else deepbet")
    g.add_argument("--synthstrip-model", type=Path, metavar="PT",
                   help="SynthStrip weights (default $FREESURFER_HOME/models/synthstrip.1.pt)")
    g.add_argument("--output-spaces", nargs="*", metavar="SPACE",
                   default=list(DEFAULT_OUTPUT_SPACES),
                   help="template spaces for lesion maps ('native' or nothing = native only); "
                   "TemplateFlow names, e.g. MNI152NLin2009cAsym (prefetch with "
                   "bids_cl-fetch-templates)")

    g = parser.add_argument_group("Longitudinal lesion change (docs/longitudinal.md)")
    g.add_argument("--longitudinal", choices=LONGITUDINAL_CHOICES, default="auto",
                   help="auto: when a participant has several sessions of one target line, classify "
                   "each lesion as new, enlarging, stable, shrinking or disappeared between sessions; "
                   "off: sessions only")
    g.add_argument("--change-rules", nargs="+", type=_change_rule, metavar="RULE=VALUE",
                   help="change thresholds other than the defaults, e.g. enlarge_relative=0.3 "
                   "min_change_ul=5 (rules: " + ", ".join(_change_rule_names()) + ")")
    return parser


def given_options(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The destinations (RunConfig field names) of the options present on the command line.

    Whatever spelling the user typed (``-w``, ``--nthreads``, ``--mem``, ``--nipype-plugin-file``,
    ``-vv``), argparse maps it to one destination; parsing again with every default suppressed leaves
    exactly the destinations the command line set.
    """
    quiet = copy.deepcopy(parser)
    for action in quiet._actions:  # argparse has no public list of its actions
        if action.dest not in ("help", "version"):
            action.default = argparse.SUPPRESS
    return set(vars(quiet.parse_args(argv)))


# Fields of a saved configuration that belong to the run that saved it, never to the next one.
_NOT_RELOADED = ("run_uuid", "version", "bids_dir", "output_dir", "analysis_level", "config_file")


def _config_file_values(path: Path | None, given: set[str]) -> dict[str, Any]:
    """Values of --config-file for every option the command line did not give."""
    if path is None:
        return {}
    if not path.is_file():
        raise BidsClError(f"--config-file {path} does not exist", EXIT_USAGE)
    saved = RunConfig.load(path).to_dict()
    return {k: v for k, v in saved.items() if k not in given and k not in _NOT_RELOADED}


def parse_args(argv: list[str] | None = None) -> RunConfig:
    """Parse ``argv`` into a validated RunConfig (raises BidsClError with an exit code)."""
    from bids_cl.utils.bids import load_bids_filters, strip_prefix

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)

    if args.analysis_level not in ANALYSIS_LEVELS:
        raise BidsClError(
            f"unknown analysis level '{args.analysis_level}'; use one of "
            + ", ".join(ANALYSIS_LEVELS), EXIT_UNKNOWN_LEVEL,
        )
    bids_dir = args.bids_dir.expanduser().resolve()
    if not bids_dir.is_dir():
        raise BidsClError(f"the BIDS directory {args.bids_dir} does not exist", EXIT_USAGE)

    values: dict[str, Any] = {
        "participant_label": strip_prefix(args.participant_label, "sub-"),
        "session_label": strip_prefix(args.session_label, "ses-"),
        "bids_filter_file": args.bids_filter_file,
        "bids_database_dir": args.bids_database_dir.resolve() if args.bids_database_dir else None,
        "skip_bids_validation": args.skip_bids_validation,
        "work_dir": (args.work_dir or Path.cwd() / "work").expanduser().resolve(),
        "nprocs": args.nprocs,
        "omp_nthreads": args.omp_nthreads,
        "mem_mb": args.mem_mb,
        "use_plugin": args.use_plugin,
        "dry_run": args.dry_run,
        "reports_only": args.reports_only,
        "verbose": args.verbose,
        "random_seed": args.random_seed,
        "sloppy": args.sloppy,
        "device": args.device,
        "model": args.model,
        "folds": args.folds,
        "disable_tta": args.disable_tta,
        "threshold": args.threshold,
        "min_lesion_size": args.min_lesion_size,
        "connectivity": args.connectivity,
        "segment_worker": args.segment_worker,
        "skull_strip": args.skull_strip,
        "synthstrip_model": args.synthstrip_model,
        "output_spaces": [s for s in (args.output_spaces or []) if s not in ("native", "T1w")],
        "longitudinal": args.longitudinal,
        "change_rules": dict(args.change_rules or []),
    }
    # The command line wins over --config-file for every option it gives, in any spelling.
    values.update({k: coerce_field(k, v)
                   for k, v in _config_file_values(args.config_file, given_options(parser, argv)).items()})
    if values["bids_filter_file"] is not None:
        values["bids_filters"] = load_bids_filters(values["bids_filter_file"])
    if values["use_plugin"] is not None:
        values["plugin"], values["plugin_args"] = load_plugin_file(values["use_plugin"])
    if values["synthstrip_model"] is not None and not values["synthstrip_model"].is_file():
        raise BidsClError(f"--synthstrip-model {values['synthstrip_model']} does not exist", EXIT_USAGE)
    if values["change_rules"]:
        from bids_cl.longitudinal.change import ChangeRules

        try:
            ChangeRules(**values["change_rules"])
        except ValueError as exc:
            raise BidsClError(f"--change-rules: {exc}", EXIT_USAGE) from None
    if values["segment_worker"] == "shared" and not is_local_plugin(values.get("plugin")):
        raise BidsClError(f"--segment-worker shared needs a plugin that runs the nodes on this machine "
                          f"({', '.join(IN_PROCESS_PLUGINS)}); {values['plugin']} jobs run elsewhere: use "
                          "--segment-worker node (or auto)", EXIT_USAGE)
    if values["folds"] is not None and any(f < 0 for f in values["folds"]):
        raise BidsClError("--folds must be non-negative fold numbers", EXIT_USAGE)
    return RunConfig(bids_dir=bids_dir, output_dir=args.output_dir.expanduser().resolve(),
                     analysis_level=args.analysis_level, version=__version__, **values)


def load_plugin_file(path: Path) -> tuple[str, dict[str, Any]]:
    """Read a Nipype plugin YAML: ``plugin: NAME`` and ``plugin_args: {...}``."""
    import yaml

    if not path.is_file():
        raise BidsClError(f"--use-plugin {path} does not exist", EXIT_USAGE)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise BidsClError(f"--use-plugin {path} is not valid YAML{line} "
                          f"({getattr(exc, 'problem', None) or type(exc).__name__})", EXIT_USAGE) from None
    if not isinstance(data, dict) or "plugin" not in data:
        raise BidsClError(f"--use-plugin {path} must set 'plugin:'", EXIT_USAGE)
    plugin = str(data["plugin"])
    if not _plugin_class(plugin):
        raise BidsClError(f"--use-plugin {path}: Nipype has no plugin named {plugin!r} "
                          "(e.g. MultiProc, Linear, SLURM, SGE, PBS, LSF)", EXIT_USAGE)
    if is_graph_plugin(plugin):
        raise BidsClError(
            f"--use-plugin {path}: Nipype's {plugin} plugin submits the whole graph and returns at once, "
            "before any node has run, so bids_cl could not report what failed or write the reports; "
            f"use plugin: {_waiting_counterpart(plugin)} (submits each node and waits for it)", EXIT_USAGE)
    plugin_args = data.get("plugin_args") or {}
    if not isinstance(plugin_args, dict):
        raise BidsClError(f"--use-plugin {path}: plugin_args must be a mapping", EXIT_USAGE)
    poll = plugin_args.get("poll_sleep_duration", 1)
    if isinstance(poll, bool) or not isinstance(poll, (int, float)) or poll <= 0:
        raise BidsClError(f"--use-plugin {path}: poll_sleep_duration must be a positive number of seconds",
                          EXIT_USAGE)
    return plugin, dict(plugin_args)


def _waiting_counterpart(graph_plugin: str) -> str:
    if graph_plugin.endswith("Graph"):  # SLURMGraph -> SLURM, SGEGraph -> SGE, PBSGraph -> PBS
        return graph_plugin.removesuffix("Graph")
    return {"CondorDAGMan": "Condor"}.get(graph_plugin, "SLURM")


def _plugin_class(name: str) -> type | None:
    from nipype.pipeline import plugins

    cls = getattr(plugins, f"{name}Plugin", None)
    return cls if isinstance(cls, type) else None


def is_graph_plugin(name: str) -> bool:
    """Whether a Nipype plugin is one of the submit-everything-and-return kind (SLURMGraph, SGEGraph ...)."""
    from nipype.pipeline.plugins.base import GraphPluginBase

    cls = _plugin_class(name)
    return cls is not None and issubclass(cls, GraphPluginBase)


