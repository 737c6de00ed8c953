"""Issue 6, configs: for any combination of the variant knobs, either the model builds and its outputs have
exactly the channels and strides that `output_shape()` promises (spatial size ceil(input / stride)), or
the constructor raises a ValueError that names a bad knob and its value. Never an obscure torch error."""
import math

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.d2  # uses detectron2: also run on the second detectron2 line


from conftest import require  # noqa: E402

require("detectron2", "make env installs detectron2")
from resnest_backbone.core.trunk import STAGE_NAMES, STAGE_PLANES  # noqa: E402
from resnest_backbone.d2 import ResNeStBackbone  # noqa: E402

ODD = [None, 2.5, "2", True]  # values a hurried config may carry: must be refused by name, not crash later


USUAL = dict(radix=[0, 1, 2, 4], cardinality=[1, 2, 4], bottleneck_width=[4, 8, 16, 24], stem_width=[4, 8, 16])
ANY = dict(radix=st.integers(-1, 5), cardinality=st.integers(0, 5), bottleneck_width=st.integers(0, 24),
           stem_width=st.integers(0, 24))


@st.composite
def knobs(draw):
    """Half the time the usual values (which mostly build), half the time any integer in range or an odd
    type, knob by knob."""
    usual = draw(st.booleans())
    return {name: draw(st.sampled_from(USUAL[name])) if usual else
            draw(st.one_of(ANY[name], ANY[name], st.sampled_from(ODD))) for name in USUAL}


def bad_knobs(kw):
    """The knobs that make this configuration impossible, from the documented rules (the oracle)."""
    bad = set()
    for name in ("radix", "cardinality", "bottleneck_width", "stem_width"):
        value = kw[name]
        if not isinstance(value, int) or isinstance(value, bool) or value < (0 if name == "radix" else 1):
            bad.add(name)
    if bad:
        return bad
    radix, card, width = kw["radix"], kw["cardinality"], kw["bottleneck_width"]
    for planes in STAGE_PLANES:
        group = int(planes * width / 64) * card
        if radix >= 1 and group % (card * radix):
            bad |= {"radix", "cardinality", "bottleneck_width"}
        if radix >= 1 and max(group * radix // 4, 32) % card:
            bad.add("cardinality")
    return bad


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arch=knobs(), avd=st.booleans(), avd_first=st.booleans(),
       dilation=st.sampled_from([("os", 32), ("os", 16), ("os", 8), ("dil", (1, 1, 2, 4)),
                                 ("dil", (1, 2, 1, 3))]),
       out_features=st.lists(st.sampled_from(["stem", *STAGE_NAMES]), min_size=1, max_size=5, unique=True),
       height=st.integers(1, 70), width=st.integers(1, 70), train=st.booleans())
def test_knobs_build_with_promised_shapes_or_name_the_bad_value(arch, avd, avd_first, dilation, out_features,
                                                               height, width, train):
    kw = dict(layers=(1, 1, 1, 1), avd=avd, avd_first=avd_first, out_features=out_features, **arch)
    if dilation[0] == "os":
        kw["output_stride"] = dilation[1]
    else:
        kw["strides"], kw["dilations"] = (1, 2, 2, 2), dilation[1]
    bad = bad_knobs(kw)
    event("refused" if bad else "built")
    if bad:
        with pytest.raises(ValueError) as err:
            ResNeStBackbone(**kw)
        message = str(err.value)
        assert any(f"{name}={kw[name]!r}" in message for name in bad), (bad, message)
        return
    model = ResNeStBackbone(**kw).train(train)
    promised = model.output_shape()
    assert list(promised) == out_features
    # batch 2 in training (BN needs more than one value per channel in the trunk at 1x1 maps)
    x = torch.randn(2 if train else 1, 3, height, width)
    with torch.no_grad():
        outputs = model(x)
    assert set(outputs) == set(out_features)
    for name, spec in promised.items():
        out = outputs[name]
        assert out.shape[:2] == (x.shape[0], spec.channels), name
        assert out.shape[2:] == (math.ceil(height / spec.stride), math.ceil(width / spec.stride)), \
            (name, spec.stride, tuple(out.shape))
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("kw, needle", [
    (dict(layers=(3, 4, 6)), "layers=(3, 4, 6)"),
    (dict(layers=(1, 0, 1, 1)), "layers=(1, 0, 1, 1)"),
    (dict(output_stride=4), "output_stride=4"),
    (dict(output_stride=16, strides=(1, 2, 2, 2)), "output_stride=16 contradicts"),
    (dict(dilations=(1, 1, 0, 1)), "dilations=(1, 1, 0, 1)"),
    (dict(strides=(1, 3, 2, 2)), "strides=(1, 3, 2, 2)"),
    (dict(multi_grid=()), "multi_grid=()"),
    (dict(dropblock_prob=1.0), "dropblock_prob=1.0"),
    (dict(dropblock_prob=None), "dropblock_prob=None"),
    (dict(reduction_factor=0), "reduction_factor=0"),
    (dict(out_features="res4"), "out_features='res4'"),
    (dict(out_features=["res6"]), "res6"),
    (dict(cardinality=3, bottleneck_width=2, radix=1), "cardinality=3"),
])
def test_other_bad_values_are_named(kw, needle):
    with pytest.raises(ValueError) as err:
        ResNeStBackbone(**{"layers": (1, 1, 1, 1), **kw})
    assert needle in str(err.value)
