"""Process-wide settings: the training precision that "auto" measures on a bf16 CPU."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import TINY_MODEL
from tlkit import runtime
from tlkit.backbone import create_backbone
from tlkit.cache import cache_dir


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


@pytest.mark.parametrize("bf16_s, fp32_s, chosen", [(0.20, 0.10, "32-true"), (0.20, 0.18, "bf16-mixed"), (0.10, 0.20, "bf16-mixed")])
def test_auto_takes_fp32_only_when_it_is_clearly_faster_and_remembers(bf16_cpu, monkeypatch, bf16_s, fp32_s, chosen):
    calls = []

    def timed(module, input_size, batch, autocast, steps=2):
        calls.append(autocast)
        return bf16_s if autocast else fp32_s

    monkeypatch.setattr(runtime, "_step_seconds", timed)
    assert runtime.training_precision("auto", _module(), (3, 32, 32), 12, name="m") == chosen
    assert sorted(calls) == [False, True]
    assert runtime.training_precision("auto", _module(), (3, 32, 32), 12, name="m") == chosen and len(calls) == 2  # remembered
    saved = json.loads((cache_dir() / "machine.json").read_text())
    assert [v for k, v in saved.items() if k.startswith("train:m:3x32x32:12:")] == [chosen]
    runtime.training_precision("auto", _module(), (3, 48, 48), 12, name="m")
    assert len(calls) == 4  # another input size is measured again


def test_a_named_precision_is_never_measured(bf16_cpu, monkeypatch):
    monkeypatch.setattr(runtime, "_step_seconds", lambda *a, **k: pytest.fail("measured"))
    assert runtime.training_precision("32-true", _module(), (3, 32, 32), 8, name="m") == "32-true"
    assert runtime.training_precision("bf16-mixed", _module(), (3, 32, 32), 8, name="m") == "bf16-mixed"


def test_the_measurement_leaves_the_module_untouched(bf16_cpu):
    module = _module()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    seconds = runtime._step_seconds(module, (3, 32, 32), 4, autocast=True)
    assert seconds > 0 and all(torch.equal(before[k], v) for k, v in module.state_dict().items())
    assert all(p.grad is None for p in module.parameters())


def test_a_job_gets_its_share_of_the_cores_for_threads_and_loader_workers(monkeypatch):
    from tlkit.data import default_workers

    monkeypatch.setenv("TLKIT_CPUS", "16")
    assert runtime.cpu_share() == 16 and default_workers() == (min(8, 15) if torch.cuda.is_available() else 2)
    monkeypatch.setenv("TLKIT_CPUS", "3")
    assert runtime.cpu_share() == 3 and (torch.cuda.is_available() or default_workers() == 0)
    monkeypatch.setenv("TLKIT_CPUS", "none")  # not a count: the cores this process may run on
    assert runtime.cpu_share() >= 1
    threads = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", str(threads))
    try:
        runtime.use_cpus(1)
        assert torch.get_num_threads() == 1 and runtime.cpu_share() == 1
    finally:
        torch.set_num_threads(threads)


def test_hidden_progress_bars_stay_hidden_even_when_asked_for(monkeypatch):
    from tlkit.progress import PlainProgress

    def lines(trainer):
        return [c for c in trainer.callbacks if isinstance(c, PlainProgress)]

    monkeypatch.setitem(runtime._BARS, "on", True)
    monkeypatch.setenv("TLKIT_PROGRESS", "rich")
    assert runtime.build_trainer(devices=1, precision="32-true", progress=True, root_dir=None).progress_bar_callback is not None
    monkeypatch.setenv("TLKIT_PROGRESS", "plain")  # what output to a file gets by default
    plain = runtime.build_trainer(devices=1, precision="32-true", progress=True, root_dir=None)
    assert plain.progress_bar_callback is None and len(lines(plain)) == 1
    runtime.hide_progress_bars()
    for mode in ("rich", "plain"):
        monkeypatch.setenv("TLKIT_PROGRESS", mode)
        hidden = runtime.build_trainer(devices=1, precision="32-true", progress=True, root_dir=None)
        assert hidden.progress_bar_callback is None and not lines(hidden)
