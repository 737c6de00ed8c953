# Mask R-CNN, ResNeSt-50-FPN, 1x (LazyConfig of ../mask_rcnn_resnest50_fpn.yaml: SyncBN in backbone, FPN, box
# and mask heads; reference 42.81 box AP / 38.14 mask AP, detectron2-ResNeSt).
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.modeling.poolers import ROIPooler
from detectron2.modeling.roi_heads import MaskRCNNConvUpsampleHead

from .base_rcnn_fpn_resnest import dataloader, lr_multiplier, model, optimizer, train

model.roi_heads.update(
    mask_in_features=["p2", "p3", "p4", "p5"],
    mask_pooler=L(ROIPooler)(
        output_size=14,
        scales=(1.0 / 4, 1.0 / 8, 1.0 / 16, 1.0 / 32),
        sampling_ratio=0,
        pooler_type="ROIAlignV2",
    ),
    mask_head=L(MaskRCNNConvUpsampleHead)(
        input_shape=L(ShapeSpec)(channels=256, width=14, height=14),
        num_classes="${..num_classes}",
        conv_dims=[256, 256, 256, 256, 256],  # 4 convs + the deconv
        conv_norm="SyncBN",
    ),
)
dataloader.train.mapper.use_instance_mask = True
train.output_dir = "./output/lazy/mask_rcnn_resnest50_fpn"
