"""Helpers to import the reference implementations (open_clip, transformers).

PyPI's torchvision wheel cannot load its compiled operators beside the local CPU
torch build, and `import torchvision` fails in `torchvision/__init__.py`. open_clip
only needs torchvision's pure-Python parts (transforms), so we register an empty
package object whose `__path__` points at the installed torchvision folder: its
submodules import normally while the failing package initialiser never runs.
"""
import importlib.machinery
import importlib.util
import os
import sys
import types


def import_open_clip():
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - any failure of the compiled-op registration
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        spec = importlib.util.find_spec("torchvision")
        package = types.ModuleType("torchvision")
        package.__path__ = [os.path.dirname(spec.origin)]
        package.__version__ = "0.0.0-stub"
        package.__spec__ = importlib.machinery.ModuleSpec(
            "torchvision", None, is_package=True
        )
        package.__spec__.submodule_search_locations = package.__path__
        sys.modules["torchvision"] = package
    import open_clip

    return open_clip
