"""What a model author declares so that a model loads from, and saves to, its original single file.

A model folder's ``_weight_mapping.py`` builds one :class:`WeightMapper` from data and puts
it in the model's capabilities (``weight_mapping: WeightMapper = capability(MY_WEIGHTS)``):

- :class:`Rule` s, tried in order: key patterns on the original side and on the model's
  side (:class:`KeyPattern`: literal text with ``{name}`` placeholders, one dotted
  component each) and a :class:`Transform` between them — :data:`IDENTITY` (a rename,
  the default), :class:`Split` (one fused tensor ↔ several), :class:`Reorder` /
  :data:`SWAP_HALVES` (chunks in another order), :class:`Inverted` (any of them the other
  way round). Every rule runs both ways.
- :class:`WeightVariant` s: the :class:`Condition` s that recognise a variant from key
  names and shapes (:class:`Has`, :class:`Lacks`, :class:`DimIs`) and one
  :class:`ConfigReader` per config field (:class:`Dim`, :class:`BlockCount`,
  :class:`Present`, :class:`Const`, :class:`Derived`), so the config comes from the file's
  header alone. :class:`TensorSpec` is what readers and conditions see of a tensor.

``models/flux/_weight_mapping.py`` is a complete example.
"""

from diffcaps.weights._patterns import KeyPattern as KeyPattern
from diffcaps.weights._service import Rule as Rule, WeightMapper as WeightMapper
from diffcaps.weights._transforms import (
    IDENTITY as IDENTITY,
    SWAP_HALVES as SWAP_HALVES,
    Identity as Identity,
    Inverted as Inverted,
    Reorder as Reorder,
    Split as Split,
    Transform as Transform,
)
from diffcaps.weights._variants import (
    BlockCount as BlockCount,
    Condition as Condition,
    ConfigReader as ConfigReader,
    Const as Const,
    Derived as Derived,
    Dim as Dim,
    DimIs as DimIs,
    Has as Has,
    Lacks as Lacks,
    Present as Present,
    TensorSpec as TensorSpec,
    WeightVariant as WeightVariant,
)

__all__ = [
    "BlockCount",
    "Condition",
    "ConfigReader",
    "Const",
    "Derived",
    "Dim",
    "DimIs",
    "Has",
    "IDENTITY",
    "Identity",
    "Inverted",
    "KeyPattern",
    "Lacks",
    "Present",
    "Reorder",
    "Rule",
    "SWAP_HALVES",
    "Split",
    "TensorSpec",
    "Transform",
    "WeightMapper",
    "WeightVariant",
]
