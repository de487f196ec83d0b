"""Peak memory of the hf engine's generation: log-probs recorded per step vs kept logits.

    .venv/bin/python bench/hf_memory.py [--new-tokens 512] [--batch 2]

The tiny Qwen2.5-VL (64 wide, the real 152k vocabulary) generates --new-tokens tokens for
--batch prompts (end-of-turn disabled, so every step runs), CPU, greedy:
  recorder  HFEngine.generate: a logits processor keeps one log-softmax row per sequence
            and the sampled token's value of each step (engines/hf.py);
  logits    the way the engine did it before: generate(output_logits=True) keeps every
            step's raw logits (steps × batch × vocabulary floats), log-probs taken after.
Each runs in its own process; the figure is the peak resident memory during generation
minus the resident memory before it. Both must give the
same tokens and log-probs (checked); a thread samples RSS every 5 ms. Expected for the kept logits: steps × batch × 152k × 4
bytes (512 × 2 → 0.62 GB); the recorder should stay flat in the step count.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def child(model: str, mode: str, new_tokens: int, batch: int) -> None:
    import torch

    torch.set_num_threads(1)
    from PIL import Image

    from mars_cli import protocol
    from mars_cli.engines import GenRequest, Sampling, open_engine
    from mars_cli.records import make_task

    eng = open_engine("hf", policy=model, sampling=Sampling(temperature=0), max_batch=batch)
    eng.special = dict(eng.special, im_end=-1)  # never stop early: every step runs
    img = Path(tempfile.mkdtemp()) / "i.png"
    Image.new("RGB", (56, 56), (10, 200, 30)).save(img)
    ids, _, ims = eng.renderer.render(protocol.initial_messages(make_task("t", "What is it?", images=[str(img)])))
    reqs = [GenRequest(ids=ids, images=ims, max_new_tokens=new_tokens) for _ in range(batch)]
    eng.generate([GenRequest(ids=ids, images=ims, max_new_tokens=2)])  # warm up allocators
    before = _rss_mb()
    peak = [before]
    done = threading.Event()

    def watch():  # the peak during generation (ru_maxrss would include loading the model)
        while not done.wait(0.005):
            peak[0] = max(peak[0], _rss_mb())

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    if mode == "recorder":
        res = eng.generate(reqs)
        out = [(r.ids, r.logprobs) for r in res]
    else:
        from mars_cli.models.inputs import build_inputs

        pol = eng.policy
        b = build_inputs(pol, [(r.ids, r.images) for r in reqs], pad_side="left")
        n = b.tensors["input_ids"].shape[1]
        with torch.inference_mode():
            gen = pol.model.generate(**b.tensors, max_new_tokens=new_tokens, do_sample=False, output_logits=True,
                                     return_dict_in_generate=True, eos_token_id=-1, pad_token_id=pol.special["pad"],
                                     suppress_tokens=[pol.special["image_pad"], pol.special["vision_start"],
                                                      pol.special["vision_end"]])
            new = gen.sequences[:, n:]
            cols = [torch.log_softmax(step.float(), -1).gather(-1, new[:, t:t + 1]).squeeze(-1)
                    for t, step in enumerate(gen.logits)]
        lp = torch.stack(cols, 1)
        out = [(new[i].tolist(), lp[i].tolist()) for i in range(batch)]
    done.set()
    watcher.join()
    peak[0] = max(peak[0], _rss_mb())
    print(json.dumps({"mode": mode, "delta_mb": round(peak[0] - before, 1), "out": out}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--new-tokens", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--model", help="a tiny model directory (default: made here)")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child[0], a.child[1], a.new_tokens, a.batch)
        return
    model = a.model
    if not model:
        from mars_cli.models.tiny import make_tiny_model

        model = str(Path(tempfile.mkdtemp()) / "tiny")
        make_tiny_model(model)
    res = {}
    for mode in ("logits", "recorder"):
        p = subprocess.run([sys.executable, __file__, "--child", model, mode, "--new-tokens", str(a.new_tokens),
                            "--batch", str(a.batch)], capture_output=True, text=True, check=True)
        res[mode] = json.loads(p.stdout.strip().splitlines()[-1])
    (ia, la), (ib, lb) = res["logits"]["out"][0], res["recorder"]["out"][0]
    same = ia == ib and max(abs(x - y) for x, y in zip(la, lb)) < 1e-4
    expected = a.new_tokens * a.batch * 151_665 * 4 / 2**20
    figures = {"new_tokens": a.new_tokens, "batch": a.batch, "logits_mb": res["logits"]["delta_mb"],
               "recorder_mb": res["recorder"]["delta_mb"], "kept_logits_expected_mb": round(expected, 1),
               "same_tokens_and_logprobs": same}
    sys.stderr.write(f"hf_memory: {a.new_tokens} tokens × batch {a.batch}: kept logits +{figures['logits_mb']:.0f} MB "
                     f"(expected ≈{expected:.0f}), recorder +{figures['recorder_mb']:.0f} MB; same values: {same}\n")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
