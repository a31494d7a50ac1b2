"""Imports of packages that only some features need, with errors naming the extra.

`pip install keras_clip` installs what training, export and serving need. Plots and
the linear probe need `keras_clip[eval]` (matplotlib, scipy); reading plain PyTorch
`.pt` checkpoints needs `keras_clip[torch]`; converting to or from keras-hub needs
`keras_clip[keras_hub]`.
"""
import importlib

# The extra that provides each optional top-level module.
EXTRAS = {"matplotlib": "eval", "scipy": "eval", "torch": "torch", "keras_hub": "keras_hub"}


def import_optional(name, purpose):
    """Imports module `name` (e.g. `"scipy.optimize"`) or raises an ImportError that says
    which `keras_clip[...]` extra to install for `purpose`."""
    top = name.split(".")[0]
    try:
        return importlib.import_module(name)
    except ImportError as e:
        extra = EXTRAS.get(top)
        hint = f"pip install 'keras_clip[{extra}]'" if extra else f"pip install {top}"
        raise ImportError(f"{purpose} needs the `{top}` package, which is not installed: {hint}") from e
