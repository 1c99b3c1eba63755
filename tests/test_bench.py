"""The benchmark's correctness, not its speed: the reference-style layer masks like ours, both loops'
attacks stay in the eps-ball, every loop trains a tiny model, and the tables render from given numbers."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bench import common, memory, prune_overhead, reference, run_all, study_overhead, throughput
from study.trial import pruning
from study.trial.attacks import AttackStrength, pgd_linf

MACHINE = common.Machine(cpu="test cpu", cores=2, torch_threads=2, torch="x", python="3", device="cpu",
                         matmul_dtype="float32", matmul_tflops=0.1)


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))


def test_reference_mask_and_forward_equal_ours():
    ours, ref = _tiny(), _tiny()
    pruning.make_prunable(ours)
    reference.make_reference(ref, k=0.1)
    with torch.no_grad():
        for a, b in zip(pruning.masked_layers(ours), reference.subnet_layers(ref)):
            s = torch.randn(a[1].scores.shape, generator=torch.Generator().manual_seed(1))
            a[1].scores.copy_(s)
            b.popup_scores.copy_(s)
    pruning.refresh_masks(ours, 0.1, "layer")
    pruning.set_mode(ours, "scores")
    for (_, a), b in zip(pruning.masked_layers(ours), reference.subnet_layers(ref)):
        assert torch.equal(a.mask, reference.reference_mask(b.popup_scores, 0.1))
    x = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(ours(x), ref(x))


def test_both_attacks_stay_in_the_eps_ball():
    model = _tiny()
    x, y = torch.rand(4, 3, 8, 8), torch.randint(0, 10, (4,))
    eps = 8 / 255
    mine = pgd_linf(model, x, y, AttackStrength(eps=eps, steps=3, step_size=2 / 255))
    reference.make_reference(model, k=0.5)
    reference.set_stage(model, "prune")
    theirs = reference.reference_pgd(model, x, y, eps, 2 / 255, 3)
    for adv in (mine, theirs):
        assert (adv - x).abs().max() <= eps + 1e-6
        assert adv.min() >= 0 and adv.max() <= 1
        assert not torch.equal(adv, x)
    # the reference attack computed parameter gradients (the cost it is there to show) and zeroed them
    scores = [m.popup_scores.grad for m in reference.subnet_layers(model)]
    assert all(g is not None and not g.any() for g in scores)
    assert F.cross_entropy(model(theirs), y) >= F.cross_entropy(model(x), y) - 1e-4


def test_every_loop_trains_a_tiny_model():
    spec = throughput.Spec(loops=("reference", "ours", "ours_bf16", "dense", "prune", "finetune"), arch="small_cnn",
                           stage="prune", batch=2, device="cpu", width=2, repeats=1, warmup=1, attack_steps=1)
    r = throughput.measure(spec)
    assert not r["errors"]
    assert set(r["loops"]) == set(spec.loops)
    assert all(v["images_s"] > 0 for v in r["loops"].values())
    assert r["peak_mem"] > 0


def _loops(**rates: float) -> dict:
    return {k: {"times": [2 / v], "step_s": 2 / v, "images_s": v} for k, v in rates.items()}


def test_tables_render_from_given_numbers():
    spec = dict(loops=["reference", "ours"], arch="small_cnn", stage="prune", batch=2, device="cpu", width=0,
                batches_per_repeat=1, repeats=1, warmup=1, attack_steps=10, seed=0)
    t1 = throughput.table([{"spec": spec, "loops": _loops(reference=1.0, ours=3.0), "errors": {}, "peak_mem": 1,
                            "base_mem": 0}], MACHINE)
    assert t1.rows[0][:6] == ["small_cnn", "prune", 2, "1.00", "3.00", "3.00x"]
    half = throughput.table([{"spec": {**spec, "loops": ["reference", "ours", "ours_bf16"]},
                              "loops": _loops(reference=1.0, ours=3.0, ours_bf16=4.5), "errors": {}}], MACHINE)
    assert half.headers[6:8] == ["ours bf16 img/s", "bf16 / reference"] and half.rows[0][6:8] == ["4.50", "4.50x"]
    t2 = prune_overhead.table([{"spec": {**spec, "loops": ["dense", "prune", "finetune"]},
                                "loops": _loops(dense=2.0, prune=1.6, finetune=2.0), "errors": {}}], MACHINE)
    assert t2.rows[0][5] == "+25.0%" and t2.rows[0][7] == "+0.0%"
    t0 = 1000.0
    trials = [{"start": t0 + 12, "end": t0 + 56, "pid": 1, "report_s": 0.5},
              {"start": t0 + 12.5, "end": t0 + 57, "pid": 2, "report_s": 0.5}]
    t3 = study_overhead.table({"study_s": 60.0, "plain_s": 56.0, "returned": t0 + 59, "quickstart_s": 200.0,
                               "pairs": [{"study_s": 60.0, "plain_s": 56.0}, {"study_s": 61.0, "plain_s": 55.0}],
                               "pretrain_s": 10.0, "pool_ready_s": 3.0, "trial_s": [44.0, 44.0], "n_trials": 2,
                               "complete": 2, "failed": 0, "space": "s.yaml", "start": t0, "end": t0 + 60,
                               "fit": (t0 + 2, t0 + 58), "pretrain": {"end": t0 + 11.5}, "trials": trials,
                               "driver_s": {}, "driver_calls": {}, "concurrency": 2, "cpus_per_trial": 1}, MACHINE)
    # total: study, plain, overhead, per trial, % of the study, % of the quickstart's wall
    assert t3.rows[0][1:] == ["60.0", "56.0", "4.0", "2.0", "6.7%", "2.0%"]
    assert t3.rows[1][1:4] == ["11.5", "10.0", "1.5"]  # start -> dense model: 11.5 s against the plain 10
    assert t3.rows[2][1:4] == ["45.5", "46.0", "-0.50"]  # dense -> last trial end (57): against plain 56 - 10
    assert t3.rows[3][1:4] == ["2.0", "0.00", "2.0"]  # after the last trial, until run_study returned
    assert t3.rows[4][1:4] == ["1.0", "0.00", "1.0"]  # Ray's shutdown
    assert "0.75" in t3.rows[7][1]
    assert any("60.0 / 56.0 = 4.0; 61.0 / 55.0 = 6.0" in n for n in t3.notes)
    assert any("200.0 s" in n for n in t3.notes)  # first trial's start after the dense model, mean of the two workers
    t4 = memory.table([{"what": "a step", "batch": 2, "attack_steps": 2, "peak_mem": 3 * 2**20, "base_mem": 2**20},
                       {"what": "a trial", "batch": 64, "attack_steps": "3/5", "peak_mem": 2**21, "base_mem": 2**20}],
                      MACHINE)
    assert t4.rows[0][2:] == ["3 MiB", "1 MiB", "2 MiB"]
    text = run_all.render_markdown([t1, t2, t3, t4], MACHINE, "python -m bench.run_all", "2025-01-01 00:00 UTC")
    assert "| small_cnn | prune | 2 | 1.00 | 3.00 | 3.00x |" in text
    assert "command: `python -m bench.run_all`" in text and "test cpu" in text and "2025-01-01" in text
    assert text.count("\n|---|") == 4 and text.count("### ") == 4
