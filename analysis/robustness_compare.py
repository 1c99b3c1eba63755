"""Dense vs pruned: PGD beside AutoAttack, L0/L2/Linf curves, transfer from the dense model, wall times.

    python -m analysis.robustness_compare DENSE.pt PRUNED.pt --dataset cifar10 --arch vgg16_bn \
        [--points 512 --steps 50 --restarts 2 --linf 0,2/255,4/255,8/255,16/255 --json out.json]

Checkpoints: a state dict, or a dict holding one under "model" (study's pre-training cache and exported
pruned weights both load; pruned weights are hard zeros in the dense architecture). The test split is
used; nothing is selected on it. Every number comes from study.robustness.evaluate_robustness on the
same seeded points for both models.
"""
from __future__ import annotations

import argparse
import json
import sys
from fractions import Fraction
from pathlib import Path

import torch
from torch import nn

from study.trial import sparse_file

DEFAULT_EPS = {  # eps per threat, in each threat's unit (see study.robustness.Threat.unit)
    "linf": "0,1/255,2/255,4/255,8/255,16/255",
    "l2": "0,0.125,0.25,0.5,1,2",
    "l0": "0,1,2,5,10,20",
}


def parse_eps(text: str) -> list[float]:
    return [float(Fraction(t.strip())) for t in text.split(",") if t.strip()]


def load(path: Path, arch: str, info, width: int, device: torch.device) -> nn.Module:
    from study.trial.models import create_model
    model = create_model(arch, info, width)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(ckpt, dict) and ckpt.get("format") == sparse_file.FORMAT:
        ckpt = sparse_file.decode(ckpt, str(path))  # an exported model, stored sparse
    model.load_state_dict(ckpt["model"] if isinstance(ckpt, dict) and "model" in ckpt else ckpt)
    return model.to(device).eval()


def zero_share(model: nn.Module) -> float:
    ws = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return float(sum((w == 0).sum() for w in ws) / sum(w.numel() for w in ws))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dense", type=Path)
    p.add_argument("pruned", type=Path)
    p.add_argument("--dataset", required=True)
    p.add_argument("--arch", default="small_cnn")
    p.add_argument("--width", type=int, default=0)
    p.add_argument("--root", default="data")
    p.add_argument("--points", type=int, default=512)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--restarts", type=int, default=2)
    p.add_argument("--square-queries", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-autoattack", action="store_true")
    p.add_argument("--json", type=Path, help="write both reports' to_dict() here")
    for t, default in DEFAULT_EPS.items():
        p.add_argument(f"--{t}", default=default, help=f"comma-separated eps (fractions allowed); '' skips {t}")
    a = p.parse_args(argv)

    from study.trial.config import DataConfig
    from study.trial.data import load_dataset
    from study.robustness import EvalBudget, evaluate_robustness

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    splits = load_dataset(DataConfig(name=a.dataset, root=a.root), device=device)
    dense, pruned = (load(path, a.arch, splits.info, a.width, device) for path in (a.dense, a.pruned))
    threats = {t: parse_eps(getattr(a, t)) for t in DEFAULT_EPS if getattr(a, t).strip()}
    budget = EvalBudget(points=a.points, steps=a.steps, restarts=a.restarts, seed=a.seed,
                        square_queries=a.square_queries)
    reports = {}
    for name, model, ref in (("dense", dense, None), ("pruned", pruned, dense)):
        print(f"\n===== {name}: {getattr(a, name)} (zero weights {zero_share(model):.1%}) on {device} =====")
        reports[name] = evaluate_robustness(model, splits.x_test, splits.y_test, threats=threats, budget=budget,
                                            autoattack=not a.no_autoattack, reference_model=ref)
        print(reports[name].table())

    d, q = reports["dense"], reports["pruned"]
    print(f"\n===== side by side ({d.n_points} points, seed {a.seed}) =====")
    print(f"{'metric':<30} {'dense':>8} {'pruned':>8}")
    fd, fq = d.flat_metrics(), q.flat_metrics()
    for k in fd:
        if k.split(".")[0] in ("clean_acc", "robust", "auc", "autoattack", "suspect", "wall_s") and k in fq:
            print(f"{k:<30} {fd[k]:>8.4f} {fq[k]:>8.4f}")
    if a.json:
        a.json.write_text(json.dumps({k: r.to_dict() for k, r in reports.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
