"""Reading the weights of a TorchScript archive without running any of its code.

`torch.jit.load` compiles the archive's `code/` and calls the `__setstate__` methods
it defines while loading, so an archive from a stranger can run anything TorchScript
can reach (it can write files, for instance). OpenAI publishes its CLIP weights as
such archives, so they are read here with numpy alone:

- `<root>/data.pkl` is parsed with a restricted unpickler. Its `find_class` returns
  only inert stand-ins: a tensor rebuilder that slices the raw storage bytes, storage
  dtype markers, `collections.OrderedDict`, the identity list builders of
  `torch.jit._pickle`, and, for the archive's own `__torch__.*` classes, placeholder
  classes that only record the pickled attributes. Any other global (`os.system`,
  `builtins.eval`, ...) raises `CheckpointError` naming it.
- Storage records map to the raw bytes of `<root>/data/<key>`, read with
  `numpy.frombuffer` in the archive's byte order; offsets and strides are bounds
  checked before any view is taken.
- The placeholders are walked to collect `dotted.attribute.path -> array`. Which
  attributes are parameters and buffers (the keys of `torch.jit.load(...).state_dict()`)
  is read as text from the `__parameters__` / `__buffers__` lines of the class
  definitions in `code/`; that text is never compiled or evaluated.

`constants.pkl` holds only the constant tensors that TorchScript code refers to; no
state-dict entry lives there, so it is not read.

The archive layout follows PyTorch's `torch/csrc/jit/serialization/pickler.cpp` and
`torch/jit/_pickle.py` (read for the list of globals; no code taken from them).
"""
import collections
import pickle
import re
import struct
import zipfile

import numpy as np
from absl import logging

from keras_clip.convert import checkpoint
from keras_clip.convert.checkpoint import CheckpointError

# Bounds on what a crafted archive can make the reader do.
MAX_MODULE_DEPTH = 64  # nesting of submodules (OpenAI's CLIP: 6)
MAX_CLASSES = 10_000  # distinct `__torch__` classes referenced by data.pkl
MAX_TENSOR_RANK = 16
MAX_VIEWS_PER_STORAGE = 4  # tensors built from one storage may total 4x its elements (tied weights)
MAX_CODE_BYTES = 64 << 20  # total size of code/*.py read for parameter names
MAX_PICKLE_BYTES = 64 << 20  # data.pkl (OpenAI's ViT-L/14: ~60 kB)

# torch storage class -> numpy dtype (little-endian form; byte order applied later).
_STORAGE_DTYPES = {
    "FloatStorage": "<f4",
    "DoubleStorage": "<f8",
    "HalfStorage": "<f2",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "<i8",
    "IntStorage": "<i4",
    "ShortStorage": "<i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "?",
    "ComplexFloatStorage": "<c8",
    "ComplexDoubleStorage": "<c16",
}


class _Frozen:
    """Base of every object the unpickler hands out: a pickle `BUILD` cannot modify it."""

    __slots__ = ()

    def __setstate__(self, state):
        raise CheckpointError(f"Refusing a pickle that tries to modify {self!r} (BUILD)")


class _SafeCallable(_Frozen):
    """An allowed global function, wrapped so that the pickle cannot set its attributes."""

    __slots__ = ("function", "name")

    def __init__(self, function, name):
        object.__setattr__(self, "function", function)
        object.__setattr__(self, "name", name)

    def __call__(self, *args):
        return self.function(*args)

    def __repr__(self):
        return f"`{self.name}`"


class _StorageType(_Frozen):
    """What `GLOBAL torch FloatStorage` (etc.) unpickles to: a dtype marker."""

    __slots__ = ("name", "dtype")

    def __init__(self, name):
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "dtype", _STORAGE_DTYPES[name])

    def __repr__(self):
        return f"`torch.{self.name}`"


class _Storage(_Frozen):
    """A storage record `('storage', type, key, location, numel)`; bytes read lazily."""

    __slots__ = ("reader", "storage_type", "key", "numel", "handed_out", "materialized", "_array")

    def __init__(self, reader, storage_type, key, numel):
        self.reader = reader
        self.storage_type = storage_type
        self.key = key
        self.numel = numel
        self.handed_out = False
        self.materialized = 0  # elements of all tensors built from this storage
        self._array = None

    def __repr__(self):
        return f"storage `{self.key}`"

    def array(self):
        if self._array is None:
            self._array = self.reader.storage_array(self)
        return self._array


class _ScriptObject:
    """Inert stand-in for an instance of an archive class (`__torch__.*`).

    Unpickling creates it (`NEWOBJ`) and hands it its state (`BUILD`); both only
    record values. Nothing of the archive's class definition is ever run.
    """

    qualified_name = "__torch__"

    def __new__(cls, *args):
        obj = object.__new__(cls)
        obj.__dict__["_args"] = args
        obj.__dict__["_state"] = None
        return obj

    def __init__(self, *args):  # REDUCE on the class: record, never call anything
        pass

    def __setstate__(self, state):
        if not isinstance(self, _ScriptObject):  # BUILD applied to the class itself
            raise CheckpointError("Refusing a pickle that tries to modify a TorchScript class (BUILD)")
        self.__dict__["_state"] = state

    def __repr__(self):
        return f"<{self.qualified_name} placeholder>"


def _identity_list(data):
    return data


def _restore_type_tag(value, type_str=None):  # noqa: ARG001 - the tag is not needed
    return value


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *unused):  # noqa: ARG001
    return data


def _build_tensor_from_id(data):  # noqa: ARG001 - tensor tables only exist in RPC messages
    raise CheckpointError("The archive refers to tensors by id (an RPC message, not a checkpoint)")


def _device(name):
    if not isinstance(name, str):
        raise CheckpointError(f"torch.device got {type(name).__name__}, expected a string")
    return name


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals listed in `_safe_global`."""

    def __init__(self, file, reader):
        super().__init__(file)
        self.reader = reader
        self.classes = {}

    def find_class(self, module, name):
        found = self._safe_global(module, name)
        if found is None:
            raise CheckpointError(
                f"Refusing to load the TorchScript archive {self.reader.path}: its pickle "
                f"refers to the global `{module}.{name}`, which is not a tensor, storage "
                "or TorchScript module. Only weights are read from archives; nothing in "
                "them is executed."
            )
        return found

    def _safe_global(self, module, name):
        qualified = f"{module}.{name}"
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        function = {
            "torch._utils._rebuild_tensor_v2": self.reader.rebuild_tensor,
            "torch._utils._rebuild_parameter": _rebuild_parameter,
            "torch.device": _device,
            "collections.OrderedDict": collections.OrderedDict,
            "torch.jit._pickle.build_intlist": _identity_list,
            "torch.jit._pickle.build_tensorlist": _identity_list,
            "torch.jit._pickle.build_doublelist": _identity_list,
            "torch.jit._pickle.build_boollist": _identity_list,
            "torch.jit._pickle.restore_type_tag": _restore_type_tag,
            "torch.jit._pickle.build_tensor_from_id": _build_tensor_from_id,
        }.get(qualified)
        if function is not None:
            return _SafeCallable(function, qualified)
        if (module == "__torch__" or module.startswith("__torch__.")) and name.isidentifier():
            if qualified not in self.classes:
                if len(self.classes) >= MAX_CLASSES:
                    raise CheckpointError(
                        f"{self.reader.path} refers to more than {MAX_CLASSES} TorchScript classes"
                    )
                self.classes[qualified] = type(
                    name, (_ScriptObject,), {"qualified_name": qualified, "__module__": __name__}
                )
            return self.classes[qualified]
        return None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointError(f"Unsupported persistent record in {self.reader.path}: {pid!r:.100}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise CheckpointError(f"Storage record with a non-storage type: {storage_type!r:.100}")
        if not (isinstance(key, str) and re.fullmatch(r"[A-Za-z0-9_]{1,64}", key)):
            raise CheckpointError(f"Storage record with an invalid key: {key!r:.100}")
        if not (isinstance(numel, int) and numel >= 0):
            raise CheckpointError(f"Storage `{key}` has an invalid size: {numel!r:.100}")
        return self.reader.storage(storage_type, key, numel)


class _ClassDecl:
    def __init__(self, is_module):
        self.is_module = is_module
        self.declared = False  # saw a __parameters__ line (else: all tensor attributes count)
        self.parameters = []
        self.buffers = []


def _names_in_list(line):
    return re.findall(r'"([^"\\]*)"', line)


class _ArchiveReader:
    def __init__(self, path, archive):
        self.path = path
        self.archive = archive
        names = archive.namelist()
        roots = sorted({n.split("/", 1)[0] for n in names if n.count("/") == 1 and n.endswith("/data.pkl")})
        if len(roots) != 1:
            raise CheckpointError(
                f"{path} is not a TorchScript archive: expected one `<name>/data.pkl`, found "
                f"{len(roots)}"
            )
        self.root = roots[0]
        self.names = set(names)
        byteorder = "little"
        if f"{self.root}/byteorder" in self.names:
            byteorder = archive.read(f"{self.root}/byteorder").decode("ascii", "replace").strip()
        if byteorder not in ("little", "big"):
            raise CheckpointError(f"{path}: unknown byte order {byteorder!r:.20}")
        self.byteorder = byteorder
        self.storages = {}
        self.tensor_count = 0

    # ---- storages and tensors ------------------------------------------------------

    def storage(self, storage_type, key, numel):
        known = self.storages.get(key)
        if known is not None:
            if known.storage_type.name != storage_type.name or known.numel != numel:
                raise CheckpointError(f"Storage `{key}` is declared twice with different types or sizes")
            return known
        member = f"{self.root}/data/{key}"
        if member not in self.names:
            raise CheckpointError(f"{self.path} has no `{member}` for a tensor storage")
        itemsize = 2 if storage_type.dtype == "bfloat16" else np.dtype(storage_type.dtype).itemsize
        info = self.archive.getinfo(member)
        if info.compress_type != zipfile.ZIP_STORED:
            # torch stores tensors uncompressed; a compressed one could expand far beyond
            # the file's size (a zip bomb), so it is refused instead of inflated.
            raise CheckpointError(f"Storage `{member}` is compressed; TorchScript archives store tensors uncompressed")
        available = info.file_size
        if numel * itemsize > available:
            raise CheckpointError(
                f"Storage `{member}` holds {available} bytes but its record declares "
                f"{numel} x {storage_type.name} ({numel * itemsize} bytes): the file is "
                "truncated or crafted"
            )
        self.storages[key] = _Storage(self, storage_type, key, numel)
        return self.storages[key]

    def storage_array(self, storage):
        dtype = storage.storage_type.dtype
        raw_dtype = np.dtype("<u2" if dtype == "bfloat16" else dtype)
        if self.byteorder == "big":
            raw_dtype = raw_dtype.newbyteorder(">")
        member = f"{self.root}/data/{storage.key}"
        # Stored (uncompressed, checked in `storage`): one read straight into the array.
        offset = self._stored_data_offset(member)
        array = np.fromfile(self.path, dtype=raw_dtype, count=storage.numel, offset=offset)
        if array.size != storage.numel:
            raise CheckpointError(f"Storage `{member}` is truncated: {array.size} of {storage.numel} elements")
        if dtype == "bfloat16":  # the upper half of a float32
            return (array.astype(np.uint32) << 16).view(np.float32)
        return array.astype(raw_dtype.newbyteorder("="), copy=False)

    def _stored_data_offset(self, member):
        """File offset of an uncompressed member's bytes, from its local zip header."""
        info = self.archive.getinfo(member)
        if info.flag_bits & 0x1:
            raise CheckpointError(f"Storage `{member}` is encrypted")
        with open(self.path, "rb") as f:
            f.seek(info.header_offset)
            header = f.read(30)
        if len(header) != 30 or header[:4] != b"PK\x03\x04":
            raise CheckpointError(f"{self.path}: bad local zip header for `{member}`")
        name_length, extra_length = struct.unpack("<HH", header[26:30])
        return info.header_offset + 30 + name_length + extra_length

    def rebuild_tensor(self, storage, storage_offset, size, stride, *unused):
        if not isinstance(storage, _Storage):
            raise CheckpointError(f"Tensor record without a storage: {storage!r:.100}")
        ints = lambda v: isinstance(v, (tuple, list)) and all(isinstance(i, int) and i >= 0 for i in v)  # noqa: E731
        if not (isinstance(storage_offset, int) and storage_offset >= 0 and ints(size) and ints(stride)
                and len(size) == len(stride) and len(size) <= MAX_TENSOR_RANK):
            raise CheckpointError(
                f"Tensor on storage `{storage.key}` has invalid geometry: offset "
                f"{storage_offset!r:.40}, size {size!r:.80}, stride {stride!r:.80}"
            )
        size, stride = tuple(size), tuple(stride)
        numel = int(np.prod(size, dtype=object))
        self.tensor_count += 1
        if self.tensor_count > checkpoint.MAX_TENSORS:
            raise CheckpointError(
                f"TorchScript archive {self.path} holds more than {checkpoint.MAX_TENSORS} tensors "
                "(keras_clip.convert.checkpoint.MAX_TENSORS); no CLIP has that many"
            )
        if numel == 0:
            dtype = np.float32 if storage.storage_type.dtype == "bfloat16" else np.dtype(storage.storage_type.dtype)
            return np.zeros(size, dtype)
        last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= storage.numel or numel > storage.numel:
            raise CheckpointError(
                f"Tensor of size {size} (stride {stride}, offset {storage_offset}) does not fit "
                f"its storage `{storage.key}` of {storage.numel} elements"
            )
        storage.materialized += numel
        if storage.materialized > MAX_VIEWS_PER_STORAGE * max(storage.numel, 1):
            # Each tensor is an own copy: many views of one storage would multiply memory.
            raise CheckpointError(
                f"Storage `{storage.key}` of {storage.numel} elements backs tensors of "
                f"{storage.materialized} elements in all, more than {MAX_VIEWS_PER_STORAGE}x its size"
            )
        data = storage.array()
        contiguous = all(st == int(np.prod(size[i + 1:], dtype=object)) for i, st in enumerate(stride) if size[i] > 1)
        if storage_offset == 0 and numel == storage.numel and contiguous and not storage.handed_out:
            storage.handed_out = True  # the tensor owns the storage array: no second copy
            return data.reshape(size)
        view = np.lib.stride_tricks.as_strided(
            data[storage_offset:], shape=size, strides=[s * data.itemsize for s in stride], writeable=False
        )
        return np.array(view, order="C")  # own, contiguous, writeable copy

    # ---- class declarations from code/ (read as text, never run) -------------------

    def class_declarations(self):
        prefix = f"{self.root}/code/"
        decls = {}
        budget = MAX_CODE_BYTES
        for name in sorted(self.names):
            if not (name.startswith(prefix + "__torch__/") and name.endswith(".py")):
                continue
            size = self.archive.getinfo(name).file_size
            if size > budget:
                logging.warning("TorchScript code in %s exceeds %d bytes; not reading more", self.path, MAX_CODE_BYTES)
                break
            budget -= size
            module = name[len(prefix):-len(".py")].replace("/", ".")
            text = self.archive.read(name).decode("utf-8", "replace")
            current = None
            for line in text.splitlines():
                if line.startswith("class "):
                    match = re.match(r"class (\w+)(?:\(([\w.]*)\))?:", line)
                    current = None
                    if match:
                        current = decls.setdefault(f"{module}.{match.group(1)}", _ClassDecl(match.group(2) == "Module"))
                elif current is not None and line.startswith("  __parameters__ = ["):
                    current.parameters = _names_in_list(line)
                    current.declared = True
                elif current is not None and line.startswith("  __buffers__ = ["):
                    current.buffers = _names_in_list(line)
                elif line and not line.startswith(" "):
                    current = None
        return decls

    # ---- the module tree -----------------------------------------------------------

    def load_root(self):
        size = self.archive.getinfo(f"{self.root}/data.pkl").file_size
        if size > MAX_PICKLE_BYTES:
            raise CheckpointError(
                f"{self.path}: data.pkl is {size} bytes, more than the limit of {MAX_PICKLE_BYTES} "
                "(keras_clip.convert.torchscript.MAX_PICKLE_BYTES)"
            )
        with self.archive.open(f"{self.root}/data.pkl") as f:
            return _RestrictedUnpickler(f, self).load()


def _contains_tensor(value, depth=0):
    if isinstance(value, np.ndarray):
        return True
    if depth > MAX_MODULE_DEPTH:
        return False
    if isinstance(value, dict):
        return any(_contains_tensor(v, depth + 1) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_contains_tensor(v, depth + 1) for v in value)
    return False


def _collect(obj, prefix, decls, out, path):
    """Appends `prefix + name -> array` for the parameters and buffers of `obj` and its submodules."""
    where = prefix[:-1] or "<root module>"
    if len(path) > MAX_MODULE_DEPTH:
        raise CheckpointError(f"TorchScript modules nested deeper than {MAX_MODULE_DEPTH} levels at `{where}`")
    if any(obj is seen for seen in path):
        raise CheckpointError(f"TorchScript module `{where}` contains itself")
    decl = decls.get(obj.qualified_name)
    if decl is not None and not decl.is_module:
        return
    state = obj._state
    if not isinstance(state, dict):
        if _contains_tensor(state) or _contains_tensor(obj._args):
            raise CheckpointError(
                f"TorchScript module `{where}` ({obj.qualified_name}) stores its tensors through "
                "a custom __getstate__/__setstate__; they cannot be read without running the "
                "archive's code, which keras_clip never does. Convert the checkpoint to "
                "safetensors or a plain state dict on a machine you trust."
            )
        return
    if decl is not None and decl.declared:
        names = decl.parameters + [b for b in decl.buffers if b not in decl.parameters]
    else:
        names = [k for k, v in state.items() if isinstance(v, np.ndarray)]
    for name in names:
        value = state.get(name)
        if isinstance(value, np.ndarray):
            out[prefix + name] = value
    for name, value in state.items():
        if isinstance(name, str) and isinstance(value, _ScriptObject):
            _collect(value, f"{prefix}{name}.", decls, out, path + [obj])


def read_tensors(path):
    """Returns `{state-dict key: numpy array}` of a TorchScript archive, running nothing.

    Keys equal those of `torch.jit.load(path).state_dict()` (parameters and buffers,
    dotted paths such as `visual.conv1.weight`); values are bit-identical copies, in
    the tensor's own dtype (bfloat16 is widened to float32).

    Raises:
        CheckpointError: the archive refers to anything but tensors and TorchScript
            modules, a storage is missing or too small, or a module keeps its
            tensors in custom `__getstate__` state.
    """
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{path} is not a readable zip archive ({e})") from e
    with archive:
        reader = _ArchiveReader(path, archive)
        root = reader.load_root()
        if isinstance(root, dict):  # a pickled dict of tensors
            out = {k: v for k, v in root.items() if isinstance(k, str) and isinstance(v, np.ndarray)}
        elif isinstance(root, _ScriptObject):
            out = {}
            _collect(root, "", reader.class_declarations(), out, [])
        else:
            raise CheckpointError(f"{path}: data.pkl holds a {type(root).__name__}, not a TorchScript module")
    logging.info("Read %d tensors from the TorchScript archive %s without running its code", len(out), path)
    return out
