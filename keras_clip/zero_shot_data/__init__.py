"""Class names and prompt templates for zero-shot classification benchmarks.

The data are JSON files next to this module (see `README.md` here for where each
came from). Each file holds `classes` (label order of the dataset) and `templates`
(`str.format` strings with one `{}` for the class name), or `classes_from` naming
the file whose classes it shares.

Example:

>>> class_names, templates = load_dataset_prompts("cifar10")
>>> class_names[:3], len(templates)
(['airplane', 'automobile', 'bird'], 18)
>>> "imagenet" in available_datasets()
True
"""
import importlib.resources
import json

_PACKAGE = __name__


def available_datasets():
    """Names accepted by `load_dataset_prompts`, sorted.

    Returns:
        list of str, e.g. `["caltech101", "cifar10", ..., "imagenet", ...]`.
    """
    files = importlib.resources.files(_PACKAGE).iterdir()
    return sorted(f.name[: -len(".json")] for f in files if f.name.endswith(".json"))


def _read(name):
    available = available_datasets()
    if name not in available:
        raise ValueError(
            f"`name` must be one of {available}. Received: name={name!r}"
        )
    text = importlib.resources.files(_PACKAGE).joinpath(f"{name}.json").read_text("utf-8")
    return json.loads(text)


def load_dataset_prompts(name):
    """Class names and prompt templates OpenAI used for a dataset.

    Args:
        name: str, one of `available_datasets()` (lower case, e.g. `"imagenet"`,
            `"imagenet_simple"` for OpenAI's 7-template subset, `"cifar100"`,
            `"oxford_pets"`).

    Returns:
        `(class_names, templates)`: two new lists of str. `class_names[i]` is the
        name of label `i`; each template contains one `{}`.

    Raises:
        ValueError: if `name` is unknown.
    """
    data = _read(name)
    classes = _read(data["classes_from"])["classes"] if "classes_from" in data else data["classes"]
    return list(classes), list(data["templates"])
