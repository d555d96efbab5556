"""Model handles: the MLIP protocol, its backends and one loader.

:func:`load` turns a name, a file or a network into an :class:`~skntk.models.base.MLIP` handle:

========================  =====================================  =====================
``name_or_model``         backend                                extra
========================  =====================================  =====================
``"sevennet-0"``          SevenNet-0 (``"7net-0"`` also works)   ``skntk[sevennet]``
``"chgnet-0.3.0"``        CHGNet 0.3.0 (``"chgnet"`` also)       ``skntk[chgnet]``
``"path/to/x.model"``     a MACE model file                      ``skntk[mace]``
a SevenNet checkpoint     e.g. written by ``SevenNetMLIP.save``  ``skntk[sevennet]``
a CHGNet state file       e.g. written by ``CHGNetMLIP.save``    ``skntk[chgnet]``
another existing file     a built-in model saved by ``save``
an :class:`MLIP`          returned as is
a ``torch.nn.Module``     the built-in model, wrapped
========================  =====================================  =====================

Nothing here downloads weights: SevenNet-0 and CHGNet 0.3.0 ship inside their wheels and MACE
reads the user's file. The kind of a file is found by reading the names in its pickle without
running it (:func:`_sniff`); SevenNet, CHGNet and MACE files are then read by their backend's own
loader, which unpickles them: only load files you trust.
"""

from __future__ import annotations

import os
import pickletools
import zipfile

import torch

# re-exported for callers of the old private names; the backends import them from _util
from skntk.models._util import require as _require  # noqa: F401
from skntk.models._util import resolve_device as _resolve_device
from skntk.models.base import MLIP, BackendBatch

__all__ = ["BackendBatch", "MLIP", "is_model_name", "load", "resolve_model"]

_SEVENNET_NAMES = {"sevennet-0": "7net-0", "7net-0": "7net-0", "sevennet": "7net-0"}
_CHGNET_NAMES = {"chgnet-0.3.0": "0.3.0", "chgnet": "0.3.0", "chgnet-0.2.0": "0.2.0"}


def load(name_or_model, *, device="auto", dtype=None) -> MLIP:
    """Load an MLIP handle from a name, a model file or a network.

    Parameters
    ----------
    name_or_model : str, os.PathLike, MLIP or torch.nn.Module
        ``"sevennet-0"`` / ``"7net-0"`` (SevenNet-0, 842k parameters, 89 elements),
        ``"chgnet-0.3.0"`` / ``"chgnet"`` (CHGNet 0.3.0, 412k parameters, 89 elements),
        a path to a MACE ``.model`` file, a SevenNet checkpoint, a CHGNet state file (the
        formats of :meth:`MLIP.save` for those backends; recognised by content), a built-in
        model file written by :meth:`~skntk.models.builtin.BuiltinMLIP.save`, an already
        built :class:`MLIP` handle (returned as is)
        or a network (``torch.nn.Module``: SevenNet, CHGNet, MACE or
        :class:`~skntk.models.builtin.BuiltinNet`), wrapped in place.
    device : str or torch.device, default="auto"
        ``"auto"`` picks the first CUDA device when there is one, else the CPU.
    dtype : torch.dtype or None, default=None
        Floating point type of the network and of its batches. ``None``: float32 for SevenNet
        and CHGNet (the only type they support), the file's dtype for MACE.

    Returns
    -------
    model : MLIP
        The handle; ``model.module`` is the network.

    Raises
    ------
    ImportError
        When the backend's optional extra is not installed (the message names it).
    ValueError
        When the name is unknown or the path does not exist.

    Examples
    --------
    >>> from skntk.models import load
    >>> load("no-such-model")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: Unknown model 'no-such-model': expected one of ...
    """
    if isinstance(name_or_model, MLIP):
        return name_or_model
    _resolve_device(device)  # the device is named before any file is read
    if isinstance(name_or_model, torch.nn.Module):
        return _wrap_module(name_or_model, device=device, dtype=dtype)
    if isinstance(name_or_model, (str, os.PathLike)):
        key = os.fspath(name_or_model)
        handle = _load_spec(key, device, dtype)
        # where it came from: parallel workers load it themselves (skntk.parallel)
        handle.source = os.path.abspath(key) if os.path.isfile(key) else key
        return handle
    raise TypeError(
        f"load() takes a model name, a path, an MLIP or a torch.nn.Module; "
        f"got {type(name_or_model).__name__}."
    )


def is_model_name(name: str) -> bool:
    """Whether ``name`` is a pretrained model :func:`load` knows by name (``"sevennet-0"``,
    ``"chgnet-0.3.0"``, ...), not a file.

    >>> is_model_name("SevenNet-0"), is_model_name("runs/model.pth")
    (True, False)
    """
    return name.lower() in _SEVENNET_NAMES or name.lower() in _CHGNET_NAMES


def _load_spec(key: str, device, dtype) -> MLIP:
    """The handle of a model name or file ``key`` (see :func:`load`)."""
    low = key.lower()
    if low in _SEVENNET_NAMES:
        from skntk.models.sevennet import SevenNetMLIP

        return SevenNetMLIP.from_pretrained(_SEVENNET_NAMES[low], device=device,
                                            dtype=dtype or torch.float32)
    if low in _CHGNET_NAMES:
        from skntk.models.chgnet import CHGNetMLIP

        return CHGNetMLIP.from_pretrained(_CHGNET_NAMES[low], device=device,
                                          dtype=dtype or torch.float32)
    if low.endswith(".model"):
        if not os.path.isfile(key):
            raise ValueError(f"MACE model file {key!r} does not exist.")
        from skntk.models.mace import MACEMLIP

        return MACEMLIP.from_file(key, device=device, dtype=dtype)
    if os.path.isfile(key):
        kind = _sniff(key)
        if kind is None:
            _check_torch_file(key)
        if kind == "sevennet":
            from skntk.models.sevennet import SevenNetMLIP

            return SevenNetMLIP.from_checkpoint(key, device=device,
                                                dtype=dtype or torch.float32)
        if kind == "chgnet":
            from skntk.models.chgnet import CHGNetMLIP

            return CHGNetMLIP.from_file(key, device=device, dtype=dtype or torch.float32)
        if kind == "mace":
            from skntk.models.mace import MACEMLIP

            return MACEMLIP.from_file(key, device=device, dtype=dtype)
        from skntk.models.builtin import BuiltinMLIP

        return BuiltinMLIP.load(key, device=_resolve_device(device))
    known = sorted(set(_SEVENNET_NAMES) | set(_CHGNET_NAMES))
    if os.path.splitext(key)[1] or os.sep in key or os.path.exists(key):
        if os.path.isdir(key):
            raise IsADirectoryError(f"model {key!r} is a directory, not a model file.")
        raise FileNotFoundError(f"no model file at {key!r} (and it is not a model name: "
                                f"{known}).")
    raise ValueError(
        f"Unknown model {key!r}: expected one of {known}, a path to a model file (MACE "
        ".model, SevenNet checkpoint, CHGNet state file, built-in), an MLIP handle or a "
        "torch.nn.Module."
    )


def _check_torch_file(path) -> None:
    """Refuse a file that is neither a zip-format torch file nor a pickle (e.g. a text file)."""
    with open(path, "rb") as fh:
        head = fh.read(16)
    if not (head.startswith(b"PK\x03\x04") or head.startswith(b"\x80")):
        raise ValueError(f"model {path!r} is not a model file: it is neither a torch zip archive "
                         f"nor a pickle (it starts with {head[:12]!r}).")


def _sniff(path) -> str | None:
    """Kind of a ``torch.save`` file from the names in its pickle, without unpickling it.

    Returns ``"builtin"`` (``{"format": "skntk.builtin/1", ...}``), ``"sevennet"`` (a dict
    with ``config`` and ``model_state_dict``), ``"chgnet"`` (``{"model": {"state_dict",
    "model_args"}}``), ``"mace"`` (a pickled module of ``mace.modules``) or ``None``
    (not a zip-format torch file, or none of these).
    """
    try:
        with zipfile.ZipFile(path) as zf:
            pkl = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
            if not pkl:
                return None
            raw = zf.read(pkl[0])
    except (zipfile.BadZipFile, OSError):
        return None
    strings, modules = set(), set()
    try:
        for op, arg, _ in pickletools.genops(raw):
            if isinstance(arg, str):
                if op.name in ("GLOBAL", "INST"):
                    modules.add(arg.split(" ")[0])
                else:
                    strings.add(arg)
    except Exception:  # noqa: BLE001 - a damaged pickle is "unknown", the loader will say why
        return None
    if "skntk.builtin/1" in strings:
        return "builtin"
    if any(m.startswith("mace.modules") for m in modules | strings):  # GLOBAL / STACK_GLOBAL
        return "mace"
    if {"config", "model_state_dict"} <= strings:
        return "sevennet"
    if {"model", "model_args", "state_dict"} <= strings:
        return "chgnet"
    return None


def _wrap_module(module: torch.nn.Module, *, device, dtype) -> MLIP:
    """Wrap a bare network: a SevenNet AtomGraphSequential, a CHGNet, a MACE or the built-in one."""
    cls = type(module)
    mod = cls.__module__
    if mod.startswith("sevenn."):
        from skntk.models.sevennet import SevenNetMLIP

        return SevenNetMLIP(module, device=device, dtype=dtype or torch.float32)
    if mod.startswith("chgnet."):
        from skntk.models.chgnet import CHGNetMLIP

        return CHGNetMLIP(module, device=device, dtype=dtype or torch.float32)
    if mod.startswith("mace."):
        from skntk.models.mace import MACEMLIP

        return MACEMLIP(module, device=device, dtype=dtype)
    try:
        from skntk.models.builtin import BuiltinMLIP, BuiltinNet
    except ImportError:  # pragma: no cover - the built-in model is part of skntk
        BuiltinNet = None
    if BuiltinNet is not None and isinstance(module, BuiltinNet):
        handle = BuiltinMLIP(module=module)
        handle._adopt(module, device=_resolve_device(device), eval=False)  # restore_module undoes
        return handle
    raise TypeError(
        f"Do not know how to wrap a {cls.__module__}.{cls.__name__}: pass an MLIP handle, "
        "a SevenNet, CHGNet or MACE network, or the built-in model (BuiltinNet)."
    )


def resolve_model(model, owner: str) -> MLIP:
    """The MLIP handle behind the ``model`` parameter.

    A handle passes through; a string or path goes through :func:`skntk.models.load` (a name
    such as ``"sevennet-0"``, a MACE ``.model`` file or a :meth:`BuiltinMLIP.save` file, loaded
    in each ``fit``); a raw ``torch.nn.Module`` is refused (it has no collate/energy protocol,
    and scikit-learn's ``clone`` would deep-copy it).
    """
    if isinstance(model, MLIP):
        return model
    if model is None:
        raise ValueError(f"{owner} needs a model: an MLIP handle (e.g. BuiltinMLIP) or the path of "
                         f"a saved built-in model; got None.")
    if isinstance(model, (str, os.PathLike)):
        try:  # "sevennet-0", "chgnet-0.3.0", a MACE .model file or a BuiltinMLIP.save file
            return load(model, device="cpu")
        except (ValueError, FileNotFoundError) as err:
            raise ValueError(f"The 'model' parameter of {owner} is the string {str(model)!r}, "
                             f"which is neither a known model name nor a saved model file: "
                             f"{err}") from err
    if isinstance(model, torch.nn.Module):
        raise TypeError(
            f"The 'model' parameter of {owner} is a raw {type(model).__name__} (torch.nn.Module); "
            f"wrap it in an MLIP handle (skntk.models.base.MLIP subclass, e.g. "
            f"BuiltinMLIP(module=net)) so features know how to batch structures and so clone() "
            f"does not deep-copy the network."
        )
    raise TypeError(f"The 'model' parameter of {owner} must be an MLIP handle or a path; got "
                    f"{type(model).__name__}.")
