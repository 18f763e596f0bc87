"""The open-vocabulary configs' classes against their datasets, and class embeddings served from the checkpoint.

* detectron2: ``MODEL.ALPHACLIP.CLASS_NAMES`` selects its classes from a registered dataset whose categories
  are a superset, with non-contiguous ids, in another order; detectron2's own ``tools/train_net.py`` (with the
  README's line) trains on the ``CLASS_NAMES`` indices and evaluates those classes under the dataset's ids.
* A detector loaded from its checkpoint does not rebuild the CLIP to recompute its class embeddings.
"""
from __future__ import annotations

import json
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import import_or_skip
from test_ovd_prompts import _d2_tools, _hook_line, _record_training_inputs, _run_tool, tiny_clip  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
H, W = 72, 104
# The dataset's categories: a superset of the config's, ids neither contiguous nor in the config's order.
CATEGORIES = [dict(id=7, name="disc"), dict(id=12, name="square"), dict(id=3, name="block"), dict(id=5, name="bar")]
CLASS_NAMES = ["square", "bar", "block"]
NOVEL = "block"


def _boxes(i: int) -> dict:
    """Image ``i``'s boxes ``xyxy`` by class: images 0-2 hold all four classes, image 3 a block and a disc."""
    boxes = dict(square=[8 + 2 * i, 8, 30 + 2 * i, 30], bar=[40, 44, 96, 56], block=[60, 10, 90, 36],
                 disc=[10, 40, 34, 66])
    return boxes if i < 3 else {k: boxes[k] for k in ("block", "disc")}


def _class_of(box: torch.Tensor, i: int) -> str:
    """The class of image ``i`` whose box is ``box`` (in the image's pixels, to a pixel)."""
    dist = {n: (box - torch.tensor(b)).abs().max().item() for n, b in _boxes(i).items()}
    name = min(dist, key=dist.get)
    assert dist[name] < 1.5, (box, dist)
    return name


def superset_coco(root: Path) -> Path:
    """4 textured 72 x 104 images in a COCO json of the 4 :data:`CATEGORIES`."""
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True)
    ids = {c["name"]: c["id"] for c in CATEGORIES}
    images, annotations = [], []
    for i in range(4):
        img = rng.integers(0, 120, (H, W, 3), dtype=np.uint8)
        img[:, ::5] = (30, 200, 90)
        for k, (name, (x0, y0, x1, y1)) in enumerate(_boxes(i).items()):
            img[y0:y1, x0:x1] = (220, 40 + 50 * k, 40)
            annotations.append(dict(id=len(annotations) + 1, image_id=i + 1, category_id=ids[name], iscrowd=0,
                                    bbox=[x0, y0, x1 - x0, y1 - y0], area=(x1 - x0) * (y1 - y0)))
        Image.fromarray(img).save(root / "img" / f"{i}.png")
        images.append(dict(id=i + 1, file_name=f"{i}.png", height=H, width=W))
    path = root / "instances.json"
    path.write_text(json.dumps(dict(images=images, annotations=annotations, categories=CATEGORIES)))
    return path


def _register(tmp_path: Path, tag: str) -> str:
    from detectron2.data.datasets import register_coco_instances

    data = superset_coco(tmp_path / "coco")
    name = f"superset_{tag}_{tmp_path.name}"
    register_coco_instances(name, {}, str(data), str(data.parent / "img"))
    return name


def _tool(tmp_path: Path) -> Path:
    """detectron2's ``tools/train_net.py`` with the README's line after its imports."""
    source = (_d2_tools() / "train_net.py").read_text()
    first_def = source.index("\ndef ")
    tool = tmp_path / "train_net.py"
    tool.write_text(source[:first_def] + "\n" + _hook_line() + "\n" + source[first_def:])
    return tool


def _opts(tmp_path: Path, clip: Path, dataset: str) -> list:
    return [
        "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", str(clip / "tower.pth"), "OUTPUT_DIR", str(tmp_path / "out"),
        "MODEL.ALPHACLIP.ARCH", "tiny", "MODEL.ALPHACLIP.OUT_STRIDE", "16", "MODEL.ALPHACLIP.SFP_OUT_CHANNELS", "32",
        "MODEL.ROI_BOX_HEAD.FC_DIM", "64", "MODEL.ROI_HEADS.NUM_CLASSES", "3",
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "50",
        "MODEL.RPN.POST_NMS_TOPK_TEST", "50", "DATASETS.TRAIN", f"('{dataset}',)", "DATASETS.TEST", f"('{dataset}',)",
        "DATALOADER.NUM_WORKERS", "0", "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MIN_SIZE_TEST", "64",
        "INPUT.RANDOM_FLIP", "none", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "2", "SOLVER.WARMUP_ITERS", "1",
        "SOLVER.CHECKPOINT_PERIOD", "1000",
        "MODEL.ALPHACLIP.CLASS_NAMES", str(CLASS_NAMES), "MODEL.ALPHACLIP.NOVEL_CLASSES", f"['{NOVEL}']",
        "MODEL.ALPHACLIP.CLIP", str(clip / "clip"), "MODEL.ALPHACLIP.TEMPLATES", "clip",
        "MODEL.ALPHACLIP.TEXT_EMBEDDINGS", str(tmp_path / "text.safetensors"),
    ]


OV_YAML = ROOT / "configs" / "detectron2" / "ov_faster_rcnn_alphaclip_vit_b16_sfp.yaml"


def _record_test_results(monkeypatch) -> list:
    from alphaclip_plugins.integrations.detectron2 import AlphaCLIPTrainer

    results, test = [], AlphaCLIPTrainer.test.__func__
    monkeypatch.setattr(AlphaCLIPTrainer, "test", classmethod(
        lambda cls, *a, **k: results.append(test(cls, *a, **k)) or results[-1]))
    return results


def test_detectron2_train_net_trains_on_the_config_classes_of_a_superset_dataset(tmp_path, monkeypatch, tiny_clip):
    tool = _tool(tmp_path)
    dataset = _register(tmp_path, "train")
    seen, results = _record_training_inputs(monkeypatch), _record_test_results(monkeypatch)
    _run_tool(tool, ["--config-file", str(OV_YAML), *_opts(tmp_path, tiny_clip, dataset)], monkeypatch)

    assert len(seen) == 2
    images = set()
    for _, batch in seen:
        for x in batch:
            scale = torch.tensor([W, H, W, H]) / torch.tensor(x["image"].shape[2:0:-1] * 2)
            names = [_class_of(b * scale, x["image_id"] - 1) for b in x["instances"].gt_boxes.tensor]
            assert sorted(names) == ["bar", "square"]  # no novel block, no disc (not a config class)
            assert x["instances"].gt_classes.tolist() == [CLASS_NAMES.index(n) for n in names]
            images.add(x["image_id"])
    assert 4 not in images  # it held only a block and a disc
    # The final evaluation's AP table names the config's classes.
    (res,) = results
    assert sorted(k for k in res["bbox"] if k.startswith("AP-")) == sorted(f"AP-{c}" for c in CLASS_NAMES)


class _Oracle(torch.nn.Module):
    """Predicts each image's ground truth of the config's classes, labelled with their ``CLASS_NAMES`` index."""

    def forward(self, batched_inputs):
        from detectron2.structures import Boxes, Instances

        out = []
        for x in batched_inputs:
            boxes = {n: b for n, b in _boxes(x["image_id"] - 1).items() if n in CLASS_NAMES}
            out.append({"instances": Instances(
                (x["height"], x["width"]), pred_boxes=Boxes(torch.tensor(list(boxes.values()), dtype=torch.float32)),
                scores=torch.ones(len(boxes)), pred_classes=torch.tensor([CLASS_NAMES.index(n) for n in boxes]))})
        return out


def test_detectron2_train_net_evaluates_the_config_classes_under_the_dataset_ids(tmp_path):
    """The tool's own ``Trainer.test`` / ``build_evaluator``: perfect predictions score AP 100 per class."""
    ns = runpy.run_path(str(_tool(tmp_path)))  # the tool's module, not its __main__
    dataset = _register(tmp_path, "eval")
    cfg = ns["get_cfg"]()
    cfg.merge_from_file(str(OV_YAML))
    cfg.merge_from_list(_opts(tmp_path, Path("unused"), dataset))
    res = ns["Trainer"].test(cfg, _Oracle())
    per_class = {k: v for k, v in res["bbox"].items() if k.startswith("AP-")}
    assert per_class == {f"AP-{c}": pytest.approx(100.0) for c in CLASS_NAMES}
    # COCO results carry the dataset's own category ids; the evaluated ground truth holds the config's classes.
    out = tmp_path / "out" / "inference"
    ids = {c["name"]: c["id"] for c in CATEGORIES}
    predicted = json.loads((out / "coco_instances_results.json").read_text())
    assert {p["category_id"] for p in predicted} == {ids[c] for c in CLASS_NAMES}
    (gt_file,) = out.glob("*_coco_format.json")
    gt = json.loads(gt_file.read_text())
    assert gt["categories"] == [dict(id=ids[c], name=c) for c in CLASS_NAMES]
    assert len(gt["images"]) == 4 and len(gt["annotations"]) == 3 * 3 + 1  # the test set keeps the novel block


def test_class_names_missing_from_the_dataset_are_an_error_naming_them(tmp_path):
    _d2_tools()
    from alphaclip_plugins.integrations.detectron2 import class_subset_dataset

    dataset = _register(tmp_path, "missing")
    with pytest.raises(ValueError, match=r"\['kite'\] are not classes of dataset .*superset_missing"):
        class_subset_dataset(dataset, ["square", "kite"])
    derived = class_subset_dataset(dataset, CLASS_NAMES)
    assert class_subset_dataset(derived, CLASS_NAMES) == derived
    assert class_subset_dataset(dataset, ["block", "bar", "disc", "square"]) == dataset  # sorted by id: as is


# --- Class embeddings served from the detector's checkpoint -----------------------------------------------------
NAMES = ["red circle", "blue square", "green triangle"]


def _absent_clip(tmp_path: Path) -> dict:
    """A CLIP spec whose architecture is known and whose checkpoint is not there."""
    return dict(name="tiny", pretrained=str(tmp_path / "absent" / "ViT-B-16.pt"))


def test_zero_shot_classifier_computes_its_embeddings_only_when_nothing_brought_them(tmp_path, tiny_clip):
    from alphaclip_plugins import from_pretrained
    from alphaclip_plugins.core.zeroshot import load_text_embeddings, text_classifier
    from alphaclip_plugins.detection.open_vocab import ZeroShotClassifier

    file, x = tmp_path / "text.safetensors", torch.randn(5, 32, generator=torch.Generator().manual_seed(0))
    computed = ZeroShotClassifier(32, len(NAMES) + 1, file, NAMES, clip=str(tiny_clip / "clip"), templates="clip")
    assert not file.exists()  # not at build
    expected = computed(x)  # the first forward computes them and writes the file
    emb, labels = load_text_embeddings(file)
    assert labels == NAMES
    reference = text_classifier(from_pretrained(tiny_clip / "clip"), NAMES, "clip")
    torch.testing.assert_close(computed.text_embeddings, torch.nn.functional.normalize(reference, dim=-1))
    torch.testing.assert_close(emb, reference)
    file.unlink()

    served = ZeroShotClassifier(32, len(NAMES) + 1, file, NAMES, clip=_absent_clip(tmp_path))  # no CLIP read
    served.load_state_dict(computed.state_dict())
    assert torch.equal(served(x), expected) and not file.exists()

    lost = ZeroShotClassifier(32, len(NAMES) + 1, file, NAMES, clip=_absent_clip(tmp_path))
    early = ZeroShotClassifier(32, len(NAMES) + 1, file, NAMES, clip=_absent_clip(tmp_path)).state_dict()
    lost.load_state_dict(early)  # saved before its embeddings were computed: zeros, which bring nothing
    with pytest.raises(FileNotFoundError, match=r"text.safetensors does not exist and no checkpoint loaded them.*"
                                                r"absent.*alphaclip vocab"):
        lost(x)
    lost.load_state_dict(computed.state_dict())
    assert torch.equal(lost(x), expected)


def _predict_mmdet(cfg, checkpoint, image):
    from mmdet.apis import inference_detector, init_detector

    pred = inference_detector(init_detector(cfg, checkpoint, device="cpu"), image).pred_instances
    assert len(pred) > 0
    return pred


def test_mmdet_init_detector_predicts_from_the_checkpoints_embeddings_without_the_clip(tmp_path, tiny_clip):
    import_or_skip("mmdet")
    import_or_skip("mmcv.ops")
    from mmengine.runner import save_checkpoint

    from test_ovd import _build_mmdet, _mmdet_ov_cfg, _textured_image

    cfg = _mmdet_ov_cfg(tmp_path, tiny_clip / "clip")
    cfg.model.region_scorer = None  # re-scoring needs its CLIP; the classifier's embeddings do not
    head = cfg.model.roi_head.bbox_head
    head.update(num_classes=len(NAMES))
    head.cls_predictor_cfg.update(class_names=NAMES, clip=str(tiny_clip / "clip"), templates="clip")
    model = _build_mmdet(cfg)  # init_weights computes them and writes the file
    save_checkpoint(dict(state_dict=model.state_dict(), meta=dict(dataset_meta=dict(classes=tuple(NAMES)))),
                    str(tmp_path / "det.pth"))
    _textured_image(tmp_path / "img.png")
    before = _predict_mmdet(cfg, str(tmp_path / "det.pth"), str(tmp_path / "img.png"))

    file = Path(head.cls_predictor_cfg.text_embeddings)
    file.unlink()
    head.cls_predictor_cfg.clip = _absent_clip(tmp_path)
    after = _predict_mmdet(cfg, str(tmp_path / "det.pth"), str(tmp_path / "img.png"))
    assert not file.exists()
    for key in ("bboxes", "scores", "labels"):
        assert torch.equal(before[key], after[key]), key
    with pytest.raises(FileNotFoundError, match="does not exist and no checkpoint loaded them"):
        _predict_mmdet(cfg, None, str(tmp_path / "img.png"))  # no checkpoint, no file, no CLIP


def test_detectron2_predictor_predicts_from_the_checkpoints_embeddings_without_the_clip(tmp_path, tiny_clip):
    _d2_tools()
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.engine import DefaultPredictor
    from detectron2.modeling import build_model

    from test_detectron2 import _yacs
    from test_ovd import _textured_image

    cfg = _yacs("ov_faster_rcnn_alphaclip_vit_b16_sfp.yaml")
    cfg.MODEL.ALPHACLIP.update(TEXT_EMBEDDINGS=str(tmp_path / "text.safetensors"), CLASS_NAMES=NAMES, NOVEL_CLASSES=[],
                               CLIP=str(tiny_clip / "clip"), TEMPLATES="clip", RESCORE=False)
    cfg.MODEL.ROI_HEADS.update(NUM_CLASSES=len(NAMES), SCORE_THRESH_TEST=0.0)
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 96, 128
    model = build_model(cfg).eval()
    assert not (tmp_path / "text.safetensors").exists()  # not at build
    with torch.no_grad():
        model([{"image": torch.zeros(4, 32, 32)}])  # the first forward computes the embeddings
    assert (tmp_path / "text.safetensors").exists()
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("det")
    image = _textured_image(tmp_path / "img.png")[..., ::-1].copy()
    cfg.MODEL.WEIGHTS = str(tmp_path / "det.pth")
    before = DefaultPredictor(cfg)(image)["instances"]

    (tmp_path / "text.safetensors").unlink()
    cfg.MODEL.ALPHACLIP.update(CLIP="backbone", CLIP_CHECKPOINT=str(tmp_path / "absent.pth"),
                               CLIP_TEXT_CHECKPOINT=str(tmp_path / "absent.pt"))
    after = DefaultPredictor(cfg)(image)["instances"]
    assert len(after) > 0 and not (tmp_path / "text.safetensors").exists()
    assert torch.equal(before.pred_boxes.tensor, after.pred_boxes.tensor)
    assert torch.equal(before.scores, after.scores) and torch.equal(before.pred_classes, after.pred_classes)
