"""One device resolver for every command: ``extract``, ``train``, ``eval``, ``predict`` and the benchmarks.

A device is named ``auto``, ``cpu``, ``cuda`` or ``cuda:N``. A name that is none of these, CUDA asked for on a
machine without it, or a GPU index the machine does not have is a :class:`DeviceError` whose one line names the
value as the user gave it (``--device cuda`` on the command line, ``device=cuda`` as a training setting) and what
to use instead; the command line prints it and exits 1, before anything is loaded or written.

Here (not in ``train``) because extraction needs it too, and ``train`` may import ``extract``, not the reverse.
torch is imported when a device is resolved, not with this module: extraction workers import ``extract``.
"""

from __future__ import annotations

from extract.errors import DeviceError


def resolve_device(name: str, local_rank: int | None = None, option: str = "--device", auto: bool = True) -> str:
    """``name`` as the device to use: ``auto`` -> CUDA when available, else ``cpu``; ``cpu`` and ``cuda:N`` as
    given; ``cuda`` (and ``auto`` with CUDA) -> ``cuda``, or with ``local_rank`` this rank's GPU,
    ``cuda:{local_rank % device_count}`` (every GPU of the node visible to every rank, or one each).

    ``option`` is how the user gave the value, for the message: ``--device`` (a flag, ``--device cuda``) or
    ``device`` (a setting, ``device=cuda``). ``auto=False`` for a command that does not take ``auto``
    (extraction). Raises :class:`DeviceError` when the name is not a device or the machine lacks it."""
    name = str(name).strip()
    names = ("auto", "cpu", "cuda") if auto else ("cpu", "cuda")

    def spelt(value: str) -> str:
        return f"{option} {value}" if option.startswith("-") else f"{option}={value}"

    if name not in names and not (name.startswith("cuda:") and name[5:].isdigit()):
        shown = name if len(name) <= 40 else name[:40] + "..."
        raise DeviceError(f"{spelt(repr(shown))} is not a device: use {', '.join(names)} or cuda:N")
    if name == "cpu":
        return name
    import torch

    if not torch.cuda.is_available():
        if name == "auto":
            return "cpu"
        instead = f"{spelt('cpu')} or auto" if auto else spelt("cpu")
        raise DeviceError(f"{spelt(name)} was asked for but CUDA is not available; use {instead}")
    count = torch.cuda.device_count()
    if name.startswith("cuda:"):
        if int(name[5:]) >= count:
            raise DeviceError(f"{spelt(name)}: this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}")
        return name
    return "cuda" if local_rank is None else f"cuda:{local_rank % max(1, count)}"
