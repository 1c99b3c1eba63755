"""Experiment 1: HYDRA vs LWM vs random pruning on Fashion-MNIST, every cell confirmed on the test split.

This module is over 400 lines because it is one experiment read top to bottom: cells, study runs, AutoAttack on the 99% cells, aggregation over seeds and its page; splitting it would scatter one protocol over files.

    make experiment-methods                                      # = python -m analysis.experiments.fashion_methods
    python -m analysis.experiments.fashion_methods --quick       # smoke run: 2 cells, tiny budgets (CI, ~2 min)
    python -m analysis.experiments.fashion_methods --full-data   # all 54k training images, 3 seeds (a GPU)

A PGD-AT small CNN (BatchNorm) is pre-trained once per seed, then pruned by HYDRA (ssi init, score training),
LWM (layer-wise magnitude) and random masks to 90, 95 and 99% sparsity, per-layer and global scope, and
robustly fine-tuned; plus the dense model itself. Every cell is one `study run` of
analysis/experiments/fashion_methods.yaml with each search key narrowed to the cell's value and n_trials 1 (Ray Tune
trial, Optuna storage, MLflow runs: the study machinery, not a side loop; no sampler of this project walks a
grid). Its test figures are the study's own confirmation of its front (that one trial): clean and PGD-50 x2
restarts on 1000 seeded test points. Afterwards the 99% cells of the first seed get standard AutoAttack on
200 seeded test points (the confirmation code the study uses, on the cell's exported model.pt).
Nothing is selected here: the validation figures are reported beside the test ones, nothing more.

Default sizing (CPU): a seeded 2000-image subset of the training images, batch 32, 8 pre-train / 3 prune /
3 fine-tune epochs of PGD-5 (eps 0.1), seeds 0 and 1: 38 cell studies, about 3.5 hours on the 2-core
development machine with a background job (an estimated 2-2.5 hours on 2 idle cores); the test-split PGD
(about 3.5 minutes a good cell) and AutoAttack (2-8 minutes a cell) are half of it. `--full-data` (for a GPU)
is the whole training set, batch 128, 20 / 10 / 10 epochs of PGD-7, seeds 0, 1, 2, PGD-50 x3 on all 10,000
test images and AutoAttack on 1000 test points of every 99% cell and seed (an estimated 2-3 hours on one
H100, not measured).

Writes docs/results.md (its section), docs/results/fashion_methods{,_cells}.csv and
docs/results/fashion_methods.png. Cells already finished with the same settings are reused (rerun the
command after an interruption; --fresh recomputes them). Cell studies live in runs/experiments/fashion_methods/.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import yaml

from analysis.experiments import common
from analysis.experiments.common import ROOT

KEY = "fashion_methods"
MODULE = "analysis.experiments.fashion_methods"
SPACE = Path(__file__).with_name("fashion_methods.yaml")
METHODS = ("hydra", "lwm", "random")
LABELS = {"hydra": "HYDRA (ssi)", "lwm": "LWM", "random": "random", "dense": "dense (PGD-AT)"}
COLORS = {"hydra": "tab:blue", "lwm": "tab:orange", "random": "tab:green", "dense": "black"}
# Where the data module finds Fashion-MNIST (Debian's package; torchvision's layout under data.root).
FASHION_DIRS = (Path("/usr/share/datasets/fashion-mnist"), ROOT / "data" / "FashionMNIST" / "raw")
FASHION_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
INSTALL = "sudo apt-get install dataset-fashion-mnist"


@dataclass(frozen=True)
class Sizing:
    seeds: tuple[int, ...] = (0, 1)
    methods: tuple[str, ...] = METHODS
    keeps: tuple[float, ...] = (0.1, 0.05, 0.01)
    scopes: tuple[str, ...] = ("layer", "global")
    dense: bool = True  # the unpruned PGD-AT model of each seed (compression 1x)
    test_points: int = 1000  # study.confirm: clean + PGD on these seeded test points, every cell
    test_steps: int = 50
    test_restarts: int = 2
    aa_points: int = 200  # standard AutoAttack on these seeded test points ...
    aa_keeps: tuple[float, ...] = (0.01,)  # ... for the cells at these keep fractions ...
    aa_seeds: tuple[int, ...] = (0,)  # ... of these seeds
    sets: tuple[str, ...] = ()  # --set overrides of every cell's `study run` (analysis/experiments/fashion_methods.yaml keys)


QUICK = Sizing(seeds=(0,), methods=("hydra", "lwm"), keeps=(0.1,), scopes=("global",), dense=False,
               test_points=100, test_steps=5, test_restarts=2, aa_points=0, aa_seeds=(),
               sets=("trial.data.train_limit=256", "trial.pretrain.epochs=1", "trial.prune_stage.epochs=1",
                     "trial.finetune.epochs=1", "trial.pretrain_attack.steps=2", "trial.attack.steps=2",
                     "trial.eval.points=100", "trial.eval.steps=3", "trial.eval.val_points=64",
                     "trial.eval.val_steps=2"))
FULL_DATA = Sizing(seeds=(0, 1, 2), test_points=10000, test_restarts=3, aa_points=1000, aa_seeds=(0, 1, 2),
                   sets=("trial.data.train_limit=0", "trial.data.batch_size=128", "trial.pretrain.epochs=20",
                         "trial.prune_stage.epochs=10", "trial.finetune.epochs=10", "trial.pretrain_attack.steps=7",
                         "trial.attack.steps=7", "trial.eval.points=0"))


@dataclass(frozen=True)
class Cell:
    seed: int
    method: str
    scope: str
    keep: float

    @property
    def label(self) -> str:
        if self.method == "dense":
            return f"seed {self.seed} dense"
        return f"seed {self.seed} {self.method} {self.scope} {100 * (1 - self.keep):g}%"

    def sets(self) -> list[str]:
        return [f"search.prune.method.choice=[{self.method}]", f"search.prune.keep_fraction.choice=[{self.keep!r}]",
                f"search.prune.scope.choice=[{self.scope}]", f"trial.seed={self.seed}"]


def cells(z: Sizing) -> list[Cell]:
    out = []
    for seed in z.seeds:
        if z.dense:
            out.append(Cell(seed, "dense", "layer", 1.0))
        out += [Cell(seed, m, s, k) for s in z.scopes for k in z.keeps for m in z.methods]
    return out


def fashion_missing() -> str | None:
    """None when Fashion-MNIST is installed, else the one-line error with the install command."""
    for d in FASHION_DIRS:
        if all((d / f).is_file() or (d / f"{f}.gz").is_file() for f in FASHION_FILES):
            return None
    where = " or ".join(str(d) for d in FASHION_DIRS)
    return f"Fashion-MNIST is not installed (looked in {where}); install it with: {INSTALL}"


# ---------------------------------------------------------------------------------------------------
# Running the cells.


def settings_tag(z: Sizing) -> str:
    """Short hash of everything that changes a cell's numbers: cell studies of other settings get other names."""
    text = json.dumps([SPACE.read_text(), list(z.sets), z.test_points, z.test_steps, z.test_restarts])
    return hashlib.sha1(text.encode()).hexdigest()[:6]


def study_name(tag: str, c: Cell) -> str:
    if c.method == "dense":
        return f"fm{tag}-s{c.seed}-dense"
    return f"fm{tag}-s{c.seed}-{c.method}-{c.scope}-k{c.keep:g}"


def run_cell(c: Cell, z: Sizing, tag: str, work: Path, fresh: bool) -> dict[str, Any]:
    runs, name = work / "runs", study_name(tag, c)
    sets = ["study.n_trials=1", f"trial.cache_dir={work / 'pretrained'}",
            f"study.confirm.points={z.test_points}", f"study.confirm.steps={z.test_steps}",
            f"study.confirm.restarts={z.test_restarts}", "study.confirm.autoattack=false", *c.sets(), *z.sets]
    reused = not fresh and common.study_finished(runs, name)
    if reused:
        wall = common.recorded_wall(runs, name)
    else:
        wall = common.study_run(SPACE, name, runs, sets, work / "logs" / f"{name}.log")
    row: dict[str, Any] = {"seed": c.seed, "method": c.method, "scope": c.scope if c.method != "dense" else "",
                           "keep_fraction": c.keep, "sparsity": round(1 - c.keep, 6), "study": name,
                           "study_wall_s": round(wall, 1)}
    trial = common.load_study(runs, name).trials[0]
    row["state"] = trial.state.name
    m = common.trial_metrics(trial)
    for k in ("params_kept", "params_total", "compression", "val_clean_acc", "val_robust_acc", "wall_s"):
        row[k if k != "wall_s" else "trial_wall_s"] = m.get(k, math.nan)
    confirm = common.read_json(common.trial_folder(runs, name, trial.number) / "confirm.json")
    if confirm is not None:
        t = confirm["metrics"]
        row.update(test_clean_acc=t["test_clean_acc"], test_pgd_acc=t["test_pgd_acc"],
                   test_points=int(t["test_points"]), test_attack=confirm["test_attack"])
    if c.method != "dense" and c.keep in z.aa_keeps and c.seed in z.aa_seeds and confirm is not None:
        row.update(autoattack(c, z, runs, name, trial.number, fresh))
    common.log_line(f"{c.label}: test clean {row.get('test_clean_acc', math.nan):.3f} PGD "
                    f"{row.get('test_pgd_acc', math.nan):.3f}"
                    + (f", AutoAttack {row['aa_autoattack_acc']:.3f} on {row['aa_points']}" if "aa_points" in row else "")
                    + (" (reused)" if reused else f" ({wall:.0f} s)"))
    return row


def autoattack(c: Cell, z: Sizing, runs: Path, name: str, number: int, fresh: bool) -> dict[str, Any]:
    """Standard AutoAttack (+ PGD, per-point worst case) on `aa_points` seeded test points of the cell's model."""
    folder = common.trial_folder(runs, name, number)
    path = folder / "autoattack.json"
    budget = {"points": z.aa_points, "steps": z.test_steps, "restarts": z.test_restarts}
    payload = common.read_json(path)
    if fresh or payload is None or payload.get("budget_key") != budget:
        t0 = time.perf_counter()
        overrides = {"seed": c.seed, **trial_overrides(z.sets)}
        payload = common.confirm_saved_model(SPACE, overrides, folder / "model.pt", points=z.aa_points,
                                             steps=z.test_steps, restarts=z.test_restarts, autoattack=True)
        payload["budget_key"] = budget
        path.write_text(json.dumps(payload, indent=2))
        common.record_wall(runs, f"{name}:autoattack", time.perf_counter() - t0)
    t = payload["metrics"]
    return {"aa_points": int(t["test_points"]), "aa_clean_acc": t["test_clean_acc"], "aa_pgd_acc": t["test_pgd_acc"],
            "aa_autoattack_acc": t["test_autoattack_acc"], "aa_robust_acc": t["test_robust_acc"],
            "aa_attack": payload["test_attack"], "aa_wall_s": common.recorded_wall(runs, f"{name}:autoattack")}


def trial_overrides(sets: Sequence[str]) -> dict[str, Any]:
    """The `trial.*` --set overrides as a trial config's dotted overrides (values parsed as YAML)."""
    out = {}
    for s in sets:
        key, _, value = s.partition("=")
        if key.startswith("trial."):
            out[key[len("trial."):]] = yaml.safe_load(value)
    return out


# ---------------------------------------------------------------------------------------------------
# Summary, plot, page.


CELL_COLUMNS = ["seed", "method", "scope", "keep_fraction", "sparsity", "state", "params_kept", "params_total",
                "compression", "val_clean_acc", "val_robust_acc", "test_clean_acc", "test_pgd_acc", "test_points",
                "aa_points", "aa_clean_acc", "aa_pgd_acc", "aa_autoattack_acc", "aa_robust_acc", "trial_wall_s",
                "study_wall_s", "aa_wall_s", "study", "test_attack", "aa_attack"]
SUMMARY_FIGURES = ("compression", "val_robust_acc", "test_clean_acc", "test_pgd_acc", "aa_autoattack_acc",
                   "aa_robust_acc")


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (method, scope, keep): mean, std, min, max over seeds of every figure."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["scope"], r["keep_fraction"]), []).append(r)
    out = []
    for (method, scope, keep), rs in groups.items():
        s: dict[str, Any] = {"method": method, "scope": scope, "keep_fraction": keep, "sparsity": rs[0]["sparsity"],
                             "seeds": " ".join(str(r["seed"]) for r in rs), "params_kept": rs[0].get("params_kept")}
        for fig in SUMMARY_FIGURES:
            sp = common.spread([r.get(fig, math.nan) for r in rs])
            for stat in ("mean", "std", "min", "max"):
                s[f"{fig}_{stat}"] = sp[stat]
            s[f"{fig}_n"] = sp["n"]
        out.append(s)
    order = {m: i for i, m in enumerate(("dense", *METHODS))}
    return sorted(out, key=lambda s: (s["method"] != "dense", s["scope"], -s["keep_fraction"], order.get(s["method"], 9)))


def plot(summary: list[dict[str, Any]], path: Path) -> Path:
    """Test robust (PGD) accuracy against compression, one colour per method, solid = layer, dashed = global
    scope; bars span the seeds (min to max); hollow diamonds: AutoAttack (its points, first seed)."""
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    dense = [s for s in summary if s["method"] == "dense"]
    for s in dense:
        ax.errorbar([s["compression_mean"]], [s["test_pgd_acc_mean"]], fmt="*", ms=12, color="black",
                    yerr=_bars(s, "test_pgd_acc"), label=LABELS["dense"])
    for method in METHODS:
        for scope, style in (("layer", "-"), ("global", "--")):
            pts = sorted((s for s in summary if s["method"] == method and s["scope"] == scope),
                         key=lambda s: s["compression_mean"])
            if not pts:
                continue
            xs = [s["compression_mean"] for s in pts]
            ax.errorbar(xs, [s["test_pgd_acc_mean"] for s in pts], yerr=_bars(pts, "test_pgd_acc"), fmt="o" + style,
                        color=COLORS[method], capsize=3, label=f"{LABELS[method]}, {scope}")
            aa = [s for s in pts if math.isfinite(s["aa_autoattack_acc_mean"])]
            if aa:
                ax.plot([s["compression_mean"] for s in aa], [s["aa_autoattack_acc_mean"] for s in aa], "D",
                        mfc="none", color=COLORS[method], ms=8)
    if any(_finite(s["aa_autoattack_acc_mean"]) for s in summary):
        ax.plot([], [], "D", mfc="none", color="grey", label="AutoAttack (its own points)")
    ax.set_xscale("log")
    ax.set_xlabel("compression (parameters total / kept)")
    ax.set_ylabel("test robust accuracy (PGD)")
    ax.set_title("Fashion-MNIST: test robust accuracy per cell (bars: min to max over seeds)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _bars(s: Any, fig: str) -> Any:
    rows = s if isinstance(s, list) else [s]
    lo = [max(0.0, r[f"{fig}_mean"] - r[f"{fig}_min"]) if math.isfinite(r[f"{fig}_min"]) else 0.0 for r in rows]
    hi = [max(0.0, r[f"{fig}_max"] - r[f"{fig}_mean"]) if math.isfinite(r[f"{fig}_max"]) else 0.0 for r in rows]
    return [lo, hi]


def setup_text(work: Path, rows: list[dict[str, Any]]) -> str:
    """The effective settings, read back from a cell study's validated space.yaml."""
    space = yaml.safe_load((work / "runs" / rows[0]["study"] / "space.yaml").read_text())
    t = space["trial"]
    d, pa, a = t["data"], t["pretrain_attack"], t["attack"]
    limit = d.get("train_limit", 0)
    images = f"a seeded {limit}-image subset of the 54,000 training images" if limit else "all 54,000 training images"
    return (f"Data: Fashion-MNIST, {images} (the 6,000-image validation split carved first), batch {d['batch_size']}. "
            f"Model: {t['model']['arch']}. Dense model: {_n(t['pretrain']['epochs'], 'epoch')} of PGD-{pa['steps']} "
            f"adversarial training (Linf eps {pa['eps']}). HYDRA: {_n(t['prune_stage']['epochs'], 'score-training epoch')} "
            f"(ssi init), then every method {_n(t['finetune']['epochs'], 'fine-tune epoch')} of PGD-{a['steps']} "
            f"(LWM and random masks are set without training). Validation figures: PGD-{t['eval']['steps']} on "
            f"{t['eval']['points'] or 'all'} validation points.")


def _n(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def markdown(rows: list[dict], summary: list[dict], z: Sizing, quick: bool, command: str, wall: float,
             started: datetime, work: Path, csvs: Sequence[Path], png: Path, out: Path) -> str:
    attack = next((r["test_attack"] for r in rows if r.get("test_attack")), "-")
    aa_attack = next((r["aa_attack"] for r in rows if r.get("aa_attack")), "")
    rel = lambda p: p.relative_to(out).as_posix()  # noqa: E731
    table = common.md_table(summary, [
        ("method", lambda s: LABELS[s["method"]]), ("scope", "scope"),
        ("sparsity", lambda s: f"{100 * s['sparsity']:g}%"),
        ("kept params", lambda s: f"{int(s['params_kept']):,}" if _finite(s.get("params_kept")) else "-"),
        ("compression", lambda s: f"{s['compression_mean']:.1f}x"),
        ("seeds", "seeds"),
        ("test clean", lambda s: common.pm(s["test_clean_acc_mean"], s["test_clean_acc_std"])),
        ("test PGD", lambda s: common.pm(s["test_pgd_acc_mean"], s["test_pgd_acc_std"])),
        ("PGD min-max", lambda s: f"{s['test_pgd_acc_min']:.3f}-{s['test_pgd_acc_max']:.3f}"
         if _finite(s["test_pgd_acc_min"]) else "-"),
        ("val robust", lambda s: common.pm(s["val_robust_acc_mean"], s["val_robust_acc_std"])),
    ])
    aa_rows = [r for r in rows if r.get("aa_points")]
    aa_table = common.md_table(aa_rows, [
        ("seed", "seed"), ("method", lambda r: LABELS[r["method"]]), ("scope", "scope"),
        ("sparsity", lambda r: f"{100 * r['sparsity']:g}%"), ("points", "aa_points"),
        ("clean", lambda r: f"{r['aa_clean_acc']:.3f}"), ("PGD", lambda r: f"{r['aa_pgd_acc']:.3f}"),
        ("AutoAttack", lambda r: f"{r['aa_autoattack_acc']:.3f}"),
        ("robust (worst of both)", lambda r: f"{r['aa_robust_acc']:.3f}"),
    ]) if aa_rows else "(no AutoAttack cells in this run)\n"
    parts = ["## Experiment 1: pruning methods on Fashion-MNIST (HYDRA, LWM, random)"]
    if quick:
        parts.append(common.QUICK_BANNER)
    compute = sum(r.get(k, 0.0) for r in rows for k in ("study_wall_s", "aa_wall_s") if _finite(r.get(k)))
    parts += [common.stamp(command, z.seeds, wall, started, compute),
              setup_text(work, rows),
              f"Test figures (test split, every cell; nothing is selected on them): {attack}. Mean ± standard "
              f"deviation over the seeds, and the min-max of the test PGD accuracy. AutoAttack: {aa_attack or '-'}.",
              table, "Standard AutoAttack on the 99% cells (`robust` = correct under both PGD and AutoAttack, per point):",
              aa_table, f"![test robust accuracy against compression]({rel(png)})",
              reading(summary),
              "Data: " + ", ".join(f"[{p.name}]({rel(p)})" for p in csvs) + ". Every cell is a study in "
              f"`{work.relative_to(ROOT) if work.is_relative_to(ROOT) else work}/runs/` (MLflow: its `mlflow.db`).",
              f"Full data on a GPU: `python -m analysis.experiments.fashion_methods --full-data` ({len(cells(FULL_DATA))} "
              "cell studies: all training images, 20 / 10 / 10 epochs of PGD-7, seeds 0-2, PGD-50 x3 on all 10,000 test "
              "images, AutoAttack on 1000 points of every 99% cell; an estimated 2-3 hours on one H100, not measured)."]
    return "\n\n".join(p.rstrip() for p in parts) + "\n"


def reading(summary: list[dict[str, Any]]) -> str:
    """One line per (scope, sparsity): the methods ranked by mean test PGD accuracy, with the seed spread."""
    lines = []
    keys = sorted({(s["scope"], s["keep_fraction"]) for s in summary if s["method"] != "dense"},
                  key=lambda k: (k[0], -k[1]))
    for scope, keep in keys:
        group = sorted((s for s in summary if (s["scope"], s["keep_fraction"]) == (scope, keep) and s["method"] != "dense"),
                       key=lambda s: -s["test_pgd_acc_mean"] if _finite(s["test_pgd_acc_mean"]) else 1)
        ranked = ", ".join(f"{LABELS[s['method']]} {common.pm(s['test_pgd_acc_mean'], s['test_pgd_acc_std'])}" for s in group)
        best, rest = group[0], group[1:]
        clear = rest and _finite(best["test_pgd_acc_min"]) and all(
            _finite(r["test_pgd_acc_max"]) and best["test_pgd_acc_min"] > r["test_pgd_acc_max"] for r in rest)
        one_seed = any(s["test_pgd_acc_n"] < 2 for s in group)
        note = ("one seed: no spread" if one_seed else "ahead in every seed" if clear else
                "ahead on the mean only: the seed ranges overlap") if rest else ""
        if one_seed:
            note = f" ({note})" if note else ""
        else:
            note = f" ({LABELS[best['method']]} {note})" if note else ""
        lines.append(f"- {100 * (1 - keep):g}% {scope}: {ranked}{note}")
    return "Test PGD accuracy by cell, best first:\n\n" + "\n".join(lines)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


# ---------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, Sizing]:
    p = argparse.ArgumentParser(prog=MODULE, description=__doc__.splitlines()[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="smoke run: 2 cells, tiny data and budgets (not results)")
    mode.add_argument("--full-data", action="store_true", help="all training images, 3 seeds, the paper-sized budget (a GPU)")
    p.add_argument("--seeds", type=int, nargs="+", help="trial seeds (each pre-trains its own dense model)")
    p.add_argument("--methods", nargs="+", choices=METHODS)
    p.add_argument("--keeps", type=float, nargs="+", help="keep fractions (0.01 = 99%% sparsity)")
    p.add_argument("--scopes", nargs="+", choices=("layer", "global"))
    p.add_argument("--no-dense", action="store_true", help="leave out the unpruned model's row")
    p.add_argument("--test-points", type=int, help="seeded test points of every cell's clean + PGD figures")
    p.add_argument("--aa-points", type=int, help="seeded test points of AutoAttack (0: none)")
    p.add_argument("--aa-seeds", type=int, nargs="+", help="seeds whose 99%% cells get AutoAttack")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value of analysis/experiments/fashion_methods.yaml in every cell, e.g. trial.pretrain.epochs=4")
    p.add_argument("--out", default=str(ROOT / "docs"), help="folder of results.md (and results/ for CSVs, plots)")
    p.add_argument("--work", default=str(ROOT / "runs" / "experiments" / KEY), help="cell studies, dense cache, logs")
    p.add_argument("--fresh", action="store_true", help="recompute cells already finished with the same settings")
    args = p.parse_args(argv)
    z = QUICK if args.quick else FULL_DATA if args.full_data else Sizing()
    given = {"seeds": args.seeds, "methods": args.methods, "keeps": args.keeps, "scopes": args.scopes,
             "aa_seeds": args.aa_seeds}
    z = replace(z, **{k: tuple(v) for k, v in given.items() if v}, sets=(*z.sets, *args.set))
    if args.test_points:
        z = replace(z, test_points=args.test_points)
    if args.aa_points is not None:
        z = replace(z, aa_points=args.aa_points, aa_seeds=z.aa_seeds if args.aa_points else ())
    if args.no_dense:
        z = replace(z, dense=False)
    return args, z


def main(argv: Sequence[str] | None = None) -> int:
    args, z = parse_args(argv)
    missing = fashion_missing()
    if missing:
        print(f"{MODULE}: error: {missing}", file=sys.stderr)
        return 2
    started, t0 = datetime.now(timezone.utc), time.perf_counter()
    work, out = Path(args.work).resolve(), Path(args.out).resolve()
    tag = settings_tag(z)
    todo = cells(z)
    common.log_line(f"{len(todo)} cells (settings {tag}); logs in {work / 'logs'}")
    try:
        rows = [run_cell(c, z, tag, work, args.fresh) for c in todo]
    except common.StudyFailed as e:
        print(f"{MODULE}: error: {e}", file=sys.stderr)
        return 1
    summary = summarize(rows)
    assets = out / common.ASSETS
    csvs = [common.write_csv(assets / f"{KEY}.csv", summary),
            common.write_csv(assets / f"{KEY}_cells.csv", rows, CELL_COLUMNS)]
    png = plot(summary, assets / f"{KEY}.png")
    wall = time.perf_counter() - t0
    text = markdown(rows, summary, z, args.quick, common.command_line(MODULE, argv), wall, started, work, csvs, png, out)
    page = common.update_section(out / common.RESULTS_PAGE, KEY, text)
    common.log_line(f"wrote {page}, {', '.join(p.name for p in csvs)} and {png.name} in {wall / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
