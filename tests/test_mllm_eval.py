"""Captioning scores against hand-computable cases: identical texts, a known mismatch, exact match, skips."""
from __future__ import annotations

import shutil

import pytest

from conftest import import_or_skip  # noqa: E402

import_or_skip("pycocoevalcap")

from alphaclip_plugins.train.caption_metrics import caption_scores, exact_match, tokenize  # noqa: E402

SENTENCES = ["a small red circle on the left", "two blue squares next to a tree", "the yellow cross above the door",
             "a purple triangle under a green table"]


def test_identical_predictions_score_perfectly():
    scores, _ = caption_scores(SENTENCES, [[s] for s in SENTENCES], java=False)
    assert scores["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    assert scores["ROUGE-L"] == pytest.approx(1.0, abs=1e-9)
    assert scores["CIDEr"] == pytest.approx(10.0, abs=1e-6)  # CIDEr-D on pycocoevalcap's x10 scale
    assert scores["exact"] == 1.0


def test_known_mismatch():
    # "a red circle" vs "a blue square": one of three words in common, same length (no brevity penalty).
    scores, _ = caption_scores(["a red circle"], [["a blue square"]], java=False)
    assert scores["BLEU-1"] == pytest.approx(1 / 3, abs=1e-6)
    assert scores["BLEU-2"] == pytest.approx(0.0, abs=1e-4)  # no bigram in common
    # ROUGE-L: LCS 1 ("a"), P = R = 1/3, F_beta = (1 + b^2) P R / (R + b^2 P) = 1/3 for P = R.
    assert scores["ROUGE-L"] == pytest.approx(1 / 3, abs=1e-9)
    assert scores["exact"] == 0.0
    half, _ = caption_scores(["a red circle", "a blue square"], [["a red circle"], ["a red circle"]], java=False)
    assert half["exact"] == 0.5


def test_exact_match_normalises_case_space_and_end_punctuation_only():
    assert exact_match(["A  Red circle.", "a red circles"], [["a red circle"], ["a red circle"]]) == 0.5
    assert tokenize("A red, circle!") == "a red circle"


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="one list of references per prediction"):
        caption_scores(["a"], [["a"], ["b"]], java=False)
    with pytest.raises(ValueError, match="no reference"):
        caption_scores(["a"], [[]], java=False)


def test_without_java_meteor_and_spice_are_skipped_with_a_message():
    scores, messages = caption_scores(SENTENCES, [[s] for s in SENTENCES], java=False)
    assert scores["METEOR"] is None and scores["SPICE"] is None
    assert any("Java" in m for m in messages)


@pytest.mark.slow  # METEOR starts a JVM and loads its paraphrase tables: ~20 s
@pytest.mark.skipif(shutil.which("java") is None, reason="METEOR needs java")
def test_meteor_runs_where_java_is_present_and_spice_says_why_it_cannot():
    # Two identical pairs and two with no word in common: METEOR's mean of segment scores is near 1/2.
    predictions = SENTENCES[:2] + ["red red red", "blue blue blue"]
    same, messages = caption_scores(predictions, [[s] for s in SENTENCES])
    assert 0.4 < same["METEOR"] < 0.55, same["METEOR"]
    if same["SPICE"] is None:  # offline: Stanford CoreNLP was never downloaded
        assert any("SPICE skipped" in m and "CoreNLP" in m for m in messages)
