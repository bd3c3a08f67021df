"""The composition cost benchmark end to end on the tiny model (the figures are its results file, not this test)."""

import json


def test_compose_cost_quick_run_writes_every_method(tmp_path):
    from benchmarks import compose_cost

    rows = compose_cost.main(["--size", "tiny", "--resolution", "64", "--steps", "2", "--repeats", "1",
                              "--name", "compose_cost_quick", "--out-dir", str(tmp_path)])
    by_method = {r["method"]: r for r in rows}
    assert set(by_method) == {"base", "switch", "composite", "mole", "regional", "regional_prompts", "regional_latent",
                              "regional_latent_fitted", "regional_inpaint_fitted"}
    # counted, not declared: one forward a step, Composite and the latent blend one per expert (the halves cover the
    # image, so the base is skipped); fitted after step 1 of 2, the base runs too in step 2 where the subjects
    # leave room
    forwards = {name: r["unet_forwards_per_step"] for name, r in by_method.items()}
    assert forwards == {"base": 1, "switch": 1, "composite": 2, "mole": 1, "regional": 1, "regional_prompts": 1,
                        "regional_latent": 2, "regional_latent_fitted": forwards["regional_latent_fitted"],
                        "regional_inpaint_fitted": 2}  # one pass per expert, fitted or not
    assert forwards["regional_latent_fitted"] in (2, 2.5)  # 2.5 when the silhouettes leave room in step 2
    decodes = {name: r["vae_decodes"] for name, r in by_method.items()}
    assert decodes == {**dict.fromkeys(by_method, 1), "regional_inpaint_fitted": 2}  # the inpaint blend: per pass
    assert by_method["base"]["ratio"] == 1.0
    assert all(r["latency_s"] > 0 for r in rows)
    saved = json.loads((tmp_path / "compose_cost_quick.json").read_text())
    assert saved["rows"][-1]["method"] == "vae_decode" and saved["rows"][-1]["latency_s"] > 0
    assert (tmp_path / "compose_cost_quick.md").read_text().count("| composite |") == 1


def test_compose_cost_times_only_the_methods_asked_for(tmp_path):
    from benchmarks import compose_cost

    rows = compose_cost.main(["--size", "tiny", "--resolution", "64", "--steps", "2", "--repeats", "1",
                              "--methods", "regional_inpaint_fitted", "--name", "q", "--out-dir", str(tmp_path)])
    assert [r["method"] for r in rows] == ["base", "regional_inpaint_fitted"]
