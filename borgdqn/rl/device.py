"""Where the learner runs, and whether it runs in mixed precision.

``device: auto`` picks CUDA when torch sees a GPU, else the CPU. ``mixed_precision: auto`` means bf16 autocast on
a GPU that supports bf16 and full fp32 on the CPU (on most CPUs without AMX/AVX512-BF16 bf16 is emulated and
slower than fp32). bf16 keeps fp32's exponent range, so, unlike fp16, it needs no loss scaling. ``on`` forces
bf16 and fails with a one-line message where bf16 autocast cannot run.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

logger = logging.getLogger(__name__)

MixedPrecision = Literal["auto", "on", "off"]


class DeviceError(ValueError):
    """The configured device or precision cannot work here; the message is one line that says what to do."""


def select_device(name: str = "auto") -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` -> a torch.device that exists on this machine."""
    name = name.strip().lower()
    if name == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise DeviceError(f"learner.device={name!r} is not a device; use auto, cpu, cuda or cuda:N") from err
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise DeviceError(f"learner.device={name!r} is not supported; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise DeviceError(f"learner.device={name!r} but torch sees no CUDA GPU; set learner.device=cpu or auto")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise DeviceError(f"learner.device={name!r} but only {torch.cuda.device_count()} CUDA device(s) exist here")
    return device


def _cpu_bf16_works() -> str | None:
    """None when a conv/linear/LSTM forward+backward runs under CPU bf16 autocast, else the error text."""
    try:
        net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 4))
        lstm = nn.LSTM(4, 4, batch_first=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = net(torch.rand(2, 1, 4, 4))
            out, _ = lstm(y.unsqueeze(1))
        out.float().sum().backward()
    except (RuntimeError, TypeError, NotImplementedError) as err:
        return str(err).splitlines()[0] if str(err) else type(err).__name__
    return None


def resolve_amp_dtype(mode: MixedPrecision, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``mode`` on ``device``, or None for full fp32."""
    if mode == "off":
        return None
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if mode == "on":
            raise DeviceError(
                f"learner.mixed_precision=on but {torch.cuda.get_device_name(device)} lacks bf16; "
                "set learner.mixed_precision=off"
            )
        return None
    if mode == "auto":
        return None
    problem = _cpu_bf16_works()
    if problem is not None:
        raise DeviceError(
            f"learner.mixed_precision=on but bf16 autocast fails on this CPU ({problem}); "
            "set learner.mixed_precision=off"
        )
    return torch.bfloat16


def autocast(
    device: torch.device, dtype: torch.dtype | None, *, cache_enabled: bool = True
) -> contextlib.AbstractContextManager[object]:
    """An autocast context for ``dtype`` on ``device``; a no-op when ``dtype`` is None.

    ``cache_enabled=False`` is needed inside CUDA graph capture: the weight-cast cache would otherwise hand the
    graph tensors that are freed when the context exits.
    """
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype, cache_enabled=cache_enabled)


def configure_backend(device: torch.device) -> None:
    """Process-wide speed settings for a learner process (each agent is its own process)."""
    if device.type == "cuda":
        # Fixed batch shapes: let cuDNN benchmark its algorithms once; TF32 matmuls for the fp32 parts.
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


@dataclass(frozen=True)
class DevicePlan:
    device: torch.device
    amp_dtype: torch.dtype | None

    def describe(self) -> str:
        precision = "fp32" if self.amp_dtype is None else str(self.amp_dtype).removeprefix("torch.")
        where = str(self.device)
        if self.device.type == "cuda":
            where += f" ({torch.cuda.get_device_name(self.device)})"
        return f"device={where} precision={precision}"


def plan_device(name: str = "auto", mixed_precision: MixedPrecision = "auto") -> DevicePlan:
    """Resolve ``learner.device`` and ``learner.mixed_precision``; raises DeviceError with a one-line reason."""
    device = select_device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return DevicePlan(device, resolve_amp_dtype(mixed_precision, device))
