"""`mars crop`: 0-1000 units, clamping that says what it did, batch mode over stdin."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from clirun import Ran
from mars_cli.tools.crop_batch import prepare_box, to_unit_box


def photo(path, w=400, h=300):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def test_units():
    assert to_unit_box([100, 200, 500, 1000], "1000") == ([0.1, 0.2, 0.5, 1.0], "1000")
    assert to_unit_box([100, 200, 500, 1000], "auto")[1] == "1000"
    assert to_unit_box([0.1, 0.2, 0.5, 1.0], "auto") == ([0.1, 0.2, 0.5, 1.0], "1")


def test_out_of_range_hints_at_units_and_clamp_warns(tmp_path):
    img = photo(tmp_path / "a.png")
    r = Ran(["crop", img, 100, 200, 500, 600])
    assert r.exit_code == 2 and "is outside [0, 1]" in r.stderr and "a 0-1000 box? pass --units 1000" in r.stderr
    r = Ran(["crop", img, 100, 200, 500, 600, "--units", "1000", "-o", tmp_path / "c.png"])
    assert r.exit_code == 0, r.stderr
    rec = json.loads(r.stdout)
    assert rec["box_px"] == [40, 60, 200, 180] and r.stderr == ""
    # --clamp used to turn this into the whole image without a word
    r = Ran(["crop", "--clamp", img, "0", "0", "500", "500", "-o", tmp_path / "d.png"])
    assert r.exit_code == 0
    assert "mars crop: box (0, 0, 500, 500) clamped to (0, 0, 1, 1): that is the whole image; a 0-1000 box? " \
           "pass --units 1000" in r.stderr
    warned = []
    assert prepare_box([-0.1, 0.2, 0.5, 0.6], clamp=True, warn=warned.append) == (0.0, 0.2, 0.5, 0.6)
    assert warned == ["box (-0.1, 0.2, 0.5, 0.6) clamped to (0, 0.2, 0.5, 0.6)"]
    warned.clear()
    prepare_box([0.1, 0.2, 0.5, 0.6], clamp=True, warn=warned.append)
    assert warned == []  # nothing moved, nothing said


def test_batch_many_boxes_many_images(tmp_path, monkeypatch):
    a, b = photo(tmp_path / "a.png"), photo(tmp_path / "b.png", 200, 100)
    lines = [{"image": str(a), "box": [0, 0, 0.5, 0.5], "id": 1},
             {"image": str(b), "bbox_2d": [500, 0, 1000, 1000], "id": 2},
             {"image": str(a), "box": [0.5, 0.5, 0.4, 1], "id": 3},  # inverted: reported, the rest go on
             {"image": str(a), "box": [0.25, 0.25, 0.75, 0.75], "out": str(tmp_path / "named.jpg"), "id": 4}]
    r = Ran(["crop", "--artifacts", tmp_path / "art"], input="".join(json.dumps(x) + "\n" for x in lines))
    assert r.exit_code == 1
    out = [json.loads(x) for x in r.stdout.splitlines()]
    assert [o["id"] for o in out] == [1, 2, 4]
    assert out[0]["box_px"] == [0, 0, 200, 150] and out[1]["box_px"] == [100, 0, 200, 100]
    assert out[2]["path"] == str(tmp_path / "named.jpg") and (tmp_path / "named.jpg").exists()
    assert all((tmp_path / "art") in __import__("pathlib").Path(o["path"]).parents for o in out[:2])
    assert "mars crop: <stdin>:3: box (0.5, 0.5, 0.4, 1): x0 must be less than x1" in r.stderr
    assert "1 of the crops failed" in r.stderr
    # IMAGE as the argument serves records with a box only
    r = Ran(["crop", a, "--units", "1000", "--artifacts", tmp_path / "art"], input='{"box": [0, 0, 250, 500]}\n')
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["box_px"] == [0, 0, 100, 150]
    r = Ran(["crop", a, "0.1", "0.2"])
    assert r.exit_code == 2 and "all four box numbers" in r.stderr
    r = Ran(["crop", "-o", tmp_path / "x.jpg"], input='{"image": "a.png", "box": [0, 0, 1, 1]}\n')
    assert r.exit_code == 2 and "batch mode" in r.stderr
