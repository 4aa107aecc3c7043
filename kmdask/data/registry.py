"""The data sets kmdask knows by checksum: their IDX file names, shapes, and the md5/sha256 of
the **decompressed** bytes (the gz wrappers in circulation differ, the contents do not)."""

from __future__ import annotations

from dataclasses import dataclass

from kmdask.data.idx import IMAGE_SIDE
from kmdask.errors import ConfigError

N_FEATURES = IMAGE_SIDE * IMAGE_SIDE
SPLITS = ("train", "test")


@dataclass(frozen=True)
class FileSpec:
    """One IDX file of a data set: name (without .gz), split, kind and expected content."""

    name: str
    split: str  # "train" | "test"
    kind: str  # "images" | "labels"
    shape: tuple[int, ...]
    md5: str
    sha256: str


@dataclass(frozen=True)
class DatasetSpec:
    """A data set: its IDX files, images and labels per split (train, and usually test)."""

    name: str
    files: tuple[FileSpec, ...]
    classes: tuple[str, ...] | None = None  # what label i means, where it is not the digit i

    def file(self, split: str, kind: str) -> FileSpec:
        for f in self.files:
            if f.split == split and f.kind == kind:
                return f
        raise KeyError((split, kind))

    def n_rows(self, split: str) -> int:
        return self.file(split, "images").shape[0]

    @property
    def splits(self) -> tuple[str, ...]:
        """The splits it has, in :data:`SPLITS` order."""
        return tuple(s for s in SPLITS if any(f.split == s for f in self.files))

    @property
    def image_shape(self) -> tuple[int, int]:
        """(height, width) of its images."""
        h, w = self.file("train", "images").shape[1:]
        return int(h), int(w)


def _idx_files(train: tuple[str, str, str, str], test: tuple[str, str, str, str],
               n_train: int = 60000, n_test: int = 10000) -> tuple[FileSpec, ...]:
    """The four standard MNIST-layout files from (images md5, sha256, labels md5, sha256)."""
    img = (IMAGE_SIDE, IMAGE_SIDE)
    return (
        FileSpec("train-images-idx3-ubyte", "train", "images", (n_train, *img), *train[:2]),
        FileSpec("train-labels-idx1-ubyte", "train", "labels", (n_train,), *train[2:]),
        FileSpec("t10k-images-idx3-ubyte", "test", "images", (n_test, *img), *test[:2]),
        FileSpec("t10k-labels-idx1-ubyte", "test", "labels", (n_test,), *test[2:]),
    )


# Fashion-MNIST's label names, in label order (zalandoresearch/fashion-mnist README)
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot")

REGISTRY: dict[str, DatasetSpec] = {
    # the canonical decompressed MNIST files (checked against their published checksums)
    "mnist": DatasetSpec("mnist", _idx_files(
        ("6bbc9ace898e44ae57da46a324031adb",
         "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
         "a25bea736e30d166cdddb491f175f624",
         "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"),
        ("2646ac647ad5339dbf082846283269ea",
         "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
         "27ae3e4e09519cfbb04c329615203637",
         "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"),
    )),
    # computed from Debian's dataset-fashion-mnist (0.0~git20200523), the upstream files
    "fashion-mnist": DatasetSpec("fashion-mnist", _idx_files(
        ("f4a8712d7a061bf5bd6d2ca38dc4d50a",
         "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
         "9018921c3c673c538a1fc5bad174d6f9",
         "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
        ("8181f5470baa50b63fa0f6fddb340f0a",
         "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
         "15d484375f8d13e6eb1aabb0c3f46965",
         "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
    ), classes=FASHION_CLASSES),
}


def class_names(dataset: str | None) -> list[str] | None:
    """The names of a known data set's classes (None: its labels are digits, or unknown)."""
    spec = REGISTRY.get(dataset or "")
    return None if spec is None or spec.classes is None else list(spec.classes)


def get_spec(dataset: str) -> DatasetSpec:
    """The registry entry for ``dataset``; unknown names are a :class:`ConfigError`."""
    try:
        return REGISTRY[dataset]
    except KeyError:
        known = ", ".join(sorted(REGISTRY))
        raise ConfigError(f"unknown dataset {dataset!r} (known: {known})") from None
