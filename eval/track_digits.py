"""Train a method on the tiny-digits world and score its student at every validation step: digits-FID and prompt
agreement on 1000 held-out prompts, sampled through the recipe's stock pipeline, appended to OUTPUT_DIR/tune.jsonl
(with the ratio to --teacher_fid when given). The ablation and tuning curves in README come from this.

    python eval/track_digits.py dmd2 --teacher_fid 7.060 --config train_scripts/configs/tiny_digits/dmd2.yaml \\
        --output_dir runs/t/dmd2 --validation_steps 250

(7.060: the teacher at 25 DDIM steps, guidance 3, from `stepdistill toy quality`.) Every other option goes to the
method's trainer unchanged.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from stepdistill.config import parse_config  # noqa: E402
from stepdistill.errors import StepdistillError  # noqa: E402
from stepdistill.methods import METHODS, get_method  # noqa: E402
from stepdistill.toy.evaluate import DigitsJudge, score_pipeline  # noqa: E402
from stepdistill.trainer import Trainer  # noqa: E402


class TrackingTrainer(Trainer):
    """The real trainer; its validation step scores the student instead of writing a grid."""

    teacher_fid: float | None = None

    @torch.no_grad()
    def validate(self):
        if not self.accelerator.is_main_process:
            return None
        start = time.time()
        if not hasattr(self, "judge"):
            self.judge = DigitsJudge.from_world(self.config.pretrained_model_name_or_path)
        kwargs = {**self.method.recipe().call_kwargs(), "height": self.resolution, "width": self.resolution}
        with self.accelerator.autocast():  # float32 trainable networks beside half-precision frozen ones
            scores, _ = score_pipeline(self.method.sampling_pipeline(), self.judge, kwargs)
        line = {"step": self.step, "fid": round(scores["digits_fid"], 3), "agree": round(scores["prompt_agreement"], 4)}
        if self.teacher_fid:
            line["ratio"] = round(scores["digits_fid"] / self.teacher_fid, 3)
        line["eval_s"] = round(time.time() - start, 1)
        print("TRACK", json.dumps(line), flush=True)
        with open(self.output_dir / "tune.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("method", choices=sorted(METHODS))
    parser.add_argument("--teacher_fid", type=float, default=None, help="the teacher's digits-FID, for the ratio")
    args, rest = parser.parse_known_args(argv)
    method = get_method(args.method)
    TrackingTrainer.teacher_fid = args.teacher_fid
    try:
        config = parse_config(method.config_class, rest, prog=f"track_digits.py {args.method}")
        TrackingTrainer(config, method).train()
    except StepdistillError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
