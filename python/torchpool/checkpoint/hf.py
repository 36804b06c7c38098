"""Hugging Face transformers models, loaded lazily (transformers is imported only when used).

    model = torchpool.from_pretrained(AutoModelForCausalLM, "llama/", budget_bytes=1 << 30)
    out = model.generate(input_ids, max_new_tokens=20)

or, building the model yourself:

    config = AutoConfig.from_pretrained("llama/")
    with torchpool.init_empty_weights():              # parameters on meta, buffers real
        model = AutoModelForCausalLM.from_config(config)
    model = torchpool.load_lazily(model.eval(), "llama/")

Note [Transformers key rules]
-----------------------------
Rationale: a transformers checkpoint does not name the model's tensors one to one.  Tied weights
(``lm_head.weight`` = ``model.embed_tokens.weight``) are stored once; older checkpoints hold keys the
model no longer persists (BERT's ``embeddings.position_ids``, per-layer ``rotary_emb.inv_freq``,
GPT-2's ``attn.bias`` masks), which the class lists in ``_keys_to_ignore_on_load_unexpected``; some
keys may be missing by design (``_keys_to_ignore_on_load_missing``: BART's ``final_logits_bias``);
keys are renamed by the conversion mapping (``LayerNorm.gamma`` -> ``LayerNorm.weight``) and a
base-model checkpoint loads into a model with a head by adding or removing ``base_model_prefix``.
Approach: ``key_rules(model)`` asks the model and transformers for each of these (the expanded
``all_tied_weights_keys``, the two ignore lists plus the ``rotary_emb.inv_freq`` and ``position_ids``
patterns transformers adds itself, ``get_model_conversion_mapping`` and ``rename_source_key`` for the
renames and the prefix) and hands them to ``load_lazily`` / ``load_into`` as ``tied``,
``ignore_unexpected``, ``ignore_missing`` and ``key_map``.  A checkpoint key that needs one of
transformers' tensor conversions (fusing MoE experts, splitting fused projections, ...) is refused
with its name: those change bytes, and a lazy binding maps a checkpoint tensor to a model tensor as
stored.  Non-persistent buffers left on meta by a model built under ``torch.device("meta")`` are
rebuilt from the config (``fix_meta``: a second skeleton built under ``init_empty_weights()``, whose
buffers are copied by name), the values ``__init__`` and ``_init_weights`` compute for them.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch

from .lazy import _all_tensors, init_empty_weights, load_into, load_lazily

__all__ = ["from_pretrained", "key_rules"]


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ImportError("torchpool.from_pretrained needs the 'transformers' package: "
                          "python -m pip install transformers") from None
    return transformers


def key_rules(model) -> dict:
    """What ``load_lazily`` needs to know about a transformers model (Note [Transformers key rules])."""
    _transformers()
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, rename_source_key
    except ImportError:  # transformers < 5: no conversion mapping; names as stored, ties by identity
        get_model_conversion_mapping = rename_source_key = None
    transforms = get_model_conversion_mapping(model) if get_model_conversion_mapping is not None else []
    renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    expected = {k: True for k in model.state_dict(keep_vars=True)}
    prefix = getattr(model, "base_model_prefix", "") or None

    def key_map(ck_name: str) -> str:
        if rename_source_key is None:
            return ck_name
        new, conv = rename_source_key(ck_name, renamings, converters, prefix, expected)
        if conv is not None:
            raise NotImplementedError(
                f"torchpool: checkpoint tensor {ck_name!r} needs transformers' conversion {conv!r} "
                f"({type(model).__name__}) to become {new!r}; torchpool binds tensors as stored and does not "
                "convert them. Load this model with transformers' own from_pretrained.")
        return new

    tied = getattr(model, "all_tied_weights_keys", None)
    if tied is None and hasattr(model, "get_expanded_tied_weights_keys"):
        tied = model.get_expanded_tied_weights_keys(all_submodels=True)
    ignore_unexpected = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
    buffers = [n for n, _ in model.named_buffers()]
    if any(b.endswith("rotary_emb.inv_freq") for b in buffers):
        ignore_unexpected.add(r"rotary_emb\.inv_freq")
    if any(b.endswith("position_ids") for b in buffers):
        ignore_unexpected.add(r"(^|\.)position_ids$")
    ignore_missing = set(getattr(model, "_keys_to_ignore_on_load_missing", None) or ())
    return dict(key_map=key_map, tied=dict(tied or {}), ignore_unexpected=sorted(ignore_unexpected),
                ignore_missing=sorted(ignore_missing), fix_meta=_rebuild_buffers)


def _rebuild_buffers(model, names):
    """Non-persistent buffers on meta -> the values a skeleton built from the config holds."""
    cls = type(model)
    config = copy.deepcopy(model.config)
    with init_empty_weights(), torch.device("cpu"):
        fresh = cls._from_config(config, dtype=getattr(model.config, "dtype", None))
    ref = _all_tensors(fresh)
    for name in names:
        t = ref.get(name)
        mod_name, _, attr = name.rpartition(".")
        module = model.get_submodule(mod_name) if mod_name else model
        if t is None or attr not in module._buffers or t.device.type == "meta":
            continue
        if tuple(t.shape) != tuple(module._buffers[attr].shape):
            continue
        module._buffers[attr] = t.to(module._buffers[attr].dtype)


def _checkpoint_dtype(path):
    from .reader import open_checkpoint

    with open_checkpoint(path) as ck:
        for k in ck.keys():
            dt = ck.info(k).torch_dtype
            if dt is not None and dt.is_floating_point:
                return dt
    return None


def from_pretrained(model_class_or_auto_class, path, *, budget_bytes: int | None = None, dtype=None, device="cpu",
                    lazy: bool = True, strict: bool = True, **config_kwargs):
    """A transformers model for the checkpoint directory ``path`` (``config.json`` + safetensors
    shards), built without allocating its weights and bound lazily (``load_lazily``; with
    ``lazy=False`` read at once by ``load_into``). ``model_class_or_auto_class``: an ``Auto*`` class
    (``AutoModelForCausalLM``) or a model class (``LlamaForCausalLM``). ``dtype``: like
    transformers' default "auto" when None (the config's dtype, else the checkpoint's); checkpoint
    tensors are converted to it. ``config_kwargs`` go to the config (``attn_implementation`` too).
    The model is in eval mode; ``generation_config.json`` is read when present."""
    transformers = _transformers()
    path = Path(os.fspath(path))
    if not path.is_dir() or not (path / "config.json").exists():
        raise FileNotFoundError(f"torchpool.from_pretrained: {path} is not a directory with a config.json "
                                "(no model hub is contacted: pass a local checkpoint directory)")
    cls = model_class_or_auto_class
    attn = config_kwargs.pop("attn_implementation", None)
    is_auto = cls.__module__.startswith("transformers.models.auto")
    if is_auto:
        config = transformers.AutoConfig.from_pretrained(path, **config_kwargs)
    else:
        config = cls.config_class.from_pretrained(path, **config_kwargs)
    qc = getattr(config, "quantization_config", None)
    if qc is not None:
        method = qc.get("quant_method", "?") if isinstance(qc, dict) else getattr(qc, "quant_method", "?")
        raise NotImplementedError(
            f"torchpool.from_pretrained: {path / 'config.json'} describes a quantized checkpoint (quant_method "
            f"{method!r}); transformers' quantizers replace modules and convert weights while loading, which a lazy "
            "binding of stored tensors does not do. Load it with transformers' own from_pretrained.")
    if isinstance(dtype, str):
        dtype = None if dtype == "auto" else getattr(torch, dtype)
    if dtype is None:
        dtype = getattr(config, "dtype", None)
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        if dtype is None:
            dtype = _checkpoint_dtype(path) or torch.get_default_dtype()
    kwargs = dict(dtype=dtype)
    if attn is not None:
        kwargs["attn_implementation"] = attn
    with init_empty_weights(), torch.device("cpu"):
        model = cls.from_config(config, **kwargs) if is_auto else cls._from_config(config, **kwargs)
    model.eval()
    if model.can_generate() and (path / "generation_config.json").exists():
        model.generation_config = transformers.GenerationConfig.from_pretrained(path)
    device = torch.device(device)
    if lazy:
        load_lazily(model, path, device=device, budget_bytes=budget_bytes, dtype=dtype, strict=strict)
    else:
        load_into(model, path, device=device, dtype=dtype, strict=strict)
    if device.type != "cpu":  # buffers and declared-missing tensors were built on the CPU
        from .lazy import is_unloaded
        for mname, m in model.named_modules():
            for a, t in list(m._buffers.items()):
                if t is not None and not is_unloaded(t) and t.device != device:
                    m._buffers[a] = t.to(device)
            for a, t in list(m._parameters.items()):
                if t is not None and not is_unloaded(t) and t.device != device:
                    m._parameters[a] = torch.nn.Parameter(t.to(device), requires_grad=t.requires_grad)
    return model
