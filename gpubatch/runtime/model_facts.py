"""What the client reads of an ONNX model before a run: its first input, its inputs' and
outputs' names and dims, its outputs' element types, cached per file.

Reading them takes the ``onnx`` package (0.8 s to import on the benchmark machine, more on a
cluster's network filesystem) and, for outputs, ONNX shape inference; it was a quarter of a
short run's start-up, paid on every ``gpubatch run`` and ``validate``. A model changes far less
often than it runs, so the facts are kept under the user cache (``$GPUBATCH_CACHE``), keyed by the
file's absolute path, inode, size and modification and change times: a model rewritten in place
or replaced is read again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gpubatch.core.errors import InputError, SpecError
from gpubatch.core.files import cache_root, write_json_atomic
from gpubatch.io.localized import localize
from gpubatch.io.uris import is_remote, local_path

#: bump when what is cached changes shape
FACTS_VERSION = 3

Dims = list[int | None]


@dataclass
class OnnxInput:
    """The first graph input of an ONNX model, as preflight needs it."""

    name: str
    dims: Dims  # None: a dynamic (named or unknown) dimension
    dtype: str


def onnx_dtype_name(elem_type: int) -> str:
    """numpy's name for an ONNX tensor element type ('float32', 'int64', 'bfloat16')."""
    import onnx

    if not elem_type:
        return "unknown"
    if elem_type == onnx.TensorProto.BFLOAT16:
        return "bfloat16"
    try:
        return str(onnx.helper.tensor_dtype_to_np_dtype(elem_type).name)
    except (KeyError, TypeError, ValueError):
        return onnx.TensorProto.DataType.Name(elem_type).lower()


def read_first_input(model: Any) -> OnnxInput:
    """Name, dims and element type of a loaded model's first non-initializer input."""
    initializers = {i.name for i in model.graph.initializer}
    first = next(i for i in model.graph.input if i.name not in initializers)
    tensor = first.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tensor.shape.dim]
    return OnnxInput(first.name, dims, onnx_dtype_name(tensor.elem_type))


def read_output_types(model: Any) -> dict[str, str]:
    """Output name -> numpy's name for its element type (``unknown`` where the graph says none)."""
    return {o.name: onnx_dtype_name(o.type.tensor_type.elem_type) for o in model.graph.output}


def read_io(model: Any) -> tuple[list[tuple[str, Dims]], list[tuple[str, Dims]], list[str]]:
    """(inputs, outputs) of a loaded model as (name, dims), None for a dynamic dim, and the
    outputs known to be scalars (a shape of no dims; an output of unknown shape has none at all).

    Exporters often leave output widths unnamed; ONNX shape inference (with data propagation
    through Reshape and friends) usually recovers them from the graph alone, weights unread.
    """
    import onnx

    with contextlib.suppress(Exception):  # inference is a nicety: the declared shapes remain
        model = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    graph = model.graph
    initializers = {i.name for i in graph.initializer}

    def dims(value: Any) -> Dims:
        return [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]

    scalars = [o.name for o in graph.output
               if o.type.tensor_type.HasField("shape") and not o.type.tensor_type.shape.dim]
    return ([(i.name, dims(i)) for i in graph.input if i.name not in initializers],
            [(o.name, dims(o)) for o in graph.output], scalars)


#: the first bytes of files people hand over as "the model" that are not ONNX
ZIP_MAGIC = b"PK\x03\x04"  # TorchScript (torch.jit.save), ExportedProgram (.pt2), torch.save
PICKLE_MAGIC = b"\x80"  # a legacy torch.save checkpoint (a pickle)


def not_onnx_reason(path: str, detail: str) -> str:
    """What to tell a user whose model file onnx cannot read: a PyTorch file is named as one
    (the likeliest mix-up, with its two fixes); anything else is truncated or another format."""
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(ZIP_MAGIC) or head.startswith(PICKLE_MAGIC):
        return (f"{path} is a PyTorch file, not ONNX; export it with torch.onnx.export, or save it "
                "with torch.jit.save (.pt) or torch.export.save (.pt2) and set model.backend: torch")
    if not head:
        return f"{path} is empty, not an ONNX model; copy or export it again"
    return (f"{path} is not a readable ONNX model (truncated, or another format: {detail}); "
            "copy or export it again (torch.onnx.export)")


def _load_onnx(path: str, field: str) -> Any:
    """The parsed model, or a SpecError naming ``field``: a truncated or foreign file is the
    user's to fix, not a protobuf traceback. A file that parses into a graph with no inputs
    (protobuf reads many byte strings as an empty message) is no model either."""
    import onnx

    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and friends, all "unreadable"
        raise SpecError([(field, not_onnx_reason(path, type(exc).__name__))]) from None
    initializers = {i.name for i in model.graph.initializer}
    if not any(i.name not in initializers for i in model.graph.input):
        raise SpecError([(field, not_onnx_reason(path, "no graph inputs"))])
    return model


def _read_facts(path: str, field: str) -> dict[str, Any]:
    model = _load_onnx(path, field)
    first = read_first_input(model)
    inputs, outputs, scalars = read_io(model)
    return {"version": FACTS_VERSION, "first": asdict(first), "inputs": inputs, "outputs": outputs,
            "scalar_outputs": scalars, "output_types": read_output_types(model)}


def _cache_file(path: str) -> str:
    st = os.stat(path)
    # the inode changes when a file is replaced by a rename; mtime and ctime when written in place
    key = f"{os.path.abspath(path)}|{st.st_ino}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{FACTS_VERSION}"
    return str(cache_root() / "model-facts" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json")


def model_facts(path: str, field: str = "model.path") -> dict[str, Any]:
    """The facts of the ONNX file at ``path``: from the cache when the file is unchanged, else
    read (a model onnx cannot parse raises SpecError naming ``field``, and nothing is cached)."""
    cached = _cache_file(path)
    with contextlib.suppress(OSError, ValueError):
        facts = json.loads(Path(cached).read_text(encoding="utf-8"))
        if isinstance(facts, dict) and facts.get("version") == FACTS_VERSION:  # else read again
            return facts
    facts = _read_facts(path, field)
    with contextlib.suppress(OSError):  # a read-only cache only costs the next run the import
        Path(cached).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(cached, facts)
    return facts


def model_first_input(path: str) -> OnnxInput:
    """The model's first non-initializer input."""
    first = model_facts(path)["first"]
    return OnnxInput(str(first["name"]), list(first["dims"]), str(first["dtype"]))


def model_inputs(path: str, field: str = "model.path") -> list[tuple[str, Dims]]:
    """The model's inputs (initializers excluded) as (name, dims)."""
    return [(str(name), list(dims)) for name, dims in model_facts(path, field)["inputs"]]


def scalar_outputs(path: str) -> list[str]:
    """The model's outputs known to have no axes at all: one value per call, not per item."""
    return [str(name) for name in model_facts(path)["scalar_outputs"]]


#: element types ONNX Runtime cannot hand to numpy: bfloat16 and 4-bit types fail every call
#: ("No corresponding Numpy type"), and float8 comes back as its raw bytes in uint8, so an fp8
#: embedding would be written as codes 0..255 and read back as those numbers
UNREADABLE_TYPES = ("bfloat16", "int4", "uint4")
UNREADABLE_PREFIXES = ("float8", "float4")


def unreadable_outputs(path: str, field: str = "model.path") -> dict[str, str]:
    """The model's outputs (name -> element type) that reach numpy wrong or not at all."""
    types: dict[str, str] = model_facts(path, field)["output_types"]
    return {name: t for name, t in types.items() if t in UNREADABLE_TYPES or t.startswith(UNREADABLE_PREFIXES)}


def model_outputs(path: str) -> dict[str, Dims]:
    """Output name -> dims (None where dynamic), shape inference applied, weights unread."""
    return {str(name): list(dims) for name, dims in model_facts(path)["outputs"]}


def local_model_file(path: str, storage: dict[str, Any] | None, name: str) -> str:
    """The local file of a model path: a remote one fetched into the cache ``run`` loads it from
    (io.localized.localize, keyed by URI and version: fetched once for both), so that ``validate``
    checks the very file ``run`` loads. Remote models went unchecked, and a model ``run`` then
    could not use quarantined every input."""
    if not is_remote(path):
        return local_path(path)
    try:
        return localize(path, storage)
    except (InputError, OSError) as exc:
        raise SpecError([(name, f"{path} cannot be fetched: {exc}")]) from None
