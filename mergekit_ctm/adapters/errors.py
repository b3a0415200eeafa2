"""Error type of the adapters layer."""

from __future__ import annotations

from mergekit_ctm.errors import InputError


class AdapterError(InputError):
    """A PEFT adapter cannot be read, or is not supported.

    The message names the adapter (path or hub id), the module or field at fault, and the fix.
    Subclasses ValueError so pydantic validators turn it into a validation error with the field.
    """
