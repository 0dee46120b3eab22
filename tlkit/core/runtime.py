"""Process-wide speed and quiet settings -> applied once, before any heavy work."""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import warnings
from contextlib import contextmanager
from functools import cache

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_ONE_GIB = 1 << 30


def autocast(device_type: str, precision: str):
    """torch.autocast for a Lightning precision string: bf16 for "bf16-*", fp16 for "16-*", off otherwise."""
    import torch

    dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float16
    return torch.autocast(device_type, dtype=dtype, enabled=precision.startswith(("bf16", "16")))


@cache
def tune_allocator() -> bool:
    """Keep freed image/tensor buffers in glibc's heap instead of returning them to the OS.

    Each batch allocates and frees large buffers; with glibc's defaults every one is an
    mmap/munmap pair plus page faults. Raising both thresholds to 1 GiB was measured at
    1.3-2.7x faster at 224 px on the reference CPU (RSS then stays at its peak).
    Set TLKIT_NO_MALLOPT=1 to keep glibc's defaults.
    """
    if os.environ.get("TLKIT_NO_MALLOPT") or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # musl or another libc: nothing to tune
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, _ONE_GIB) and libc.mallopt(_M_TRIM_THRESHOLD, _ONE_GIB))


def _cpu_key() -> str | None:
    """torch's version and this CPU's instruction-set flags: what oneDNN's bf16 answer depends on."""
    import hashlib

    from tlkit.core.cache import package_version

    try:
        with open("/proc/cpuinfo") as handle:
            flags = next((line for line in handle if line.startswith(("flags", "Features"))), "")
    except OSError:
        return None
    return f"bf16:{package_version('torch')}:{hashlib.sha256(flags.encode()).hexdigest()[:16]}" if flags else None


@cache
def cpu_supports_bf16() -> bool:
    """True where oneDNN runs bf16 natively (AVX512-BF16 or AMX): autocast is then a speed-up.

    The answer is remembered per CPU (its flags) and torch version in the cache folder, so a command
    that finds its features cached need not import torch (1.5-2 s) to name the precision in their key.
    """
    from tlkit.core.cache import cache_dir, read_json, write_json

    key, path = _cpu_key(), cache_dir() / "machine.json"
    known = read_json(path) or {}
    if key is not None and isinstance(known.get(key), bool):
        return known[key]
    import torch

    try:
        supported = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        supported = False
    if key is not None:
        try:
            write_json(path, {**known, key: supported})
        except OSError:
            pass
    return supported


def may_have_gpu(accelerator: str = "auto") -> bool:
    """False only where no GPU can be visible: not asked for, or (Linux) no NVIDIA / AMD device nodes.
    Told without importing torch; True means "ask torch"."""
    if accelerator not in ("auto", "gpu", "cuda"):
        return False
    if not sys.platform.startswith("linux"):
        return True
    return any(os.path.exists(node) for node in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd"))


def resolve_precision(precision: str, accelerator: str = "auto") -> str:
    """Turn "auto" into a Lightning precision string for the device that will run.

    GPU: bf16-mixed where supported, else 16-mixed. CPU: bf16-mixed where the CPU has native bf16
    (measured 2x faster for resnet18 training here), else 32-true.
    """
    if precision != "auto":
        return precision
    if not may_have_gpu(accelerator):
        return "bf16-mixed" if cpu_supports_bf16() else "32-true"
    import torch

    use_cuda = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    if use_cuda:
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "bf16-mixed" if cpu_supports_bf16() else "32-true"


def training_precision(precision: str, module) -> str:
    """The precision to train `module` with. "auto" is decided by the hardware and the architecture, never by a
    timing: a setting that changes the weights a run reaches must not depend on how busy the machine is (on a near
    tie such as EfficientNet-Lite0 at 224 px, a timing picks bf16 on a busy machine and fp32 on an idle one).

    On a CPU with native bf16 (oneDNN), bf16 autocast halves the step of ordinary convolutions but oneDNN's bf16
    backward of depthwise convolutions is slow, so networks with depthwise convolutions train in fp32 and the
    others in bf16. Training steps measured on this project's 2-core CPU, idle (bench/precision.py, 2026-11-29;
    fp32 time over bf16 time, below 1 when fp32 is faster): EfficientNet-Lite0 0.60 at 64 px and 0.95 at 224 px,
    MobileNetV3 0.73 and ConvNeXt-atto 0.96 at 96 px; resnet18 1.30 at 32 and 64 px and 1.78 at 224 px, resnet50
    1.95. The rule picks the faster precision, or one of a near tie, in each case but ConvNeXt-atto at 224 px
    (1.33: bf16 would be faster there); --precision overrides it. The same bench run while the tests used the
    cores gave other ratios (MobileNetV3 2.27, resnet18 0.91 at 32 px): why nothing is timed at run time.
    """
    resolved = resolve_precision(precision)
    if precision != "auto" or resolved != "bf16-mixed" or (may_have_gpu() and _cuda_available()):
        return resolved
    return "32-true" if has_depthwise_convolutions(module) else "bf16-mixed"


def has_depthwise_convolutions(module) -> bool:
    import torch

    return any(isinstance(m, torch.nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels for m in module.modules())


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


# Loggers whose INFO lines are Lightning's and MLflow's chatter ("GPU available: False", the litlogger
# tip, "Using bfloat16 Automatic Mixed Precision", "`Trainer.fit` stopped"), not news about the user's run.
_CHATTY_LOGGERS = (
    "lightning",
    "lightning.pytorch",
    "lightning.fabric",
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
    "lightning.pytorch.accelerators.cuda",
    "lightning.pytorch.trainer.connectors.checkpoint_connector",
)
# Warnings that say nothing about the user's data or model.
_NOISE = (
    ".*does not have many workers.*",  # tlkit chooses workers per machine on purpose (data.default_workers)
    ".*number of training batches.*",  # small datasets have few batches
    ".*LeafSpec.*",  # Lightning's own use of a deprecated torch API
    ".*module\\(s\\) in eval mode.*",  # frozen BatchNorm, on purpose
    ".*Checkpoint directory .* exists and is not empty.*",  # --resume
    ".*The dirpath has changed "
    "from.*",  # a retried point continues from a lost run's checkpoint (tlkit.pipelines.cluster)
    ".*have no `val_dataloader`.*",  # use_val 'train' has no val loader, on purpose
    ".*You defined a `validation_step` but have no `val_dataloader`.*",
)


# MLflow's start-up lines ("Creating initial MLflow database tables...", alembic's migrations) and its INFO chatter.
# MLflow sets its top logger to INFO when it is imported; these named ones keep the level given here.
_STORE_LOGGERS = ("mlflow.store.tracking.sqlalchemy_store", "alembic", "alembic.runtime.migration")
# MLflow logs a database error's whole traceback at ERROR, then raises it: the CLI says it in one line.
_STORE_ERROR_LOGGER = "mlflow.store.db.utils"
# Per-download progress bars, and "View run ... at URL" per run on a server: tlkit prints its own lines.
_MLFLOW_OUTPUT = {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}


def quiet_loggers() -> None:
    for name in _CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    for name in _STORE_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


@contextmanager
def quiet_lightning():
    """Around a Lightning fit or predict: its chatter is silenced, for library callers as for the CLI."""
    quiet_loggers()
    with warnings.catch_warnings():
        for message in _NOISE:
            warnings.filterwarnings("ignore", message=message)
        yield


def quiet() -> None:
    """The CLI's processes (commands, a pipeline's jobs, Ray tasks): no start-up chatter or library output that
    buries tlkit's own lines. Called by entry points only; importing tlkit configures nothing."""
    quiet_loggers()
    logging.getLogger(_STORE_ERROR_LOGGER).setLevel(logging.CRITICAL)
    for key, value in _MLFLOW_OUTPUT.items():
        os.environ.setdefault(key, value)
    for message in _NOISE:
        warnings.filterwarnings("ignore", message=message)
    warnings.filterwarnings("ignore", category=FutureWarning)


def device_count(devices: int | str | list) -> int:
    """How many processes Lightning will start for `devices` with accelerator="auto"."""
    import torch

    if isinstance(devices, (list, tuple)):
        return len(devices)
    if devices in ("auto", -1, "-1"):
        return torch.cuda.device_count() if torch.cuda.is_available() else 1
    return int(devices)


def spawn_safe(devices) -> None:
    """Before spawning several processes: share tensors through files, not file descriptors.

    With torch's default fd-based sharing, spawning the DDP processes here failed with
    "bad value(s) in fds_to_keep"; the file-system strategy works on every Linux set-up.
    """
    if device_count(devices) > 1:
        import torch.multiprocessing

        torch.multiprocessing.set_sharing_strategy("file_system")


_BARS = {"on": True}
PROGRESS_MODES = ("rich", "plain", "off")


def progress_mode() -> str:
    """How long commands show progress: TLKIT_PROGRESS=rich|plain|off. By default rich bars on a terminal, and
    plain lines (one per epoch, flushed, no control characters) when the output goes to a file, a pipe or CI."""
    mode = os.environ.get("TLKIT_PROGRESS", "").strip().lower()
    if mode in PROGRESS_MODES:
        return mode
    if mode:
        from tlkit.errors import TlkitError

        raise TlkitError(f"TLKIT_PROGRESS={mode!r} is not one of {', '.join(PROGRESS_MODES)}; unset it or choose one")
    return "rich" if sys.stdout.isatty() else "plain"


def hide_progress_bars() -> None:
    """No live progress bars in this process: it shares the terminal with others (a job of
    `tlkit run --jobs`), whose bars would overwrite each other; it prints whole lines instead."""
    _BARS["on"] = False


def progress_bars_on() -> bool:
    """False in a process whose bars `hide_progress_bars` turned off (a pipeline's job)."""
    return _BARS["on"]


def cpu_share() -> int:
    """CPU cores this process may use: $TLKIT_CPUS when set (each job of `tlkit run --jobs N` gets its
    share), else the cores it may run on."""
    value = os.environ.get("TLKIT_CPUS", "")
    if value.isdigit() and int(value) > 0:
        return int(value)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def use_cpus(n: int) -> None:
    """Compute on `n` cores: torch's threads, and DataLoader workers through $TLKIT_CPUS (a job of
    `tlkit run --jobs` gets its share of the machine; small models scale poorly across many threads,
    so several jobs on a few cores each get more done than one job on all of them)."""
    os.environ["TLKIT_CPUS"] = os.environ["OMP_NUM_THREADS"] = str(n)
    import torch

    torch.set_num_threads(n)


def build_trainer(*, devices, precision: str, progress: bool, root_dir, **kwargs):
    """A Lightning Trainer with tlkit's device policy.

    accelerator="auto" (the GPU when there is one); several devices run as spawned DDP processes,
    so only this process touches MLflow and the caches; no Lightning logger (MLflow is logged by
    tlkit's own callback) and no model summary.
    """
    import lightning as L

    spawn_safe(devices)
    quiet_loggers()  # the banners come while the Trainer is built
    mode = progress_mode() if progress and progress_bars_on() else "off"
    if mode == "plain":
        from tlkit.core.progress import PlainProgress

        kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), PlainProgress()]
    return L.Trainer(
        accelerator="auto",
        devices=devices,
        strategy="ddp_spawn" if device_count(devices) > 1 else "auto",
        precision=precision,  # type: ignore[arg-type]  # a Lightning precision string, checked by ComputeConfig
        logger=False,
        enable_model_summary=False,
        enable_progress_bar=mode == "rich",
        default_root_dir=root_dir,
        **kwargs,
    )
