"""Warnings for the two classic mistakes with ResNeSt weights, one mechanism for both adapters.

Random heads. An ImageNet ResNeSt checkpoint fills only the backbone trunk; a detector (or segmentor)
evaluated with it runs its heads (RPN, ROI heads, FPN, sem-seg head, ...) at their random initialisation:
about 0 AP. The adapters' loaders know what a load filled: the detectron2 checkpointer from the keys it
loaded against the model's, ResNeStSA from the keys an mmengine / torch load of the whole model left missing.
They `arm_random_heads` on the model with the parts no weights reached; the warning is given at the first
forward in eval mode (evaluation, inference), and never when a forward in training mode comes first
(training from an ImageNet trunk is what such a file is for). One warning per load.

Input format. ResNeSt weights were trained on RGB images normalised with the ImageNet mean and std in 0-255
scale (RESNEST_INPUT). detectron2's defaults are BGR with Caffe's mean and std 1, so a config that does not
set them feeds the network inputs it never saw (no error; the anchors' trackers report NaN losses and
poor results). When a load fills a
ResNeSt trunk, the adapters `check_input` the config (its own key names) and warn with the values to set.

Both go through the framework's logger as warnings (logging, the project's convention): detectron2's (its
console and log.txt) or mmengine's current logger. `RESNEST_SILENCE=random_heads,input_format` (either or
both) silences them, e.g. for a checkpoint you trained yourself on BGR input.
"""
import logging
import os
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

from torch import nn

RANDOM_HEADS = "random_heads"
INPUT_FORMAT = "input_format"
SILENCE_ENV = "RESNEST_SILENCE"
# What every published ResNeSt checkpoint (ImageNet, detectron2-ResNeSt, mmdet) was trained on.
RESNEST_INPUT = {"format": "RGB", "pixel_mean": [123.68, 116.779, 103.939], "pixel_std": [58.393, 57.12, 57.375]}
# Per channel, 0-255 scale: torchvision's / mmdet's [123.675, 116.28, 103.53] / [58.395, 57.12, 57.375] pass;
# Caffe's BGR mean [103.53, 116.28, 123.675] and std [1, 1, 1] do not.
TOLERANCE = 1.0
INPUT_KEY = "resnest_input"  # the input a training checkpoint of this project was trained on (RESNEST_INPUT's keys)
_GUARD = "_resnest_random_heads_guard"

Log = Callable[[str], None]


def silenced(kind: str) -> bool:
    """True when $RESNEST_SILENCE names `kind` (comma-separated)."""
    return kind in {k.strip() for k in os.environ.get(SILENCE_ENV, "").split(",")}


def random_parts(model: nn.Module, unfilled: Iterable[str], trunk: Optional[str]) -> Tuple[List[str], int]:
    """The largest modules of `model` (outside the trunk named `trunk`) whose parameters are all in
    `unfilled`, and how many parameter tensors outside the trunk are unfilled."""
    unfilled = set(unfilled)
    if trunk is None:
        inside = lambda n: False  # noqa: E731
    else:
        inside = lambda n: not trunk or n == trunk or n.startswith(trunk + ".")  # noqa: E731
    outside = [n for n, _ in model.named_parameters() if not inside(n)]
    count = sum(1 for n in outside if n in unfilled)
    if not count:
        return [], 0
    if all(n in unfilled for n, _ in model.named_parameters()):
        return ["the whole model"], count
    parts: List[str] = []
    for name, module in model.named_modules():
        if not name or inside(name) or any(name.startswith(p + ".") for p in parts):
            continue
        names = [f"{name}.{n}" for n, _ in module.named_parameters()]
        if names and all(n in unfilled for n in names):
            parts.append(name)
    return parts, count


def arm_random_heads(model: nn.Module, what: Callable[[], Tuple[Sequence[str], int, bool]], source: str,
                     advice: str, log: Log) -> None:
    """After a load into `model`: at its first forward in eval mode, unless a forward in training mode comes
    first, warn when `what()` -> (parts, count, trunk_filled) names parts the load left at their random
    initialisation. Replaces what an earlier load armed. `what` is asked then (mmengine completes its list
    of missing keys after the backbone has loaded)."""
    disarm(model)

    def pre_hook(module, args):
        disarm(module)  # one decision per load
        if module.training or silenced(RANDOM_HEADS):
            return
        parts, count, trunk_filled = what()
        if parts:
            log(random_heads_message(parts, count, trunk_filled, source, advice))

    setattr(model, _GUARD, model.register_forward_pre_hook(pre_hook))


def random_heads_message(parts: Sequence[str], count: int, trunk_filled: bool, source: str, advice: str) -> str:
    if trunk_filled:
        what = (f"{source} filled only the ResNeSt trunk (backbone-only weights, e.g. an ImageNet checkpoint); "
                f"these parts kept their random initialisation: ")
    elif parts == ["the whole model"]:
        what = f"{source}: no weights were loaded into the model; it is entirely at its random initialisation"
    else:
        what = f"{source} did not fill these parts, which kept their random initialisation: "
    shown = "" if parts == ["the whole model"] else ", ".join(parts[:12]) + (
        f" ... ({len(parts) - 12} more)" if len(parts) > 12 else "")
    message = ("!!! RANDOM HEADS: the model is being evaluated untrained. " + what + shown
               + f" ({count} tensors outside the trunk). Its predictions are meaningless (about 0 AP / "
               "mIoU). " + advice + f" [{SILENCE_ENV}={RANDOM_HEADS} silences this]")
    return message


def disarm(model: nn.Module) -> None:
    handle = model.__dict__.pop(_GUARD, None)
    if handle is not None:
        handle.remove()


def armed(model: nn.Module) -> bool:
    return _GUARD in model.__dict__


def input_problems(rows: Iterable[Tuple[str, object, object]]) -> List[str]:
    """`key: value -> what to set` for each (key, value, expected) that differs: strings (formats) exactly,
    numbers (mean, std) per channel within TOLERANCE."""
    problems = []
    for key, value, expected in rows:
        if value is None:
            continue
        if isinstance(expected, bool):
            wrong = bool(value) != expected
        elif isinstance(expected, str):
            wrong = str(value).upper() != expected.upper()
        else:
            value = [float(v) for v in value]
            wrong = len(value) != len(expected) or any(abs(a - b) > TOLERANCE for a, b in zip(value, expected))
        if wrong:
            problems.append(f"{key} is {_show(value)}: set {_show(expected)}")
    return problems


def check_input(rows: Iterable[Tuple[str, object, object]], source: str, log: Log, expected_from: str = "") -> bool:
    """Warn (once, through `log`) when the config's input (rows of key, value, expected) is not what the
    weights from `source` were trained on. Returns whether it warned."""
    problems = input_problems(rows)
    if not problems or silenced(INPUT_FORMAT):
        return False
    log(f"!!! INPUT FORMAT: {source} holds ResNeSt weights trained on "
        + (expected_from or "RGB images normalised with the ImageNet mean/std in 0-255 scale")
        + ", but this config gives them other input (no error is raised: the weights see inputs they were never "
        "trained on). Set:\n  " + "\n  ".join(problems) + f"\n[{SILENCE_ENV}={INPUT_FORMAT} silences this, e.g. "
        "for weights you trained yourself on this input]")
    return True


def _show(value) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, str):
        return repr(value)
    return "[" + ", ".join(f"{v:g}" for v in value) + "]"


def logger_log(logger: logging.Logger) -> Log:
    return lambda message: logger.warning(message)


__all__ = ["INPUT_FORMAT", "INPUT_KEY", "RANDOM_HEADS", "RESNEST_INPUT", "SILENCE_ENV", "TOLERANCE",
           "arm_random_heads", "armed", "check_input", "disarm", "input_problems", "logger_log",
           "random_heads_message", "random_parts", "silenced"]
