"""benchmarks/best_of_n.py's table when an attribute has no held-out label (a corpus whose
held-out clips never name, say, a tempo): a dash in its column, the means over the rest."""

from __future__ import annotations

import argparse

from benchmarks.best_of_n import render


def test_an_attribute_without_held_out_labels_is_a_dash_and_left_out_of_the_means():
    names = ["family", "tempo"]
    rows = [{"n": 1, "attributes": {"family": 0.5}, "mean_accuracy": 0.5, "text_audio": 0.1,
             "seconds_per_caption": 1.0, "kept_other": 0}]
    stage = {"attr/family/real_accuracy": 0.9, "attr/family/chance": 0.25, "attr/family/accuracy": 0.4,
             "ref/real/text_audio": 0.2, "eval/text_audio": 0.05}
    args = argparse.Namespace(model="models:/lafma@champion", root="/tmp/r")
    lines = [ln.split("|")[1:-1] for ln in render(args, rows, names, stage, "s", "e", 4, "/o").splitlines()
             if ln.startswith("| ")]
    n1, real, chance = (dict(zip(["n", "mean", "ta", *names], (c.strip() for c in cells))) for cells in lines[2:5])
    assert (n1["family"], n1["tempo"]) == ("0.500", "–")
    assert (real["mean"], real["family"], real["tempo"]) == ("0.900", "0.900", "–")
    assert (chance["mean"], chance["tempo"]) == ("0.250", "–")
    assert "mean attribute accuracy 0.400" in render(args, rows, names, stage, "s", "e", 4, "/o")
