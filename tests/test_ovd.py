"""Open-vocabulary detection that trains, checkpoints and serves: mmengine checkpoints under torch's
weights_only, alpha padding, the vocabulary swap, the frozen scorer outside DDP and checkpoints, re-scoring."""
from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

from conftest import import_or_skip

import_or_skip("mmdet")
import_or_skip("mmcv.ops")
from mmengine.model import BaseModel  # noqa: E402

from alphaclip_plugins.integrations import mmdet as ac_mmdet  # noqa: E402,F401  (registers the safe globals)


# --- 1. mmengine checkpoints under torch.load(weights_only=True) ----------------------------------------------
class _Toy(BaseModel):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 1)

    def forward(self, inputs, data_samples=None, mode="tensor"):
        y = self.lin(torch.stack(inputs))
        return dict(loss=y.pow(2).mean()) if mode == "loss" else y


class _Data(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        return dict(inputs=torch.full((3,), float(i)))


def _runner(work_dir, max_iters: int = 3, **kw):
    from mmengine.runner import Runner

    return Runner(
        model=_Toy(), work_dir=str(work_dir), train_cfg=dict(by_epoch=False, max_iters=max_iters),
        train_dataloader=dict(dataset=_Data(), sampler=dict(type="DefaultSampler", shuffle=True), batch_size=2,
                              num_workers=0),
        optim_wrapper=dict(optimizer=dict(type="AdamW", lr=0.01)),
        param_scheduler=[dict(type="LinearLR", by_epoch=False, begin=0, end=2)],
        default_hooks=dict(checkpoint=dict(type="CheckpointHook", by_epoch=False, interval=3)), **kw)


def test_mmengine_checkpoints_load_with_weights_only_and_resume(tmp_path, monkeypatch):
    from mmengine.runner import load_checkpoint

    monkeypatch.delenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", raising=False)
    monkeypatch.delenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", raising=False)
    runner = _runner(tmp_path / "a")
    runner.train()
    path = tmp_path / "a" / "iter_3.pth"
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert ckpt["meta"]["iter"] == 3
    history = ckpt["message_hub"]["log_scalars"]["train/loss"]
    assert len(history.data[0]) == 3 and history.mean() == pytest.approx(float(history.data[0].mean()))

    model = _Toy()
    load_checkpoint(model, str(path), map_location="cpu")  # mmengine's own loading
    assert torch.equal(model.lin.weight, runner.model.lin.weight)
    resumed = _runner(tmp_path / "b", max_iters=4, resume=True, load_from=str(path))
    resumed.train()
    assert resumed.iter == 4
    assert torch.load(tmp_path / "b" / "iter_4.pth", weights_only=True)["meta"]["iter"] == 4


class _Evil:
    def __reduce__(self):
        from mmengine.logging.history_buffer import HistoryBuffer

        return (getattr, (HistoryBuffer, "update"))  # pickled as builtins.getattr: only 4 names may pass


def test_the_allowed_globals_refuse_anything_else(tmp_path):
    import numpy as np

    path = tmp_path / "evil.pth"
    torch.save({"x": _Evil()}, path, pickle_protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="refusing getattr"):
        torch.load(path, weights_only=True)
    torch.save({"x": np.ma.masked_array([1.0])}, path)
    with pytest.raises(pickle.UnpicklingError):  # an array subclass
        torch.load(path, weights_only=True)
    torch.save({"x": np.arange(5, dtype=np.float32), "y": np.float64(2.5)}, path)
    back = torch.load(path, weights_only=True)
    assert back["x"].tolist() == [0, 1, 2, 3, 4] and back["y"] == 2.5


# --- 2. padding: alpha is background wherever a pad transform adds pixels ---------------------------------------
def _rgba(h: int = 50, w: int = 70):
    import numpy as np

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    img[..., 3] = 255  # the whole image is the region
    return img


@pytest.mark.parametrize("pad_val", [dict(img=(114, 114, 114)), 114, dict(img=0)])
def test_alpha_pad_pads_alpha_as_background_and_rgb_as_asked(pad_val):
    import numpy as np
    from mmengine.registry import init_default_scope
    from mmdet.registry import TRANSFORMS

    init_default_scope("mmdet")
    img = _rgba()
    out = TRANSFORMS.build(dict(type="AlphaPad", size_divisor=32, pad_val=pad_val))(dict(img=img.copy()))
    rgb_out = TRANSFORMS.build(dict(type="Pad", size_divisor=32, pad_val=pad_val))(dict(img=img[..., :3].copy()))
    padded = out["img"]
    assert padded.shape == (64, 96, 4) and out["pad_shape"] == (64, 96, 4)
    np.testing.assert_array_equal(padded[..., :3], rgb_out["img"])  # RGB exactly as mmdet pads it
    assert (padded[:50, :70, 3] == 255).all()
    assert (padded[50:, :, 3] == 0).all() and (padded[:, 70:, 3] == 0).all()
    value = pad_val["img"] if isinstance(pad_val, dict) else pad_val
    assert (padded[50:, :, :3] == np.asarray(value)).all()
    with pytest.raises(ValueError, match="3 values"):
        TRANSFORMS.build(dict(type="AlphaPad", size_divisor=32, pad_val=dict(img=(1, 2, 3, 4))))(dict(img=img.copy()))


def test_preprocessor_pads_alpha_as_background_also_in_batch_fixed_size_pad():
    from mmengine.registry import init_default_scope
    from mmdet.registry import MODELS
    from mmdet.structures import DetDataSample

    from alphaclip_plugins.detection.inputs import ALPHA_BACKGROUND_255

    init_default_scope("mmdet")
    aug = [dict(type="BatchFixedSizePad", size=(128, 128))]
    ours = MODELS.build(dict(type="AlphaDetDataPreprocessor", bgr_to_rgb=True, pad_size_divisor=32,
                             batch_augments=aug))
    plain = MODELS.build(dict(type="DetDataPreprocessor", mean=ours.mean.flatten().tolist(),
                              std=ours.std.flatten().tolist(), bgr_to_rgb=True, pad_size_divisor=32,
                              batch_augments=aug))
    shapes = ((50, 70), (90, 40))
    imgs = [torch.from_numpy(_rgba(h, w)).permute(2, 0, 1).contiguous() for h, w in shapes]

    def batch(channels):
        samples = [DetDataSample(metainfo=dict(img_shape=s, ori_shape=s)) for s in shapes]
        return dict(inputs=[x[:channels] for x in imgs], data_samples=samples)

    for training in (True, False):
        x = ours(batch(4), training)["inputs"]
        ref = plain(batch(3), training)["inputs"]
        torch.testing.assert_close(x[:, :3], ref, rtol=0, atol=0)  # RGB padding unchanged
        for i, (h, w) in enumerate(shapes):
            alpha = x[i, 3]
            assert torch.allclose(alpha[:h, :w], torch.tensor(1.9231), atol=1e-4)
            outside = torch.ones_like(alpha, dtype=torch.bool)
            outside[:h, :w] = False
            assert torch.allclose(alpha[outside], torch.tensor(-1.9231), atol=1e-4)
        assert x.shape[-2:] == ((128, 128) if training else (96, 96))
    assert ALPHA_BACKGROUND_255 == pytest.approx(-1.9231, abs=1e-4)
