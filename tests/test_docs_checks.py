"""The docs test's own checks (tests/docs_*.py), fed synthetic Markdown: each kind of rot is caught and named by
file and line, and correct text passes (so a check that refuses everything would fail here too)."""

from __future__ import annotations

import traceback
from pathlib import Path

import pytest
from docs_commands import command_problems, shell_commands
from docs_markdown import anchors, fenced_blocks, link_problems, slug
from docs_python import resolution_problems, run_block, runnable_source

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "synthetic.md"  # never written: the text is handed over


def _blocks(text: str, lang: str):
    return [b for b in fenced_blocks(PAGE, "docs/synthetic.md", text) if b.lang == lang]


# The README's Export section before issue 27: export_pipeline had moved to formats/export_targets.py.
OLD_EXPORT_SNIPPET = """Intro line.

```python
from moslora_diffusion.export import export, export_pipeline
path = export("runwayml/stable-diffusion-v1-5", adapters=[("outputs/sks-dog", 0.8)],
              target="merged-single-file", out="sks.safetensors", dtype="fp16", overwrite=False, config=None)
```
"""


def test_a_wrong_import_is_named_with_its_file_and_line():
    for lang_line in ("```python", "```python no-run"):
        block = _blocks(OLD_EXPORT_SNIPPET.replace("```python", lang_line, 1), "python")[0]
        assert resolution_problems(block) == ["docs/synthetic.md:4: moslora_diffusion.export has no 'export_pipeline'"]
    fixed = OLD_EXPORT_SNIPPET.replace("moslora_diffusion.export import",
                                       "moslora_diffusion.formats.export_targets import")
    assert resolution_problems(_blocks(fixed, "python")[0]) == []


def test_module_attributes_and_failing_imports_are_resolved():
    text = ("```python no-run\nimport moslora_diffusion as md\nimport moslora_diffusion.mole as mole\n"
            "import no_such_package_here\npipe = object()\n"
            "md.attach_to_pipeline(pipe, md.AdapterConfig(rank=4))\nmole.attach_mole; mole.no_such_function\n"
            "md.moslora.native_file.save_adapter; md.moslora.no_such_module\npipe.anything_at_all\n```\n")
    problems = resolution_problems(_blocks(text, "python")[0])
    assert problems == [
        "docs/synthetic.md:4: `import no_such_package_here` fails: No module named 'no_such_package_here'",
        "docs/synthetic.md:7: mole has no 'no_such_function'",
        "docs/synthetic.md:8: md.moslora has no 'no_such_module'",
    ]


def test_a_block_that_raises_reports_the_markdown_line(tmp_path):
    block = _blocks("# Page\n\n```python\nvalue = 1\nraise ValueError('boom')\n```\n", "python")[0]
    with pytest.raises(ValueError, match="boom") as raised:
        run_block(block, tmp_path)
    frame = traceback.extract_tb(raised.value.__traceback__)[-1]
    assert (frame.filename, frame.lineno) == ("docs/synthetic.md", 5)


def test_hub_ids_stand_for_the_tiny_models_when_a_block_runs():
    block = _blocks('```python\nload("stable-diffusion-v1-5/stable-diffusion-v1-5")\n'
                    'load("stabilityai/stable-diffusion-xl-base-1.0")\n```\n', "python")[0]
    assert runnable_source(block).strip() == 'load("tiny-sd15")\nload("tiny-sdxl")'


SHELL = """Text.

```bash
# a comment line
OMP_NUM_THREADS=1 python train_dreambooth.py --pretrained_model_name_or_path tiny-sd15 \\
  --instance_data_dir photos --instance_prompt "a photo of sks dog" --network_dim 8
python -m moslora_diffusion.export --base b --adapter a --to lora-comfy --out o.safetensors
python -m moslora_diffusion.mole train --experts a b --max_train_steps 3 --no_such_gate_flag 1
python app.py --port 7861 --bogus && echo done
accelerate launch --num_processes 2 train_dreambooth.py ... --fake_flag
bash scripts/no_such_script.sh
python -m moslora_diffusion.generate --base b --prompt p --out o --seeds zero
```
"""

GOOD_SHELL = """```bash
python train_dreambooth.py --pretrained_model_name_or_path tiny-sd15 --instance_data_dir photos \\
  --instance_prompt "a photo of sks dog" --rank 4 --output_dir run   # a trailing comment
python -m moslora_diffusion.mole generate --base b --mole m --prompt "a b" --seeds 0 1 --heatmap --out o
moslora-export --base b --adapter run:0.8 --to lora-kohya --out o.safetensors > log.txt
accelerate launch --multi_gpu --num_processes 4 train_dreambooth.py ...
torchrun --nproc_per_node 2 train_dreambooth.py --config run.yaml --rank 8
python -m moslora_diffusion.export ... --to merged-single-file
bash scripts/demo.sh; STEPS=10 bash scripts/demo.sh
mkdir photos && python -c "print(1)" | cat && git status && python -m pytest -q --whatever
```
"""


def test_unknown_flags_refused_values_and_missing_scripts_are_named():
    problems = command_problems(_blocks(SHELL, "bash")[0], REPO)
    assert [p.split(":", 2)[:2] for p in problems] == [["docs/synthetic.md", str(n)] for n in (5, 7, 8, 9, 10, 11, 12)]
    expected = ["unknown flag --network_dim", "invalid choice: 'lora-comfy'", "unknown flag --no_such_gate_flag",
                "unknown flag --bogus", "unknown flag --fake_flag", "scripts/no_such_script.sh does not exist",
                "invalid int value: 'zero'"]
    for problem, words in zip(problems, expected, strict=True):
        assert words in problem, problem


def test_correct_commands_pass_and_other_commands_are_left_alone():
    assert command_problems(_blocks(GOOD_SHELL, "bash")[0], REPO) == []


def test_a_command_that_does_not_exist_or_stops_before_its_parser_is_named():
    text = ("```bash\npython -m moslora_diffusion.no_such_command --x 1\npython -m moslora_diffusion.mole\n"
            "python -m moslora_diffusion.mole generate --help\n```\n")
    problems = command_problems(_blocks(text, "bash")[0], REPO)
    assert len(problems) == 2, problems
    assert problems[0].startswith("docs/synthetic.md:2:") and "No module named moslora_diffusion.no_such_command" \
        in problems[0]
    assert problems[1].startswith("docs/synthetic.md:3:") and "before reaching its argument parser" in problems[1]


def test_a_missing_required_flag_is_a_problem_unless_flags_are_left_out():
    missing = _blocks("```bash\npython -m moslora_diffusion.export --adapter a --to lora-kohya --out o\n```\n", "bash")
    assert "required: --base" in command_problems(missing[0], REPO)[0]
    elided = _blocks("```bash\npython -m moslora_diffusion.export ... --to lora-kohya\n```\n", "bash")
    assert command_problems(elided[0], REPO) == []


def test_commands_are_split_at_continuations_operators_and_comments():
    block = _blocks("```sh\nA=1 python x.py --a 'b c' \\\n  --d # e\nls | wc -l; echo \"f;g\" 2> err\n```\n", "sh")[0]
    assert shell_commands(block) == [(0, ["A=1", "python", "x.py", "--a", "b c", "--d"]), (2, ["ls"]),
                                     (2, ["wc", "-l"]), (2, ["echo", "f;g"])]
    console = _blocks("```console\n$ python app.py --bogus\nerror: not a command --bogus\n```\n", "console")[0]
    assert shell_commands(console) == [(0, ["python", "app.py", "--bogus"])]


LINKS = """# The page

## The toy world and the toy base model (`assets/`)

## Compose: several subjects by weighted sum or MoLE

## Compose: several subjects by weighted sum or MoLE

See [ok](#the-page), [ok](#the-toy-world-and-the-toy-base-model-assets),
[repeat](#compose-several-subjects-by-weighted-sum-or-mole-1),
[dead anchor](#no-such-heading), [ok](training.md#flags), [dead cross anchor](training.md#no-such-flags),
[dead file](missing-page.md), ![dead image](../assets/no-such.png), ![ok](../assets/app_screenshot.png),
[web](https://example.com/x#y), [folder](../benchmarks/), `[not a link](nowhere.md)`
<!-- [a comment](nowhere.md) -->

```bash
echo "[in a code block](nowhere.md)"
```

[ref]: also-missing.md
"""


def test_dead_links_and_anchors_are_named_and_good_ones_pass():
    problems = link_problems(PAGE, "docs/synthetic.md", REPO, text=LINKS)
    assert [p.split(":")[1] for p in problems] == ["11", "11", "12", "12", "20"]
    for problem, words in zip(problems, ["'#no-such-heading'", "'training.md#no-such-flags'", "missing-page.md",
                                         "no-such.png", "also-missing.md"], strict=True):
        assert words in problem and ("dead link" in problem or "dead anchor" in problem), problem


def test_anchors_follow_githubs_slug_rules():
    assert slug("The toy world and the toy base model (`assets/`)") == "the-toy-world-and-the-toy-base-model-assets"
    assert slug("Pivotal tuning (textual inversion + LoRA)") == "pivotal-tuning-textual-inversion--lora"
    assert slug("Reusing an output folder: what `--overwrite_output_dir` deletes") == \
        "reusing-an-output-folder-what---overwrite_output_dir-deletes"
    assert slug("**Bold** and [a link](x.md) — dash") == "bold-and-a-link--dash"
    assert anchors(PAGE, LINKS) >= {"the-page", "compose-several-subjects-by-weighted-sum-or-mole",
                                    "compose-several-subjects-by-weighted-sum-or-mole-1"}


def test_fenced_blocks_keep_their_line_language_and_options_also_inside_lists():
    text = "# P\n\n- item:\n\n  ```python no-run\n  x = 1\n    y = 2\n  ```\n\n~~~bash\nls\n~~~\n"
    python, bash = fenced_blocks(PAGE, "docs/synthetic.md", text)
    assert (python.line, python.lang, python.options, python.text) == (6, "python", ("no-run",), "x = 1\n  y = 2\n")
    assert (bash.line, bash.lang, bash.text) == (11, "bash", "ls\n")
