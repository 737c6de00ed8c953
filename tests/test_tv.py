"""The torchvision adapter (resnest_backbone/tv): torchvision's own detection and segmentation models with a
ResNeSt backbone, compared with torchvision's ResNet builders, trained and run on the generated demo data, and
checked against the core trunk, the weights-by-name path, the fast path and bf16."""
import hashlib
import io
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from torchvision.models.detection import MaskRCNN, RetinaNet
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7
from torchvision.ops.misc import FrozenBatchNorm2d

from resnest_backbone.convert import CheckpointError, load_weights
from resnest_backbone.core import build_resnest
from resnest_backbone.core.fuse import deploy
from resnest_backbone.data.demo import DET_CLASSES, demo_paths, ensure_demo_data
from resnest_backbone.guards import RESNEST_INPUT, input_problems
from resnest_backbone.core.precision import fp32_heads
from resnest_backbone.tv import deeplabv3_resnest, fasterrcnn_resnest_fpn, resnest_fpn_backbone
from test_bf16 import BF16_MIN, BF16_REL, rel_err
from test_fuse import randomize_norms
from test_weights_by_name import server, table  # noqa: F401  (fixtures: a local HTTP server, the sources table)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 64
TINY_SPEC = {"version": 1, "seed": 7, "size": SIZE, "det": {"train": 2, "val": 1}, "seg": {"train": 2, "val": 1},
             "min_object": 12, "max_object": 28, "max_objects": 3}
# torchvision's detectors at the demo images' size, with fewer sampled and kept boxes (their own kwargs).
SMALL_RCNN = dict(min_size=SIZE, max_size=SIZE, rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=50,
                  box_batch_size_per_image=32, box_score_thresh=0.0)
NUM_CLASSES = len(DET_CLASSES) + 1  # + background (torchvision's detection) or + "background" (segmentation)
MEAN, STD = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def weights():
    """An ImageNet-style resnest14d checkpoint (official names, classifier, BN with non-trivial statistics),
    its bytes and sha256: overrides test_weights_by_name's fixture of that name, so `table` serves this one."""
    torch.manual_seed(0)
    state = randomize_norms(build_resnest("resnest14d", num_classes=10)).state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    return state, data, hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def weights_file(weights, tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "imagenet_r14.pth"
    path.write_bytes(weights[1])
    return str(path)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("datasets")
    ensure_demo_data(str(root), spec=TINY_SPEC)
    return demo_paths(str(root))


def read_image(path):
    """An image file as torchvision's models take it: (C, H, W) uint8, RGB (one channel for a label map)."""
    import cv2

    image = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if image.ndim == 2:
        return torch.from_numpy(image)[None]
    return torch.from_numpy(image[:, :, ::-1].copy()).permute(2, 0, 1)


def detection_batch(demo, split):
    """(images, targets) of the demo COCO set, as torchvision's detection models take them: RGB float images in
    [0, 1], boxes x1y1x2y2 in pixels, labels = COCO category ids (0 is torchvision's background)."""
    paths = demo[f"resnest_demo_det_{split}"]
    with open(paths["json_file"]) as f:
        coco = json.load(f)
    images, targets = [], []
    for image in coco["images"]:
        images.append(read_image(os.path.join(paths["image_root"], image["file_name"])).float() / 255)
        annotations = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in annotations)],
                             dtype=torch.float32).reshape(-1, 4)
        targets.append({"boxes": boxes, "labels": torch.tensor([a["category_id"] for a in annotations])})
    return images, targets


def segmentation_batch(demo, split):
    """(images, labels) of the demo ADE-layout set: images normalised as torchvision's segmentation references
    do (ImageNet mean/std), labels (0 background, 1..3 shapes, 255 ignore) as int64."""
    paths = demo[f"resnest_demo_seg_{split}"]
    names = sorted(os.listdir(paths["image_root"]))
    images = torch.stack([(read_image(os.path.join(paths["image_root"], n)).float() / 255 - MEAN) / STD
                          for n in names])
    labels = torch.stack([read_image(os.path.join(paths["sem_seg_root"], n[:-4] + ".png"))[0].long() for n in names])
    return images, labels


def segmentation_loss(outputs, target):
    """torchvision's references/segmentation/train.py criterion."""
    losses = {name: nn.functional.cross_entropy(x, target, ignore_index=255) for name, x in outputs.items()}
    return losses["out"] + 0.5 * losses["aux"] if "aux" in losses else losses["out"]


def top_parts(module):
    """{top-level child with parameters: whether they are trainable}; a part must be all or nothing."""
    parts = {}
    for name, p in module.named_parameters():
        parts.setdefault(name.split(".")[0], set()).add(p.requires_grad)
    assert all(len(v) == 1 for v in parts.values()), parts
    return {k: v.pop() for k, v in parts.items()}


def test_import_changes_nothing_in_torchvision():
    # A fresh interpreter: every attribute of every loaded torchvision module, and of every torchvision class
    # in them, is the same object after `import resnest_backbone.tv`, and no torchvision module is added.
    code = """if True:
        import json, sys, torchvision
        def snapshot():
            found = {}
            for name, module in list(sys.modules.items()):
                if name.split(".")[0] == "torchvision" and module is not None:
                    for key, value in vars(module).items():
                        found[f"{name}.{key}"] = value
                        if isinstance(value, type) and value.__module__.startswith("torchvision"):
                            found.update({f"{name}.{key}.{k}": v for k, v in vars(value).items()})
            return found, {n for n in sys.modules if n.split(".")[0] == "torchvision"}
        (before, modules), missing = snapshot(), object()
        import resnest_backbone.tv
        after, modules_after = snapshot()
        print(json.dumps({"attributes": len(before), "new_modules": sorted(modules_after - modules),
                          "changed": sorted(k for k in set(before) | set(after)
                                            if before.get(k, missing) is not after.get(k, missing))}))
    """
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["attributes"] > 10000 and result["new_modules"] == [] and result["changed"] == [], result


@pytest.mark.parametrize("norm_layer", [None, nn.BatchNorm2d])
@pytest.mark.parametrize("trainable_layers", range(6))
def test_fpn_backbone_freezes_as_torchvision(trainable_layers, norm_layer):
    # torchvision's resnet_fpn_backbone on a ResNet-18 (no weights) for the same arguments: the same parts
    # trainable (the last k of layer4, layer3, layer2, layer1, conv1; bn1 too for k = 5), the same norms
    # (default FrozenBatchNorm2d, whose bn1 has no parameters), the FPN trainable, LastLevelMaxPool.
    kwargs = dict(weights=None, trainable_layers=trainable_layers, **({"norm_layer": norm_layer} if norm_layer else {}))
    ours = resnest_fpn_backbone(backbone_name="resnest14d", **kwargs)
    theirs = resnet_fpn_backbone(backbone_name="resnet18", **kwargs)
    parts = top_parts(ours.body)
    assert parts == top_parts(theirs.body)
    last = ("layer4", "layer3", "layer2", "layer1", "conv1")[:trainable_layers]
    assert {p for p, on in parts.items() if on} == {p for p in parts if p in last or trainable_layers == 5}
    assert all(p.requires_grad for p in ours.fpn.parameters())
    norm = FrozenBatchNorm2d if norm_layer is None else nn.BatchNorm2d
    for model in (ours, theirs):
        assert {type(m) for m in model.body.modules() if "Norm" in type(m).__name__} == {norm}
    assert type(ours.fpn.extra_blocks) is LastLevelMaxPool and ours.out_channels == 256


@pytest.mark.parametrize("returned_layers", [None, [2, 3, 4], [1, 3]])
def test_fpn_backbone_outputs_match_torchvision(returned_layers):
    ours = resnest_fpn_backbone(backbone_name="resnest14d", weights=None, returned_layers=returned_layers).eval()
    theirs = resnet_fpn_backbone(backbone_name="resnet18", weights=None, returned_layers=returned_layers).eval()
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        out, ref = ours(x), theirs(x)
    assert [(k, v.shape) for k, v in out.items()] == [(k, v.shape) for k, v in ref.items()]


def test_fpn_backbone_errors_as_torchvision():
    for kwargs in (dict(trainable_layers=6), dict(trainable_layers=-1), dict(returned_layers=[0, 1]),
                   dict(returned_layers=[2, 5])):
        with pytest.raises(ValueError) as theirs:
            resnet_fpn_backbone(backbone_name="resnet18", weights=None, **kwargs)
        with pytest.raises(ValueError) as ours:
            resnest_fpn_backbone(backbone_name="resnest14d", weights=None, **kwargs)
        assert str(ours.value) == str(theirs.value)
    with pytest.raises(ValueError, match="unknown ResNeSt variant 'resnet50'"):
        resnest_fpn_backbone(backbone_name="resnet50", weights=None)
    for builder in (fasterrcnn_resnest_fpn, deeplabv3_resnest):  # torchvision's detector weights argument
        with pytest.raises(ValueError, match="no trained ResNeSt detection or segmentation model"):
            builder("resnest14d", weights="COCO_V1")


def test_model_builders_mirror_torchvision():
    from torchvision.models.detection import fasterrcnn_resnet50_fpn
    from torchvision.models.segmentation import deeplabv3_resnet50

    # Faster R-CNN without backbone weights: BatchNorm2d, every layer trainable, torchvision's warning when
    # trainable_backbone_layers is given anyway; the same transform (ImageNet mean/std on RGB in [0, 1], the
    # input ResNeSt weights were trained on: guards.RESNEST_INPUT within its tolerance).
    with pytest.warns(UserWarning, match="falling back to trainable_backbone_layers=5") as ours_warned:
        ours = fasterrcnn_resnest_fpn("resnest14d", trainable_backbone_layers=2)
    with pytest.warns(UserWarning) as theirs_warned:
        theirs = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, trainable_backbone_layers=2)
    assert [str(w.message) for w in ours_warned] == [str(w.message) for w in theirs_warned]
    assert all(top_parts(ours.backbone.body).values()) and all(top_parts(theirs.backbone.body).values())
    for model in (ours, theirs):
        assert any(type(m) is nn.BatchNorm2d for m in model.backbone.body.modules())
        assert not any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    assert ours.roi_heads.box_predictor.cls_score.out_features == 91
    t, r = ours.transform, theirs.transform
    assert (t.min_size, t.max_size, t.image_mean, t.image_std) == (r.min_size, r.max_size, r.image_mean, r.image_std)
    assert not input_problems([("image_mean", [v * 255 for v in t.image_mean], RESNEST_INPUT["pixel_mean"]),
                               ("image_std", [v * 255 for v in t.image_std], RESNEST_INPUT["pixel_std"])])
    assert [type(m) for m in (ours.rpn.head, ours.roi_heads.box_head, ours.roi_heads.box_predictor)] == \
        [type(m) for m in (theirs.rpn.head, theirs.roi_heads.box_head, theirs.roi_heads.box_predictor)]

    # DeepLabV3: output stride 8 by the same dilations (per stage: the first block at half, the others full;
    # resnest26d has two blocks per stage) and strides, the same outputs.
    ours = deeplabv3_resnest("resnest26d", num_classes=5, aux_loss=True).eval()
    theirs = deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=5, aux_loss=True).eval()
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        for block in (0, 1):
            conv, ref = getattr(ours.backbone, stage)[block].conv2.conv, getattr(theirs.backbone, stage)[block].conv2
            assert conv.dilation == ref.dilation, (stage, block)
    assert ours.backbone.output_strides() == {"res4": 8, "res5": 8}
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        out, ref = ours.backbone(x), theirs.backbone(x)
        assert [(k, v.shape) for k, v in out.items()] == [(k, v.shape) for k, v in ref.items()]
        assert out["out"].shape[-2:] == (8, 12)
        assert [(k, v.shape) for k, v in ours(x).items()] == [(k, v.shape) for k, v in theirs(x).items()]
    assert type(ours.classifier) is type(theirs.classifier) and type(ours.aux_classifier) is type(theirs.aux_classifier)
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in ours.modules())


def test_features_equal_the_core_trunk(weights, weights_file):
    # Same weights, eval mode: the FPN body (FrozenBatchNorm2d) and the DeepLab body (BN, output stride 8)
    # return the core trunk's stages; FrozenBatchNorm2d took the file's BN statistics and affine parameters.
    state = weights[0]
    x = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(0))
    backbone = resnest_fpn_backbone(backbone_name="resnest14d", weights=weights_file).eval()
    frozen = {n: m for n, m in backbone.body.named_modules() if isinstance(m, FrozenBatchNorm2d)}
    assert len(frozen) == sum(1 for k in state if k.endswith("running_var"))
    for name, m in frozen.items():
        for buffer in ("weight", "bias", "running_mean", "running_var"):
            assert torch.equal(getattr(m, buffer), state[f"{name}.{buffer}"]), (name, buffer)
    assert torch.equal(backbone.body.layer2[0].conv2.fc1.weight, state["layer2.0.conv2.fc1.weight"])
    deeplab = deeplabv3_resnest("resnest14d", num_classes=3, aux_loss=True, weights_backbone=weights_file).eval()
    for body, output_stride, names in ((backbone.body, 32, ["0", "1", "2", "3"]),
                                       (deeplab.backbone, 8, ["aux", "out"])):
        core = build_resnest("resnest14d", output_stride=output_stride)
        load_weights(core, weights_file)
        core.eval()
        with torch.no_grad():
            out, ref = body(x), core(x)
        assert list(out) == names
        for name, stage in zip(names, ["res2", "res3", "res4", "res5"][-len(names):]):
            # FrozenBatchNorm2d (x * scale + shift) against BatchNorm2d's kernel: float rounding only
            torch.testing.assert_close(out[name], ref[stage], rtol=1e-5, atol=1e-5 * ref[stage].abs().max().item())
    assert all(torch.equal(v, deeplab.backbone.state_dict()[k]) for k, v in core.state_dict().items())


def test_weights_by_name(server, table, weights):  # noqa: F811
    # "resnest14d" resolves to its published file (served here, full sha256 pinned), downloaded once, loaded.
    state, data, _ = weights
    server.files["/r14.pth"] = data
    table([server.url + "/r14.pth"])
    model = fasterrcnn_resnest_fpn("resnest14d", weights_backbone="resnest14d", num_classes=NUM_CLASSES)
    body = model.backbone.body
    assert torch.equal(body.layer3[0].conv2.fc2.weight, state["layer3.0.conv2.fc2.weight"])
    assert torch.equal(body.conv1[1].running_var, state["conv1.1.running_var"])
    assert isinstance(body.conv1[1], FrozenBatchNorm2d)
    deeplab = deeplabv3_resnest("resnest14d", num_classes=3, weights_backbone="resnest14d")
    assert torch.equal(deeplab.backbone.layer4[0].conv2.conv.weight, state["layer4.0.conv2.conv.weight"])
    assert len(server.requests) == 1  # the second load read the cache
    with pytest.raises(CheckpointError, match="nothing was loaded"):  # weights of another architecture
        resnest_fpn_backbone(backbone_name="resnest26d", weights="resnest14d")


def test_faster_rcnn_training_step_and_inference(demo, weights_file):
    torch.manual_seed(0)
    model = fasterrcnn_resnest_fpn("resnest14d", weights_backbone=weights_file, num_classes=NUM_CLASSES,
                                   **SMALL_RCNN)
    body = model.backbone.body
    assert top_parts(body) == {"conv1": False, "layer1": False, "layer2": True, "layer3": True, "layer4": True}
    assert isinstance(body.bn1, FrozenBatchNorm2d)  # torchvision's default with weights: 3 trainable, FrozenBN
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images, targets = detection_batch(demo, "train")
    model.train()
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    optimizer.zero_grad()
    sum(losses.values()).backward()
    optimizer.step()
    after = model.state_dict()
    for prefix in ("backbone.body.layer2.", "backbone.body.layer4.", "backbone.fpn.", "rpn.", "roi_heads."):
        assert any(not torch.equal(after[k], before[k]) for k in after if k.startswith(prefix)), prefix
    for prefix in ("backbone.body.conv1.", "backbone.body.bn1.", "backbone.body.layer1.",
                   "backbone.body.layer3.0.bn1."):  # frozen: no gradient; FrozenBatchNorm2d: fixed statistics
        assert all(torch.equal(after[k], before[k]) for k in after if k.startswith(prefix)), prefix

    model.eval()
    images, _ = detection_batch(demo, "val")
    with torch.no_grad():
        detections = model(images)
    assert len(detections) == len(images) and set(detections[0]) == {"boxes", "labels", "scores"}
    assert 0 < len(detections[0]["boxes"]) <= 100 and torch.isfinite(detections[0]["boxes"]).all()


@pytest.mark.parametrize("detector", ["maskrcnn", "retinanet"])
def test_backbone_in_maskrcnn_and_retinanet(demo, weights_file, detector):
    # resnest_fpn_backbone as torchvision's maskrcnn_resnet50_fpn / retinanet_resnet50_fpn build theirs.
    torch.manual_seed(0)
    images, targets = detection_batch(demo, "train")
    if detector == "maskrcnn":
        backbone = resnest_fpn_backbone(backbone_name="resnest14d", weights=weights_file)
        model = MaskRCNN(backbone, NUM_CLASSES, min_size=SIZE, max_size=SIZE, box_batch_size_per_image=32)
        for target in targets:  # box masks: enough for a training step
            target["masks"] = torch.zeros(len(target["boxes"]), SIZE, SIZE, dtype=torch.uint8)
            for mask, (x0, y0, x1, y1) in zip(target["masks"], target["boxes"].long().tolist()):
                mask[y0:y1, x0:x1] = 1
    else:
        backbone = resnest_fpn_backbone(backbone_name="resnest14d", weights=weights_file, returned_layers=[2, 3, 4],
                                        extra_blocks=LastLevelP6P7(256, 256))
        model = RetinaNet(backbone, NUM_CLASSES, min_size=SIZE, max_size=SIZE)
    model.train()
    losses = model(images, targets)
    assert losses and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.backbone.body.layer4[0].conv3.weight.grad.abs().sum() > 0
    assert {"maskrcnn": ["roi_heads.box_predictor", "roi_heads.mask_predictor.mask_fcn_logits", "rpn.head.bbox_pred",
                         "rpn.head.cls_logits"],
            "retinanet": ["head.classification_head.cls_logits", "head.regression_head.bbox_reg"]}[detector] == \
        sorted(fp32_heads(model))


def test_deeplabv3_training_step_and_inference(demo, weights_file):
    torch.manual_seed(0)
    model = deeplabv3_resnest("resnest14d", num_classes=NUM_CLASSES, aux_loss=True, weights_backbone=weights_file)
    images, labels = segmentation_batch(demo, "train")
    assert set(labels.unique().tolist()) <= set(range(NUM_CLASSES)) | {255} and len(labels.unique()) > 1
    running = model.backbone.layer3[0].bn1.running_mean.clone()
    model.train()
    loss = segmentation_loss(model(images), labels)
    assert torch.isfinite(loss)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    optimizer.zero_grad()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())  # all layers trainable, as torchvision's
    optimizer.step()
    assert not torch.equal(model.backbone.layer3[0].bn1.running_mean, running)  # BatchNorm2d, training
    model.eval()
    images, _ = segmentation_batch(demo, "val")
    with torch.no_grad():
        out = model(images)
    assert set(out) == {"out", "aux"} and out["out"].shape == (len(images), NUM_CLASSES, SIZE, SIZE)


@pytest.fixture(scope="module")
def eval_models(weights_file):
    torch.manual_seed(0)
    rcnn = fasterrcnn_resnest_fpn("resnest14d", weights_backbone=weights_file, num_classes=NUM_CLASSES,
                                  **SMALL_RCNN).eval()
    deeplab = deeplabv3_resnest("resnest14d", num_classes=NUM_CLASSES, aux_loss=True,
                                weights_backbone=weights_file).eval()
    return rcnn, deeplab


def test_fast_path(demo, eval_models):
    # core.fuse.deploy on the torchvision models: the trunk fused and channels_last, the rest unchanged.
    # Folding changes float rounding only (about 1e-6 relative), so the same boxes survive NMS: boxes (pixels,
    # up to 64) within 1e-3, scores within 1e-4, segmentation logits within 1e-4 of their scale.
    rcnn, deeplab = eval_models
    images, _ = detection_batch(demo, "val")
    seg_images, _ = segmentation_batch(demo, "val")
    with torch.no_grad():
        fast = deploy(rcnn)
        assert fast.backbone.body.is_fused
        assert not any(isinstance(m, FrozenBatchNorm2d) for m in fast.backbone.modules())  # folded
        out, ref = fast(images)[0], rcnn(images)[0]
        assert len(out["boxes"]) == len(ref["boxes"]) > 0
        torch.testing.assert_close(out["boxes"], ref["boxes"], atol=1e-3, rtol=1e-5)
        torch.testing.assert_close(out["scores"], ref["scores"], atol=1e-4, rtol=1e-4)
        assert torch.equal(out["labels"], ref["labels"])
        fast = deploy(deeplab)
        assert fast.backbone.is_fused
        out, ref = fast(seg_images), deeplab(seg_images)
        for k in ref:
            assert (out[k] - ref[k]).abs().max() < 1e-4 * ref[k].abs().max(), k


def test_bf16(demo, eval_models):
    # deploy(model, dtype=torch.bfloat16) on the torchvision models against float32. Bounds as tests/test_bf16.py
    # and test_amp_d2.py: features (each FPN level, the DeepLab logits) within BF16_REL = 1e-2 relative, about
    # 2.5 bf16 roundings, and above BF16_MIN (the run really was bf16). torchvision's score and box layers run in
    # fp32 (the adapter registers them): on the same proposals class probabilities agree within 2e-3 and box
    # deltas within BF16_REL, and the detections come out in float32.
    rcnn, deeplab = eval_models
    images, _ = detection_batch(demo, "val")
    seg_images, _ = segmentation_batch(demo, "val")
    with torch.no_grad():
        bf16 = deploy(rcnn, dtype=torch.bfloat16)
        batch, _ = rcnn.transform(images)
        ref_features = rcnn.backbone(batch.tensors)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            features = bf16.backbone(batch.tensors)
        errors = {k: rel_err(features[k], ref_features[k]) for k in ref_features}
        assert all(v.dtype == torch.bfloat16 for v in features.values())
        assert all(BF16_MIN < e < BF16_REL for e in errors.values()), errors
        proposals, _ = rcnn.rpn(batch, ref_features)

        def predictions(model, feats):
            heads = model.roi_heads
            return heads.box_predictor(heads.box_head(heads.box_roi_pool(feats, proposals, batch.image_sizes)))

        ref_scores, ref_deltas = predictions(rcnn, ref_features)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            scores, deltas = predictions(bf16, features)
        assert scores.dtype == deltas.dtype == torch.float32
        assert (scores.softmax(-1) - ref_scores.softmax(-1)).abs().max() < 2e-3
        assert BF16_MIN < rel_err(deltas, ref_deltas) < BF16_REL
        out = bf16(images)[0]
        assert len(out["boxes"]) > 0 and out["boxes"].dtype == out["scores"].dtype == torch.float32

        bf16 = deploy(deeplab, dtype=torch.bfloat16)
        out, ref = bf16(seg_images), deeplab(seg_images)
        for k in ref:
            assert out[k].dtype == torch.bfloat16 and BF16_MIN < rel_err(out[k], ref[k]) < BF16_REL, k
