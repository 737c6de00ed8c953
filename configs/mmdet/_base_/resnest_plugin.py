# What each ResNeSt config of configs/mmdet and configs/mmseg adds to the OpenMMLab recipe besides the backbone.
# Registers the `ResNeStSA` backbone in mmdet's and mmseg's MODELS.
custom_imports = dict(imports=['resnest_backbone.mm'], allow_failed_imports=False)
# Warns before the run when ResNeSt weights meet BGR input or another mean/std (resnest_backbone/guards.py).
custom_hooks = [dict(type='ResNeStInputCheckHook')]
