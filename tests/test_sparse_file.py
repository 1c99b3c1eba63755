"""The exported model stored sparse (study.trial.sparse_file): its size against the reported sparse_bytes,
a bitwise round trip, torch's weights-only loader, the older dense format, and damaged files."""
from __future__ import annotations

import os
from collections import OrderedDict

import numpy as np
import pytest
import torch

from study.trial import pruning, sparse_file
from study.trial.data import dataset_info
from study.trial.models import create_model


def exported(arch: str = "small_cnn", data: str = "digits", keep: float = 0.1) -> tuple[dict, pruning.SizeReport]:
    torch.manual_seed(0)
    model = create_model(arch, dataset_info(data))
    pruning.make_prunable(model)
    pruning.init_scores(model, "ssi")
    pruning.refresh_masks(model, keep, "layer")
    pruning.set_mode(model, "fixed")
    state = pruning.export_state_dict(model)
    return state, pruning.size_report(state, pruning.prunable_weight_names(model))


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes, so that -0.0 and 0.0 (or two NaNs) are told apart."""
    return t.reshape(-1).contiguous().view(torch.uint8) if t.dtype != torch.bool else t


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(bits(a[k]), bits(b[k])), k


@pytest.mark.parametrize("arch, data", [("small_cnn", "digits"), ("resnet18", "cifar10")])
def test_a_90_percent_pruned_model_is_stored_within_10_percent_of_sparse_bytes(tmp_path, arch, data):
    state, size = exported(arch, data, keep=0.1)
    assert size.sparsity == pytest.approx(0.9, abs=0.01)
    path = sparse_file.save(state, tmp_path / "model.pt")
    on_disk = os.path.getsize(path)
    assert on_disk <= 1.10 * size.sparse_bytes, (on_disk, size.sparse_bytes)
    assert on_disk < 0.2 * size.dense_bytes  # the dense file would be 5x larger or more
    assert_bitwise_equal(sparse_file.load_state(path), state)


def test_the_file_loads_with_torchs_weights_only_unpickler(tmp_path):
    state, _ = exported()
    path = sparse_file.save(state, tmp_path / "model.pt")
    payload = torch.load(path, map_location="cpu", weights_only=True)  # no code, no classes: plain containers
    assert payload["format"] == sparse_file.FORMAT
    assert sum(torch.is_tensor(v) for v in payload.values()) + len(payload["dense"]) <= 6  # few tensor records


def test_exported_hard_zeros_are_positive_zeros():
    """Pruned weights are exported as +0.0 whatever their sign, so the sparse file (which stores no zeros)
    round-trips bit for bit."""
    state, _ = exported()
    for name, t in state.items():
        if sparse_file.is_prunable(name, t):
            zeros = t[t == 0]
            assert zeros.numel() > 0 and not torch.signbit(zeros).any(), name


def test_awkward_weights_round_trip(tmp_path):
    """Negative and tiny values, a weight kept whole, one kept weight, a layer of one weight, every dtype of a
    state dict (int64 counters, float64), sizes that are not multiples of 8."""
    g = torch.Generator().manual_seed(1)
    whole = torch.randn(3, 5, generator=g)
    one = torch.zeros(7, 3, 3, 3)
    one[2, 1, 0, 2] = -1e-30
    odd = torch.randn(13, 3, generator=g) * (torch.rand(13, 3, generator=g) < 0.3)
    state = OrderedDict([("a.weight", whole), ("b.weight", one), ("b.bias", torch.randn(7, generator=g)),
                         ("c.weight", odd), ("d.weight", torch.full((1, 1), -2.5)), ("bn.num_batches_tracked",
                         torch.tensor(17)), ("e.weight", torch.randn(2, 2, dtype=torch.float64)),
                         ("bn.running_var", torch.rand(4, generator=g))])
    path = sparse_file.save(state, tmp_path / "m.pt")
    assert_bitwise_equal(sparse_file.load_state(path), state)
    payload = torch.load(path, weights_only=True)
    stored_odd = int((odd.view(torch.int32) != 0).sum())  # its -0.0s too (randn * mask makes some)
    assert payload["values"].numel() == 15 + 1 + stored_odd + 1  # only non-zero bit patterns are stored


def test_the_older_dense_format_still_loads(tmp_path):
    state, _ = exported()
    torch.save(state, tmp_path / "old.pt")
    assert_bitwise_equal(sparse_file.load_state(tmp_path / "old.pt"), state)


def test_damaged_payloads_are_refused_in_one_line(tmp_path):
    state, _ = exported()
    payload = sparse_file.encode(state)
    short = {**payload, "values": payload["values"][:-3]}
    with pytest.raises(sparse_file.SparseFileError, match="damaged") as e:
        sparse_file.decode(short, "m.pt")
    assert "\n" not in str(e.value) and "m.pt" in str(e.value)
    extra = {**payload, "values": torch.cat([payload["values"], torch.ones(2)])}
    with pytest.raises(sparse_file.SparseFileError, match="belong to no weight"):
        sparse_file.decode(extra, "m.pt")
    with pytest.raises(sparse_file.SparseFileError, match="not a model file"):
        sparse_file.decode({"format": "other", "x": 1}, "m.pt")
    with pytest.raises(sparse_file.SparseFileError, match="not a model file"):
        sparse_file.decode([torch.ones(1)], "m.pt")


def test_the_mask_is_numpys_packbits_of_the_kept_weights():
    """The stored bits, read with an independent decoder: bit i of layer w is 1 iff w.flatten()[i] != 0."""
    state, _ = exported()
    payload = sparse_file.encode(state)
    at = 0
    for name, kind, shape, _ in payload["layout"]:
        if kind != "sparse":
            continue
        flat = state[name].flatten()
        nbytes = (flat.numel() + 7) // 8
        raw = payload["mask"][at:at + nbytes].numpy()
        expected = np.array([int(v != 0) for v in flat.tolist()] + [0] * (8 * nbytes - flat.numel()), np.uint8)
        got = np.array([(byte >> (7 - i)) & 1 for byte in raw for i in range(8)], np.uint8)
        assert np.array_equal(got, expected), name
        at += nbytes
