"""Throughput and compression of the tensor codecs on a ResNet-18 state dict.

    python bench/codec.py [--json] [--repeats 5] [--threads 1]

The state dict is ``torchvision.models.resnet18(num_classes=10)`` at random init (no
download). Dense codecs encode the state itself; top-k codecs encode an update, the state
minus a copy perturbed by 1% of each tensor's spread, as a silo would send. Throughput is in
MB/s of fp32 input (floating tensors counted at 4 bytes per element, others at their own
width), median over repeats of encoding / decoding the whole state dict in this process.
``ratio`` is encoded bytes over fp32 bytes; ``rel_error`` is ||decoded - input|| / ||input||
over the floating tensors. ``--threads`` sets torch's intra-op threads (1 by default, as the
project runs each process on one thread); the int8 and top-k paths compute in numpy and do not
depend on it, the fp16/bf16 casts do.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time

import torch
import torchvision

from lssfl.common.codecs import decode_state, encode_state, layout_of, parse_codec

CODECS = (
    "fp32",
    "fp16",
    "bf16",
    "int8",
    "int8+zstd",
    "topk0.01+int8",
    "topk0.01+int8+zstd",
)


def _state_and_update() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    state = {
        k: v.detach().clone()
        for k, v in torchvision.models.resnet18(num_classes=10).state_dict().items()
    }
    update = {}
    for name, t in state.items():
        if t.is_floating_point():
            spread = float(t.std()) if t.numel() > 1 else 1.0
            perturbed = t + 0.01 * spread * torch.randn_like(t)
            update[name] = t - perturbed
        else:
            update[name] = t - t
    return state, update


def _fp32_bytes(state: dict[str, torch.Tensor]) -> int:
    return sum(
        t.numel() * (4 if t.is_floating_point() else t.element_size()) for t in state.values()
    )


def _rel_error(ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> float:
    num = sum(
        float((got[k].double() - t.double()).square().sum())
        for k, t in ref.items()
        if t.is_floating_point()
    )
    den = sum(float(t.double().square().sum()) for t in ref.values() if t.is_floating_point())
    return math.sqrt(num / den)


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: first-call allocations and thread-local contexts
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(repeats: int) -> dict:
    state, update = _state_and_update()
    fp32 = _fp32_bytes(state)
    results = {}
    for name in CODECS:
        spec = parse_codec(name)
        source = update if spec.topk is not None else state
        layout = layout_of(source)
        payloads = encode_state(source, spec)
        decoded = decode_state(payloads, spec, layout)
        enc_s = _median_seconds(lambda s=source, c=spec: encode_state(s, c), repeats)
        dec_s = _median_seconds(
            lambda p=payloads, c=spec, lay=layout: decode_state(p, c, lay), repeats
        )
        size = sum(len(p) for p in payloads.values())
        results[name] = {
            "encode_MBps": round(fp32 / enc_s / 1e6, 1),
            "decode_MBps": round(fp32 / dec_s / 1e6, 1),
            "encode_ms": round(enc_s * 1e3, 2),
            "decode_ms": round(dec_s * 1e3, 2),
            "encoded_bytes": size,
            "ratio": round(size / fp32, 4),
            "rel_error": float(f"{_rel_error(source, decoded):.3g}"),
        }
    return {
        "model": "resnet18(num_classes=10)",
        "tensors": len(state),
        "fp32_bytes": fp32,
        "torch_threads": torch.get_num_threads(),
        "repeats": repeats,
        "machine": platform.processor() or platform.machine(),
        "codecs": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print JSON only")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report = run(args.repeats)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(
        f"{report['model']}: {report['fp32_bytes'] / 1e6:.1f} MB fp32, "
        f"{report['torch_threads']} thread(s), median of {report['repeats']}"
    )
    for name, r in report["codecs"].items():
        print(
            f"{name:20s} enc {r['encode_MBps']:8.1f} MB/s  dec {r['decode_MBps']:8.1f} MB/s  "
            f"ratio {r['ratio']:.4f}  rel_error {r['rel_error']:.3g}"
        )


if __name__ == "__main__":
    main()
