"""pygan_optim imports only with the torch its compiled module was built
against (pygan_optim/_ext.py): the module reads torch's C++ objects as that
version lays them out. Another torch is refused before the module is loaded
(its static initialisers would register the ops with torch already), naming
both versions and how to rebuild. Each case imports in a fresh interpreter."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pygan_optim import _ext

MARKER = b"PYGAN_OPTIM_BUILT_WITH_TORCH="


def _import(code_before: str = "", extension: str | None = None):
    env = dict(os.environ)
    env.pop("PYGAN_OPTIM_EXTENSION", None)
    if extension is not None:
        env["PYGAN_OPTIM_EXTENSION"] = extension
    code = ("import sys, torch\n" + code_before +
            "try:\n"
            "    import pygan_optim\n"
            "except ImportError as error:\n"
            "    print('REFUSED:', error)\n"
            "    print('LOADED:', 'pygan_optim._C' in sys.modules)\n"
            "    try:\n"
            "        torch.ops.pygan_optim.adam_step_\n"
            "        print('OPS: True')\n"
            "    except (AttributeError, RuntimeError):\n"
            "        print('OPS: False')\n"
            "else:\n"
            "    print('IMPORTED', pygan_optim._ext._C.built_with_torch)\n")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _module_with_version(tmp_path, version: bytes) -> str:
    """A copy of the module whose written torch version reads `version`."""
    path = _ext._C.__file__
    data = open(path, "rb").read()
    at = data.index(MARKER) + len(MARKER)
    built = _ext._C.built_with_torch.encode()
    assert data[at:at + len(built) + 1] == built + b";"
    assert len(version) == len(built)  # same length: the file stays a valid module
    copy = tmp_path / os.path.basename(path)
    copy.write_bytes(data[:at] + version + data[at + len(version):])
    return str(copy)


def test_the_module_says_which_torch_built_it():
    import torch
    assert _ext._C.built_with_torch == _ext._torch_release(torch.__version__)
    assert open(_ext._C.__file__, "rb").read().count(MARKER) == 1


@pytest.mark.parametrize("version, release", [
    ("2.13.0+cpu", "2.13.0"), ("2.13.0a0+git1234abc", "2.13.0"), ("2.14.1", "2.14.1"),
    ("2.10.0.dev20260101+cu130", "2.10.0")])
def test_release_of_a_torch_version(version, release):
    assert _ext._torch_release(version) == release


def test_another_torch_is_refused_before_the_module_loads():
    out = _import("torch.__version__ = '2.12.1+cpu'\n")
    assert "REFUSED:" in out, out
    assert f"built against torch {_ext._C.built_with_torch}" in out
    assert "runs torch 2.12.1+cpu" in out and "make build" in out
    assert "LOADED: False" in out and "OPS: False" in out, out


def test_a_source_build_of_the_same_release_is_accepted():
    release = _ext._C.built_with_torch
    out = _import(f"torch.__version__ = '{release}a0+git1234abc'\n")
    assert f"IMPORTED {release}" in out, out


def test_a_module_built_for_another_torch_is_refused(tmp_path):
    other = b"1" + _ext._C.built_with_torch.encode()[1:]  # 2.13.0 -> 1.13.0
    path = _module_with_version(tmp_path, other)
    out = _import(extension=path)
    assert f"REFUSED: pygan_optim's compiled module ({path}) was built against torch " \
           f"{other.decode()}" in out, out
    assert "LOADED: False" in out and "OPS: False" in out, out


def test_an_unloadable_file_keeps_its_own_error(tmp_path):
    """Not a module at all, no version written: the loader's error, unchanged."""
    path = tmp_path / "_C.so"
    path.write_bytes(b"not an ELF file")
    out = _import(extension=str(path))
    assert "REFUSED:" in out and str(path) in out and "built against" not in out, out
