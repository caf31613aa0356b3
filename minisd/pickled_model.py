"""The weights of a whole pickled PyTorch model (`torch.save(model)`), read as data: nothing the file names runs.

Released weights such as torchxrayvision's are whole pickled models. torch.load(weights_only=True) refuses
their classes (and every file in the legacy format), and weights_only=False would run whatever the file names.
Here every class the pickle names becomes a plain attribute holder, tensors are rebuilt by torch's own
functions, and any other callable is refused. Both formats torch.save writes are read: the zip archive
(torch >= 1.6: data.pkl beside data/<key>) and the legacy stream (magic number, protocol, system info, the
object, its storage keys, then each storage as an int64 element count and its bytes).
"""
import collections
import pickle
import struct
import zipfile

import torch

from .errors import MinisdError

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
STORAGE_DTYPES = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "UntypedStorage": torch.uint8,
}
CALLABLES = {
    "torch._utils._rebuild_tensor": torch._utils._rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": torch._utils._rebuild_tensor_v2,
    "torch._utils._rebuild_parameter": torch._utils._rebuild_parameter,
    "collections.OrderedDict": collections.OrderedDict,
    "builtins.set": set,
    "builtins.frozenset": frozenset,
}


class PickledObject:
    """Stands in for every class the pickle names: it keeps the object's attributes and runs nothing."""

    def __init__(self, *args, **kwargs):
        pass


class DataUnpickler(pickle.Unpickler):
    """pickle, with the objects a model file may name mapped to data (see the module's docstring)."""

    def __init__(self, file, read_storage=None):
        super().__init__(file)
        self.read_storage, self.storages = read_storage, {}

    def find_class(self, module, name):
        module = "builtins" if module == "__builtin__" else module   # protocol 2 writes Python 2's name
        if f"{module}.{name}" in CALLABLES:
            return CALLABLES[f"{module}.{name}"]
        if module == "torch" and name in STORAGE_DTYPES:
            return STORAGE_DTYPES[name]
        if name.lstrip("_")[:1].isupper():   # a class: its instances become attribute holders
            return PickledObject
        raise pickle.UnpicklingError(f"it names {module}.{name}, which is not a tensor or a class")

    def persistent_load(self, saved_id):
        kind = saved_id[0].decode() if isinstance(saved_id[0], bytes) else saved_id[0]
        if kind == "module":   # the legacy format's class with its source code, which is not run
            return PickledObject
        if kind != "storage" or not isinstance(saved_id[1], torch.dtype):
            raise pickle.UnpicklingError(f"unknown persistent id {kind!r}")
        dtype, key, _, numel = saved_id[1:5]
        key = key.decode() if isinstance(key, bytes) else str(key)
        if key not in self.storages:
            data = self.read_storage(key, numel * torch._utils._element_size(dtype))
            self.storages[key] = torch.storage.TypedStorage(wrap_storage=data, dtype=dtype, _internal=True)
        storage = self.storages[key]
        view = saved_id[5] if len(saved_id) > 5 else None
        if view is None:
            return storage
        size = torch._utils._element_size(dtype)
        _, offset, count = view
        part = storage._untyped_storage[offset * size:(offset + count) * size]
        return torch.storage.TypedStorage(wrap_storage=part, dtype=dtype, _internal=True)


def bytes_storage(data):
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).untyped_storage()


def load(path):
    """The object pickled in `path`, with classes as PickledObject and tensors rebuilt."""
    with open(path, "rb") as f:
        if zipfile.is_zipfile(f):
            with zipfile.ZipFile(f) as archive:
                names = archive.namelist()
                pickled = next((n for n in names if n.endswith("data.pkl")), None)
                if pickled is None:
                    raise pickle.UnpicklingError("a zip archive without data.pkl")
                prefix = pickled[:-len("data.pkl")]
                unpickler = DataUnpickler(archive.open(pickled),
                                          lambda key, nbytes: bytes_storage(archive.read(f"{prefix}data/{key}")))
                return unpickler.load()
        f.seek(0)
        if DataUnpickler(f).load() != LEGACY_MAGIC:
            raise pickle.UnpicklingError("not a file written by torch.save")
        DataUnpickler(f).load(), DataUnpickler(f).load()   # protocol version, system information
        unpickler = DataUnpickler(f, lambda key, nbytes: torch.UntypedStorage(nbytes))
        result = unpickler.load()
        for key in DataUnpickler(f).load():
            storage = unpickler.storages[str(key)]
            count, = struct.unpack("<q", f.read(8))
            data = f.read(count * torch._utils._element_size(storage.dtype))
            if len(data) != storage._untyped_storage.nbytes():
                raise pickle.UnpicklingError("the file is cut short")
            storage._untyped_storage.copy_(bytes_storage(data))
        return result


def module_state(obj, prefix=""):
    """{name: tensor} of the parameters and persistent buffers of a pickled nn.Module and its children."""
    attributes = vars(obj) if isinstance(obj, PickledObject) else {}
    state, transient = {}, attributes.get("_non_persistent_buffers_set") or set()
    for group in ("_parameters", "_buffers"):
        for name, value in (attributes.get(group) or {}).items():
            if isinstance(value, torch.Tensor) and not (group == "_buffers" and name in transient):
                state[prefix + name] = value.detach()
    for name, child in (attributes.get("_modules") or {}).items():
        state.update(module_state(child, f"{prefix}{name}."))
    return state


def read_pickled_model(path):
    """{name: tensor} of the whole model pickled in `path`, or None when the file holds something else (a state
    dict, which minisd.checkpoint.files.read_tensors reads with torch's own weights-only loader)."""
    try:
        obj = load(path)
    except OSError as e:
        raise MinisdError(f"{path}: cannot be read ({e.strerror or e})") from None
    except Exception as e:   # a damaged or foreign pickle fails in many ways
        raise MinisdError(f"{path}: not a model written by torch.save, or truncated ({e})") from None
    return module_state(obj) if isinstance(obj, PickledObject) else None
