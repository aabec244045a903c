"""The modality registry keeps its promises: each stem's declared tensors are what its decode, its
placeholder and its examples produce, and each field names limits that exist."""

from __future__ import annotations

from dataclasses import fields

import pytest

from datamodules import demo
from datamodules.limits import DataLimits
from datamodules.m5product import eval_dataloader
from datamodules.shards import write_shards
from scale.config import ModelConfig
from scale.modalities import REGISTRY, batch_layout, build_modalities
from scale.modalities.spec import FileField, RecordField
from tests.conftest import tiny_config

STEMS = [(name, stem) for name, spec in REGISTRY.items() for stem in spec.stem_classes()]


def config_with(modality: str, stem: str) -> ModelConfig:
    config = tiny_config()
    section = getattr(config, modality)
    if hasattr(section, "stem"):
        section.stem = stem
    return config


@pytest.mark.parametrize("modality, stem", STEMS, ids=[f"{m}.{s}" for m, s in STEMS])
def test_placeholder_and_examples_are_the_declared_tensors(modality, stem):
    config = config_with(modality, stem)
    stem_class = REGISTRY[modality].stem_classes()[stem]
    declared = stem_class.tensors(getattr(config, modality))
    absent = stem_class.absent(getattr(config, modality))
    example = stem_class.example(getattr(config, modality), 3)
    assert list(absent) == list(example) == list(declared)
    for key, spec in declared.items():
        assert absent[key].shape == spec.shape and absent[key].dtype == spec.dtype, key
        assert (absent[key] == spec.fill).all(), key
        assert example[key].shape == (3, *spec.shape) and example[key].dtype == spec.dtype, key
    encoder = build_modalities(ModelConfig.from_dict({**config.to_dict(), "modalities": [modality]}))[modality]
    assert type(encoder) is stem_class and encoder.input_keys == tuple(declared)
    # What the device half hands the encoder is what `prepared_tensors` declares (float32 weights).
    prepared = encoder.prepare(example)
    for key, spec in stem_class.prepared_tensors(getattr(config, modality)).items():
        assert prepared[key].shape == (3, *spec.shape) and prepared[key].dtype == spec.dtype, key


def test_every_field_names_limits_that_exist():
    limits = {f.name for f in fields(DataLimits)}
    for spec in REGISTRY.values():
        assert spec.fields, spec.name
        for source in spec.fields:
            if isinstance(source, FileField):
                assert source.max_bytes in limits and source.members, source.name
                if source.derive is not None:
                    assert source.derive.source in {f.name for s in REGISTRY.values() for f in s.fields}
            else:
                assert isinstance(source, RecordField) and (source.max_chars is None or source.max_chars in limits)
        for stem in spec.stem_classes().values():
            assert set(stem.members()) <= {m for f in spec.fields if isinstance(f, FileField) for m in f.members}


@pytest.fixture(scope="module")
def feature_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("layout")
    demo.generate(root / "raw", 12, seed=3, missing={"video": 0.3, "audio": 0.3}, image_size=32, video_size=16,
                  video_seconds=1.0, fps=4, audio_seconds=0.5, features=True, region_dim=16,
                  video_feature_dim=12, mel_bins=8, mel_frames=40)  # fmt: skip
    write_shards(root / "raw", root / "shards")
    return root / "shards"


@pytest.mark.parametrize("stems", ["media", "features"])
def test_decoded_batches_have_exactly_the_declared_layout(demo_shards, feature_shards, stems):
    config = tiny_config()
    shards = demo_shards["eval"]
    if stems == "features":
        config.image.stem, config.image.max_regions, config.image.region_dim = "regions", 24, 16
        config.video.stem, config.video.feature_dim = "features", 12
        config.audio.stem, config.audio.feature_frames, config.audio.mel_bins = "features", 40, 8
        shards = feature_shards
    layout = batch_layout(config)
    absent_seen, present_seen = False, set()
    for batch in eval_dataloader(str(shards), config, batch_size=5):
        absent_seen |= any(not batch[modality]["present"].all() for modality in layout)
        present_seen |= {modality for modality in layout if batch[modality]["present"].any()}
        for modality, keys in layout.items():
            assert set(batch[modality]) == set(keys), modality
            for key, (shape, dtype) in keys.items():
                value = batch[modality][key]
                assert value.shape[1:] == shape and value.dtype == dtype, (modality, key, value.shape, value.dtype)
        assert not any(isinstance(v, dict) for k, v in batch.items() if k not in layout)
    assert absent_seen  # placeholders of absent modalities collate to the same layout
    assert present_seen == set(layout)  # and every stem decoded real samples to it
