"""`python app.py`'s command line: an adapter's scale as generate and export take it (PATH:SCALE)."""

import pytest
from conftest import make_adapter

from moslora_diffusion.app import cli as app_cli
from moslora_diffusion.app.state import open_app_state


def test_the_app_opens_each_adapter_at_its_scale(tiny_sd15_dir, tmp_path):
    """`--adapter run:0.5` said "no such file or folder"; the app now opens it at 0.5 (the slider's first value),
    and an adapter without a scale at 1.0."""
    first = make_adapter(tiny_sd15_dir, tmp_path / "first" / "moslora.safetensors", seed=1)
    second = make_adapter(tiny_sd15_dir, tmp_path / "second" / "moslora.safetensors", seed=2)
    state = open_app_state(tiny_sd15_dir, tmp_path / "outputs", [first.parent, second.parent], device="cpu",
                           scales=[0.5])
    assert state.fusion.scales == {"first": 0.5, "second": 1.0}


def test_the_command_line_hands_the_scales_over(monkeypatch, tmp_path, capsys):
    seen = {}

    def opened(base, outputs, adapters, config, photos, device, moles, scales):
        seen.update(adapters=[str(a) for a in adapters], scales=scales)
        raise ValueError("stopped before loading")

    monkeypatch.setattr("moslora_diffusion.app.state.open_app_state", opened)
    (tmp_path / "run").mkdir()
    with pytest.raises(SystemExit):
        app_cli.main(["--base", str(tmp_path / "model"), "--output_dir", str(tmp_path / "out"), "--adapter",
                      f"{tmp_path / 'run'}:0.5", "--adapter", str(tmp_path / "run")])
    assert seen == {"adapters": [str(tmp_path / "run")] * 2, "scales": [0.5, 1.0]}
    assert "stopped before loading" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        app_cli.main(["--base", str(tmp_path / "model"), "--adapter", f"{tmp_path / 'nothing'}:x"])
    assert "scale not a number ('x' after the last ':'), and no file or folder of that name exists" in \
        capsys.readouterr().err


def test_without_the_demos_adapter_the_app_says_why_it_opens_the_base_alone(monkeypatch, tmp_path, capsys):
    """The README says `python app.py` opens with the demo's adapter; before scripts/demo.sh has run it opened the
    bare toy base without a word."""
    monkeypatch.setattr(app_cli, "DEMO_ADAPTER", tmp_path / "demo")
    monkeypatch.setattr("moslora_diffusion.app.state.open_app_state", lambda *a, **k: (_ for _ in ()).throw(
        ValueError("stopped before loading")))
    with pytest.raises(SystemExit):
        app_cli.main(["--output_dir", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert f"no adapter: {tmp_path / 'demo'} appears once `bash scripts/demo.sh` has run (or give --adapter); " \
           "opening the toy base model alone" in out
