"""Process-wide settings: the training precision "auto" picks on a bf16 CPU, cores and workers."""

from __future__ import annotations

import time

import pytest
import torch
from conftest import TINY_MODEL

from tlkit.core import runtime
from tlkit.core.cache import cache_dir
from tlkit.models.backbone import create_backbone


@pytest.fixture
def bf16_cpu(monkeypatch, tmp_path):
    """A CPU with native bf16 and no GPU, and an empty cache folder."""
    monkeypatch.setenv("TLKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(runtime, "cpu_supports_bf16", lambda: True)
    monkeypatch.setattr(runtime, "may_have_gpu", lambda accelerator="auto": False)


class _Classifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        backbone = create_backbone(TINY_MODEL, img_size=32)
        self.backbone, self.head = backbone.model, torch.nn.Linear(backbone.num_features, 3)

    def forward(self, images):
        return self.head(self.backbone(images))


def _module():
    return _Classifier()


def test_auto_is_decided_by_the_architecture_never_by_a_timing(bf16_cpu, monkeypatch):
    """The same answer on a busy machine as on an idle one: nothing is timed, so nothing depends on the load."""
    monkeypatch.setattr(time, "perf_counter", lambda: pytest.fail("timed"))
    assert runtime.training_precision("auto", _module()) == "bf16-mixed"  # plain convolutions: bf16
    mobile = create_backbone("test_efficientnet", img_size=32).model  # depthwise convolutions: fp32
    assert runtime.has_depthwise_convolutions(mobile)
    assert runtime.training_precision("auto", mobile) == "32-true"
    assert not (cache_dir() / "machine.json").exists() or "train:" not in (cache_dir() / "machine.json").read_text()


def test_a_named_precision_is_kept(bf16_cpu):
    assert runtime.training_precision("32-true", _module()) == "32-true"
    assert (
        runtime.training_precision("bf16-mixed", create_backbone("test_efficientnet", img_size=32).model)
        == "bf16-mixed"
    )


def test_a_job_gets_its_share_of_the_cores_for_threads_and_loader_workers(monkeypatch):
    from tlkit.data.loaders import default_workers

    monkeypatch.setenv("TLKIT_CPUS", "16")
    assert runtime.cpu_share() == 16
    assert default_workers() == (min(8, 15) if torch.cuda.is_available() else 2)
    monkeypatch.setenv("TLKIT_CPUS", "3")
    assert runtime.cpu_share() == 3
    assert torch.cuda.is_available() or default_workers() == 0
    monkeypatch.setenv("TLKIT_CPUS", "none")  # not a count: the cores this process may run on
    assert runtime.cpu_share() >= 1
    threads = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", str(threads))
    try:
        runtime.use_cpus(1)
        assert torch.get_num_threads() == 1
        assert runtime.cpu_share() == 1
    finally:
        torch.set_num_threads(threads)


def test_hidden_progress_bars_stay_hidden_even_when_asked_for(monkeypatch):
    from tlkit.core.progress import PlainProgress

    def lines(trainer):
        return [c for c in trainer.callbacks if isinstance(c, PlainProgress)]

    monkeypatch.setitem(runtime._BARS, "on", True)
    monkeypatch.setenv("TLKIT_PROGRESS", "rich")
    assert (
        runtime.build_trainer(devices=1, precision="32-true", progress=True, root_dir=None).progress_bar_callback
        is not None
    )
    monkeypatch.setenv("TLKIT_PROGRESS", "plain")  # what output to a file gets by default
    plain = runtime.build_trainer(devices=1, precision="32-true", progress=True, root_dir=None)
    assert plain.progress_bar_callback is None
    assert len(lines(plain)) == 1
    runtime.hide_progress_bars()
    for mode in ("rich", "plain"):
        monkeypatch.setenv("TLKIT_PROGRESS", mode)
        hidden = runtime.build_trainer(devices=1, precision="32-true", progress=True, root_dir=None)
        assert hidden.progress_bar_callback is None
        assert not lines(hidden)
