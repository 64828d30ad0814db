"""The one device resolver of the package: what `--device` and the `device` arguments mean."""

from __future__ import annotations

import torch


def resolve_device(name: str | torch.device | None, what: str = "device") -> torch.device:
    """`auto`/None → cuda when available, else cpu; `cpu`, `cuda` and `cuda:N` as torch spells
    them. Raises ValueError for any other name and for cuda on a machine without a usable GPU
    (never a silent CPU run); `what` names the setting in the message (`--device`)."""
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"{what} {name}: not a device ({err})") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{what} {name}: the pipeline runs on cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{what} {name}: CUDA is not available on this machine (use cpu or auto)")
    return device
