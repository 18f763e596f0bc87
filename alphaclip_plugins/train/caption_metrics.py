"""Region captioning scores: BLEU-4, ROUGE-L, CIDEr (pycocoevalcap), METEOR and SPICE where Java can run them,
and exact-match accuracy for short answers.

pycocoevalcap's scorers take pre-tokenised text; :func:`tokenize` lower-cases and drops punctuation as the
COCO caption pipeline's PTB tokenizer does, in Python (so the three Java-free scores need no Java).
METEOR runs the ``meteor-1.5.jar`` shipped with pycocoevalcap; SPICE needs Stanford CoreNLP's jars in
pycocoevalcap's ``spice/lib``, which it downloads on first use: offline they are absent and SPICE is skipped
with a message (as METEOR is without ``java``). Install with ``pip install 'alphaclip-plugins[eval]'``.
"""
from __future__ import annotations

import os
import re
import shutil
import string
from typing import Dict, List, Optional, Sequence, Tuple

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")
SCORES = ("BLEU-4", "ROUGE-L", "CIDEr", "METEOR", "SPICE", "exact")


def tokenize(text: str) -> str:
    """Lower case, punctuation removed, words separated by one space (the COCO captions' PTB convention)."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def normalise_answer(text: str) -> str:
    """A short answer for exact match: lower case, spaces collapsed, end punctuation dropped."""
    return " ".join(text.lower().split()).strip(" .!?,;:")


def exact_match(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """The fraction of predictions equal to one of their references (after :func:`normalise_answer`)."""
    if not predictions:
        raise ValueError("no predictions to score")
    hits = sum(normalise_answer(p) in {normalise_answer(r) for r in refs} for p, refs in zip(predictions, references))
    return hits / len(predictions)


def _require():
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge
    except ImportError:
        raise ImportError("captioning scores need pycocoevalcap: pip install 'alphaclip-plugins[eval]'") from None
    return Bleu, Rouge, Cider


def _spice_jars() -> Optional[str]:
    """Why SPICE cannot run here, or None when it can."""
    import pycocoevalcap.spice.spice as spice

    lib = os.path.join(os.path.dirname(spice.__file__), "lib")
    if not any(f.startswith("stanford-corenlp-3.6.0") for f in os.listdir(lib)):
        return (f"SPICE skipped: Stanford CoreNLP 3.6.0 is not in {lib} (SPICE downloads it on first use, which needs "
                f"the network; run pycocoevalcap's get_stanford_models once online)")
    return None


def caption_scores(predictions: Sequence[str], references: Sequence[Sequence[str]],
                   java: Optional[bool] = None) -> Tuple[Dict[str, Optional[float]], List[str]]:
    """Corpus scores of ``predictions`` against ``references`` (one list of reference texts per prediction).

    Args:
        java: run METEOR and SPICE; None = when ``java`` is on PATH.

    Returns:
        ``({"BLEU-1".."BLEU-4", "ROUGE-L", "CIDEr", "METEOR", "SPICE", "exact": score or None}, messages)``;
        a None score was skipped, and ``messages`` says why. CIDEr is pycocoevalcap's CIDEr-D (x10 scale).
    """
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"got {len(predictions)} predictions for {len(references)} reference lists; "
                         f"pass one list of references per prediction (and at least one)")
    if any(not refs for refs in references):
        raise ValueError("a prediction has no reference text; every sample needs at least one")
    Bleu, Rouge, Cider = _require()
    res = {i: [tokenize(p)] for i, p in enumerate(predictions)}
    gts = {i: [tokenize(r) for r in refs] for i, refs in enumerate(references)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores: Dict[str, Optional[float]] = {f"BLEU-{n + 1}": float(b) for n, b in enumerate(bleu)}
    scores["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    messages: List[str] = []
    java = shutil.which("java") is not None if java is None else java
    scores["METEOR"] = scores["SPICE"] = None
    if not java:
        messages.append("METEOR and SPICE skipped: they need Java (install a JRE, e.g. apt-get install default-jre)")
    else:
        from pycocoevalcap.meteor.meteor import Meteor

        scores["METEOR"] = float(Meteor().compute_score(gts, res)[0])
        why = _spice_jars()
        if why:
            messages.append(why)
        else:
            from pycocoevalcap.spice.spice import Spice

            scores["SPICE"] = float(Spice().compute_score(gts, res)[0])
    scores["exact"] = exact_match(predictions, references)
    return scores, messages
