"""Compare the sharing schemes of lib/schemes.py: train and test each one, then tabulate.

For every scheme and seed this trains and tests one run of the 2D entry script
(main_combine.py) or the 3D one (3d_implementation/main.py), each in its own Python process,
with the same data, settings and number of steps; only SCHEME, SEED and OUTPUT_PATH differ:

    OUTPUT_PATH = <out>/<scheme>/seed<k>,  PHASE = train_test

A run whose results/metrics.json exists (with the same settings) is skipped, and an
interrupted run resumes from its checkpoints, so the command can simply be started again.
Finally it writes <out>/comparison.md, <out>/comparison.csv and <out>/comparison.png:
trainable parameters per scheme and, per modality and class, Dice and ASSD as mean ± std
over all test volumes of all seeds (the per-case values of every seed pooled), plus the
average Dice over the classes.

    python experiments/compare.py --preset=demo --seeds=3
    python experiments/compare.py --preset=demo --seeds=1 --num_steps=600 --schemes=ummkd,joint
    python experiments/compare.py --network=3d --preset=demo --seeds=1
    python experiments/compare.py --preset=heldout --seeds=1      # real held-out patients

With ``--preset=heldout`` (experiments/heldout.py) the runs are schemes x seeds x folds on real
patients: the CHAOS MR patients of ../shared in ``--folds`` folds (each tested once; of each
fold's training patients ``--val_patients`` validate), the CT of abdomen_real trained on and
the DICOM patient tested in every fold; OUTPUT_PATH = <out>/<scheme>/seed<k>/fold<f>. It
writes the per-patient results (comparison.csv), the tables with the Wilcoxon signed-rank
test of UMMKD against each baseline over patients (comparison.md), the per-patient figure
(comparison.png) and the validation score against the step of every run
(learning_curves.png). Every run tests its best checkpoint on its validation patients
(TEST_CHECKPOINT), with the post-processing chosen on them: nothing is chosen on the test
patients.

Any other --name=value is a setting of the entry script (see `python main_combine.py
--help`) and is passed to every run. Relative paths are relative to the repository root.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import subprocess
import sys
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from lib.cli import SCRIPTS, entry_module  # noqa: E402
from lib.config import ConfigError, load_config, resolve  # noqa: E402
from lib.files import write_text  # noqa: E402
from lib.schemes import SCHEMES  # noqa: E402

MODALITIES = ("mr", "ct")
# --preset=heldout without --schemes: the paper's four (Y and X shapes would add 8 runs per
# seed, about 40 minutes on a 2-core CPU, past the comparison's 2-hour budget).
HELDOUT_SCHEMES = ("ummkd", "separate_bn", "joint", "individual")
# Settings the comparison sets itself for every run (use its own flags instead).
OWN = {"SCHEME": "--schemes", "SEED": "--seeds", "OUTPUT_PATH": "--out", "PHASE": "(fixed)",
       "PRESET": "--preset", "START_OVER": "(decided per run)"}


# ---------------------------------------------------------------------- settings


def run_config(network: str, preset: str, overrides=(), **settings) -> dict:
    """The resolved settings of a run, exactly as the entry script would resolve them."""
    from lib.pipeline import resolve_paths

    module = entry_module(network)
    argv = [f"--preset={preset}", *overrides]
    argv += [f"--{k.lower()}={_text(v)}" for k, v in settings.items()]
    config = resolve(vars(module), argv, module.PRESETS)
    return resolve_paths(config, ROOT)


def _text(value) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def _kwargs_to_overrides(overrides) -> list[str]:
    if isinstance(overrides, dict):
        return [f"--{k.lower()}={_text(v)}" for k, v in overrides.items()]
    return list(overrides or [])


def parameter_counts(network: str = "2d", overrides=None, preset: str = "demo",
                     schemes=None, **settings) -> dict:
    """{scheme: trainable parameters} of the network built for each scheme (no training).

    ``overrides``: "--name=value" strings or a {name: value} dict; keyword arguments are
    settings too, e.g. ``parameter_counts("2d", preset="custom", feature_base=2, n_class=3)``.
    """
    import keras

    module = entry_module(network)
    args = _kwargs_to_overrides(overrides) + _kwargs_to_overrides(settings)
    counts = {}
    for scheme in schemes or SCHEMES:
        config = run_config(network, preset, args, scheme=scheme)
        model = module.network().build_model(config)
        counts[scheme] = sum(int(v.shape.num_elements()) for v in model.trainable_variables)
        del model
        keras.backend.clear_session()
    return counts


# ---------------------------------------------------------------------- runs
def run_dir(out: str, scheme: str, seed: int) -> str:
    return os.path.join(out, scheme, f"seed{seed}")


def _saved_config(config: dict) -> dict | None:
    from lib.run_dir import CONFIG_FILE

    path = os.path.join(config["OUTPUT_PATH"], CONFIG_FILE)
    return load_config(path) if os.path.isfile(path) else None


def is_done(config: dict) -> tuple[bool, str]:
    """Whether the run of ``config`` already has results made with the same settings."""
    from lib.run_dir import BOOKKEEPING_KEYS, config_differences

    if not os.path.isfile(os.path.join(config["OUTPUT_PATH"], "results", "metrics.json")):
        return False, "no results yet"
    saved = _saved_config(config)
    if saved is None:
        return True, "results exist"
    # everything but bookkeeping must match: the test lists and test-time settings too
    diffs = config_differences(saved, config,
                               sorted((set(saved) | set(config)) - BOOKKEEPING_KEYS))
    if diffs:
        return False, "results of other settings (" + "; ".join(diffs) + ")"
    return True, "results exist"


def trained_otherwise(config: dict) -> str | None:
    """How a previous run in OUTPUT_PATH was trained differently, else None.

    A run trained past NUM_STEPS, or with other training settings, would not be the run of
    this comparison: it is moved aside (START_OVER, never deleted) and trained again. Runs
    that differ only in test-time settings are tested again without retraining.
    """
    from lib.run_dir import config_differences

    beyond = trained_beyond(config)
    if beyond is not None:
        return f"trained to step {beyond} > NUM_STEPS"
    saved = _saved_config(config)
    diffs = config_differences(saved, config) if saved is not None else []
    return "trained with " + "; ".join(diffs) if diffs else None


def trained_beyond(config: dict) -> int | None:
    """The step of a previous run in OUTPUT_PATH that trained past NUM_STEPS, else None.

    Resuming such a run would test a model trained longer than the others of the
    comparison, so it is moved aside (START_OVER, never deleted) and trained again.
    """
    if not os.path.isdir(os.path.join(config["OUTPUT_PATH"], "checkpoints")):
        return None
    from lib.run_dir import latest_step

    step = latest_step(config["OUTPUT_PATH"])
    return step if step > config["NUM_STEPS"] else None


def run_one(network: str, preset: str, scheme: str, seed: int, out: str, overrides,
            log=print, start_over: bool = False, path: str | None = None,
            name: str | None = None) -> tuple[str, float]:
    """Train and test one scheme+seed (in ``path``, default run_dir) in a child process;
    returns (status, seconds)."""
    path = path or run_dir(out, scheme, seed)
    name = name or f"{scheme} seed {seed}"
    args = [sys.executable, SCRIPTS[network], f"--preset={preset}", f"--scheme={scheme}",
            f"--seed={seed}", f"--output_path={path}", "--phase=train_test",
            *overrides]
    if start_over:
        args.append("--start_over=true")
    if not any(a.lower().startswith("--progress=") for a in overrides):
        args.append("--progress=false")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    stdout_path = path + ".log"
    t0 = time.time()
    log(f"[{time.strftime('%H:%M:%S')}] {name}: training and testing "
        f"(log: {os.path.relpath(stdout_path, ROOT)})")
    with open(stdout_path, "a", encoding="utf-8") as handle:
        handle.write(f"$ {' '.join(args)}\n")
        handle.flush()
        code = subprocess.call(args, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT)
    seconds = time.time() - t0
    if code != 0:
        with open(stdout_path, encoding="utf-8", errors="replace") as handle:
            tail = handle.read().strip().splitlines()[-5:]
        log(f"  {name} FAILED (exit {code}) after {seconds:.0f} s:\n    "
            + "\n    ".join(tail))
        return "failed", seconds
    log(f"  {name}: done in {seconds:.0f} s")
    return "trained", seconds


# ---------------------------------------------------------------------- aggregation
def _mean_std(values) -> tuple[float, float, int]:
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not vals:
        return float("nan"), float("nan"), 0
    mean = sum(vals) / len(vals)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals)), len(vals)


def aggregate(reports: list[dict]) -> dict:
    """Pool the per-case results of several metrics.json reports (one per seed).

    Returns {modality: {"classes": [...], "n_cases": n, "dice": {cls: (mean, std, n)},
    "assd": {cls: (mean, std, n)}, "n_undefined": {cls: k}, "dice_avg": (mean, std, n)}};
    "dice_avg" is over the per-case averages of the class Dice (std: spread of those
    averages). Undefined (NaN/None) ASSD values are left out and counted.
    """
    result = {}
    if not reports:
        return result
    classes = reports[0]["classes"]
    for m in MODALITIES:
        cases = [c for r in reports if m in r for c in r[m]["cases"]]
        if not cases:
            continue
        entry = {"classes": classes, "n_cases": len(cases), "dice": {}, "assd": {},
                 "n_undefined": {}}
        for name in classes:
            entry["dice"][name] = _mean_std(c["dice"].get(name) for c in cases)
            entry["assd"][name] = _mean_std(c["assd"].get(name) for c in cases)
            entry["n_undefined"][name] = sum(
                1 for c in cases if c["assd"].get(name) is None
                or (isinstance(c["assd"].get(name), float) and math.isnan(c["assd"][name])))
        per_case = [_mean_std(c["dice"].get(n) for n in classes)[0] for c in cases]
        entry["dice_avg"] = _mean_std(per_case)
        result[m] = entry
    return result


def _fmt(stat, digits=3) -> str:
    mean, std, n = stat
    if n == 0 or math.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown(summary: dict, params: dict, title: str, notes: list[str]) -> str:
    """Two Markdown tables (Dice, ASSD): one row per scheme, columns modality x class."""
    schemes = list(summary)
    classes = next((e["classes"] for s in schemes for e in summary[s].values()), [])
    lines = [f"# {title}", ""] + [f"{n}  " for n in notes] + [""]
    for metric, unit in (("dice", ""), ("assd", " (mm)")):
        header = ["scheme", "parameters"]
        for m in MODALITIES:
            header += [f"{m.upper()} {c}" for c in classes]
            if metric == "dice":
                header.append(f"{m.upper()} average")
        lines.append(f"## {'Dice' if metric == 'dice' else 'ASSD'}{unit}, mean ± std over "
                     "seeds and test volumes")
        lines.append("")
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "|".join("---" for _ in header) + "|")
        for s in schemes:
            row = [s, f"{params.get(s, float('nan')):,}" if s in params else "?"]
            for m in MODALITIES:
                entry = summary[s].get(m)
                for c in classes:
                    if entry is None:
                        row.append("failed")
                        continue
                    cell = _fmt(entry[metric][c], 3 if metric == "dice" else 2)
                    undef = entry["n_undefined"][c] if metric == "assd" else 0
                    row.append(cell + (f" ({undef} undefined)" if undef else ""))
                if metric == "dice":
                    row.append(_fmt(entry["dice_avg"]) if entry else "failed")
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)


def write_csv(path: str, summary: dict, params: dict, seeds: dict) -> None:
    fields = ["scheme", "parameters", "n_seeds", "modality", "class", "dice_mean", "dice_std",
              "n_cases", "assd_mean", "assd_std", "assd_n_defined", "assd_n_undefined"]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(fields)
    num = lambda v: "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.6g}"
    for s, per_mod in summary.items():
        for m, e in per_mod.items():
            for c in e["classes"]:
                d, a = e["dice"][c], e["assd"][c]
                writer.writerow([s, params.get(s, ""), seeds.get(s, 0), m, c, num(d[0]),
                                 num(d[1]), d[2], num(a[0]), num(a[1]), a[2],
                                 e["n_undefined"][c]])
            d = e["dice_avg"]
            writer.writerow([s, params.get(s, ""), seeds.get(s, 0), m, "average", num(d[0]),
                             num(d[1]), d[2], "", "", "", ""])
    write_text(path, buf.getvalue())


def bar_chart(path: str, summary: dict, title: str) -> None:
    """Grouped bars: schemes on x, one bar per modality, mean class-average Dice ± std."""
    from lib.figures import _MODALITY_COLORS, _new_figure, _save

    schemes = list(summary)
    fig = _new_figure((max(6.0, 1.3 * len(schemes) + 2), 4.0))
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(MODALITIES)
    for k, m in enumerate(MODALITIES):
        xs = [i + (k - (len(MODALITIES) - 1) / 2) * width for i in range(len(schemes))]
        means = [summary[s][m]["dice_avg"][0] if m in summary[s] else 0.0 for s in schemes]
        stds = [summary[s][m]["dice_avg"][1] if m in summary[s] else 0.0 for s in schemes]
        means = [0.0 if math.isnan(v) else v for v in means]
        stds = [0.0 if math.isnan(v) else v for v in stds]
        bars = ax.bar(xs, means, width, yerr=stds, capsize=3, label=m.upper(),
                      color=_MODALITY_COLORS[k % len(_MODALITY_COLORS)])
        for bar, v in zip(bars, means):
            ax.text(bar.get_x() + bar.get_width() / 2, 0.02, f"{v:.2f}", ha="center",
                    va="bottom", fontsize=7, rotation=90, color="white")
    ax.set_xticks(range(len(schemes)))
    ax.set_xticklabels(schemes)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("Dice (average over classes)")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    _save(fig, path)


def _read_times(out: str) -> dict:
    path = os.path.join(out, "run_times.json")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _record_time(out: str, key: str, seconds: float) -> None:
    times = _read_times(out)
    times[key] = round(seconds, 1)
    write_text(os.path.join(out, "run_times.json"), json.dumps(times, indent=1))


def load_reports(out: str, scheme: str, seeds) -> list[dict]:
    reports = []
    for seed in seeds:
        path = os.path.join(run_dir(out, scheme, seed), "results", "metrics.json")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as handle:
                reports.append(json.load(handle))
    return reports


# ---------------------------------------------------------------------- command line
def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="experiments/compare.py", allow_abbrev=False,  # --scheme is a setting, not --schemes
        description="Train and test UMMKD and the baseline sharing schemes (separate BN "
                    "without KD, joint training, individual networks, Y- and X-shaped "
                    "networks) on the same data with the same settings and seeds, then "
                    "write a comparison table (comparison.md, comparison.csv) and bar chart "
                    "(comparison.png) of trainable parameters, Dice and ASSD per modality "
                    "and class (mean ± std over seeds and test volumes). Runs that already "
                    "have results are skipped; interrupted runs resume.",
        epilog="Any other --name=value is a setting of the entry script (main_combine.py for "
               "2d, 3d_implementation/main.py for 3d; see their --help) applied to every "
               "run, e.g. --num_steps=400. Relative paths are relative to the repository "
               "root.")
    parser.add_argument("--preset", default="demo",
                        help="preset of the entry script: demo (phantom data), abdomen (2d "
                             "only; the prepared real pair, see README) or custom "
                             "(default: demo)")
    parser.add_argument("--seeds", type=int, default=3,
                        help="number of seeds per scheme: SEED=0..N-1 (default: 3)")
    parser.add_argument("--schemes", default=None,
                        help=f"comma-separated schemes (default: all: {','.join(SCHEMES)}; "
                             f"with --preset=heldout: {','.join(HELDOUT_SCHEMES)})")
    parser.add_argument("--network", default="2d", choices=sorted(SCRIPTS),
                        help="2d (main_combine.py) or 3d (3d_implementation/main.py)")
    parser.add_argument("--folds", type=int, default=4,
                        help="--preset=heldout: folds over the CHAOS MR patients (default: 4)")
    parser.add_argument("--val_patients", type=int, default=3,
                        help="--preset=heldout: validation patients drawn from each fold's "
                             "training patients (model selection; default: 3)")
    parser.add_argument("--out", default=None,
                        help="output folder (default: output/compare_<preset>, "
                             "output/compare3d_<preset> for 3d)")
    args, rest = parser.parse_known_args(argv)
    for arg in rest:
        if not arg.startswith("--") or "=" not in arg:
            parser.error(f"{arg}: settings must look like --name=value")
        key = arg[2:].split("=", 1)[0].upper().replace("-", "_")
        if key in OWN:
            parser.error(f"{arg}: set by the comparison itself; use {OWN[key]}")
    if args.schemes is None:
        args.schemes = ",".join(HELDOUT_SCHEMES if args.preset == "heldout" else SCHEMES)
    schemes = [s.strip() for s in args.schemes.split(",") if s.strip()]
    unknown = [s for s in schemes if s not in SCHEMES]
    if unknown or not schemes:
        parser.error(f"--schemes: unknown {', '.join(unknown) or '(none given)'}; expected "
                     f"some of {', '.join(SCHEMES)}")
    if args.seeds < 1:
        parser.error("--seeds: expected at least 1")
    out = args.out or os.path.join(
        "output", f"compare{'3d' if args.network == '3d' else ''}_{args.preset}")
    args.out = out if os.path.isabs(out) else os.path.normpath(os.path.join(ROOT, out))
    args.schemes = schemes
    return args, rest


def main(argv=None, log=print) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    if args.preset == "heldout":
        return compare_heldout(args, overrides, log)
    t_start = time.time()
    seeds = list(range(args.seeds))
    try:
        module = entry_module(args.network)
        if args.preset not in module.PRESETS:
            raise ConfigError(f"--preset: {args.preset!r} is not a preset of "
                              f"{os.path.relpath(SCRIPTS[args.network], ROOT)} (expected one "
                              f"of {', '.join(module.PRESETS)})")
        configs = {(s, k): run_config(args.network, args.preset, overrides, scheme=s, seed=k,
                                      output_path=run_dir(args.out, s, k),
                                      phase="train_test")
                   for s in args.schemes for k in seeds}
        log(f"comparing {len(args.schemes)} schemes x {len(seeds)} seeds ({args.network}, "
            f"preset {args.preset}, {configs[(args.schemes[0], 0)]['NUM_STEPS']} steps) "
            f"in {os.path.relpath(args.out, ROOT)}")
        params = parameter_counts(args.network, overrides, args.preset, args.schemes)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    log("trainable parameters: " + ", ".join(f"{s} {n:,}" for s, n in params.items()))
    os.makedirs(args.out, exist_ok=True)
    status = {}
    for s in args.schemes:
        for k in seeds:
            done, why = is_done(configs[(s, k)])
            if done:
                log(f"skipping {s} seed {k}: {why} in "
                    f"{os.path.relpath(configs[(s, k)]['OUTPUT_PATH'], ROOT)}")
                status[(s, k)] = ("skipped", 0.0)
                continue
            other = trained_otherwise(configs[(s, k)])
            if other is not None:
                log(f"{s} seed {k}: the run in its folder was {other}; moving it aside "
                    f"(START_OVER) and training again")
            status[(s, k)] = run_one(args.network, args.preset, s, k, args.out, overrides, log,
                                     start_over=other is not None)
            if status[(s, k)][0] == "trained":
                _record_time(args.out, f"{s}/seed{k}", status[(s, k)][1])

    summary, n_seeds = {}, {}
    for s in args.schemes:
        reports = load_reports(args.out, s, seeds)
        n_seeds[s] = len(reports)
        summary[s] = aggregate(reports)
    cfg0 = configs[(args.schemes[0], 0)]
    wall = time.time() - t_start
    command = "python experiments/compare.py " + " ".join(
        [f"--preset={args.preset}", f"--seeds={args.seeds}", f"--network={args.network}",
         f"--schemes={','.join(args.schemes)}", f"--out={os.path.relpath(args.out, ROOT)}",
         *overrides])
    notes = [f"command: `{command}`",
             f"network {args.network} ({cfg0['NETWORK']}), preset {args.preset}, "
             f"{cfg0['NUM_STEPS']} steps, batch {cfg0['BATCH_SIZE']} per modality, "
             f"f={cfg0['FEATURE_BASE']}, seeds {seeds}; KD weight {cfg0['MIU_KD']} for ummkd, "
             "0 for the other schemes",
             "test volumes pooled per scheme (all seeds): " + ", ".join(
                 f"{m.upper()} {max((summary[s][m]['n_cases'] for s in summary if m in summary[s]), default=0)}"
                 for m in MODALITIES),
             "runs this invocation: " + ", ".join(f"{s}/seed{k} {st}"
                                                  for (s, k), (st, _) in status.items()),
             "time to train and test (when last run): " + ", ".join(
                 f"{key} {sec:.0f} s" for key, sec in _read_times(args.out).items()
                 if key.split("/")[0] in args.schemes),
             f"wall time of this invocation: {wall:.0f} s"]
    title = f"Sharing schemes compared ({args.network}, preset {args.preset})"
    text = markdown(summary, params, title, notes)
    write_text(os.path.join(args.out, "comparison.md"), text + "\n")
    write_csv(os.path.join(args.out, "comparison.csv"), summary, params, n_seeds)
    bar_chart(os.path.join(args.out, "comparison.png"), summary,
              f"{title}: {cfg0['NUM_STEPS']} steps, {args.seeds} seed(s)")
    log(text)
    log(f"written: {os.path.relpath(os.path.join(args.out, 'comparison.md'), ROOT)}, "
        "comparison.csv, comparison.png")
    failed = [f"{s}/seed{k}" for (s, k), (st, _) in status.items() if st == "failed"]
    if failed:
        print(f"error: runs failed: {', '.join(failed)} (see their .log files)",
              file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------------- held-out patients
def _fold_lists(lists: dict, fold: int) -> list[str]:
    return [f"--source_train_list={lists['mr'][fold]['train']}", "--source_val_list=",
            f"--source_test_list={lists['mr'][fold]['test']}",
            f"--source_val_volume_list={lists['mr'][fold]['val']}",
            f"--target_train_list={lists['ct']['train']}", "--target_val_list=",
            f"--target_test_list={lists['ct']['test']}",
            f"--target_val_volume_list={lists['ct']['val']}"]


def heldout_tables(rows, schemes, classes, params, notes) -> str:
    """comparison.md of the held-out comparison: per protocol, modality and organ the mean
    ± std over held-out patients per scheme, then UMMKD against each baseline (Wilcoxon)."""
    from experiments import heldout

    lines = ["# Sharing schemes on real held-out patients", ""] + [f"{n}  " for n in notes] + [""]
    for protocol, what in (("prepared", "the prepared test volumes (label crop; the paper's "
                                        "protocol)"),
                           ("scan", "each scan's own geometry (whole scan, label-free crop)")):
        for modality in ("mr", "ct"):
            header = ["scheme", "parameters", *classes, "average"]
            lines += [f"## {modality.upper()} Dice on {what}: mean ± std over the tests "
                      "(patients x seeds x folds that tested them; n tests, patients)", "",
                      "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
            for s in schemes:
                row = [s, f"{params[s]:,}" if s in params else "?"]
                for organ in [*classes, None]:
                    found = heldout.tests(rows, protocol, modality, s, organ)
                    values = list(found.values())
                    row.append(f"{np.mean(values):.3f} ± {np.std(values):.3f} ({len(values)}, "
                               f"{len({c for c, _, _ in found})})" if values else "absent")
                lines.append("| " + " | ".join(row) + " |")
            lines.append("")
            if "ummkd" not in schemes:
                continue
            lines += [f"UMMKD against each baseline ({modality.upper()}, {protocol}): mean "
                      "Dice difference, Wilcoxon signed-rank p (two-sided), patients", "",
                      "| baseline | " + " | ".join([*classes, "average"]) + " |",
                      "|---|" + "|".join("---" for _ in range(len(classes) + 1)) + "|"]
            for s in schemes:
                if s == "ummkd":
                    continue
                cells = []
                for organ in [*classes, None]:
                    t = heldout.paired_test(
                        heldout.per_patient(rows, protocol, modality, "ummkd", organ),
                        heldout.per_patient(rows, protocol, modality, s, organ))
                    cells.append("absent" if not t["n"] else
                                 f"{t['mean_difference']:+.3f}, p "
                                 + ("n/a" if t["p"] is None else f"{t['p']:.3g}")
                                 + f" (n={t['n']})")
                lines.append(f"| {s} | " + " | ".join(cells) + " |")
            lines.append("")
    seeds = sorted({r["seed"] for r in rows})
    if len(seeds) > 1:
        lines += ["## Seed spread: the average Dice of each seed alone (mean over its tests), "
                  "and max - min over seeds", ""]
        for protocol in ("prepared", "scan"):
            header = ["scheme", *(f"{m.upper()} seed {k}" for m in ("mr", "ct") for k in seeds),
                      "MR max - min", "CT max - min"]
            lines += [f"{protocol}:", "", "| " + " | ".join(header) + " |",
                      "|" + "|".join("---" for _ in header) + "|"]
            for s in schemes:
                means = {m: heldout.seed_means(rows, protocol, m, s) for m in ("mr", "ct")}
                cells = [f"{means[m][k]:.3f}" if k in means[m] else "-"
                         for m in ("mr", "ct") for k in seeds]
                cells += [f"{max(v.values()) - min(v.values()):.3f}" if len(v) > 1 else "-"
                          for v in means.values()]
                lines.append(f"| {s} | " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines)


def compare_heldout(args, overrides, log=print) -> int:
    """``--preset=heldout``: prepare the folds, train and test every scheme x seed x fold,
    then write comparison.csv (per patient), comparison.md and comparison.png."""
    from experiments import heldout

    t_start = time.time()
    seeds = list(range(args.seeds))
    try:
        base = run_config(args.network, "heldout", overrides)
        split_files = heldout.splits(args.out, args.folds, n_val=args.val_patients)
        size = base["IMAGE_SIZE"] if args.network == "2d" else base["PATCH_SIZE"][0]
        lists = heldout.prepare_data(args.out, split_files, int(size), log,
                                     train_volumes=args.network == "3d")
        runs = {}
        for f in range(args.folds):
            fold_args = [*overrides, *_fold_lists(lists, f)]
            for s in args.schemes:
                for k in seeds:
                    path = os.path.join(run_dir(args.out, s, k), f"fold{f}")
                    runs[(s, k, f)] = (fold_args, path, run_config(
                        args.network, "heldout", fold_args, scheme=s, seed=k,
                        output_path=path, phase="train_test"))
        params = parameter_counts(args.network, overrides, "heldout", args.schemes)
    except (ConfigError, heldout.HeldOutError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    log(f"held-out comparison: {len(args.schemes)} schemes x {len(seeds)} seeds x "
        f"{args.folds} folds ({args.network}, {base['NUM_STEPS']} steps) in "
        f"{os.path.relpath(args.out, ROOT)}")
    log("trainable parameters: " + ", ".join(f"{s} {n:,}" for s, n in params.items()))
    status = {}
    for (s, k, f), (fold_args, path, config) in runs.items():
        name = f"{s} seed {k} fold {f}"
        done, why = is_done(config)
        if done:
            log(f"skipping {name}: {why}")
            status[(s, k, f)] = "skipped"
            continue
        other = trained_otherwise(config)
        if other is not None:
            log(f"{name}: the run in its folder was {other}; moving it aside and training again")
        status[(s, k, f)], seconds = run_one(args.network, "heldout", s, k, args.out, fold_args,
                                             log, start_over=other is not None, path=path,
                                             name=name)
        if status[(s, k, f)] == "trained":
            _record_time(args.out, f"{s}/seed{k}/fold{f}", seconds)

    absent = {"ct": heldout.absent_classes(os.path.join(args.out, "data", "ct", "dataset.json"))}
    rows = []
    for (s, k, f), (_, path, config) in runs.items():
        absent["mr"] = heldout.absent_classes(
            os.path.join(args.out, "data", f"mr_fold{f}", "dataset.json"))
        metrics_path = os.path.join(path, "results", "metrics.json")
        if os.path.isfile(metrics_path):
            with open(metrics_path, encoding="utf-8") as handle:
                rows += heldout.patient_rows(json.load(handle), absent, scheme=s, seed=k,
                                             fold=f)
    heldout.write_rows(os.path.join(args.out, "comparison.csv"), rows)
    times = _read_times(args.out)
    notes = [f"command: `python experiments/compare.py --preset=heldout --seeds={args.seeds} "
             f"--folds={args.folds} --network={args.network} --schemes={','.join(args.schemes)}"
             + "".join(f" {o}" for o in overrides) + "`",
             f"{base['NUM_STEPS']} steps, batch {base['BATCH_SIZE']} per modality, "
             f"augmentation {base['AUGMENT'] if 'AUGMENT' in base else 'n/a'}, seeds {seeds}; "
             f"the {base['TEST_CHECKPOINT']} checkpoint of every run is tested "
             f"({args.val_patients} validation patients per fold, never a test patient)",
             "MR: CHAOS T2-SPIR patients, each tested by the models of its fold; CT: trained "
             "on ct_0001, tested on the DICOM patient in every fold (its values averaged over "
             "folds and seeds); kidneys absent from it are reported as absent",
             f"training and testing: {sum(times.get(f'{s}/seed{k}/fold{f}', 0) for s, k, f in runs):.0f} s "
             f"of runs, wall time of this invocation {time.time() - t_start:.0f} s"]
    text = heldout_tables(rows, args.schemes, base["CLASS_NAMES"], params, notes)
    write_text(os.path.join(args.out, "comparison.md"), text + "\n")
    heldout.paired_figure(os.path.join(args.out, "comparison.png"), rows, "prepared",
                          args.schemes, title="Per-patient Dice, held-out patients")
    heldout.learning_curves(os.path.join(args.out, "learning_curves.png"),
                            {f"{s} seed {k} fold {f}": path
                             for (s, k, f), (_, path, _) in runs.items()},
                            title="Validation patients of each fold (model selection)")
    log(text)
    failed = [f"{s}/seed{k}/fold{f}" for (s, k, f), st in status.items() if st == "failed"]
    if failed:
        print(f"error: runs failed: {', '.join(failed)} (see their .log files)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
