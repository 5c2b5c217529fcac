"""``make gpu-check``: the CUDA paths in one command, on a machine with one CUDA GPU (issue 13 item 8).

Uses the interpreter it runs under (``make gpu-check PYTHON=...``) and its torch; creates no venv and installs
nothing. In order:

1. build the InPlace-ABN extension against this torch (``python -m common.abn.build``; ``TORCH_CUDA_ARCH_LIST``
   defaults to the GPU's own architecture, which keeps the nvcc part short);
2. the CUDA tests: the tests whose name or marker contains "cuda" in :data:`CUDA_TEST_FILES` (they skip
   without CUDA elsewhere);
3. the ABN CUDA benchmark: time and ``torch.cuda.max_memory_allocated`` of InPlace-ABN against BatchNorm2d +
   in-place LeakyReLU at the PSPNet-R101 shapes, batch 8, 512x512 (``python -m bench.abn --device cuda``);
4. one training step of each entry point of :data:`ENTRY_POINTS` on the GPU (one process, tiny synthetic
   data and random-weight teachers written to a temporary folder); a script that does not exist yet is
   reported as "not present".

Then it prints one summary table and exits 1 if any stage failed (a failed stage's output tail is printed
above the table, and the temporary folder with every stage's log is kept). Without a CUDA device it prints
one line saying so and exits 0.
"""
import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CUDA_TEST_FILES = ("tests/test_abn_ext.py", "tests/test_abn_sync.py", "tests/test_engine.py",
                   "tests/test_train_baseline.py")
BENCH_ROUNDS = 10

# One training step of every entry point: (script or module, its flags). Placeholders: {city} = the synthetic
# Cityscapes flags (--data-dir, --data-list, --data-listval), {cityscapes} / {camvid} = the dataset roots,
# {t101} = a PSPNet-R101 state_dict, {t101_toolbox} = the same in the toolbox key layout (SKD), {r18_imagenet} =
# deep-stem ResNet-18 backbone weights, {esp_teacher} = an ESPNet-C state_dict, {cirkd_teacher} = a
# DeepLabV3-R101 state_dict, {aicsd_teacher} = a DeepLabV3+-R101 train.py checkpoint (both written when those models are
# registered), {out} = the entry's own folder. The rows of the CIRKD and AICSD scripts follow their specs'
# flags (cirkd.md §1.2-1.3, aicsd.md §2.1-2.2); whoever adds a script checks its row.
# The 512x512 crops give the 65x65 logits the discriminators need, so the adversarial paths run too.
ENTRY_POINTS = (
    ("common.train_baseline", "--model pspnet_resnet18 {city} --input-size 512,512 --batch-size 2 --num-steps 1 "
                              "--save-dir {out} --save-every 0 --num-workers 0"),
    ("cwd/train.py", "--kd True --adv True --cwd True --norm-type channel --divergence kl --lambda-cwd 3 "
                     "--temperature 4 {city} --T_ckpt_path {t101} --is-student-load-imgnet False --input-size 512,512 "
                     "--batch-size 2 --num-steps 1 --save-ckpt-start 1 --save-dir {out} --outputs-dir {out}/outputs "
                     "--num-workers 0"),
    ("ifvd/train.py", "{city} --T_ckpt_path {t101} --student-pretrain-model-imgnet {r18_imagenet} --input-size 512,512 "
                      "--batch-size 2 --num-steps 1 --save-ckpt-start 1 --save-dir {out} --outputs-dir {out}/outputs "
                      "--num-workers 0"),
    ("skd/train_and_eval.py", "{city} --T_ckpt_path {t101_toolbox} --is-student-load-imgnet False --input-size 512,512 "
                              "--batch-size 2 --num-steps 1 --save-steps 1 --num-workers 0 --snapshot-dir {out}/snap "
                              "--log-dir {out}/log --outputs-dir {out}/outputs"),
    ("skd/train_esp.py", "--method student_esp_e --data_dir {camvid} --sd_mode light_label_kd_sd --teacher_model "
                         "student_esp_e --teacher-path {esp_teacher} --num-steps 1 --batch-size 2 --snapshot-dir {out} "
                         "--num-workers 0"),
    ("cirkd/train_baseline.py", "--model deeplabv3 --backbone resnet18 --dataset citys --data {cityscapes} "
                                "--train-list {cityscapes}/lists/train.lst --val-list {cityscapes}/lists/val.lst "
                                "--crop-size 512 512 --batch-size 2 --max-iterations 1 --pretrained-base None "
                                "--save-dir {out} --log-dir {out} --workers 0 --skip-val"),
    ("cirkd/train_kd.py", "--teacher-model deeplabv3 --student-model deeplabv3 --teacher-backbone resnet101 "
                          "--student-backbone resnet18 --dataset citys --data {cityscapes} --train-list "
                          "{cityscapes}/lists/train.lst --val-list {cityscapes}/lists/val.lst --crop-size 512 512 "
                          "--batch-size 2 --max-iterations 1 --teacher-pretrained {cirkd_teacher} "
                          "--student-pretrained-base None --save-dir {out} --log-dir {out} --workers 0 --skip-val"),
    ("aicsd/train.py", "--backbone resnet18 --dataset cityscapes --data-dir {cityscapes} --epochs 1 --batch-size 2 "
                       "--workers 0 --imagenet-weights none --save-dir {out} --checkname gpu_check"),
    ("aicsd/train_kd.py", "--backbone resnet18 --dataset cityscapes --data-dir {cityscapes} --epochs 1 --batch-size 2 "
                          "--workers 0 --imagenet-weights none --lo_lambda 9500 --pi_lambda 10 --teacher_path "
                          "{aicsd_teacher} --save-dir {out} --checkname gpu_check"),
)


@dataclass
class Stage:
    """One row of the summary: what ran, its status ("ok", "FAIL", "not present"), seconds, a short note."""

    name: str
    status: str
    seconds: float = 0.0
    note: str = ""

    @property
    def failed(self):
        return self.status == "FAIL"


def no_gpu_reason(dev=Path("/dev")):
    """Why there is nothing to check here (a one-line sentence), or None when a CUDA device is usable.

    Raises SystemExit(1) with a message when a GPU is visible (``dev/nvidia<N>``) but this interpreter has no torch.
    """
    try:
        import torch
    except ImportError:
        if not any(Path(dev).glob("nvidia[0-9]*")):
            return f"no CUDA GPU on this machine (no /dev/nvidia*; {sys.executable} has no torch either)"
        raise SystemExit(f"gpu-check: a GPU is present but {sys.executable} cannot import torch; "
                         "choose an interpreter that has it with PYTHON=/path/to/python") from None
    if not torch.backends.cuda.is_built():
        return f"torch {torch.__version__} under {sys.executable} is a CPU-only build"
    if not torch.cuda.is_available():
        return f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device"
    return None


def last_line(text):
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def run_stage(name, cmd, env, cwd, log_dir, show_output=False, timeout=900):
    """Run ``cmd``; returns a Stage (its output goes to ``log_dir/<name>.log``, its tail is shown on failure)."""
    print(f"\n=== {name} ===\n$ {' '.join(shlex.quote(str(c)) for c in cmd)}", flush=True)
    start = time.perf_counter()
    try:
        proc = subprocess.run([str(c) for c in cmd], env=env, cwd=cwd, capture_output=True, text=True,
                              timeout=timeout)
        output, code = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as err:  # its captured output may be bytes even with text=True
        partial = [x.decode(errors="replace") if isinstance(x, bytes) else (x or "") for x in (err.stdout, err.stderr)]
        output, code = f"{''.join(partial)}\ntimed out after {timeout} s", -1
    seconds = time.perf_counter() - start
    log = Path(log_dir) / f"{name.replace('/', '_').replace(' ', '_')}.log"
    log.write_text(output)
    if show_output:
        print(output, end="", flush=True)
    if code != 0:
        tail = "\n".join(output.splitlines()[-25:])
        print(f"--- {name} FAILED (exit {code}); last lines of {log}:\n{tail}", flush=True)
        return Stage(name, "FAIL", seconds, f"exit {code}: {last_line(output)}")
    return Stage(name, "ok", seconds, last_line(proc.stdout))


def script_command(python, target):
    """``[python, path]`` for a ``*.py`` path, ``[python, -m, module]`` for a dotted module; and the file it needs."""
    if target.endswith(".py"):
        return [python, REPO / target], REPO / target
    return [python, "-m", target], REPO / (target.replace(".", "/") + ".py")


def entry_stages(entries, python, fills, env, work, log_dir, device="cuda"):
    """One training step of each present entry point on ``device``; the absent ones are "not present"."""
    stages = []
    for target, flags in entries:
        cmd, path = script_command(python, target)
        name = f"1 step: {target}"
        if not path.is_file():
            stages.append(Stage(name, "not present", note=f"{path.relative_to(REPO)} does not exist yet"))
            continue
        out = Path(work) / "runs" / target.replace("/", "_").replace(".", "_")
        out.mkdir(parents=True, exist_ok=True)
        argv = shlex.split(flags.format(out=out, **fills)) + ["--device", device]
        stages.append(run_stage(name, cmd + argv, env, out, log_dir))
    return stages


def make_inputs(work):
    """Synthetic Cityscapes/CamVid and random-weight checkpoints for the entry points; returns the placeholders."""
    import torch

    from common.datasets.synthetic import make_camvid, make_cityscapes
    from common.models import build_model, list_models

    work = Path(work)
    city, camvid = work / "cityscapes", work / "camvid"
    make_cityscapes(city, splits={"train": 2, "val": 1, "test": 1}, size=(512, 1024), seed=0)
    make_camvid(camvid, splits={"train": 2, "val": 1, "test": 1}, size=(360, 480), seed=0)
    torch.manual_seed(0)
    t101 = build_model("pspnet_resnet101").state_dict()
    torch.save(t101, work / "t101.pth")
    toolbox = {("head.0." + k[len("pspmodule."):]) if k.startswith("pspmodule.") else
               ("head.1." + k[len("head."):]) if k.startswith("head.") else k: v for k, v in t101.items()}
    torch.save({"state_dict": toolbox}, work / "t101_toolbox.pth")
    r18 = build_model("pspnet_resnet18").state_dict()
    torch.save({k: v for k, v in r18.items() if k.startswith(("conv", "bn", "layer"))}, work / "r18_imagenet.pth")
    torch.save(build_model("espnet_c", num_classes=11).state_dict(), work / "esp_teacher.pth")
    if "deeplabv3_resnet101" in list_models():
        torch.save(build_model("deeplabv3_resnet101").state_dict(), work / "cirkd_teacher.pth")
    if "deeplabv3plus_resnet101" in list_models():  # AICSD reads train.py's {'state_dict': ...} checkpoints
        torch.save({"state_dict": build_model("deeplabv3plus_resnet101").state_dict()}, work / "aicsd_teacher.pth")
    lists = city / "lists"
    return {"city": f"--data-dir {city} --data-list {lists / 'train.lst'} --data-listval {lists / 'val.lst'}",
            "cityscapes": str(city), "camvid": str(camvid), "t101": str(work / "t101.pth"),
            "t101_toolbox": str(work / "t101_toolbox.pth"), "r18_imagenet": str(work / "r18_imagenet.pth"),
            "esp_teacher": str(work / "esp_teacher.pth"), "cirkd_teacher": str(work / "cirkd_teacher.pth"),
            "aicsd_teacher": str(work / "aicsd_teacher.pth")}


def summary(stages, total_seconds):
    """The one summary table (and the verdict line)."""
    width = max(len(s.name) for s in stages)
    lines = [f"{'stage':<{width}}  {'status':<11}  {'seconds':>7}  note", "-" * (width + 40)]
    for s in stages:
        lines.append(f"{s.name:<{width}}  {s.status:<11}  {s.seconds:7.1f}  {s.note}")
    failed = [s.name for s in stages if s.failed]
    verdict = f"FAILED: {', '.join(failed)}" if failed else "all present stages passed"
    lines.append(f"gpu-check: {verdict} ({total_seconds:.0f} s)")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m common.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--keep", default=None, help="folder for the data, logs and runs (default: a temporary "
                                                     "folder, removed at the end)")
    args = parser.parse_args(argv)
    reason = no_gpu_reason()
    if reason is not None:
        print(f"gpu-check: nothing to check: {reason}.")
        return 0

    import torch

    start = time.perf_counter()
    major, minor = torch.cuda.get_device_capability(0)
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    env.setdefault("TORCH_CUDA_ARCH_LIST", f"{major}.{minor}")
    print(f"gpu-check: {torch.cuda.get_device_name(0)} (sm_{major}{minor}), torch {torch.__version__}, CUDA "
          f"{torch.version.cuda}, {sys.executable}; TORCH_CUDA_ARCH_LIST={env['TORCH_CUDA_ARCH_LIST']}", flush=True)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="segkd_gpu_check_"))
    log_dir = work / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    python = sys.executable
    stages = [run_stage("build InPlace-ABN", [python, "-m", "common.abn.build"], env, REPO, log_dir, show_output=True)]
    if not stages[0].failed:
        probe = ("from common.abn import _backend; m, why = _backend.load(); "
                 "raise SystemExit(0 if m is not None and m.with_cuda else f'no CUDA kernels: {why}')")
        stages.append(run_stage("extension has CUDA kernels", [python, "-c", probe], env, REPO, log_dir))
    stages.append(run_stage("CUDA tests", [python, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-k", "cuda",
                                           *CUDA_TEST_FILES], env, REPO, log_dir))
    stages.append(run_stage("ABN CUDA bench", [python, "-m", "bench.abn", "--device", "cuda", "--rounds",
                                               str(BENCH_ROUNDS)], env, REPO, log_dir, show_output=True))
    try:
        fills = make_inputs(work)
    except Exception as err:  # a broken data or model builder is a failed check, reported like the others
        stages.append(Stage("synthetic inputs", "FAIL", note=f"{type(err).__name__}: {err}"))
    else:
        stages += entry_stages(ENTRY_POINTS, python, fills, env, work, log_dir)
    failed = any(s.failed for s in stages)
    if failed or args.keep:
        print(f"\ngpu-check: data, logs and runs kept in {work}", flush=True)
    else:
        shutil.rmtree(work, ignore_errors=True)
    print("\n=== gpu-check summary ===")
    print(summary(stages, time.perf_counter() - start))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
