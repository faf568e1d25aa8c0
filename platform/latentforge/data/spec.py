"""What a model and a checkpoint need to know about the data they were made for (no I/O)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DataSpec:
    """What a model needs to know about its data."""

    image_shape: tuple[int, int, int]  # (C, H, W)
    num_classes: int  # 0 for unlabeled data
    class_names: tuple[str, ...] = ()
    content_hash: str = ""

    @classmethod
    def from_dataset(cls, ds) -> "DataSpec":
        return cls(tuple(ds.image_shape), ds.num_classes, tuple(ds.class_names), ds.content_hash)

    @classmethod
    def from_json(cls, d: dict) -> "DataSpec":
        return cls(tuple(d["image_shape"]), int(d["num_classes"]), tuple(d.get("class_names", ())), d.get("content_hash", ""))

    def to_json(self) -> dict:
        return {"image_shape": list(self.image_shape), "num_classes": self.num_classes,
                "class_names": list(self.class_names), "content_hash": self.content_hash}
