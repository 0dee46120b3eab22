"""Training-step time in bf16 autocast and in fp32 on this CPU, per architecture: the measurements behind the
rule `runtime.training_precision` uses for --precision auto (depthwise convolutions: fp32; others: bf16).

    .venv/bin/python bench/precision.py

Prints, per model and input size, the best of 4 steps each way (first step untimed) and fp32/bf16 (below 1:
fp32 is faster), and what the rule picks. Random weights and images: the time of a step does not depend on them.
"""

import timm
import torch

from tlkit.core import runtime

CASES = [
    ("resnet18", 32, 8),
    ("resnet18", 64, 16),
    ("resnet18", 224, 16),
    ("resnet50", 224, 16),
    ("efficientnet_lite0", 64, 8),
    ("efficientnet_lite0", 224, 16),
    ("mobilenetv3_large_100", 224, 16),
    ("convnext_atto", 96, 16),
    ("convnext_atto", 224, 16),
]


def step_seconds(model: torch.nn.Module, size: int, batch: int, autocast: bool) -> float:
    import time

    images = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    labels = torch.arange(batch) % 2
    times = []
    for i in range(5):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = torch.nn.functional.cross_entropy(model(images).float(), labels)
        loss.backward()
        model.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    print(f"native bf16 on this CPU: {runtime.cpu_supports_bf16()}; torch threads {torch.get_num_threads()}")
    for name, size, batch in CASES:
        model = timm.create_model(name, pretrained=False, num_classes=2).train()
        bf16, fp32 = step_seconds(model, size, batch, True), step_seconds(model, size, batch, False)
        rule = "fp32" if runtime.has_depthwise_convolutions(model) else "bf16"
        print(
            f"{name:24s} {size:4d} px  batch {batch:3d}  bf16 {bf16 * 1000:7.0f} ms  fp32 {fp32 * 1000:7.0f} ms  "
            f"fp32/bf16 {fp32 / bf16:5.2f}  auto: {rule}",
            flush=True,
        )


if __name__ == "__main__":
    main()
