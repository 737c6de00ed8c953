"""Issue 6, inputs: odd images through detectron2's DatasetMapper and a full ResNeSt Faster R-CNN.

Decisions (what a user would want):
- grayscale (L), grayscale+alpha (LA), palette (P) and RGBA PNGs are read as RGB (INPUT.FORMAT "RGB", as the
  ResNeSt configs set): gray is replicated to three channels, alpha is dropped. They train and predict.
- sides that are not multiples of 32, tiny (33x17) and very wide (1000x40) images work: the mapper resizes,
  the model pads to a multiple of 32 (FPN size divisibility).
- a batch of one in training works: the split-attention norm after the global pool (where the official
  code fails with "Expected more than 1 value per channel") uses its running statistics for that step.
- a one-channel model config (INPUT.FORMAT "L") or a non-RGB tensor is refused with a message saying so.
"""
import copy

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.d2  # uses detectron2: also run on the second detectron2 line


from conftest import require  # noqa: E402

require("detectron2", "make env installs detectron2")
from detectron2.data import DatasetMapper  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402
from PIL import Image  # noqa: E402

from resnest_backbone import build_resnest  # noqa: E402
from conftest import d2_cfg  # noqa: E402

IMAGES = {  # name: (PIL mode, (width, height))
    "gray": ("L", (50, 40)),
    "gray_alpha": ("LA", (40, 30)),
    "palette": ("P", (40, 40)),
    "rgba": ("RGBA", (60, 45)),
    "tiny": ("RGB", (33, 17)),
    "wide": ("RGB", (1000, 40)),
}


def small_cfg(**overrides):
    opts = {"MODEL.RESNEST.VARIANT": "resnest14d", "INPUT.MIN_SIZE_TRAIN": (64,), "INPUT.MAX_SIZE_TRAIN": 128,
            "INPUT.MIN_SIZE_TRAIN_SAMPLING": "choice",  # the config samples a (640, 800) range; one size here
            "INPUT.MIN_SIZE_TEST": 64, "INPUT.MAX_SIZE_TEST": 128, "MODEL.ROI_HEADS.NUM_CLASSES": 2,
            "MODEL.RPN.POST_NMS_TOPK_TRAIN": 64, "MODEL.RPN.POST_NMS_TOPK_TEST": 32,
            "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": 32, "INPUT.RANDOM_FLIP": "none",
            # heads shrunk for CPU time; the trunk is the config's (SyncBN, frozen stem + res2)
            "MODEL.FPN.OUT_CHANNELS": 64, "MODEL.ROI_BOX_HEAD.NUM_CONV": 1, "MODEL.ROI_BOX_HEAD.CONV_DIM": 64,
            "MODEL.ROI_BOX_HEAD.FC_DIM": 128, "MODEL.RPN.PRE_NMS_TOPK_TRAIN": 200,
            "MODEL.RPN.PRE_NMS_TOPK_TEST": 100}
    opts.update(overrides)
    return d2_cfg(**opts)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    dicts = {}
    for name, (mode, (w, h)) in IMAGES.items():
        rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        image = rgb.convert(mode)
        if mode == "RGBA":  # a real alpha channel, which must not leak into the colors
            image.putalpha(Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)))
        path = folder / f"{name}.png"
        image.save(path)
        assert Image.open(path).mode == mode
        dicts[name] = dict(file_name=str(path), height=h, width=w, image_id=name, annotations=[
            dict(bbox=[1, 1, max(3, w // 2), max(3, h // 2)], bbox_mode=0, category_id=name == "wide")])
    return dicts


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(small_cfg())


def mapped(dataset, name, is_train=True):
    return DatasetMapper(small_cfg(), is_train=is_train)(copy.deepcopy(dataset[name]))


@pytest.mark.parametrize("name", list(IMAGES))
def test_mapper_reads_every_mode_as_rgb(dataset, name):
    item = mapped(dataset, name)
    image = item["image"]
    assert image.dtype == torch.uint8 and image.shape[0] == 3
    height, width = image.shape[1:]  # ResizeShortestEdge(64, max 128): short side 64 unless long side capped
    assert max(height, width) <= 128 and (min(height, width) == 64 or max(height, width) == 128)
    if name in ("gray", "gray_alpha"):
        assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])
    if name == "rgba":  # colors kept, alpha dropped: same as the RGB pixels, resized
        reference = mapped_reference(dataset[name]["file_name"], image.shape[1:])
        assert torch.equal(image, reference)


def mapped_reference(path, size):
    from detectron2.data import transforms as T

    rgb = np.asarray(Image.open(path).convert("RGB"))
    h, w = rgb.shape[:2]
    return torch.as_tensor(T.ResizeTransform(h, w, size[0], size[1], Image.BILINEAR).apply_image(rgb)
                           ).permute(2, 0, 1)


@pytest.mark.parametrize("name", list(IMAGES))
def test_training_step_with_a_batch_of_one(model, dataset, name):
    model.train()
    with EventStorage(0):
        losses = model([mapped(dataset, name)])
    assert set(losses) == {"loss_cls", "loss_box_reg", "loss_rpn_cls", "loss_rpn_loc"}
    assert all(torch.isfinite(v) for v in losses.values()), losses


def test_training_step_on_a_mixed_batch_backpropagates(model, dataset):
    model.train()
    model.zero_grad()
    with EventStorage(0):
        losses = model([mapped(dataset, name) for name in ("gray", "rgba", "wide")])
    sum(losses.values()).backward()
    fc1 = model.backbone.bottom_up.layer3[0].conv2.fc1.weight.grad
    assert fc1 is not None and torch.isfinite(fc1).all() and fc1.abs().sum() > 0


def test_inference_returns_boxes_in_original_coordinates(model, dataset):
    model.eval()
    with torch.no_grad():
        outputs = model([mapped(dataset, name, is_train=False) for name in ("gray", "rgba", "wide")])
    for name, out in zip(("gray", "rgba", "wide"), outputs):
        width, height = IMAGES[name][1]
        assert out["instances"].image_size == (height, width)
        boxes = out["instances"].pred_boxes.tensor
        assert (boxes[:, 0::2] <= width + 1e-3).all() and (boxes[:, 1::2] <= height + 1e-3).all()


def test_batch_of_one_in_training_where_the_official_code_fails():
    resnest_torch = require("resnest.torch.resnet", "the official resnest==0.0.5, a test extra")
    official = resnest_torch.ResNet(resnest_torch.Bottleneck, [1, 1, 1, 1], radix=2, groups=1,
                                    bottleneck_width=64, deep_stem=True, stem_width=32, avg_down=True, avd=True)
    x = torch.randn(1, 3, 64, 64)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        official.train()(x)
    ours = build_resnest("resnest14d").train()
    attention_bn = ours.layer2[0].conv2.bn1
    trunk_bn = ours.layer2[0].bn1
    attention_stats, trunk_stats = attention_bn.running_mean.clone(), trunk_bn.running_mean.clone()
    out = ours(x)
    out["res5"].sum().backward()
    assert torch.isfinite(out["res5"]).all()
    # the trunk's BN learned from the batch; the attention BN (one value per channel) kept its statistics
    assert not torch.equal(trunk_bn.running_mean, trunk_stats)
    assert torch.equal(attention_bn.running_mean, attention_stats)


def test_one_channel_model_config_is_refused_clearly():
    cfg = small_cfg(**{"INPUT.FORMAT": "L", "MODEL.PIXEL_MEAN": [128.0], "MODEL.PIXEL_STD": [58.0]})
    with pytest.raises(ValueError, match="3-channel images; the input shape has 1 channels"):
        build_model(cfg)


@pytest.mark.parametrize("shape", [(1, 4, 64, 64), (1, 1, 64, 64), (3, 64, 64)])
def test_trunk_refuses_non_rgb_tensors(shape):
    with pytest.raises(ValueError, match=r"expects an \(N, 3, H, W\) image batch, got shape"):
        build_resnest("resnest14d").eval()(torch.zeros(shape))


def test_a_1x1_res5_map_at_batch_one_fails_with_a_clear_message(dataset):
    model = build_model(small_cfg(**{"INPUT.MIN_SIZE_TRAIN": (32,), "INPUT.MAX_SIZE_TRAIN": 32})).train()
    item = DatasetMapper(small_cfg(**{"INPUT.MIN_SIZE_TRAIN": (32,), "INPUT.MAX_SIZE_TRAIN": 32}),
                         is_train=True)(copy.deepcopy(dataset["palette"]))
    with EventStorage(0), pytest.raises(ValueError, match="MIN_SIZE|batch"):
        model([item])
