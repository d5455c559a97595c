"""One run's library: config and errors, checks, the results store, provenance, the trainer, feature extraction,
tracking and distributed runs. Entry points (`python -m benchmark.<entry>`) sit above it; methods/ and
datamodules/ below."""
