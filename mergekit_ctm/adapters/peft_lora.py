"""Read PEFT LoRA adapters: adapter_config.json and safetensors headers, no tensor data.

Layout contract (docs/architecture.md): every LoRA module is described in the layout of the
BASE weight it updates, ΔW = s · B @ A with A (r × m_in), B (n_out × r), so that ΔW has the
shape of the base weight (nn.Linear: out × in; GPT-2 Conv1D with fan_in_fan_out: in × out;
nn.Embedding: num_embeddings × dim). `loading.load_factors` returns factors in that layout.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from mergekit_ctm.adapters.errors import AdapterError

PEFT_PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
# Files fetched from the hub: the adapter and nothing of the base model.
HUB_ALLOW_PATTERNS = (CONFIG_NAME, SAFETENSORS_NAME, BIN_NAME, "README.md")

# safetensors header dtype names -> bytes per element
DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
    "C64": 8,
}
_TORCH_TO_ST = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
}

# LoRA factors are real matrices: only these safetensors dtypes are read as factors.
FACTOR_DTYPES = ("F16", "BF16", "F32", "F64")

_LORA_SUFFIXES = {
    ".lora_A.weight": ("linear", "A"),
    ".lora_B.weight": ("linear", "B"),
    ".lora_embedding_A": ("embedding", "A"),
    ".lora_embedding_B": ("embedding", "B"),
}

# Config fields whose non-default value changes what ΔW means: we refuse them by name.
_UNSUPPORTED_FIELDS: dict[str, tuple[Any, str]] = {
    "use_dora": (False, "DoRA (its magnitude vector makes ΔW more than B @ A)"),
    "lora_bias": (False, "LoRA with a lora_B bias (ΔW is more than B @ A)"),
    "target_parameters": (None, "LoRA on nn.Parameter (target_parameters)"),
    "layer_replication": (None, "layer_replication (it renames the base model's layers)"),
    "trainable_token_indices": (None, "TrainableTokens (trainable_token_indices)"),
    "alora_invocation_tokens": (None, "activated LoRA (alora_invocation_tokens)"),
    "use_bdlora": (None, "block-diagonal LoRA (use_bdlora)"),
    "use_qalora": (False, "QA-LoRA (use_qalora)"),
}


def stores_transposed(module: Any) -> bool:
    """PEFT stores the factors of Conv1D (fan_in_fan_out) and Embedding LoRAs swapped and
    transposed relative to the base weight's layout ΔW = B @ A."""
    return module.kind == "embedding" or bool(getattr(module, "fan_in_fan_out", False))


def swap_layout(a: Any, b: Any, transposed: bool) -> tuple[Any, Any]:
    """(A, B) <-> PEFT's stored (lora_A, lora_B): (Bᵀ, Aᵀ) when ``transposed``, else as is.
    Its own inverse, so reading and writing use the same call."""
    return (b.T, a.T) if transposed else (a, b)


class FrozenMap(Mapping):
    """Immutable, hashable, ordered mapping (mergekit Task fields must hash by value)."""

    __slots__ = ("_d", "_h")

    def __init__(self, items: Mapping | Any = ()):
        self._d = dict(items)
        self._h: int | None = None

    def __getitem__(self, key):
        return self._d[key]

    def __iter__(self) -> Iterator:
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)

    def __hash__(self) -> int:
        if self._h is None:
            self._h = hash(tuple(self._d.items()))
        return self._h

    def __eq__(self, other) -> bool:
        if isinstance(other, FrozenMap):
            return self._d == other._d
        return NotImplemented

    def __repr__(self) -> str:
        return f"FrozenMap({self._d!r})"


@dataclass(frozen=True)
class LoraModule:
    """One LoRA module, described in the base weight's layout: ΔW = scaling · B @ A.

    name: base-model module path without PEFT's prefix (`model.layers.0.self_attn.q_proj`).
    n_out × m_in: shape of ΔW (= shape of the base weight `weight_name`).
    key_A / key_B: tensor names as stored in the adapter file (PEFT's own layout).
    """

    name: str
    kind: Literal["linear", "embedding"]
    r: int
    alpha: float
    use_rslora: bool
    n_out: int
    m_in: int
    fan_in_fan_out: bool
    key_A: str
    key_B: str
    file: str
    dtype: str  # safetensors dtype name of the stored factors ("F32", "BF16", ...)

    @property
    def scaling(self) -> float:
        """s = alpha / r, or alpha / √r with rsLoRA (PEFT's LoraLayer.update_layer)."""
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r

    @property
    def weight_name(self) -> str:
        """Base-model tensor that ΔW updates."""
        return f"{self.name}.weight"

    @property
    def delta_shape(self) -> tuple[int, int]:
        return (self.n_out, self.m_in)

    @property
    def estimated_bytes(self) -> int:
        """Bytes of both factors as stored: r · (n_out + m_in) · itemsize."""
        return self.r * (self.n_out + self.m_in) * DTYPE_BYTES.get(self.dtype, 4)


@dataclass(frozen=True)
class FullTensor:
    """A non-LoRA tensor saved in the adapter: a full replacement of a base tensor.

    role: "modules_to_save" (fully trained module), "bias" (bias="all"/"lora_only"), or
    "embedding_layer" (PEFT's save_embedding_layers copy of a resized embedding).
    """

    key: str
    weight_name: str
    role: Literal["modules_to_save", "bias", "embedding_layer"]
    shape: tuple[int, ...]
    dtype: str
    file: str


@dataclass(frozen=True)
class AdapterInfo:
    """Everything known about one LoRA adapter without reading tensor data.

    modules: module name -> LoraModule. full_tensors: adapter key -> FullTensor.
    config_json: the adapter_config.json as read (canonical JSON; `.config` parses it).
    base_ref: the base part of mergekit's `base+adapter` form, if given that way.
    """

    ref: str
    path: str
    base_model_name_or_path: str | None
    task_type: str | None
    r: int
    lora_alpha: float
    use_rslora: bool
    fan_in_fan_out: bool
    bias: str
    target_modules: tuple[str, ...] | str | None
    modules_to_save: tuple[str, ...]
    modules: FrozenMap
    full_tensors: FrozenMap
    files: tuple[str, ...]
    config_json: str = field(repr=False)
    base_ref: str | None = None

    @property
    def config(self) -> dict[str, Any]:
        return json.loads(self.config_json)

    @property
    def modules_to_save_tensors(self) -> dict[str, str]:
        """Adapter key -> base tensor name, for modules_to_save (full trained modules)."""
        return {
            k: t.weight_name for k, t in self.full_tensors.items() if t.role == "modules_to_save"
        }

    @property
    def bias_tensors(self) -> dict[str, str]:
        """Adapter key -> base tensor name, for biases saved by bias="all"/"lora_only"."""
        return {k: t.weight_name for k, t in self.full_tensors.items() if t.role == "bias"}

    @property
    def embedding_layer_tensors(self) -> dict[str, str]:
        """Adapter key -> base tensor name, for full embeddings PEFT saved beside the LoRA."""
        return {
            k: t.weight_name for k, t in self.full_tensors.items() if t.role == "embedding_layer"
        }

    def module(self, name: str) -> LoraModule:
        """The LoRA module `name`, or an AdapterError listing a few that exist."""
        try:
            return self.modules[name]
        except KeyError:
            some = ", ".join(list(self.modules)[:5])
            raise AdapterError(
                f"adapter {self.ref!r} has no LoRA module {name!r}; it has {len(self.modules)} "
                f"modules, e.g. {some}. Use base-model module paths without 'base_model.model.'."
            ) from None

    def estimated_bytes(self, module: str | None = None) -> int:
        """Stored bytes of one module's factors, or of all modules when `module` is None."""
        if module is not None:
            return self.module(module).estimated_bytes
        return sum(m.estimated_bytes for m in self.modules.values())

    def __str__(self) -> str:
        return self.ref


# --------------------------------------------------------------------------- locating files


def _ref_parts(ref: Any) -> tuple[str, str | None, str | None, str | None]:
    """(ref string, adapter path, revision, base_ref) of a str, Path, ModelPath, ModelReference."""
    from mergekit.common import ModelPath, ModelReference

    if isinstance(ref, os.PathLike):
        ref = os.fspath(ref)
    if isinstance(ref, str):
        # A local directory may legitimately contain '+' or '@': take it as is.
        if os.path.isdir(ref):
            return ref, ref, None, None
        try:
            ref = ModelReference.parse(ref)
        except Exception as e:
            raise AdapterError(
                f"cannot parse adapter reference {ref!r}: {e}. Use a local adapter directory, "
                "a hub id (owner/name[@revision]) or 'base+adapter'."
            ) from e
    if isinstance(ref, ModelPath):
        return str(ref), ref.path, ref.revision, None
    if isinstance(ref, ModelReference):
        if ref.lora is not None:
            return str(ref), ref.lora.path, ref.lora.revision, str(ref.model)
        return str(ref), ref.model.path, ref.model.revision, None
    raise AdapterError(f"unsupported adapter reference type {type(ref).__name__}: {ref!r}")


def resolve_adapter_path(ref: Any, *, cache_dir: str | None = None) -> tuple[str, str, str | None]:
    """(ref string, local adapter directory, base_ref). Downloads hub ids (adapter files only)."""
    ref_str, path, revision, base_ref = _ref_parts(ref)
    if os.path.isdir(path):
        return ref_str, os.path.abspath(path), base_ref
    if os.path.exists(path):
        raise AdapterError(
            f"adapter {ref_str!r}: {path!r} is a file; pass the adapter directory that holds "
            f"{CONFIG_NAME} and {SAFETENSORS_NAME}."
        )
    # 'adapters/x' has a hub id's shape, but when 'adapters/' is a local folder it is a path.
    local_parent = os.path.isdir(path.split("/", 1)[0])
    if path.startswith((".", "/", "~")) or path.count("/") != 1 or local_parent:
        raise AdapterError(
            f"adapter {ref_str!r}: directory {path!r} does not exist (and it is not a hub id "
            "owner/name). Check the path."
        )
    try:
        import huggingface_hub

        local = huggingface_hub.snapshot_download(
            path,
            revision=revision,
            cache_dir=cache_dir,
            allow_patterns=list(HUB_ALLOW_PATTERNS),
        )
    except Exception as e:
        reason = (str(e).strip().splitlines() or [""])[0]
        raise AdapterError(
            f"adapter {ref_str!r}: not a local directory, and downloading it from the Hugging "
            f"Face hub failed ({type(e).__name__}: {reason}). Check the id and your network, "
            "or pass a local adapter directory."
        ) from e
    return ref_str, local, base_ref


# --------------------------------------------------------------------------- headers


def _valid_entry(meta: Any) -> bool:
    """A header entry as safetensors writes it: known dtype, int shape, ordered offsets."""
    if not isinstance(meta, dict) or meta.get("dtype") not in DTYPE_BYTES:
        return False
    shape, offsets = meta.get("shape"), meta.get("data_offsets")
    ints = (
        isinstance(shape, list)
        and isinstance(offsets, list)
        and len(offsets) == 2
        and all(type(v) is int and v >= 0 for v in [*shape, *offsets])
    )
    if not ints or offsets[0] > offsets[1]:
        return False
    return offsets[1] - offsets[0] == math.prod(shape) * DTYPE_BYTES[meta["dtype"]]


def read_safetensors_header(path: str, *, what: str = "") -> dict[str, dict[str, Any]]:
    """Tensor key -> {"dtype", "shape", "start", "nbytes"} from a safetensors header (no tensor
    data read); ``start`` is the absolute byte offset of the tensor's data in the file."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError("file shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8 or n > 100_000_000:
                raise ValueError(f"header length {n} exceeds the file size {size}")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        raise AdapterError(
            f"{what}{path}: not a readable safetensors file ({e}). Re-save the adapter with "
            "PeftModel.save_pretrained."
        ) from e
    if not isinstance(header, dict):
        raise AdapterError(
            f"{what}{path}: the safetensors header is not a JSON object. Re-save the adapter "
            "with PeftModel.save_pretrained."
        )
    out: dict[str, dict[str, Any]] = {}
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        if not _valid_entry(meta):
            raise AdapterError(
                f"{what}{path}: tensor {key!r} has a malformed safetensors header entry "
                f"({str(meta)[:80]}); the file is corrupt. Save or download the adapter again."
            )
        begin, end = meta["data_offsets"]
        if 8 + n + end > size:
            raise AdapterError(
                f"{what}{path}: tensor {key!r} extends past the end of the file (truncated "
                "download?). Download or save the adapter again."
            )
        out[key] = {
            "dtype": meta["dtype"],
            "shape": tuple(meta["shape"]),
            "start": 8 + n + begin,
            "nbytes": end - begin,
        }
    return out


def _read_bin_header(path: str, *, what: str = "") -> dict[str, dict[str, Any]]:
    import torch

    try:
        sd = torch.load(path, map_location="meta", weights_only=True)
    except Exception as e:
        raise AdapterError(f"{what}{path}: cannot read the PyTorch checkpoint ({e}).") from e
    if "state_dict" in sd:
        sd = sd["state_dict"]
    return {
        k: {
            "dtype": _TORCH_TO_ST.get(name := str(v.dtype).removeprefix("torch."), name),
            "shape": tuple(v.shape),
        }
        for k, v in sd.items()
    }


def _weights_file(path: str, what: str) -> str:
    for name in (SAFETENSORS_NAME, BIN_NAME):
        if os.path.isfile(os.path.join(path, name)):
            return name
    present = sorted(os.listdir(path))[:10]
    raise AdapterError(
        f"{what}no {SAFETENSORS_NAME} (or {BIN_NAME}) in {path} (found: {present}). Save the "
        "adapter with PeftModel.save_pretrained, or point at the directory that has it."
    )


# --------------------------------------------------------------------------- config


def _load_config(path: str, what: str) -> dict[str, Any]:
    cfg_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(cfg_path):
        raise AdapterError(
            f"{what}no {CONFIG_NAME} in {path}. A PEFT adapter directory needs it; save the "
            "adapter with PeftModel.save_pretrained."
        )
    try:
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise AdapterError(f"{what}{cfg_path} is not valid JSON ({e}). Fix or re-save it.") from e
    if not isinstance(cfg, dict):
        raise AdapterError(f"{what}{cfg_path} must hold a JSON object, got {type(cfg).__name__}.")
    return cfg


def _check_config(cfg: dict[str, Any], what: str) -> Any:
    """Validate the config as PEFT does (LoraConfig) and refuse unsupported variants."""
    peft_type = str(cfg.get("peft_type", "")).upper()
    if peft_type != "LORA":
        found = cfg.get("peft_type", "no peft_type field")
        raise AdapterError(
            f"{what}peft_type {found!r} is not supported yet: only LoRA adapters "
            "(peft_type LORA) can be merged. VeRA, LoHa, LoKr, IA3, AdaLoRA, ... are not."
        )
    for name, (default, desc) in _UNSUPPORTED_FIELDS.items():
        value = cfg.get(name, default)
        if value not in (default, None, False, [], {}):
            raise AdapterError(
                f"{what}{desc} is not supported yet (found {name}={value!r} in {CONFIG_NAME}). "
                "Only plain LoRA adapters can be merged."
            )
    from peft import LoraConfig

    known = {f.name for f in fields(LoraConfig) if f.init}
    kwargs = {k: v for k, v in cfg.items() if k in known}
    for k in ("peft_type", "runtime_config"):
        kwargs.pop(k, None)
    try:
        return LoraConfig(**kwargs)
    except Exception as e:
        raise AdapterError(f"{what}{CONFIG_NAME} is not a valid LoraConfig: {e}") from e


def _check_rank_alpha(lcfg: Any, what: str) -> None:
    """r and rank_pattern ranks are positive integers, lora_alpha and alpha_pattern values
    positive finite numbers. PEFT's LoraConfig takes anything (r: 2.5, lora_alpha: 0): a zero
    alpha makes every ΔW zero, a negative one flips it, a float rank is truncated."""
    fix = f"set it in {CONFIG_NAME} to the value the adapter was trained with"

    def rank(name: str, value: Any) -> None:
        if type(value) is not int or value <= 0:
            raise AdapterError(
                f"{what}{name} is {value!r}; a LoRA rank must be a positive integer: {fix}."
            )

    def alpha(name: str, value: Any) -> None:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or not math.isfinite(value) or value <= 0:
            why = " (scaling = lora_alpha / r would make every ΔW zero)" if value == 0 else ""
            raise AdapterError(
                f"{what}{name} is {value!r}{why}; lora_alpha must be a positive finite "
                f"number: {fix}."
            )

    rank("r", lcfg.r)
    for key, value in (lcfg.rank_pattern or {}).items():
        rank(f"rank_pattern[{key!r}]", value)
    alpha("lora_alpha", lcfg.lora_alpha)
    for key, value in (lcfg.alpha_pattern or {}).items():
        alpha(f"alpha_pattern[{key!r}]", value)


def resolve_rank_alpha(
    name: str, r: int, lora_alpha: float, rank_pattern: Mapping, alpha_pattern: Mapping
) -> tuple[int, float]:
    """Per-module (r, alpha) exactly as PEFT's LoraModel._create_and_replace resolves them."""
    from peft.utils.other import get_pattern_key

    r_key = get_pattern_key(list(rank_pattern.keys()), name)
    a_key = get_pattern_key(list(alpha_pattern.keys()), name)
    return int(rank_pattern.get(r_key, r)), alpha_pattern.get(a_key, lora_alpha)


def _matches_modules_to_save(name: str, modules_to_save: tuple[str, ...]) -> bool:
    # Same pattern PEFT uses to keep LoRA off modules_to_save (check_target_module_exists).
    return any(re.match(rf"(^|.*\.){m}($|\..*)", name) for m in modules_to_save)


# --------------------------------------------------------------------------- read


def _split_keys(
    header: Mapping[str, Any], fname: str, what: str
) -> tuple[dict[str, dict[str, tuple[str, str]]], list[str]]:
    """(module -> {"A"/"B": (key, kind)}, other keys) from a weights file's tensor names."""
    halves: dict[str, dict[str, tuple[str, str]]] = {}
    others: list[str] = []
    for key in header:
        if not key.startswith(PEFT_PREFIX):
            raise AdapterError(
                f"{what}tensor {key!r} in {fname} lacks PEFT's {PEFT_PREFIX!r} prefix. Save the "
                "adapter with PeftModel.save_pretrained (a raw state_dict is not an adapter)."
            )
        for suffix, (kind, half) in _LORA_SUFFIXES.items():
            if key.endswith(suffix):
                mod = key[len(PEFT_PREFIX) : -len(suffix)]
                halves.setdefault(mod, {})[half] = (key, kind)
                break
        else:
            if ".lora_magnitude_vector" in key:
                raise AdapterError(
                    f"{what}module {key[len(PEFT_PREFIX) :].split('.lora_')[0]!r} has a DoRA "
                    f"magnitude vector ({key}); DoRA is not supported yet."
                )
            if ".lora_" in key:
                raise AdapterError(
                    f"{what}tensor {key!r} is a LoRA variant this reader does not support yet "
                    "(expected lora_A.weight / lora_B.weight / lora_embedding_A / _B)."
                )
            others.append(key)
    return halves, others


def _lora_module(
    mod: str,
    h: Mapping[str, tuple[str, str]],
    header: Mapping[str, Any],
    lcfg: Any,
    fname: str,
    what: str,
) -> LoraModule:
    """One module's LoraModule from its two factor headers and the config (checked)."""
    for need in ("A", "B"):
        if need not in h:
            have = next(iter(h.values()))[0]
            raise AdapterError(
                f"{what}module {mod!r} has {have} but no lora_{need} tensor in {fname}. The "
                "adapter file is incomplete; save it again."
            )
    (key_a, kind_a), (key_b, kind_b) = h["A"], h["B"]
    for key in (key_a, key_b):
        if header[key]["dtype"] not in FACTOR_DTYPES:
            raise AdapterError(
                f"{what}module {mod!r}: tensor {key!r} has dtype {header[key]['dtype']}; "
                f"LoRA factors must be floating point ({', '.join(FACTOR_DTYPES)}). The "
                "adapter file is corrupt or was not saved by PEFT; save it again with "
                "PeftModel.save_pretrained."
            )
    if kind_a != kind_b:
        raise AdapterError(
            f"{what}module {mod!r} mixes {key_a} and {key_b}; save the adapter again."
        )
    sa, sb = header[key_a]["shape"], header[key_b]["shape"]
    if len(sa) != 2 or len(sb) != 2:
        raise AdapterError(
            f"{what}module {mod!r} has {len(sa)}-D LoRA weights {sa} / {sb} (convolution "
            "LoRA); conv LoRA is not supported yet, only Linear / Conv1D / Embedding."
        )
    r_a, r_b = sa[0], sb[1]
    if r_a != r_b:
        raise AdapterError(
            f"{what}module {mod!r}: lora_A {sa} has rank {r_a} but lora_B {sb} has rank "
            f"{r_b}; A must be (r × in) and B (out × r). The adapter file is corrupt."
        )
    rank_pattern = dict(lcfg.rank_pattern or {})
    alpha_pattern = dict(lcfg.alpha_pattern or {})
    r, alpha = resolve_rank_alpha(mod, lcfg.r, lcfg.lora_alpha, rank_pattern, alpha_pattern)
    if r != r_a:
        src = "rank_pattern" if rank_pattern and r != lcfg.r else "r"
        raise AdapterError(
            f"{what}module {mod!r}: {CONFIG_NAME} gives rank {r} ({src}) but the stored "
            f"lora_A {sa} / lora_B {sb} have rank {r_a}. Fix r / rank_pattern in "
            f"{CONFIG_NAME} to match the saved weights."
        )
    if kind_a == "embedding":
        # PEFT: ΔW = (B_e @ A_e)ᵀ s, A_e (r × num_embeddings), B_e (dim × r)
        n_out, m_in, fifo = sa[1], sb[0], False
    elif lcfg.fan_in_fan_out:
        # Conv1D weight is (in × out): ΔW = (B @ A)ᵀ s
        n_out, m_in, fifo = sa[1], sb[0], True
    else:
        n_out, m_in, fifo = sb[0], sa[1], False
    return LoraModule(
        name=mod,
        kind=kind_a,
        r=r,
        alpha=float(alpha),
        use_rslora=bool(lcfg.use_rslora),
        n_out=int(n_out),
        m_in=int(m_in),
        fan_in_fan_out=fifo,
        key_A=key_a,
        key_B=key_b,
        file=fname,
        dtype=header[key_a]["dtype"],
    )


def _full_tensor(
    key: str,
    header: Mapping[str, Any],
    modules: Mapping[str, LoraModule],
    lcfg: Any,
    fname: str,
    what: str,
) -> FullTensor:
    """A non-LoRA tensor: a resized embedding copy, a modules_to_save tensor or a bias."""
    modules_to_save = tuple(lcfg.modules_to_save or ())
    name = key[len(PEFT_PREFIX) :]
    base_name = name.replace(".base_layer.", ".")
    owner = base_name.rsplit(".", 1)[0]
    if owner in modules and modules[owner].kind == "embedding" and name.endswith(".weight"):
        role = "embedding_layer"
    elif modules_to_save and _matches_modules_to_save(base_name, modules_to_save):
        role = "modules_to_save"
    elif lcfg.bias != "none" and name.endswith(".bias"):
        role = "bias"
    else:
        raise AdapterError(
            f"{what}tensor {key!r} is neither a LoRA factor, a modules_to_save tensor "
            f"(modules_to_save={list(modules_to_save)}) nor a saved bias (bias="
            f"{lcfg.bias!r}). Fix modules_to_save / bias in {CONFIG_NAME}."
        )
    meta = header[key]
    return FullTensor(
        key=key,
        weight_name=base_name,
        role=role,
        shape=tuple(int(s) for s in meta["shape"]),
        dtype=meta["dtype"],
        file=fname,
    )


def read_adapter(ref: Any, *, cache_dir: str | None = None) -> AdapterInfo:
    """Read one PEFT LoRA adapter's config and tensor headers (no tensor data).

    ref: local adapter directory, hub id (`owner/name[@rev]`, adapter files only are fetched),
    or mergekit's `base+adapter` (`ModelReference` with `.lora`): the adapter is the lora part
    and is never merged into the base.
    """
    ref_str, path, base_ref = resolve_adapter_path(ref, cache_dir=cache_dir)
    what = f"adapter {ref_str!r}: "
    cfg = _load_config(path, what)
    lcfg = _check_config(cfg, what)
    _check_rank_alpha(lcfg, what)

    fname = _weights_file(path, what)
    fpath = os.path.join(path, fname)
    if fname.endswith(".safetensors"):
        header = read_safetensors_header(fpath, what=what)
    else:
        header = _read_bin_header(fpath, what=what)

    halves, others = _split_keys(header, fname, what)
    modules = {
        mod: _lora_module(mod, halves[mod], header, lcfg, fname, what)
        for mod in sorted(halves, key=_natural_key)
    }
    if not modules:
        raise AdapterError(
            f"{what}{fname} holds no LoRA weights (lora_A / lora_B). Is this a LoRA adapter "
            "saved with PeftModel.save_pretrained?"
        )
    full = {
        key: _full_tensor(key, header, modules, lcfg, fname, what)
        for key in sorted(others, key=_natural_key)
    }

    tm = lcfg.target_modules
    target_modules = tm if isinstance(tm, str) or tm is None else tuple(sorted(tm))
    return AdapterInfo(
        ref=ref_str,
        path=path,
        base_model_name_or_path=cfg.get("base_model_name_or_path"),
        task_type=cfg.get("task_type"),
        r=int(lcfg.r),
        lora_alpha=float(lcfg.lora_alpha),
        use_rslora=bool(lcfg.use_rslora),
        fan_in_fan_out=bool(lcfg.fan_in_fan_out),
        bias=str(lcfg.bias),
        target_modules=target_modules,
        modules_to_save=tuple(lcfg.modules_to_save or ()),
        modules=FrozenMap(modules),
        full_tensors=FrozenMap(full),
        files=(fname,),
        config_json=json.dumps(cfg, sort_keys=True),
        base_ref=base_ref,
    )


def check_against_base(info: AdapterInfo, base_shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Check every ΔW against the base weight's shape (base tensor name -> shape).

    Catches adapters made for another base model, and a wrong `fan_in_fan_out`.
    """
    for mod in info.modules.values():
        shape = base_shapes.get(mod.weight_name)
        if shape is None:
            raise AdapterError(
                f"adapter {info.ref!r}: module {mod.name!r} has no base weight "
                f"{mod.weight_name!r}. Was the adapter trained on another base model "
                f"(adapter says {info.base_model_name_or_path!r})?"
            )
        if tuple(shape) != mod.delta_shape:
            hint = " Use the base model the adapter was trained on."
            if tuple(shape) == mod.delta_shape[::-1] and mod.kind == "linear":
                hint = f" Set fan_in_fan_out={not mod.fan_in_fan_out} in {CONFIG_NAME}."
            raise AdapterError(
                f"adapter {info.ref!r}: module {mod.name!r} gives ΔW of shape {mod.delta_shape} "
                f"but base weight {mod.weight_name!r} is {tuple(shape)}.{hint}"
            )
    for t in info.full_tensors.values():
        shape = base_shapes.get(t.weight_name)
        if shape is not None and tuple(shape) != t.shape:
            raise AdapterError(
                f"adapter {info.ref!r}: tensor {t.key!r} has shape {t.shape} but base tensor "
                f"{t.weight_name!r} is {tuple(shape)}. Use the base model the adapter was "
                "trained on."
            )


def _natural_key(s: str) -> list:
    # layers.2 before layers.10
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", s)]
