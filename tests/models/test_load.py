"""skntk.models.load: names, files, networks, handles, and the errors for everything else."""

import importlib.util
import sys

import pytest
import torch

from skntk.models import _resolve_device, load
from skntk.models.base import MLIP
from tests.builders import tiny_builtin

has = {name: importlib.util.find_spec(name) is not None for name in ("sevenn", "chgnet", "mace")}


def test_unknown_name_lists_known_ones():
    with pytest.raises(ValueError, match=r"Unknown model 'gpt-7'.*'chgnet-0.3.0'.*'sevennet-0'"):
        load("gpt-7")


@pytest.mark.parametrize("bad", [3, 2.5, None, ["sevennet-0"]])
def test_wrong_type_is_named(bad):
    with pytest.raises(TypeError, match=f"got {type(bad).__name__}"):
        load(bad)


def test_handle_is_returned_as_is():
    handle = tiny_builtin((1, 8))
    assert load(handle) is handle


def test_builtin_network_is_wrapped_without_copy():
    from skntk.models.builtin import BuiltinMLIP, BuiltinNet

    net = tiny_builtin((1, 8)).module
    assert isinstance(net, BuiltinNet)
    handle = load(net, device="cpu")
    assert isinstance(handle, BuiltinMLIP) and handle.module is net


def test_builtin_file_is_loaded(tmp_path):
    from skntk.models.builtin import BuiltinMLIP

    path = tiny_builtin((1, 8), random_state=3).save(tmp_path / "m.pt")
    handle = load(str(path), device="cpu")
    assert isinstance(handle, BuiltinMLIP)
    ref = tiny_builtin((1, 8), random_state=3)
    pairs = zip(handle.module.named_parameters(), ref.module.named_parameters(), strict=True)
    for (n, a), (_, b) in pairs:
        assert torch.equal(a, b), n


def test_other_network_refused():
    with pytest.raises(TypeError, match=r"Do not know how to wrap a torch.nn.modules.linear"):
        load(torch.nn.Linear(2, 1))


def test_missing_mace_file_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"MACE model file '.*missing.model' does not exist"):
        load(str(tmp_path / "missing.model"))


@pytest.mark.parametrize("name, module, extra", [
    ("sevennet-0", "sevenn", "sevennet"),
    ("7net-0", "sevenn", "sevennet"),
    ("chgnet-0.3.0", "chgnet", "chgnet"),
])
def test_missing_extra_says_what_to_install(monkeypatch, name, module, extra):
    # make the import fail as it does when the extra is not installed
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ImportError, match=rf"pip install skntk\[{extra}\]"):
        load(name, device="cpu")


def test_missing_mace_extra(monkeypatch, tmp_path):
    path = tmp_path / "user.model"
    path.write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "mace", None)
    with pytest.raises(ImportError, match=r"pip install skntk\[mace\]"):
        load(str(path))


def test_auto_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert _resolve_device("auto") == torch.device("cuda")
    assert _resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(not has["sevenn"], reason="needs the sevennet extra: skntk[sevennet]")
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_sevennet_aliases_and_module():
    from skntk.models.sevennet import SevenNetMLIP

    handle = load("7NET-0", device="cpu")
    assert isinstance(handle, SevenNetMLIP) and handle.name == "sevennet-0"
    assert isinstance(handle, MLIP) and len(handle.species) == 89
    wrapped = load(handle.module, device="cpu")
    assert isinstance(wrapped, SevenNetMLIP) and wrapped.module is handle.module


@pytest.mark.skipif(not has["chgnet"], reason="needs the chgnet extra: pip install skntk[chgnet]")
def test_chgnet_alias_and_module():
    from skntk.models.chgnet import CHGNetMLIP

    handle = load("chgnet", device="cpu")
    assert isinstance(handle, CHGNetMLIP) and handle.name == "chgnet-0.3.0"
    wrapped = load(handle.module, device="cpu")
    assert isinstance(wrapped, CHGNetMLIP) and wrapped.module is handle.module
