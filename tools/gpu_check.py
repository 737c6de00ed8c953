#!/usr/bin/env python
"""One prepared check of the CUDA paths on one NVIDIA GPU, with nothing but this checkout and its wheels.

Install (a fresh machine with an NVIDIA driver for CUDA 13, Python >= 3.9 and PyPI; about 2 min):
    RESNEST_ENV=d2 bash tools/env/setup_env.sh    # = make env-d2 (README): torch 2.14.1 (PyPI's CUDA wheel),
                                                  # detectron2 v0.6, this project with its test extras
    .venv/bin/pip install resnest==0.0.5 timm     # among the test extras; needed where you install by hand
Run (at most 5.5 min on one GPU: the parts' time caps, 90 + 150 + 90 s by default):
    .venv/bin/python tools/gpu_check.py                  # writes gpu_check.json + gpu_check.md
    .venv/bin/python tools/gpu_check.py --parts speed    # one part
    .venv/bin/python tools/gpu_check.py --render gpu_check.json --out gpu_check.md   # re-render, run nothing

Parts, each under its own time cap, each recorded (passed / failed / timed out, with the output's tail), none
stopping the others:
  tests  `pytest -m cuda tests`: every CUDA-marked test
  train  tools/train_net.py --config-file configs/demo_faster_rcnn_resnest.yaml MODEL.DEVICE cuda: the demo
         detector trained for --iters iterations on the GPU, then its COCO box AP on the demo val split
  speed  the ResNeSt-50 trunk, ours vs the official code (resnest==0.0.5) vs timm vs torchvision's ResNet-50, at
         1x3x800x1216: fp32 (NCHW, channels_last), bf16 and fp16 autocast, and ours' fast path (deploy) in each
         precision; CUDA-synchronised medians of interleaved rounds (the benchmark's candidates, treatments and
         measure code: benchmarks/)
The report (JSON, and markdown rendered from it alone) names the device, driver, torch / CUDA / cuDNN
versions, the TF32 state (cuDNN convolutions use TF32 by default on Ampere and later: fp32 there is not
IEEE fp32) and the host's CPU flags.

Exit codes: 0 every part run passed; 1 a part failed or ran out of time; 2 bad arguments; 3 no CUDA GPU here
(nothing is checked and no report is written: the message says why).
"""
import os

if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads (as tools/benchmark.py)

import argparse  # noqa: E402
import datetime
import json
import re
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from typing import List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a checkout

NO_GPU = 3
PARTS = ("tests", "train", "speed")
DEMO_CONFIG = os.path.join("configs", "demo_faster_rcnn_resnest.yaml")
AP_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    parser.add_argument("--out", default="gpu_check.md", help="markdown report (the JSON: --out with .json)")
    parser.add_argument("--render", metavar="JSON", default=None,
                        help="run nothing: write --out from the JSON of an earlier run")
    parser.add_argument("--iters", type=int, default=450, help="training iterations (the demo config's: 450)")
    parser.add_argument("--variant", default="resnest50", help="trunk timed by the speed part")
    parser.add_argument("--size", default="1x800x1216", metavar="BxHxW", help="the speed part's input")
    parser.add_argument("--repeats", type=int, default=20, help="timed rounds of the speed part (after 3 warm-up)")
    for part, cap in (("tests", 90), ("train", 150), ("speed", 90)):
        parser.add_argument(f"--{part}-cap", type=int, default=cap, metavar="S",
                            help=f"seconds the {part} part may take (default {cap})")
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        parser.error(f"--parts: {unknown or 'none given'}; choose from {', '.join(PARTS)}")
    args.parts = parts
    for name in ("iters", "repeats", "tests_cap", "train_cap", "speed_cap"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, not {getattr(args, name)}")
    from benchmarks.candidates import parse_workloads

    try:
        loads = parse_workloads(args.size)
    except ValueError as exc:
        parser.error(f"--size: {exc}")
    if len(loads) != 1:
        parser.error(f"--size: give one BxHxW, not {args.size!r}")
    args.workload = loads[0]
    return args


def no_gpu_reason() -> Optional[str]:
    """Why this process cannot use a CUDA GPU, or None when it can."""
    import torch

    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None)"
    if not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        return (f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no CUDA device"
                + (f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else
                   ": no NVIDIA GPU or driver here"))
    return None


def gpu_environment() -> dict:
    """What the numbers depend on: device, driver, torch / CUDA / cuDNN versions, TF32 state, host CPU."""
    import torch

    from benchmarks.measure import cpu_flags

    props = torch.cuda.get_device_properties(0)
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", "-i", "0"],
                                capture_output=True, text=True, timeout=30).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        driver = None
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "device": torch.cuda.get_device_name(0),
            "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
            "memory_gib": round(props.total_memory / 2**30, 1), "driver": driver or "unknown (no nvidia-smi)",
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(), "gpus": torch.cuda.device_count(),
            "tf32": {"cudnn.allow_tf32": torch.backends.cudnn.allow_tf32,
                     "cuda.matmul.allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                     "float32_matmul_precision": torch.get_float32_matmul_precision()},
            "cpu_flags": cpu_flags(), "python": sys.version.split()[0]}


def _run(cmd: List[str], cap: int, env: Optional[dict] = None) -> dict:
    """Run `cmd` from the checkout with a time cap: {"status", "seconds", "returncode", "output"}."""
    start = time.time()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=cap)
        status, code, output = ("passed" if proc.returncode == 0 else "failed"), proc.returncode, proc.stdout
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout or ""
        status, code, output = "timed out", None, out.decode(errors="replace") if isinstance(out, bytes) else out
    return {"status": status, "seconds": round(time.time() - start, 1), "returncode": code, "output": output}


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def run_tests(cap: int) -> dict:
    """`pytest -m cuda tests` in a child process: counts and failed test ids from its JUnit XML."""
    with tempfile.TemporaryDirectory() as tmp:
        xml = os.path.join(tmp, "cuda.xml")
        res = _run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "--junitxml", xml,
                    "tests"], cap)
        counts, failed = {"passed": 0, "failed": 0, "skipped": 0}, []
        if os.path.exists(xml):
            for case in ElementTree.parse(xml).getroot().iter("testcase"):
                outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "")
                key = {"failure": "failed", "error": "failed", "skipped": "skipped"}.get(outcome, "passed")
                counts[key] += 1
                if key == "failed":
                    failed.append(f"{case.get('classname')}::{case.get('name')}")
    if res["status"] == "failed" and res["returncode"] == 5:  # pytest: nothing collected
        res["status"] = "failed: no CUDA-marked test collected"
    return {"status": res["status"], "seconds": res["seconds"], "counts": counts, "failed": failed,
            "tail": _tail(res["output"])}


def ap_from_log(log: str) -> dict:
    """{task: {AP, AP50, ...}} from the `copypaste:` lines of detectron2's print_csv_format (nan -> None)."""
    lines = [line.split("copypaste: ", 1)[1].strip() for line in log.splitlines() if "copypaste: " in line]
    out = {}
    for i, line in enumerate(lines):
        if line.startswith("Task: ") and i + 2 < len(lines):
            keys, values = lines[i + 1].split(","), lines[i + 2].split(",")
            out[line[len("Task: "):]] = {k: (None if v == "nan" else float(v)) for k, v in zip(keys, values)}
    return out


def train_command(output_dir: str, iters: int, device: str = "cuda", extra: Sequence[str] = ()) -> List[str]:
    """tools/train_net.py on the demo config: `iters` iterations (learning-rate drops at 75% and 92%, warm-up
    a fifth, as tools/demo.py), evaluated on the config's test set at the end of training."""
    steps = tuple(sorted({s for s in (int(iters * 0.75), int(iters * 0.92)) if 0 < s < iters}))
    return [sys.executable, os.path.join("tools", "train_net.py"), "--config-file", DEMO_CONFIG,
            "MODEL.DEVICE", device, "SOLVER.MAX_ITER", str(iters), "SOLVER.STEPS", str(steps),
            "SOLVER.WARMUP_ITERS", str(min(100, max(1, iters // 5))), "SOLVER.CHECKPOINT_PERIOD", str(iters),
            "OUTPUT_DIR", output_dir, *extra]


def run_training(iters: int, cap: int, device: str = "cuda", extra: Sequence[str] = ()) -> dict:
    """The demo detector trained and evaluated by tools/train_net.py in a child process, within `cap` seconds:
    status, seconds, the iterations logged, the box AP (failed when no AP was printed)."""
    with tempfile.TemporaryDirectory() as tmp:
        res = _run(train_command(os.path.join(tmp, "run"), iters, device, extra), cap,
                   env=dict(os.environ, PYTHONWARNINGS="ignore"))
    ap = ap_from_log(res["output"]).get("bbox")
    if res["status"] == "passed" and ap is None:
        res["status"] = "failed: no box AP in the output"
    logged = [int(m) for m in re.findall(r"\biter: (\d+)", res["output"])]
    return {"status": res["status"], "seconds": res["seconds"], "iterations": iters, "device": device,
            "last_iter_logged": max(logged) + 1 if logged else None, "ap": ap, "tail": _tail(res["output"])}


def run_speed(variant: str, workload, repeats: int, device: str = "cuda", warmup: int = 3) -> dict:
    """The trunks under the GPU menu (benchmarks.treatments.GPU_EVAL_MENU, and ours' fast path in fp32, bf16
    and fp16), measured by benchmarks.run.run_pairs: interleaved rounds, synchronised on CUDA, medians;
    relative error to each implementation's eager fp32 output; peak memory."""
    import torch

    from benchmarks.candidates import backbone_implementations
    from benchmarks.run import run_pairs
    from benchmarks.treatments import GPU_EVAL_MENU, gpu_own_treatments

    start = time.time()
    dev = torch.device(device)
    impls = [i for i in backbone_implementations(variant) if i.role in ("ours", "official", "timm", "resnet")]
    own = gpu_own_treatments()
    pairs = [(i, t) for i in impls for t in list(GPU_EVAL_MENU) + (own if i.role == "ours" else [])]
    x = workload.input().to(dev)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    torch.backends.cudnn.benchmark = True  # fixed input size: cuDNN picks its fastest algorithms, for all alike
    eval_ = run_pairs(pairs, "eval", lambda t: x_cl if t.channels_last else x, warmup, repeats, True, dev)
    treatments = {t.name: {"dtype": t.dtype, "description": t.description} for _, t in pairs}
    failed = sorted({f"{role} / {name}" for role, per in eval_.items() for name, e in per.items() if "error" in e})
    return {"status": "passed" if not failed else "failed: " + ", ".join(failed),
            "seconds": round(time.time() - start, 1), "workload": workload.label, "variant": variant,
            "warmup": warmup, "repeats": repeats, "cudnn_benchmark": True,
            "implementations": [{"role": i.role, "name": i.name} for i in impls], "treatments": treatments,
            "eval": eval_}


class _OutOfTime(BaseException):
    """Raised by the alarm: a BaseException, so that the benchmark's per-entry `except Exception` lets it
    through and the whole part stops."""


def _in_process(fn, cap: int, *args) -> dict:
    """fn(*args), a part run in this process, stopped after `cap` seconds (SIGALRM: between Python steps);
    a part that raises is recorded as failed with its exception, and the other parts still run."""
    def stop(signum, frame):
        raise _OutOfTime()

    start = time.time()
    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(cap)
    try:
        res = fn(*args)
    except _OutOfTime:
        res = {"status": "timed out"}
    except Exception as exc:  # noqa: BLE001 - a failing part is reported, the others still run
        res = {"status": f"failed: {type(exc).__name__}: {exc}"}
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    res.setdefault("seconds", round(time.time() - start, 1))
    return res


# ------------------------------------------------------------------------------------------------- report
def _fmt(v, digits=1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def render_markdown(report: dict) -> str:
    """The report, from the JSON alone."""
    env = report["env"]
    tf32 = ", ".join(f"{k} {v}" for k, v in env["tf32"].items())
    lines = [f"# GPU check: {env['device']}", "",
             f"Run {env['date']} on {env['device']} (compute capability {env['capability']}, {env['memory_gib']} "
             f"GiB; {env['gpus']} GPU(s) visible), driver {env['driver']}; torch {env['torch']}, CUDA "
             f"{env['cuda']}, cuDNN {env['cudnn']}, Python {env['python']}; TF32: {tf32}; host CPU flags: "
             f"{' '.join(env['cpu_flags']) or '-'}. Generated by `python tools/gpu_check.py "
             f"{' '.join(report['argv'])}` in {report['seconds'] / 60:.1f} min.", "",
             "| part | status | seconds |", "|---|---|---:|"]
    for part in PARTS:
        if part in report["parts"]:
            p = report["parts"][part]
            lines.append(f"| {part} | {p['status']} | {_fmt(p.get('seconds'))} |")
    lines.append("")
    tests = report["parts"].get("tests")
    if tests:
        c = tests.get("counts", {})
        lines += ["## CUDA-marked tests (`pytest -m cuda tests`)", "",
                  f"{c.get('passed', 0)} passed, {c.get('failed', 0)} failed, {c.get('skipped', 0)} skipped."]
        lines += [f"- failed: {name}" for name in tests.get("failed", [])]
        lines.append("")
    train = report["parts"].get("train")
    if train:
        ap = train.get("ap") or {}
        lines += [f"## Demo detector trained on the GPU ({train.get('iterations')} iterations, "
                  f"{train.get('device')})", "",
                  f"`{' '.join(train_command('OUT', train['iterations'], train['device'])[1:])}`: "
                  f"{train['status']} in {_fmt(train.get('seconds'))} s.", "",
                  "| " + " | ".join(AP_KEYS) + " |", "|" + "---:|" * len(AP_KEYS),
                  "| " + " | ".join(_fmt(ap.get(k), 2) for k in AP_KEYS) + " |", ""]
    speed = report["parts"].get("speed")
    if speed and "eval" in speed:
        lines += _speed_section(speed)
    for part in PARTS:
        p = report["parts"].get(part, {})
        if p.get("status") != "passed" and p.get("tail"):
            lines += [f"## Output of the {part} part (last lines)", "", "```", p["tail"], "```", ""]
    return "\n".join(lines)


def _best(per: dict, treatments: dict, dtype: str):
    timed = [(e["ms"], name) for name, e in per.items() if "ms" in e and treatments[name]["dtype"] == dtype]
    return min(timed) if timed else (None, None)


def _speed_section(speed: dict) -> List[str]:
    from benchmarks.render import table_cells

    def timed(column, e):
        err = "-" if e.get("rel_err") is None else f"{e['rel_err']:.0e}"
        return f"{e['ms']:.2f} ({err})"

    names = {i["role"]: i["name"] for i in speed["implementations"]}
    cols, treatments = list(speed["treatments"]), speed["treatments"]
    lines = [f"## Speed: {speed['variant']} trunk, eval {speed['workload']} (ms, median of {speed['repeats']} "
             f"after {speed['warmup']} warm-up, CUDA-synchronised; cudnn.benchmark on)", "",
             "| implementation | " + " | ".join(f"{c} ({treatments[c]['dtype']})" for c in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for role, per in speed["eval"].items():
        cells = table_cells(per, cols, lambda c, err: f"fails: {err[:100].replace('|', '/')}", timed)
        lines.append(f"| {names[role]} | " + " | ".join(cells) + " |")
    resnet = names.get("resnet", "ResNet")
    lines += ["", "Cell: ms (the largest output difference to the same implementation's eager fp32 output, relative "
              "to its largest magnitude). Best of each implementation per precision, and its time over "
              f"{resnet}'s best in that precision:", "",
              "| implementation | " + " | ".join(f"best {d} | / {resnet}" for d in ("fp32", "bf16", "fp16")) + " |",
              "|---|" + "---:|" * 6]
    rn = speed["eval"].get("resnet", {})
    for role, per in speed["eval"].items():
        cells = []
        for dtype in ("fp32", "bf16", "fp16"):
            ms, name = _best(per, treatments, dtype)
            ref = _best(rn, treatments, dtype)[0]
            cells += ["-" if ms is None else f"{ms:.2f} {name}", _fmt(None if ms is None or not ref else ms / ref, 2)]
        lines.append(f"| {names[role]} | " + " | ".join(cells) + " |")
    return lines + [""]


def write_report(report: dict, out: str) -> str:
    """The JSON (--out with .json) and the markdown rendered from it as written."""
    text = json.dumps(report, indent=1)
    stem = os.path.splitext(out)[0]
    for path, content in ((stem + ".json", text + "\n"), (out, render_markdown(json.loads(text)) + "\n")):
        if os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(content)
    return stem + ".json"


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.render is not None:
        try:
            with open(args.render) as f:
                report = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            print(f"gpu_check: error: --render {args.render}: {exc}", file=sys.stderr)
            return 2
        with open(args.out, "w") as f:
            f.write(render_markdown(report) + "\n")
        print(f"gpu_check: wrote {args.out}")
        return 0
    reason = no_gpu_reason()
    if reason:
        print(f"gpu_check: no CUDA GPU: {reason}. Nothing was checked and no report written; run it on a "
              f"machine with an NVIDIA GPU (install: see the top of tools/gpu_check.py). Exit code {NO_GPU}.")
        return NO_GPU
    start = time.time()
    report = {"env": gpu_environment(), "argv": list(argv) if argv is not None else sys.argv[1:], "parts": {}}
    print(f"gpu_check: {report['env']['device']}, driver {report['env']['driver']}, torch {report['env']['torch']} "
          f"(CUDA {report['env']['cuda']}); parts: {', '.join(args.parts)}", flush=True)
    for part in args.parts:  # in PARTS order as given; each one is recorded whatever the others did
        print(f"gpu_check: {part} (cap {getattr(args, part + '_cap')} s) ...", flush=True)
        if part == "tests":
            res = run_tests(args.tests_cap)
        elif part == "train":
            res = run_training(args.iters, args.train_cap)
        else:
            res = _in_process(run_speed, args.speed_cap, args.variant, args.workload, args.repeats)
        report["parts"][part] = res
        print(f"gpu_check: {part}: {res['status']} ({res.get('seconds', '-')} s)", flush=True)
    report["seconds"] = round(time.time() - start, 1)
    json_path = write_report(report, args.out)
    print(render_markdown(json.load(open(json_path))))
    print(f"gpu_check: wrote {json_path} and {args.out}")
    return 0 if all(p["status"] == "passed" for p in report["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
