"""Nested states (optimizer, scheduler) stored as safetensors round-trip exactly, with no pickle involved."""

import pytest
import torch

from moslora_diffusion.files.safetensors_io import WeightFileError, load_nested, save_nested, save_tensors


def test_optimizer_and_scheduler_states_round_trip(tmp_path):
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
    optimizer = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.99))
    params[0].sum().backward()
    params[1].pow(2).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 ** step)
    scheduler.step()
    for name, state in (("opt", optimizer.state_dict()), ("sched", scheduler.state_dict()), ("empty", {})):
        restored = load_nested(save_nested(state, tmp_path / f"{name}.state.safetensors"))
        assert restored.keys() == state.keys()
        if name == "opt":
            assert set(restored["state"]) == {0, 1}  # int keys stay ints
            for idx, entry in state["state"].items():
                assert all(torch.equal(restored["state"][idx][k], v) for k, v in entry.items())
            fresh = torch.optim.AdamW(params, lr=1e-3)
            fresh.load_state_dict(restored)  # torch accepts what we stored
            assert list(fresh.param_groups[0]["betas"]) == [0.9, 0.99]
        else:
            assert restored == state


def test_plain_tensor_files_and_foreign_objects_are_refused(tmp_path):
    plain = save_tensors({"a": torch.zeros(1)}, tmp_path / "plain.safetensors")
    with pytest.raises(WeightFileError, match="not a saved state"):
        load_nested(plain)
    with pytest.raises(TypeError, match="cannot store a object"):
        save_nested({"x": object()}, tmp_path / "bad.state.safetensors")
    assert not (tmp_path / "bad.state.safetensors").exists()
