"""The shard files of :func:`sagkit.lab.evaluation.evaluate_guidance`: their keys, names and
contents.

With ``out_dir`` every shard (the samples of one task and one method in one range of indices)
is written as it finishes, to ``<task>__<method>-n<n>__<first>-<end>.json`` (method: the step
rule "none", "rms" — FreeDoM and SAG —, "dps" or "backward", or a preset's name; losses as JSON
floats, samples as their raw bytes, both exact), with its key: the settings that make its
numbers. A rerun loads the shards it finds whose key equals the run's, bit for bit, and
computes the rest. The key holds

- ``version``: ``sagkit.__version__``;
- ``task``: its ``name``, ``label``, the sha256 digests of its ``reference`` and ``mask``
  (of each tensor's dtype, shape and bytes), and the loss's fingerprint: for a function its
  module and qualified name, its default arguments and its closure (the variables it
  captured), for a ``functools.partial`` its function and arguments, for a bound method its
  function and object, for another callable object its class and attributes — recursively,
  with numbers, strings, lists, tuples and dicts as they are, tensors and numpy arrays by
  digest and torch modules by their class and the digest of their parameters and buffers (so
  the weights of a classifier a loss calls are in it). Not in it: the code of a function
  (its body, and the globals it reads, stand for themselves by name) and the insides of
  objects without attributes (by class only). A loss that changes only there needs a fresh
  ``out_dir``;
- ``model``: its class, the digest of its parameters and buffers (the weights, and the
  digits model's table of class embeddings), the digest of its schedule's log α on 1001
  times in [0, 1], and its ``prediction_type``;
- ``method``, ``n`` and ``options``: the method's whole configuration
  (:meth:`~sagkit.guidance.config.GuidanceConfig.describe`);
- ``samples`` (the shard's range [first, end)), ``seed``, and the model's ``dtype`` and
  ``device`` type.

The ``classifier`` argument is not in the key: it only scores the samples (accuracy and FD
are computed from the samples at every run, loaded or not). Neither is ``batch_size``: it
only cuts the range into shards, and a shard's numbers depend on its range alone, so a shard
of a run in other batches is reused where its range comes back (tested). A file whose key
differs is refused with a ``ValueError`` that names it and every difference (``key: stored
vs now``); a file that cannot be read as a shard (cut short, not JSON, a field missing or
malformed) is refused too, never recomputed over: delete it and run again to compute it.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import numbers
import os
import types
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "digest",
    "weights_digest",
    "fingerprint",
    "task_key",
    "model_key",
    "shard_name",
    "write_shard",
    "read_shard",
]


def digest(tensor: torch.Tensor) -> str:
    """The first 16 hex digits of the sha256 of a tensor's dtype, shape and bytes."""
    hasher = hashlib.sha256()
    _hash_tensor(hasher, tensor)
    return hasher.hexdigest()[:16]


def _hash_tensor(hasher, tensor: torch.Tensor) -> None:
    t = tensor.detach().cpu().contiguous()
    hasher.update(f"{t.dtype} {tuple(t.shape)};".encode())
    hasher.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def weights_digest(module: torch.nn.Module) -> str:
    """The digest of a module's parameters and buffers, by name, in their order."""
    hasher = hashlib.sha256()
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        hasher.update(f"{name};".encode())
        _hash_tensor(hasher, tensor)
    return hasher.hexdigest()[:16]


def _name_of(value) -> str:
    """``module.qualname`` of a class or function."""
    return f"{value.__module__}.{value.__qualname__}"


def _holder(describe):
    """``describe`` (value, path) of a value that may hold others: a value met again inside
    itself is described as a cycle, so the description ends; ``describe`` gets the path with
    the value's id."""

    @functools.wraps(describe)
    def described(value, path: tuple = ()):
        if id(value) in path:
            return {"cycle": type(value).__qualname__}
        return describe(value, (*path, id(value)))

    return described


@functools.singledispatch
@_holder
def fingerprint(value, path: tuple = ()):
    """``value`` as JSON that changes where its numbers could (module docstring, the key's
    ``task``); ``path``: the ids of the objects being described, so a cycle ends.

    An object of no registered type: by its class and attributes, or without attributes (a
    builtin function, a C object) by its name or class only.
    """
    attributes = getattr(value, "__dict__", None)
    if attributes is None:
        return {"object": getattr(value, "__qualname__", None) or _name_of(type(value))}
    return {"object": _name_of(type(value)), "attributes": fingerprint(dict(attributes), path)}


@fingerprint.register(type(None))
@fingerprint.register(int)  # bool too
@fingerprint.register(str)
def _as_is(value, path: tuple = ()):
    return value


@fingerprint.register(float)
@fingerprint.register(numbers.Number)  # numpy scalars
def _as_text(value, path: tuple = ()):
    return repr(value)  # as text: NaN equals itself


@fingerprint.register(torch.Tensor)
def _tensor(value, path: tuple = ()):
    return {"tensor": digest(value)}


@fingerprint.register(np.ndarray)
def _array(value, path: tuple = ()):
    if value.dtype == object:
        return fingerprint.dispatch(object)(value, path)
    return {"array": digest(torch.from_numpy(np.ascontiguousarray(value)))}


@fingerprint.register(type)
def _class(value, path: tuple = ()):
    return {"class": _name_of(value)}


@fingerprint.register(types.ModuleType)
def _module(value, path: tuple = ()):
    return {"module": value.__name__}


@fingerprint.register(torch.nn.Module)
def _torch_module(value, path: tuple = ()):
    return {"module": _name_of(type(value)), "weights": weights_digest(value)}


@fingerprint.register(list)
@fingerprint.register(tuple)
@_holder
def _sequence(value, path: tuple = ()):
    return [fingerprint(v, path) for v in value]


@fingerprint.register(dict)
@_holder
def _mapping(value, path: tuple = ()):
    return {str(k): fingerprint(v, path) for k, v in value.items()}


@fingerprint.register(functools.partial)
@_holder
def _partial(value, path: tuple = ()):
    return {
        "partial": fingerprint(value.func, path),
        "args": fingerprint(value.args, path),
        "keywords": fingerprint(value.keywords, path),
    }


@fingerprint.register(types.MethodType)
@_holder
def _bound_method(value, path: tuple = ()):
    return {"method": fingerprint(value.__func__, path), "of": fingerprint(value.__self__, path)}


@fingerprint.register(types.FunctionType)
@_holder
def _function(value, path: tuple = ()):
    cells = zip(value.__code__.co_freevars, value.__closure__ or (), strict=True)
    return {
        "function": _name_of(value),
        "defaults": fingerprint(value.__defaults__, path),
        "keyword defaults": fingerprint(value.__kwdefaults__, path),
        "closure": {name: fingerprint(_contents(cell), path) for name, cell in cells},
    }


def _contents(cell):
    try:
        return cell.cell_contents
    except ValueError:  # a variable not bound yet
        return {"unbound": True}


def task_key(task) -> dict:
    """A :class:`~sagkit.lab.evaluation.GuidanceTask`'s part of the shard key."""
    return {
        "name": task.name,
        "label": fingerprint(task.label),
        "reference": None if task.reference is None else digest(torch.as_tensor(task.reference)),
        "mask": None if task.mask is None else digest(torch.as_tensor(task.mask)),
        "loss": fingerprint(task.loss),
    }


def model_key(model) -> dict:
    """The model's part of the shard key: class, weights, schedule and what the network
    predicts."""
    times = torch.linspace(0, 1, 1001, dtype=torch.float64)
    return {
        "class": _name_of(type(model)),
        "weights": weights_digest(model),
        "schedule": digest(model.schedule.log_alpha(times)),
        "prediction_type": getattr(model, "prediction_type", None),
    }


def shard_name(settings: dict) -> str:
    """The file name of the shard of key ``settings``."""
    lo, hi = settings["samples"]
    task, method, n = settings["task"]["name"], settings["method"], settings["n"]
    return f"{task}__{method}-n{n}__{lo:06d}-{hi:06d}.json"


def write_shard(path: Path, settings: dict, result: dict) -> None:
    """The shard as JSON, exactly: losses as floats (repr round-trips), samples as raw bytes.

    ``result``: {"samples": (N, …) tensor on the CPU, "loss": (N,) float64, "seconds": float}.
    """
    x = result["samples"].contiguous()
    record = {
        "settings": settings,
        "seconds": result["seconds"],
        "loss": result["loss"].tolist(),
        "samples": {
            "dtype": str(x.dtype).removeprefix("torch."),
            "shape": list(x.shape),
            "base64": base64.b64encode(x.view(torch.uint8).numpy().tobytes()).decode(),
        },
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)  # atomic: a killed run leaves no half-written shard behind


def read_shard(path: Path, settings: dict) -> dict:
    """The shard in ``path``, exactly as written (as :func:`write_shard` takes it); a
    ``ValueError`` naming the file if its key is not ``settings`` (with every difference) or
    if it cannot be read as a shard."""
    record = _record(path)
    if record["settings"] != settings:
        differences = "; ".join(_differences(record["settings"], settings))
        raise ValueError(
            f"{path} was written with other settings (stored vs now: {differences}): "
            "use another out_dir, or delete the file"
        )
    count = settings["samples"][1] - settings["samples"][0]
    values, seconds = record["loss"], record["seconds"]
    if not isinstance(values, list) or len(values) != count or not all(map(_is_real, values)):
        raise _unreadable(path, f"loss must be {count} numbers")
    if not _is_real(seconds) or not seconds >= 0:
        raise _unreadable(path, f"seconds must be a number >= 0, got {seconds!r}")
    x = _samples(path, record["samples"])
    if len(x) != count:
        raise _unreadable(path, f"samples: {len(x)}, expected {count}")
    loss = torch.tensor(values, dtype=torch.float64)
    return {"samples": x, "loss": loss, "seconds": seconds}


def _record(path: Path) -> dict:
    """The JSON object in ``path``, with its four fields and ``settings`` an object."""
    try:
        record = json.loads(path.read_text())
    except OSError as err:
        raise _unreadable(path, f"cannot be read: {err.strerror}") from None
    except ValueError as err:  # not JSON, or not text
        raise _unreadable(path, f"not JSON: {err}") from None
    if not isinstance(record, dict):
        raise _unreadable(path, "not a JSON object")
    missing = [k for k in ("settings", "seconds", "loss", "samples") if k not in record]
    if missing:
        raise _unreadable(path, f"missing {', '.join(missing)}")
    if not isinstance(record["settings"], dict):
        raise _unreadable(path, "settings is not a JSON object")
    return record


def _samples(path: Path, stored) -> torch.Tensor:
    """The samples of a record's ``samples`` field (its dtype, shape and base64 bytes)."""
    try:
        dtype = getattr(torch, stored["dtype"])
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"{stored['dtype']!r} is not a dtype")
        raw = bytearray(base64.b64decode(stored["base64"], validate=True))
        return torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(stored["shape"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise _unreadable(path, f"samples: {str(err).splitlines()[0]}") from None


def _is_real(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _unreadable(path: Path, reason: str) -> ValueError:
    return ValueError(
        f"{path} is not a readable shard file ({reason}); delete it and run again to compute "
        "the shard anew"
    )


def _differences(stored: dict, now: dict) -> list[str]:
    """``key: stored vs now`` for every leaf where two keys differ (dotted paths, JSON values)."""
    old, new = dict(_leaves(stored)), dict(_leaves(now))
    absent = object()
    return [
        f"{k}: {_shown(old.get(k, absent), absent)} vs {_shown(new.get(k, absent), absent)}"
        for k in [*new, *(k for k in old if k not in new)]
        if old.get(k, absent) != new.get(k, absent)
    ]


def _leaves(value, prefix: str = ""):
    if isinstance(value, dict) and value:
        for k, v in value.items():
            yield from _leaves(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(value, list) and value:
        for i, v in enumerate(value):
            yield from _leaves(v, f"{prefix}[{i}]")
    else:
        yield prefix, value


def _shown(value, absent) -> str:
    return "absent" if value is absent else json.dumps(value)
