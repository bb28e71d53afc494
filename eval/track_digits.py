"""Train a distribution-matching method on the tiny-digits world and score its generator every --validation_steps
iterations (digits-FID and prompt agreement, 1000 held-out prompts, through the recipe's stock pipeline), appending
to OUTPUT_DIR/tune.jsonl. The ablation and tuning curves in README come from this.

    python eval/track_digits.py dmd2 --config train_scripts/configs/tiny_digits/dmd2.yaml --output_dir runs/t --validation_steps 250
"""
import json, sys, time
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
import torch
from stepdistill import trainer as T
from stepdistill.config import parse_config
from stepdistill.toy import data
from stepdistill.toy.evaluate import DigitsJudge
from stepdistill.sampling import generate, cycle_prompts

TEACHER = 7.060
method = sys.argv[1]
if method == "dmd2":
    from stepdistill.methods.dmd2 import DMD2 as M
elif method == "sid":
    from stepdistill.methods.sid import SiD as M
judge = DigitsJudge.from_world("assets/tiny-digits-sd")
prompts = cycle_prompts(data.eval_prompts(), 1000)

class Tr(T.Trainer):
    @torch.no_grad()
    def validate(self):
        t0 = time.time()
        recipe = self.method.recipe()
        pipe = self.method.sampling_pipeline()
        kw = recipe.call_kwargs()
        imgs = generate(pipe, prompts, batch_size=500, seed=0, progress=False, height=self.resolution,
                        width=self.resolution, **kw)
        s = judge.score(imgs, prompts)
        line = {"step": self.step, "fid": round(s["digits_fid"], 3), "ratio": round(s["digits_fid"] / TEACHER, 3),
                "agree": round(s["prompt_agreement"], 4), "eval_s": round(time.time() - t0, 1)}
        print("TUNE", json.dumps(line), flush=True)
        with open(self.output_dir / "tune.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")

config = parse_config(M.config_class, sys.argv[2:], prog="tune")
tr = Tr(config, M)
tr.train()
