"""tokred: token reduction for ViT semantic segmentation on one shared Segmenter pipeline.

Library use without Hydra::

    import tokred
    seg = tokred.build_segmenter("vit_tiny", num_classes=11, crop_size=(384, 512), merger="tome",
                                 merger_kwargs={"r": 8})
    reducer = tokred.create_reducer("tome", r=8)
"""

__version__ = "0.1.0"

from tokred.encoder import Encoder, EmbedContext  # noqa: E402
from tokred.models import Segmenter, SegOutput, build_segmenter  # noqa: E402
from tokred.reducers import (  # noqa: E402
    BackboneInfo,
    Merger,
    Pruner,
    Reducer,
    available_reducers,
    create_reducer,
    register_reducer,
)
from tokred.state import AuxOutput, Bank, TokenState, merge_tokens  # noqa: E402

__all__ = [
    "AuxOutput", "BackboneInfo", "Bank", "EmbedContext", "Encoder", "Merger", "Pruner", "Reducer", "SegOutput",
    "Segmenter", "TokenState", "available_reducers", "build_segmenter", "create_reducer", "merge_tokens",
    "register_reducer", "__version__",
]
