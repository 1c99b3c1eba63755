#!/usr/bin/env python
"""Mutation probe: do the project's tests catch plausible bugs?

For each mutation below (a textual replacement in one file, standing for a bug someone could plausibly
write), the probe applies it in a private copy of the repository, runs the test files that should catch
it, and records:

  caught   the tests failed (good: the bug would not go unnoticed)
  missed   the tests passed with the bug in place (a gap in the tests)
  broken   the old snippet is not in the file (or is there more than once): the code changed and the
           mutation no longer applies; update it so the list stays current
  timeout  the tests ran past --timeout

The repository itself is never modified: its tracked and untracked-but-not-ignored files
(`git ls-files -co --exclude-standard`) are copied into a temporary directory, the tests run there with
cwd = the copy and PYTHONPATH = the copy (so `import study` resolves to the copy, in Ray workers too),
and the mutated file is restored after each mutation. Bytecode is not written, so a mutation never
reuses a stale .pyc.

    python tools/mutation_probe.py --list
    python tools/mutation_probe.py --only evaluate-counts-misclassified-as-robust
    python tools/mutation_probe.py                 # all of them (slow: minutes per mutation)

Exit status: 0 when every selected mutation is caught, 1 when any is missed, broken or timed out, 2 when
the unmutated tests already fail in the copy (nothing could be concluded).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str  # relative to the repository root
    old: str  # exact snippet, must occur exactly once in the file
    new: str
    tests: tuple[str, ...]  # test files (relative to the root) that should catch it
    description: str


MUTATIONS: list[Mutation] = [
    # --- study/trial/pruning.py --------------------------------------------------------------------------
    Mutation(
        "ste-without-sign", "study/trial/pruning.py",
        "a = self.scores.abs()\n",
        "a = self.scores\n",
        ("tests/test_pruning.py",),
        "STE gradient to the scores without sign(s): dL/ds = w*G instead of sign(s)*w*G"),
    Mutation(
        "ste-flipped", "study/trial/pruning.py",
        "self.weight * (self.mask + (a - a.detach()))",
        "self.weight * (self.mask - (a - a.detach()))",
        ("tests/test_pruning.py",),
        "STE gradient fully flipped: dL/ds = -sign(s)*w*G (scores descend the wrong way)"),
    Mutation(
        "topk-signed-layer", "study/trial/pruning.py",
        "return [_topk_mask(v.abs(), keep_count(v.numel(), keep_fraction)) for v in values]",
        "return [_topk_mask(v, keep_count(v.numel(), keep_fraction)) for v in values]",
        ("tests/test_pruning.py",),
        "per-layer top-k ranks the signed scores instead of |scores| (large negative scores pruned)"),
    Mutation(
        "topk-signed-global", "study/trial/pruning.py",
        "flat = torch.cat([v.abs().flatten().float() for v in values])",
        "flat = torch.cat([v.flatten().float() for v in values])",
        ("tests/test_pruning.py",),
        "global top-k ranks the signed scores instead of |scores|"),
    Mutation(
        "global-scope-per-layer", "study/trial/pruning.py",
        'if scope == "layer":',
        'if scope in ("layer", "global"):',
        ("tests/test_pruning.py",),
        "scope 'global' silently computes per-layer masks (k of each layer, not k of all)"),
    Mutation(
        "ssi-without-fan-in-scale", "study/trial/pruning.py",
        "s.copy_(math.sqrt(6.0 / fan_in) * w / w.abs().max().clamp_min(1e-12))",
        "s.copy_(w / w.abs().max().clamp_min(1e-12))",
        ("tests/test_pruning.py",),
        "ssi score init without the sqrt(6/fan_in) scale (same mask, wrong score magnitude for the optimizer)"),
    Mutation(
        "fixed-mode-hook-dropped", "study/trial/pruning.py",
        "self._hook = self.weight.register_hook(lambda g, m=self.mask: g * m)",
        "self._hook = None",
        ("tests/test_pruning.py",),
        "fixed mode without the gradient hook: pruned weights regrow during fine-tuning"),
    Mutation(
        "size-counts-bn-running-stats", "study/trial/pruning.py",
        'PARAMETER_LEAVES = ("weight", "bias")',
        'PARAMETER_LEAVES = ("weight", "bias", "running_mean", "running_var")',
        ("tests/test_pruning.py", "tests/test_models.py"),
        "size_report counts BatchNorm running statistics as parameters"),
    # --- study/trial/attacks.py and study/trial/losses.py ---------------------------------------------------------
    Mutation(
        "pgd-one-sided-start", "study/trial/attacks.py",
        "delta = (2 * noise - 1) * eps",
        "delta = noise * eps",
        ("tests/test_training_attacks.py",),
        "PGD random start drawn from [0, eps] instead of [-eps, eps]"),
    Mutation(
        "pgd-no-unit-clamp", "study/trial/attacks.py",
        "x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp_(0, 1)",
        "x_adv = torch.min(torch.max(x_adv, x - eps), x + eps)",
        ("tests/test_training_attacks.py",),
        "pgd_linf steps leave the [0, 1] image box"),
    Mutation(
        "trades-kl-swapped", "study/trial/losses.py",
        "robust = F.kl_div(F.log_softmax(model(x_adv).float(), dim=1), F.softmax(logits.float(), dim=1),",
        "robust = F.kl_div(F.log_softmax(logits.float(), dim=1), F.softmax(model(x_adv).float(), dim=1),",
        ("tests/test_losses.py", "tests/test_training_attacks.py"),
        "TRADES robust term with the KL arguments swapped: KL(f(x_adv) || f(x)) instead of KL(f(x) || f(x_adv))"),
    Mutation(
        "fgsm-rs-step-one-eps", "study/trial/losses.py",
        "step_size=1.25 * strength.eps",
        "step_size=1.0 * strength.eps",
        ("tests/test_losses.py", "tests/test_training_attacks.py"),
        "FGSM-RS step of 1.0 eps instead of Wong et al.'s 1.25 eps"),
    # --- study/trial/evaluation.py -------------------------------------------------------------------------
    Mutation(
        "evaluate-counts-misclassified-as-robust", "study/trial/evaluation.py",
        "still = ok.clone()",
        "still = torch.ones_like(ok)",
        ("tests/test_evaluation.py",),
        "evaluate counts clean-misclassified points as robust when the attack does not flip them"),
    Mutation(
        "evaluate-last-not-worst-restart", "study/trial/evaluation.py",
        "idx = still.nonzero().squeeze(1)",
        "idx = ok.nonzero().squeeze(1)",
        ("tests/test_evaluation.py",),
        "evaluate re-attacks every clean-correct point each restart: a point broken by an early restart "
        "but not by the last counts robust (best/last case, not per-point worst case)"),
    Mutation(
        "evaluate-leaves-eval-mode", "study/trial/evaluation.py",
        "model.train(was_training)",
        "pass",
        ("tests/test_evaluation.py",),
        "evaluate leaves a model that was training in eval mode (BatchNorm/dropout off for the rest of training)"),
    Mutation(
        "evaluate-unseeded-random-start", "study/trial/evaluation.py",
        "torch.manual_seed(seed)",
        "None",
        ("tests/test_evaluation.py",),
        "the PGD random start comes from the caller's global RNG, not from the evaluation seed"),
    Mutation(
        "evaluate-leaks-global-rng", "study/trial/evaluation.py",
        "with torch.random.fork_rng(devices=devices):",
        "with torch.random.fork_rng(devices=devices, enabled=False):",
        ("tests/test_evaluation.py",),
        "evaluate reseeds and consumes the caller's global RNG (training noise then depends on evaluation)"),
    # --- analysis/pareto.py --------------------------------------------------------------------------
    Mutation(
        "pareto-keeps-dominated", "analysis/pareto.py",
        "dominated = (no_worse & better).any(0)",
        "dominated = (no_worse & better).sum(0) > 1",
        ("tests/test_pareto.py",),
        "the Pareto front keeps a point that exactly one other point dominates"),
    Mutation(
        "hypervolume-reference-sign", "analysis/pareto.py",
        'else 1.1 * float(pts[:, i].max())',
        'else -1.1 * float(pts[:, i].max())',
        ("tests/test_pareto.py",),
        "default hypervolume reference point for minimised objectives off by sign (-1.1 x worst)"),
]


# ---------------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    mutation: Mutation
    status: str  # caught | missed | broken | timeout | baseline-failed
    seconds: float
    detail: str  # the first failing test, or why the mutation did not apply
    output: str = ""


def repo_files(repo: Path) -> list[str]:
    out = subprocess.run(["git", "-C", str(repo), "ls-files", "-co", "--exclude-standard", "-z"],
                         check=True, capture_output=True).stdout.decode()
    return [f for f in out.split("\0") if f]


def make_copy(repo: Path, files: list[str], dest: Path) -> Path:
    for rel in files:
        src = repo / rel
        if not src.is_file():  # tracked but deleted in the working tree, or a submodule
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)
    return dest


def env_for(copy: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(copy) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.pop("PYTEST_ADDOPTS", None)
    return env


def check_imports_resolve_to(copy: Path, python: str) -> None:
    code = "import study, analysis; print(study.__file__); print(analysis.__file__)"
    out = subprocess.run([python, "-c", code], cwd=copy, env=env_for(copy), capture_output=True, text=True)
    paths = out.stdout.split()
    if out.returncode != 0 or len(paths) != 2 or not all(Path(p).resolve().is_relative_to(copy.resolve()) for p in paths):
        raise SystemExit(f"mutation_probe: `import study` does not resolve to the copy {copy}:\n{out.stdout}{out.stderr}")


FAILED_RE = re.compile(r"^(?:FAILED|ERROR) (\S+)", re.M)


def run_tests(copy: Path, tests: tuple[str, ...], python: str, timeout: float,
              stop_first: bool = True) -> tuple[int | None, str, float]:
    cmd = [python, "-m", "pytest", *(["-x"] if stop_first else []), "-q", "-p", "no:cacheprovider", *tests]
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=copy, env=env_for(copy), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        return None, out, time.monotonic() - start
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - start


def first_failure(output: str) -> str:
    failed = list(dict.fromkeys(FAILED_RE.findall(output)))
    if failed:
        return failed[0] if len(failed) == 1 else f"{len(failed)} failed: {' '.join(failed)}"
    tail = [line for line in output.strip().splitlines() if line.strip()]
    return tail[-1] if tail else ""


def probe(m: Mutation, copy: Path, python: str, timeout: float, stop_first: bool = True) -> Outcome:
    path = copy / m.file
    if not path.is_file():
        return Outcome(m, "broken", 0.0, f"{m.file} does not exist")
    missing = [t for t in m.tests if not (copy / t).is_file()]
    if missing:
        return Outcome(m, "broken", 0.0, f"test file(s) missing: {', '.join(missing)}")
    original = path.read_text()
    count = original.count(m.old)
    if count != 1:
        return Outcome(m, "broken", 0.0, "old snippet not found" if count == 0 else f"old snippet found {count} times")
    try:
        path.write_text(original.replace(m.old, m.new))
        rc, output, seconds = run_tests(copy, m.tests, python, timeout, stop_first)
    finally:
        path.write_text(original)
    if rc is None:
        return Outcome(m, "timeout", seconds, f"tests ran past {timeout:.0f}s", output)
    if rc == 0:
        return Outcome(m, "missed", seconds, "tests passed with the mutation", output)
    if rc == 5:  # pytest: no tests collected
        return Outcome(m, "missed", seconds, "no tests collected", output)
    return Outcome(m, "caught", seconds, first_failure(output), output)


def table(outcomes: list[Outcome]) -> str:
    rows = [("mutation", "status", "secs", "tests", "detail")]
    for o in outcomes:
        tests = ",".join(Path(t).stem.removeprefix("test_") for t in o.mutation.tests)
        rows.append((o.mutation.name, o.status.upper() if o.status != "caught" else o.status,
                     f"{o.seconds:.0f}", tests, o.detail))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * 6)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", default=[], metavar="NAME",
                        help="run only this mutation (repeatable, or comma-separated)")
    parser.add_argument("--list", action="store_true", help="list the mutations and whether each applies now")
    parser.add_argument("--jobs", type=int, default=1, help="mutations run in parallel, each in its own copy")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per test run (default 1800)")
    parser.add_argument("--python", default=sys.executable, help="interpreter that runs pytest (default: this one)")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip running the unmutated tests first (a failing baseline makes every mutation 'caught')")
    parser.add_argument("--all-failures", action="store_true",
                        help="run each mutation's tests without -x and list every test that catches it (slower)")
    parser.add_argument("--log-dir", type=Path, help="write each run's pytest output to LOG_DIR/<mutation>.log")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copies")
    args = parser.parse_args(argv)

    names = [n for opt in args.only for n in opt.split(",") if n]
    by_name = {m.name: m for m in MUTATIONS}
    assert len(by_name) == len(MUTATIONS), "mutation names must be unique"
    unknown = [n for n in names if n not in by_name]
    if unknown:
        parser.error(f"unknown mutation(s) {', '.join(unknown)}; valid: {', '.join(by_name)}")
    selected = [by_name[n] for n in names] if names else list(MUTATIONS)

    if args.list:
        for m in MUTATIONS:
            path = REPO / m.file
            n = path.read_text().count(m.old) if path.is_file() else 0
            state = "applies" if n == 1 else ("BROKEN: not found" if n == 0 else f"BROKEN: found {n} times")
            print(f"{m.name:42s} {m.file:22s} {state:18s} {', '.join(m.tests)}\n    {m.description}")
        return 0

    files = repo_files(REPO)
    jobs = max(1, min(args.jobs, len(selected)))
    root = Path(tempfile.mkdtemp(prefix="mutation_probe_"))
    copies = [make_copy(REPO, files, root / f"copy{i}") for i in range(jobs)]
    print(f"mutation_probe: {len(selected)} mutation(s), {jobs} copy(ies) of {len(files)} files under {root}",
          flush=True)
    try:
        check_imports_resolve_to(copies[0], args.python)
        if not args.no_baseline:
            tests = tuple(dict.fromkeys(t for m in selected for t in m.tests if (copies[0] / t).is_file()))
            rc, output, seconds = run_tests(copies[0], tests, args.python, args.timeout)
            if rc != 0:
                print(f"mutation_probe: the UNMUTATED tests fail in the copy ({seconds:.0f}s, rc={rc}); "
                      f"fix them first:\n{output[-4000:]}")
                return 2
            print(f"mutation_probe: baseline passes ({len(tests)} test files, {seconds:.0f}s)", flush=True)

        outcomes: dict[str, Outcome] = {}
        free = list(copies)

        def work(m: Mutation) -> Outcome:
            copy = free.pop()
            try:
                return probe(m, copy, args.python, args.timeout, not args.all_failures)
            finally:
                free.append(copy)

        with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
            for o in pool.map(work, selected):
                outcomes[o.mutation.name] = o
                print(f"  {o.mutation.name}: {o.status} ({o.seconds:.0f}s) {o.detail}", flush=True)
                if args.log_dir:
                    args.log_dir.mkdir(parents=True, exist_ok=True)
                    (args.log_dir / f"{o.mutation.name}.log").write_text(o.output)
        ordered = [outcomes[m.name] for m in selected]
    finally:
        if args.keep:
            print(f"mutation_probe: copies kept under {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)

    print()
    print(table(ordered))
    bad = [o for o in ordered if o.status != "caught"]
    counts = {s: sum(o.status == s for o in ordered) for s in ("caught", "missed", "broken", "timeout")}
    print("\n" + ", ".join(f"{v} {k}" for k, v in counts.items()))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
