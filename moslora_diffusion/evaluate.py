"""Measure adapters as the DreamBooth paper does: DINO and CLIP-I (subject fidelity), CLIP-T (prompt fidelity).

    python -m moslora_diffusion.evaluate --base stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --adapter lora=outputs/dog --photos photos/dog --prompts_file prompts.txt --seeds 0 1 2 3 --out eval/dog
    python -m moslora_diffusion.evaluate --base ... --dreambench dreambooth/dataset --adapter moslora=runs/moslora \\
        --adapter lora=runs/lora --out eval/dreambench            # runs/<method>/<subject>/ per subject
    python -m moslora_diffusion.evaluate --base assets/toy-base --adapter outputs/demo --photos assets/toy-subject \\
        --prompt "a photo of sks star" --metrics toy --steps 25 --guidance 5 --out eval/toy   # offline

Resumable: run the same command again and only the missing images are generated. Writes report.md,
report.json (means with 95% intervals per adapter, subject and prompt; paired differences) and contact_sheet.png.
"""

from __future__ import annotations

import sys

from .console import run_command
from .evaluation.cli import parser, run


def _evaluate(argv: list[str]) -> None:
    args = parser().parse_args(argv)
    result = run(args)
    print(f"generated {result['generated']} images, scored {result['scored']}")
    for adapter, block in result["summary"]["adapters"].items():
        print(f"{adapter}: " + ", ".join(f"{m} {v['mean']:.3f} [{v['ci_low']:.3f}, {v['ci_high']:.3f}]"
                                         for m, v in block["overall"].items()))
    for path in result["files"]:
        print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    """`error: ...` and exit status 2 for bad input (console/exits.py), 0 when the report is written."""
    return run_command(_evaluate, argv)


if __name__ == "__main__":
    sys.exit(main())
