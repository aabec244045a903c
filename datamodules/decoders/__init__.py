"""Per-kind byte decoders behind `datamodules.decode.SampleDecoder`: media files and feature arrays."""
