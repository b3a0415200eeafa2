"""``output:``, ``modules_to_save:`` and ``random_seed:`` as fields of mergekit's own
``MergeConfiguration``.

mergekit's configuration model ignores unknown keys, so ``output: model`` vanished whenever a
recipe went through it without its raw text (``mergekit-multi``, Python's ``run_merge`` without
``config_source``). Adding the field once, when ``mergekit.config`` is imported, makes the key
survive ``model_validate``, ``model_dump`` and ``to_yaml`` for every caller. Its default is
None, so a recipe without it validates, dumps (``to_yaml`` drops defaults) and merges exactly
as before. Imports only pydantic and typing: it runs inside mergekit's import.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import StrictInt

OUTPUT_KINDS = ("adapter", "model")
OUTPUT_ANNOTATION = Optional[Literal["adapter", "model"]]  # noqa: UP045 (pydantic, py3.9 safe)


MODULES_TO_SAVE_ANNOTATION = Optional[list[str]]  # noqa: UP045
RANDOM_SEED_ANNOTATION = Optional[StrictInt]  # noqa: UP045

FIELDS = {
    "output": OUTPUT_ANNOTATION,
    "modules_to_save": MODULES_TO_SAVE_ANNOTATION,
    "random_seed": RANDOM_SEED_ANNOTATION,
}


def add_output_field(model: Any) -> None:
    """Give a pydantic v2 model class (mergekit's MergeConfiguration) the optional fields
    ``output``, ``modules_to_save`` (full checkpoints with ``output: adapter``) and
    ``random_seed`` (read for our methods only; ``--random-seed`` wins), default None
    (idempotent)."""
    from pydantic.fields import FieldInfo

    missing = {k: v for k, v in FIELDS.items() if k not in model.__pydantic_fields__}
    if not missing:
        return
    for name, annotation in missing.items():
        model.__annotations__[name] = annotation
        model.__pydantic_fields__[name] = FieldInfo.from_annotated_attribute(annotation, None)
    model.model_rebuild(force=True)


def output_of(merge_config: Any, config_source: str | None = None) -> str | None:
    """The recipe's ``output:`` (None when not set): from a MergeConfiguration (with the field
    above), a recipe dict, or else the raw YAML ``config_source``."""
    if isinstance(merge_config, dict):
        value = merge_config.get("output")
    else:
        value = getattr(merge_config, "output", None)
    if value is None and config_source:
        import yaml

        try:
            raw = yaml.safe_load(config_source)
        except yaml.YAMLError:
            raw = None
        if isinstance(raw, dict):
            value = raw.get("output")
    return value
