"""Static facts about the supported data sets: class lists, ignore value, normalisation."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ADE20K_CLASSES",
    "CAMVID_CLASSES",
    "CITYSCAPES_CLASSES",
    "DATASET_NAMES",
    "IGNORE_INDEX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DatasetInfo",
    "dataset_info",
]

#: Label value that marks pixels excluded from the loss and from mIoU.
IGNORE_INDEX: int = 255

#: Per-channel RGB mean of ImageNet, for images scaled to [0, 1].
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
#: Per-channel RGB standard deviation of ImageNet, for images scaled to [0, 1].
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

#: Valid names for :func:`tokred.data.build_dataset` and :func:`dataset_info`.
DATASET_NAMES: tuple[str, ...] = ("camvid", "camvid_sample", "ade20k", "cityscapes")

CAMVID_CLASSES: tuple[str, ...] = (
    "Sky", "Building", "Pole", "Road", "Pavement", "Tree",
    "SignSymbol", "Fence", "Car", "Pedestrian", "Bicyclist",
)  # fmt: skip

CITYSCAPES_CLASSES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
    "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car",
    "truck", "bus", "train", "motorcycle", "bicycle",
)  # fmt: skip

# SceneParsing / ADEChallengeData2016 class order (label value k+1 -> train id k), short names.
ADE20K_CLASSES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane",
    "grass", "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant",
    "curtain", "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror",
    "rug", "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp",
    "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator",
    "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow", "screen door",
    "stairway", "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower",
    "book", "hill", "bench", "countertop", "stove", "palm", "kitchen island", "computer",
    "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light",
    "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman",
    "bottle", "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt",
    "canopy", "washer", "plaything", "swimming pool", "stool", "barrel", "basket",
    "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen",
    "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan",
    "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator",
    "glass", "clock", "flag",
)  # fmt: skip


@dataclass(frozen=True)
class DatasetInfo:
    """Description of a data set's label space.

    Attributes:
        name: Registry name of the data set (one of ``DATASET_NAMES``).
        num_classes: Number of evaluated classes; train ids are ``0 .. num_classes - 1``.
        ignore_index: Label value of pixels excluded from loss and metrics.
        class_names: Human-readable class names, indexed by train id.
    """

    name: str
    num_classes: int
    ignore_index: int = IGNORE_INDEX
    class_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        """Checks that the class list matches ``num_classes``.

        Raises:
            ValueError: If ``class_names`` is non-empty and its length differs from
                ``num_classes``, or if ``ignore_index`` collides with a class id.
        """
        if self.class_names and len(self.class_names) != self.num_classes:
            raise ValueError(
                f"DatasetInfo {self.name!r}: {len(self.class_names)} class names given "
                f"for num_classes={self.num_classes}"
            )
        if 0 <= self.ignore_index < self.num_classes:
            raise ValueError(
                f"DatasetInfo {self.name!r}: ignore_index={self.ignore_index} is a valid "
                f"class id (0..{self.num_classes - 1})"
            )


_INFOS: dict[str, DatasetInfo] = {
    "camvid": DatasetInfo("camvid", len(CAMVID_CLASSES), IGNORE_INDEX, CAMVID_CLASSES),
    "camvid_sample": DatasetInfo(
        "camvid_sample", len(CAMVID_CLASSES), IGNORE_INDEX, CAMVID_CLASSES
    ),
    "ade20k": DatasetInfo("ade20k", len(ADE20K_CLASSES), IGNORE_INDEX, ADE20K_CLASSES),
    "cityscapes": DatasetInfo(
        "cityscapes", len(CITYSCAPES_CLASSES), IGNORE_INDEX, CITYSCAPES_CLASSES
    ),
}


def check_name(name: str) -> str:
    """Normalises and validates a data set name.

    Args:
        name: Data set name, case-insensitive.

    Returns:
        The lower-case name.

    Raises:
        ValueError: If the name is not one of ``DATASET_NAMES``; the message lists them.
    """
    key = str(name).strip().lower()
    if key not in _INFOS:
        raise ValueError(
            f"unknown dataset {name!r}; valid names are: {', '.join(DATASET_NAMES)}"
        )
    return key


def dataset_info(name: str) -> DatasetInfo:
    """Returns the label-space description of a data set.

    Args:
        name: One of ``DATASET_NAMES`` (case-insensitive).

    Returns:
        The data set's :class:`DatasetInfo`.

    Raises:
        ValueError: If the name is unknown; the message lists the valid names.
    """
    return _INFOS[check_name(name)]
