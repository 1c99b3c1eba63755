"""One trial end to end on digits: stage invariants, caching, resume, export."""
import io
import json

import pytest
import torch

from conftest import TINY_TRIAL

from study.trial import pipeline, pruning
from study.trial.config import trial_from_dict

TINY = TINY_TRIAL


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One pretraining cache for the module: the dense model is trained once, as in a study."""
    return tmp_path_factory.mktemp("pretrained")


@pytest.fixture
def tmp_path(tmp_path, cache):  # every test's configs point at the shared cache
    (tmp_path / "cache").symlink_to(cache, target_is_directory=True)
    return tmp_path


def tiny(tmp_path, **over):
    return trial_from_dict({**TINY, "cache_dir": str(tmp_path / "cache")}, over)


def snapshot(report: pipeline.EpochReport) -> dict:
    """What the Tune trainable does: serialise the resume state before the next epoch changes it."""
    buf = io.BytesIO()
    torch.save(report.state(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    return {"stage": report.stage, "epoch": report.epoch, "step": report.step, "model": state["model"], "raw": state}


def run(cfg, resume=None):
    seen = []
    result = pipeline.run_trial(cfg, on_epoch=lambda r: seen.append(snapshot(r)), resume_state=resume)
    return result, seen


def test_hydra_trial_stage_invariants(tmp_path):
    cfg = tiny(tmp_path)
    result, seen = run(cfg)
    dense = torch.load(pipeline.pretrain_path(cfg), weights_only=True)["model"]
    assert [(s["stage"], s["epoch"], s["step"]) for s in seen] == [
        ("prune", 1, 1), ("prune", 2, 2), ("finetune", 1, 3), ("finetune", 2, 4)]
    weight_keys = [k for k in seen[0]["model"] if k.endswith(".weight") and k.replace(".weight", ".scores") in seen[0]["model"]]
    assert weight_keys
    # prune stage: weights frozen at the dense values, scores move, exactly k kept per layer
    for s in seen[:2]:
        for k in weight_keys:
            assert torch.equal(s["model"][k], dense[k]), k
    first_scores = {k: v for k, v in seen[0]["model"].items() if k.endswith("scores")}
    assert any(not torch.equal(first_scores[k], seen[1]["model"][k]) for k in first_scores)
    for k in weight_keys:
        mask = seen[1]["model"][k.replace(".weight", ".mask")]
        assert int(mask.sum()) == pruning.keep_count(mask.numel(), 0.2)
    # fine-tune: the mask never changes, pruned weights stay exactly zero, kept weights train
    for k in weight_keys:
        mask_k = k.replace(".weight", ".mask")
        assert torch.equal(seen[2]["model"][mask_k], seen[1]["model"][mask_k])
        assert torch.equal(seen[3]["model"][mask_k], seen[1]["model"][mask_k])
        assert (seen[3]["model"][k][seen[3]["model"][mask_k] == 0] == 0).all()
    assert any(not torch.equal(seen[2]["model"][k], seen[3]["model"][k]) for k in weight_keys)
    # reported sparsity equals the zeros counted in the exported weights
    m = result.metrics
    exported = result.model_state
    zeros = sum(int((exported[k] == 0).sum()) for k in weight_keys)
    total = sum(exported[k].numel() for k in weight_keys)
    assert m["sparsity"] == pytest.approx(zeros / total)
    assert m["sparsity"] == pytest.approx(0.8, abs=0.01)
    assert all(0.0 <= m[k] <= 1.0 for k in ("val_clean_acc", "val_robust_acc"))
    assert m["val_robust_acc"] <= m["val_clean_acc"]
    assert not any(k.startswith("test") or k in ("clean_acc", "robust_acc") for k in m)  # the trial never sees test
    # the resume state is loadable the safe way
    path = tmp_path / "state.pt"
    torch.save(seen[-1]["raw"], path)
    torch.load(path, weights_only=True)


def test_pretraining_is_cached_and_shared(tmp_path):
    cfg = tiny(tmp_path)
    path = pipeline.pretrain(cfg)
    mtime = path.stat().st_mtime_ns
    other = tiny(tmp_path, **{"prune.keep_fraction": 0.05, "attack.schedule": "linear", "attack.steps": 4})
    assert other.pretrain_key() == cfg.pretrain_key()  # searched prune/attack params do not retrain
    assert pipeline.pretrain(other) == path and path.stat().st_mtime_ns == mtime
    changed = tiny(tmp_path, **{"pretrain_attack.eps": 0.2})
    assert changed.pretrain_key() != cfg.pretrain_key()


def test_resume_from_a_checkpoint_gives_the_same_result(tmp_path):
    cfg = tiny(tmp_path)
    full, seen = run(cfg)
    for cut in (0, 2):  # after prune epoch 1; after fine-tune epoch 1
        state = torch.load(_save(tmp_path, seen[cut]["raw"]), weights_only=True)
        resumed, rest = run(cfg, resume=state)
        assert [s["step"] for s in rest] == [s["step"] for s in seen[cut + 1:]]
        assert resumed.metrics["val_clean_acc"] == full.metrics["val_clean_acc"]
        assert resumed.metrics["val_robust_acc"] == full.metrics["val_robust_acc"]
        for k, v in full.model_state.items():
            torch.testing.assert_close(resumed.model_state[k], v)


def _save(tmp_path, state):
    path = tmp_path / "resume.pt"
    torch.save(state, path)
    return path


@pytest.mark.parametrize("method", ["lwm", "random", "dense"])
def test_baseline_methods(tmp_path, method):
    cfg = tiny(tmp_path, **{"prune.method": method, "finetune.epochs": 1})
    result, seen = run(cfg)
    assert all(s["stage"] == "finetune" for s in seen)
    if method == "dense":
        assert seen == [] and result.metrics["sparsity"] == 0.0
    else:
        assert result.metrics["sparsity"] == pytest.approx(0.8, abs=0.01)


def test_lwm_mask_is_the_magnitude_mask_of_the_dense_weights(tmp_path):
    cfg = tiny(tmp_path, **{"prune.method": "lwm", "finetune.epochs": 1})
    _, seen = run(cfg)
    dense = torch.load(pipeline.pretrain_path(cfg), weights_only=True)["model"]
    model = seen[0]["model"]
    for k in [k for k in model if k.endswith(".mask")]:
        expected = pruning.compute_masks([dense[k.replace(".mask", ".weight")]], 0.2, "layer")[0]
        assert torch.equal(model[k], expected)


def test_global_scope_trial(tmp_path):
    cfg = tiny(tmp_path, **{"prune.scope": "global", "prune.score_init": "kaiming_normal",
                            "attack.loss": "trades", "prune_stage.epochs": 1, "finetune.epochs": 1})
    result, _ = run(cfg)
    assert result.metrics["sparsity"] == pytest.approx(0.8, abs=0.01)


def test_nan_loss_fails_the_trial(tmp_path):
    cfg = tiny(tmp_path, **{"prune.method": "lwm", "finetune.lr": 1e30, "finetune.epochs": 2})
    with pytest.raises(pipeline.TrialFailed):
        run(cfg)


def test_result_save_writes_json_and_weights(tmp_path):
    cfg = tiny(tmp_path, **{"prune.method": "lwm", "finetune.epochs": 1})
    result, _ = run(cfg)
    out = result.save(tmp_path / "out")
    payload = json.loads((out / "result.json").read_text())
    assert payload["config"]["prune"]["method"] == "lwm"
    assert payload["metrics"]["compression"] > 1
    from study.trial.sparse_file import FORMAT, load_state

    assert torch.load(out / "model.pt", weights_only=True)["format"] == FORMAT  # stored sparse
    state = load_state(out / "model.pt")
    assert list(state) == list(result.model_state)
    assert all(torch.equal(state[k], v) for k, v in result.model_state.items())
