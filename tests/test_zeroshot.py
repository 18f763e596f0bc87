"""Zero-shot region classification and the text-classifier cache."""
from __future__ import annotations

import numpy as np
import torch

from alphaclip_plugins import RegionProcessor, classify_regions, text_classifier, tokenize
from alphaclip_plugins.core.zeroshot import TEMPLATES


def test_ovseg_ensemble_has_fourteen_templates():
    assert len(TEMPLATES["ovseg"]) == 14 and TEMPLATES["clip"] == ("a photo of a {}.",)


def test_classifier_is_the_normalised_mean_of_prompt_embeddings(tiny_model):
    labels, templates = ["cat", "red circle"], ["a photo of a {}.", "a {} in the scene"]
    weights = text_classifier(tiny_model, labels, templates)
    with torch.no_grad():
        emb = tiny_model.encode_text(tokenize([t.format(c) for c in labels for t in templates]), normalize=True)
    expected = torch.nn.functional.normalize(emb.view(2, 2, -1).mean(1), dim=-1)
    assert torch.allclose(weights, expected, atol=1e-6)


def test_classify_regions_equals_one_region_at_a_time(tiny_model):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)
    regions = [(0, 0, 20, 20), (30, 10, 60, 40), None, {"polygon": [5, 5, 50, 5, 30, 35]}]
    labels = ["cat", "dog", "red circle", "blue square"]
    probs = classify_regions(tiny_model, image, regions, labels, templates="clip")
    assert probs.shape == (4, 4) and torch.allclose(probs.sum(-1), torch.ones(4))
    batch = RegionProcessor(32)(image, regions)
    weights = text_classifier(tiny_model, labels, "clip")
    for i in range(len(regions)):
        with torch.no_grad():
            f = tiny_model.encode_image(batch.pixel_values[i : i + 1], batch.alpha[i : i + 1], normalize=True)
        ref = (tiny_model.logit_scale.exp() * f @ weights.T).softmax(-1)
        assert torch.allclose(probs[i], ref[0], atol=1e-5)
    assert not torch.allclose(probs[0], probs[1], atol=1e-4)  # the region changes the answer


def test_classifier_follows_text_weights_and_a_held_one_is_reused(tiny_model):
    image = np.random.default_rng(2).integers(0, 255, (30, 50, 3), dtype=np.uint8)
    a = text_classifier(tiny_model, ["cat", "dog"], "clip")
    held = classify_regions(tiny_model, image, None, ["cat", "dog"], "clip", classifier=a)
    assert torch.equal(held, classify_regions(tiny_model, image, None, ["cat", "dog"], "clip"))
    with torch.no_grad():
        tiny_model.ln_final.bias.add_(0.5)  # an in-place update, as an optimizer step makes
    c = text_classifier(tiny_model, ["cat", "dog"], "clip")  # nothing stale: no hidden cache
    assert not torch.allclose(c, a)


def test_region_scorer_matches_classify_regions_and_swaps_vocabulary(tiny_model):
    from alphaclip_plugins.detection.open_vocab import RegionScorer

    image = np.random.default_rng(1).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    boxes = [[0, 0, 20, 20], [30, 10, 60, 40], [5, 5, 6, 6]]
    scorer = RegionScorer(tiny_model, ["cat", "dog"], templates="clip", batch_size=2)
    assert torch.allclose(scorer(image, boxes), classify_regions(tiny_model, image, boxes, ["cat", "dog"], "clip"),
                          atol=1e-6)
    scorer.set_vocabulary(["car", "tree", "sky"])
    assert scorer(image, boxes).shape == (3, 3)


def test_fuse_scores_weights_base_and_novel_classes():
    from alphaclip_plugins.detection.open_vocab import clip_boxes, fuse_scores

    det, clip = torch.tensor([[0.64, 0.25]]), torch.tensor([[0.01, 0.81]])
    fused = fuse_scores(det, clip, novel=torch.tensor([False, True]), alpha_base=0.5, beta_novel=0.5)
    assert torch.allclose(fused, torch.tensor([[0.08, 0.45]]))
    assert torch.allclose(fuse_scores(det, clip, alpha_base=0.0), det)
    assert clip_boxes(torch.tensor([[-2.0, 3.0, 70.0, 3.0]]), 40, 60) == [[0.0, 3.0, 60.0, 4.0]]
