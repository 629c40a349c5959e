"""Shim: ``pygan_optim.migrate`` is the package ``pygan_optim/migrate/``.

An editable install made before the package existed maps the module name to
this file; it makes this module that package (its ``__path__`` and
``__init__``). A normal import finds the package directory first and never
reads this file. Delete it once every checkout has been rebuilt (``make build``).
"""
import os as _os

__path__ = [_os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "migrate")]
__package__ = __name__
if __spec__ is not None:
    __spec__.submodule_search_locations = __path__
with open(_os.path.join(__path__[0], "__init__.py"), encoding="utf-8") as _f:
    exec(compile(_f.read(), _f.name, "exec"))
del _f, _os
